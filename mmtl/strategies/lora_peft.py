"""The LoRA adapter folder as a real PEFT adapter, plus mmtl's own state next to it.

Folder layout (``adapter/`` of every LoRA checkpoint and run, ``mmtl export --no-merge``):

* ``adapter_config.json``: PEFT's ``LoraConfig`` written by ``LoraConfig.save_pretrained`` (``peft_type: LORA``,
  ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` = a full-match regex of the adapted modules'
  names in the PEFT base model, ``base_model_name_or_path`` = a description of that base).
* ``adapter_model.safetensors``: the LoRA weights under PEFT's key names
  (``base_model.model.<module in the base>.lora_A.weight``, no adapter name), fp32.
* ``mmtl_adapter.json``: mmtl's record (``format: mmtl-lora``, ``version: 2``; r, alpha, dropout, family, ZeRO
  stage, per tower the requested targets and adapted module names, the PEFT base and its key prefixes, the
  base towers' fingerprints).
* ``mmtl_extra.safetensors``: the other trained weights (projection heads, ``logit_scale``, the SigLIP loss's
  ``logit_bias``), mmtl key names.

The PEFT base model (``peft.PeftModel.from_pretrained(BASE, adapter_dir)``), per family (:data:`PEFT_BASES`):

* ``open_clip``: open_clip's own ``CLIP`` / ``CustomTextCLIP`` with the run's base weights (what
  ``open_clip.create_model(ARCH, pretrained=model.weights)`` builds); mmtl names ``image_tower.X`` ->
  ``visual.X``, ``text_tower.X`` -> ``X``. Its heads are Identity, so base + adapter = the merged export.
* ``hf``: the transformers ``CLIPModel`` / ``SiglipModel`` of ``model.weights`` (a local dir); ``image_tower.X`` / ``text_tower.X``
  -> ``X``.
* otherwise (``two_tower``): mmtl's own ``MultimodalModel`` (``mmtl.models.build_model(pipe.model)``) with
  ``mmtl_extra.safetensors`` loaded (``load_state_dict(..., strict=False)``: the trained heads); names unchanged.

Folders written before this format (``adapter_config.json`` with ``format: mmtl-lora`` and mmtl key names,
``trainable.safetensors``) are still read by :func:`read_adapter`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MMTL_META = "mmtl_adapter.json"
MMTL_EXTRA = "mmtl_extra.safetensors"
OLD_EXTRA = "trainable.safetensors"  # adapter folders written before the PEFT format

PEFT_BASES: dict[str, dict[str, Any]] = {
    "open_clip": {"kind": "open_clip", "prefixes": {"image_tower.": "visual.", "text_tower.": ""},
                  "describe": "open_clip CLIP model (open_clip.create_model(arch or model_cfg, pretrained=base "
                              "weights)): {what}"},
    "hf": {"kind": "transformers", "prefixes": {"image_tower.": "", "text_tower.": ""},
           "describe": "transformers CLIPModel/SiglipModel (from_pretrained(model.weights)): {what}"},
}
MMTL_BASE: dict[str, Any] = {"kind": "mmtl", "prefixes": {"": ""},
                             "describe": "mmtl MultimodalModel (mmtl.models.build_model(pipe.model)) with "
                                         "mmtl_extra.safetensors loaded: {what}"}


def peft_base(family: str) -> dict[str, Any]:
    """``{"kind", "prefixes"}``: which object is the PEFT base for ``family`` and how mmtl's module names map to
    its names (module docstring)."""
    b = PEFT_BASES.get(family, MMTL_BASE)
    return {"kind": b["kind"], "prefixes": dict(b["prefixes"])}


def to_base_name(name: str, prefixes: dict[str, str]) -> str:
    """An mmtl module or parameter name -> the PEFT base model's (first matching prefix replaced).

    Raises:
        ValueError: no prefix matches.
    """
    for old, new in prefixes.items():
        if name.startswith(old):
            return new + name[len(old):]
    raise ValueError(f"{name!r} is under none of the PEFT base prefixes {list(prefixes)}")


def peft_key(mmtl_key: str, prefixes: dict[str, str], adapter_name: str = "default") -> str:
    """An mmtl LoRA state-dict key (``image_tower.….lora_A.default.weight``) -> PEFT's saved key
    (``base_model.model.visual.….lora_A.weight``), as ``get_peft_model_state_dict`` names it."""
    return "base_model.model." + to_base_name(mmtl_key.replace(f".{adapter_name}", ""), prefixes)


def _base_description(meta: dict[str, Any], model_cfg=None) -> str:
    b = PEFT_BASES.get(meta.get("family", ""), MMTL_BASE)
    what = "towers as in the run's pipeline.yaml"
    if model_cfg is not None and meta.get("family") in ("open_clip", "hf"):
        what = (f"arch={model_cfg.arch}" if model_cfg.arch else "model.config") + \
               (f", weights={model_cfg.weights}" if model_cfg.weights else ", random init")
    return b["describe"].format(what=f"{meta.get('family')} {what}")


def peft_lora_config(meta: dict[str, Any], model_cfg=None):
    """PEFT ``LoraConfig`` of an mmtl adapter ``meta`` (:data:`META_ATTR` dict): one config for both towers,
    ``target_modules`` a full-match regex of the adapted modules' names in the PEFT base."""
    from peft import LoraConfig

    prefixes = meta["peft_base"]["prefixes"]
    tower_attr = {"image": "image_tower", "text": "text_tower"}
    names = [to_base_name(f"{tower_attr[w]}.{m}", prefixes) for w, spec in meta["towers"].items()
             for m in spec["modules"]]
    cfg = LoraConfig(r=int(meta["r"]), lora_alpha=meta["alpha"], lora_dropout=float(meta["dropout"]),
                     target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$", bias="none",
                     base_model_name_or_path=_base_description(meta, model_cfg), inference_mode=True)
    if meta["peft_base"]["kind"] == PEFT_BASES["open_clip"]["kind"]:  # as PeftModel.save_pretrained records a non-transformers base
        cfg.auto_mapping = {"base_model_class": "CustomTextCLIP" if any(
            n.startswith("text.") for n in names) else "CLIP", "parent_library": "open_clip.model"}
    return cfg


