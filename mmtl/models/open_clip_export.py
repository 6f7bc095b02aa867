"""The open_clip format of an export: ``open_clip_model.safetensors`` + ``open_clip_config.json``.

What open_clip 3.x reads (``open_clip/factory.py``):

* ``create_model_and_transforms("local-dir:EXPORT")`` reads ``EXPORT/open_clip_config.json`` (``model_cfg``:
  ``embed_dim``, ``vision_cfg``, ``text_cfg``, ...; ``preprocess_cfg``: ``size``, ``mean``, ``std``,
  ``interpolation``, ``resize_mode``, ``fill_color``), builds the model and loads the folder's preferred weights
  file, ``open_clip_model.safetensors`` before ``model.safetensors``, with ``strict=True``.
* ``create_model_and_transforms(ARCH, pretrained="EXPORT/open_clip_model.safetensors")`` does the same for a
  built-in architecture name (a config-only model can be registered first with ``open_clip.add_model_config``).

The weights file holds open_clip's own key names and shapes (``visual.*``, ``token_embedding.weight``,
``positional_embedding``, ``transformer.*``, ``ln_final.*``, ``text_projection``, custom-text ``text.*``) and a
0-dim ``logit_scale`` (mmtl keeps it as shape (1,) for DeepSpeed). A SigLIP loss's learned ``logit_bias`` is
kept (``model_cfg.init_logit_bias`` then makes open_clip build the parameter).

What open_clip cannot express is refused (:class:`OpenClipFormatError`, :func:`open_clip_blocker`): families
other than ``open_clip`` (timm / transformers towers with mmtl's pooling and heads, transformers CLIP), fusion
exports (``cross_attention``: the fusion module and task head), and non-Identity projection heads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_FILES = (OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG)

_WHY_FAMILY = {
    "two_tower": ("its towers are a timm image model and a transformers text model with mmtl's own pooling and "
                  "projection heads; open_clip would need an hf_model_name text tower it downloads and cannot "
                  "express the pooling/heads exactly"),
    "hf": ("its towers are transformers CLIPModel / SiglipModel modules; load the export with transformers "
           "(mmtl.models.hf_keys.to_hf_state_dict maps the keys)"),
}


class OpenClipFormatError(ValueError):
    """The export cannot be written in open_clip's format; the message says what open_clip cannot express."""


def open_clip_blocker(family: str, strategy_kind: str) -> Optional[str]:
    """Why a run of ``family`` trained with ``strategy_kind`` has no open_clip form, or ``None`` when it has one."""
    if family != "open_clip":
        why = _WHY_FAMILY.get(family, "it is not an open_clip-family model")
        return f"model.family={family!r}: {why}"
    if strategy_kind == "cross_attention":
        return ("strategy.kind='cross_attention': the export is a fusion model (frozen towers + gated "
                "cross-attention blocks + a task head); open_clip has no fusion module or task head")
    return None


def open_clip_model_cfg(model_cfg, with_logit_bias: Optional[float] = None) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of an mmtl ``model`` section (family ``open_clip``): the architecture's config
    (``model.arch``'s built-in one, or ``model.config``) without ``preprocess_cfg``; ``init_logit_bias`` only when
    ``with_logit_bias`` is given (then set to it), so the built model has a ``logit_bias`` exactly when the
    weights hold one."""
    from mmtl.models.open_clip_family import resolve_open_clip_config

    mc = resolve_open_clip_config(model_cfg)
    mc.pop("preprocess_cfg", None)
    mc.pop("init_logit_bias", None)
    mc["vision_cfg"].pop("timm_model_pretrained", None)
    if with_logit_bias is not None:
        mc["init_logit_bias"] = float(with_logit_bias)
    return mc


def open_clip_preprocess_cfg(model_cfg) -> dict[str, Any]:
    """open_clip ``preprocess_cfg`` equal to mmtl's eval transform of ``model_cfg`` (size, mean, std,
    interpolation, resize mode, fill colour; :func:`mmtl.models.open_clip_family.preprocess_of`)."""
    from mmtl.models.open_clip_family import preprocess_of, resolve_open_clip_config

    pp = preprocess_of(model_cfg, resolve_open_clip_config(model_cfg))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}


def open_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmtl export state dict (``image_tower.*``, ``text_tower.*``, ``logit_scale`` (1,), maybe ``logit_bias``)
    -> open_clip keys, fp32, contiguous, 0-dim ``logit_scale`` / ``logit_bias``.

    Raises:
        OpenClipFormatError: projection-head weights (open_clip-family heads are Identity, so a state dict with
            ``image_head.*`` / ``text_head.*`` is not one open_clip can express) or keys of no known part.
    """
    from mmtl.models.open_clip_family import to_open_clip_state_dict

    heads = sorted(k for k in state_dict if k.startswith(("image_head.", "text_head.")))
    if heads:
        raise OpenClipFormatError(f"open_clip format: projection heads {heads[:4]} on top of the towers cannot be "
                                  "expressed (open_clip's towers end in their own projection)")
    try:
        out = to_open_clip_state_dict(state_dict)
    except ValueError as exc:
        raise OpenClipFormatError(f"open_clip format: {exc}") from exc
    if "logit_bias" in state_dict:
        out["logit_bias"] = state_dict["logit_bias"].reshape(())
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def check_fits_open_clip(mc: dict[str, Any], sd: dict[str, torch.Tensor]) -> None:
    """Build open_clip's model of ``mc`` on the meta device (no memory; on CPU if an initialiser needs real
    values) and compare key names and shapes with ``sd`` exactly as a strict ``load_state_dict`` would.

    Raises:
        OpenClipFormatError: missing / unexpected keys or shape mismatches (listed).
    """
    import copy

    from mmtl.models.offline import open_clip_offline

    oc = open_clip_offline()
    cfg = copy.deepcopy(mc)
    custom = bool(cfg.pop("custom_text", False))
    if cfg["vision_cfg"].get("timm_model_name"):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    cls = oc.model.CustomTextCLIP if custom else oc.model.CLIP
    try:
        with torch.device("meta"):
            model = cls(**cfg)
    except (RuntimeError, NotImplementedError):  # an init that reads tensor values: build it for real
        model = cls(**cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = sorted(f"{k}: {have[k]} vs {want[k]}" for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or shapes:
        raise OpenClipFormatError(f"open_clip format: the weights do not fit open_clip's model: missing {missing[:6]}, "
                                  f"unexpected {unexpected[:6]}, shapes {shapes[:6]}")


def write_open_clip_format(export_dir: Path, pipe) -> list[str]:
    """Write :data:`OPEN_CLIP_WEIGHTS` + :data:`OPEN_CLIP_CONFIG` next to the mmtl export in ``export_dir``
    (which holds ``model.safetensors``) for ``pipe`` (the run's :class:`~mmtl.config.Pipeline`).

    ``open_clip_config.json`` = ``{"model_cfg", "preprocess_cfg", "mmtl": {arch, context_length}}`` (open_clip
    reads the first two). Returns the file names written.

    Raises:
        OpenClipFormatError: the run has no open_clip form (:func:`open_clip_blocker`) or its weights do not fit.
        FileNotFoundError: no ``model.safetensors``.
    """
    from safetensors.torch import load_file, save_file

    why = open_clip_blocker(pipe.model.family, pipe.strategy.kind)
    if why:
        raise OpenClipFormatError(f"no open_clip format for this run: {why}")
    export_dir = Path(export_dir)
    src = export_dir / "model.safetensors"
    if not src.exists():
        raise FileNotFoundError(f"{src} not found: the open_clip format is written from merged weights")
    sd = open_clip_state_dict(load_file(str(src)))
    bias = float(sd["logit_bias"]) if "logit_bias" in sd else None
    mc = open_clip_model_cfg(pipe.model, with_logit_bias=bias)
    check_fits_open_clip(mc, sd)
    save_file(sd, str(export_dir / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
    conf = {"model_cfg": mc, "preprocess_cfg": open_clip_preprocess_cfg(pipe.model),
            "mmtl": {"arch": pipe.model.arch, "context_length": pipe.model.context_length,
                     "note": "written by mmtl; open_clip reads model_cfg and preprocess_cfg"}}
    (export_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(conf, indent=2))
    return list(OPEN_CLIP_FILES)