def write_adapter_folder(out_dir: str | Path, lora: dict[str, torch.Tensor], meta: dict[str, Any],
                         extra: Optional[dict[str, torch.Tensor]] = None, model_cfg=None) -> Path:
    """Write the folder of the module docstring: ``lora`` (mmtl keys) under PEFT names with PEFT's config,
    ``meta`` as :data:`MMTL_META`, ``extra`` (mmtl keys) as :data:`MMTL_EXTRA`. Returns the folder.

    Raises:
        ValueError: ``lora`` is empty.
    """
    from safetensors.torch import save_file

    if not lora:
        raise ValueError("no LoRA weights to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "version": 2, "peft_base": meta.get("peft_base") or peft_base(meta.get("family", ""))}
    prefixes = meta["peft_base"]["prefixes"]
    peft_sd = {peft_key(k, prefixes): v.detach().float().cpu().contiguous() for k, v in lora.items()}
    save_file(peft_sd, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    peft_lora_config(meta, model_cfg).save_pretrained(str(out))
    (out / MMTL_META).write_text(json.dumps(meta, indent=1))
    if extra:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in extra.items()}, str(out / MMTL_EXTRA))
    return out


def read_meta(d: str | Path) -> tuple[dict[str, Any], bool]:
    """(mmtl adapter meta, is_peft_format) of an adapter folder: :data:`MMTL_META` (PEFT keys), or an
    older ``adapter_config.json`` with ``format: mmtl-lora`` (mmtl keys).

    Raises:
        FileNotFoundError: missing files; ValueError: not an mmtl adapter (e.g. a PEFT adapter from elsewhere).
    """
    from mmtl.strategies.lora import FORMAT

    d = Path(d)
    if (d / MMTL_META).exists():
        meta = json.loads((d / MMTL_META).read_text())
        if not (d / PEFT_WEIGHTS).exists():
            raise FileNotFoundError(f"{d / PEFT_WEIGHTS} not found: incomplete adapter folder")
        return meta, True
    if not (d / PEFT_CONFIG).exists() or not (d / PEFT_WEIGHTS).exists():
        raise FileNotFoundError(f"{d} has no {MMTL_META} / {PEFT_CONFIG} + {PEFT_WEIGHTS}: not an mmtl LoRA "
                                "adapter folder")
    meta = json.loads((d / PEFT_CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d} is not an mmtl LoRA adapter ({d / PEFT_CONFIG} has no format {FORMAT!r} and there "
                         f"is no {MMTL_META}); a PEFT adapter from elsewhere loads with "
                         "peft.PeftModel.from_pretrained(base, folder)")
    return meta, False


def read_lora_tensors(d: str | Path, expected: set[str], peft_format: bool,
                      prefixes: Optional[dict[str, str]] = None) -> dict[str, torch.Tensor]:
    """The folder's LoRA weights under mmtl keys; ``expected`` = the ``lora_*`` keys of the injected model.

    Raises:
        ValueError: the weights do not match ``expected`` (missing / unexpected keys listed).
    """
    from safetensors.torch import load_file

    path = Path(d) / PEFT_WEIGHTS
    raw = load_file(str(path))
    if peft_format:
        back = {peft_key(k, prefixes or {"": ""}): k for k in expected}
        tensors = {back.get(k, k): v for k, v in raw.items()}
    else:
        tensors = raw
    if set(tensors) != expected:
        raise ValueError(f"{path} does not fit the model: missing {sorted(expected - set(tensors))[:6]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:6]}")
    return tensors


def read_extra(d: str | Path) -> Optional[dict[str, torch.Tensor]]:
    """:data:`MMTL_EXTRA` of an adapter folder (or the ``trainable.safetensors`` of folders written before the
    PEFT format), or ``None``."""
    from safetensors.torch import load_file

    for name in (MMTL_EXTRA, OLD_EXTRA):
        if (Path(d) / name).exists():
            return load_file(str(Path(d) / name))
    return None
