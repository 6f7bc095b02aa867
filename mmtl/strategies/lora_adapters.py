"""LoRA adapters as files and merged weights: merge, save/load, the per-checkpoint ``adapter/`` folder and
``mmtl export`` of a LoRA checkpoint. The hooks of :class:`mmtl.strategies.lora.LoraStrategy` call these.

Folder layout (:mod:`mmtl.strategies.lora_peft`): a PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``, PEFT's names) + ``mmtl_adapter.json`` (mmtl's record: targets, modules, PEFT base,
fingerprints) + ``mmtl_extra.safetensors`` (the other trainable weights: heads, logit scale, SigLIP
``logit_bias``), so base model + folder is the whole trained model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mmtl.config import Pipeline, StrategyConfig
from mmtl.strategies.base import ExportError
from mmtl.strategies.lora import META_ATTR, apply, inject_lora
from mmtl.strategies.lora_peft import MMTL_EXTRA, read_extra, read_lora_tensors, read_meta, write_adapter_folder

# ---- merge / export ----------------------------------------------------------------------------------------
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``model`` into its base weights and put the base layers back (in place).

    Afterwards ``model`` has no PEFT layers, its outputs equal the adapted model's (up to float rounding) and its
    ``state_dict()`` keys are the base model's (loads strictly into ``build_model(cfg)``). Requires unpartitioned
    parameters (not a ZeRO-3-wrapped module). Returns ``model``.

    Raises:
        ValueError: a merge produced non-finite weights (broken adapter).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner_names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    outer = [n for n in tuner_names if not any(n.startswith(o + ".") for o in tuner_names if o != n)]
    for name in outer:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if hasattr(layer, "unload_and_optionally_merge_module"):  # nn.MultiheadAttention
            base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)
            base = layer.get_base_layer()
        setattr(parent, child, base)
    for m in model.modules():
        if "peft_config" in vars(m):
            del m.peft_config
    if META_ATTR in vars(model):
        delattr(model, META_ATTR)
    return model


def merged_state_dict(model_cfg, strategy: StrategyConfig, state_dict: dict[str, torch.Tensor],
                      zero_stage: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Map a LoRA model's state dict (PEFT key names, e.g. DeepSpeed's consolidated export) to the merged base
    model's: rebuilds ``build_model(model_cfg)``, applies ``strategy`` with ``zero_stage`` (same targets as in
    training), loads ``state_dict`` strictly, merges and returns the merged fp32 state dict. Keys outside the
    model (``logit_bias`` of the SigLIP loss) are passed through unchanged."""
    from mmtl.models import build_model

    model = build_model(model_cfg)
    apply(model, strategy, zero_stage)
    own = set(model.state_dict())
    extra = {k: v for k, v in state_dict.items() if k not in own}
    if set(extra) - {"logit_bias"}:
        raise ValueError(f"merged_state_dict: keys not in the LoRA model: {sorted(extra)[:8]}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=True)
    merge_lora(model)
    # clone: tied weights (a decoder's LM head = its word embeddings) must not share memory in safetensors
    out = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    out.update(extra)
    return out


# ---- adapters alone ------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA weights (``*lora_*`` keys, model-level names), detached CPU copies."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


def adapter_meta(model: nn.Module) -> dict[str, Any]:
    """The adapter record made by :func:`apply` (r, alpha, dropout, family, per tower targets + modules, PEFT
    base, base fingerprints)."""
    meta = getattr(model, META_ATTR, None)
    if not meta:
        raise ValueError("model has no mmtl LoRA adapters (apply strategy.kind=lora first)")
    return meta


def extra_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights besides LoRA (projection heads, ``logit_scale``), fp32 CPU copies, mmtl names."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()
            if p.requires_grad and "lora_" not in n}


def save_adapter(model: nn.Module, out_dir: str | Path, model_cfg=None) -> Path:
    """Save the adapters of ``model`` (after :func:`apply`) as a PEFT adapter folder
    (:mod:`mmtl.strategies.lora_peft`: ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's
    format, ``mmtl_adapter.json``, ``mmtl_extra.safetensors`` with the heads and logit scale). ``model_cfg``
    (``pipe.model``) only describes the base in ``base_model_name_or_path``. Returns the folder.

    Raises:
        ValueError: ``model`` has no LoRA adapters.
    """
    return write_adapter_folder(out_dir, adapter_state_dict(model), adapter_meta(model), extra_state_dict(model),
                                model_cfg)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Inject the adapters saved by :func:`save_adapter` (or a folder written before the PEFT format) into a
    fresh base ``model`` (same architecture and base weights) and load their weights; trainable set as after
    :func:`apply`. The heads / logit scale of ``mmtl_extra.safetensors`` are not loaded here
    (:func:`load_extra`). Returns ``model``.

    Raises:
        FileNotFoundError: missing files; ValueError: not an mmtl adapter, or weights not matching the model.
    """
    meta, peft_format = read_meta(adapter_dir)
    inject_lora(model, meta)
    expected = {k for k in model.state_dict() if "lora_" in k}
    prefixes = (meta.get("peft_base") or {}).get("prefixes")
    model.load_state_dict(read_lora_tensors(adapter_dir, expected, peft_format, prefixes), strict=False)
    return model


def load_extra(model: nn.Module, adapter_dir: str | Path) -> Optional[torch.Tensor]:
    """Load the folder's ``mmtl_extra.safetensors`` (heads, logit scale) into ``model``; returns the SigLIP
    ``logit_bias`` it holds (not a model parameter) or None.

    Raises:
        ExportError: no such file (an adapter folder from before heads were saved with it), or names that are
            not parameters of ``model``.
    """
    rest = read_extra(adapter_dir)
    if rest is None:
        raise ExportError(f"{adapter_dir} has no {MMTL_EXTRA} (nor trainable.safetensors): the heads and logit "
                          "scale are missing; export the run's final export/ folder instead, it is already merged")
    bias = rest.pop("logit_bias", None)
    unknown = sorted(set(rest) - set(dict(model.named_parameters())))
    if unknown:
        raise ExportError(f"{adapter_dir / MMTL_EXTRA} does not fit the model: unknown {unknown[:6]}")
    model.load_state_dict(rest, strict=False)
    return bias


# ---- the per-checkpoint adapter folder ------------------------------------------------------------------
def save_adapters(engine_module, out_dir: Path, zero_stage: int, model_cfg=None) -> Optional[Path]:
    """Write the LoRA adapters of the engine's model (``engine.module``, a ContrastiveModule, or the model
    itself) to ``out_dir`` as :func:`save_adapter` does, with ``mmtl_extra.safetensors`` holding the other
    trainable weights (projection heads, logit scale, and the SigLIP ``logit_bias`` of the wrapper), so that
    base model + this folder is the whole trained model (``mmtl export RUN --merge``). Every rank must call it
    (under ZeRO-3 the parameters are gathered); rank 0 writes and gets the folder back, other ranks get ``None``.

    Raises:
        ValueError: the model has no mmtl LoRA adapters.
    """
    import torch.distributed as dist

    model = getattr(engine_module, "model", engine_module)
    meta = adapter_meta(model)
    params = [p for p in engine_module.parameters() if p.requires_grad]

    def grab() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        lora = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}
        rest = extra_state_dict(model)
        bias = getattr(engine_module, "logit_bias", None)
        if bias is not None and engine_module is not model:
            rest["logit_bias"] = bias.detach().float().cpu().clone()
        return lora, rest

    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd, rest = grab()
    else:
        sd, rest = grab()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank != 0:
        return None
    return write_adapter_folder(out_dir, sd, meta, rest, model_cfg)


# ---- mmtl export from an adapter folder ------------------------------------------------------------------------
def _probe(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = model.image_size
    return {"images": torch.randn(2, 3, size, size, generator=g),
            **model.tokenize(["a probe caption for the export check", "another probe"])}


@torch.no_grad()
def probe_embeddings(model, probe: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings ``((2, D), (2, D))`` of ``model`` on a fixed probe batch (seeded random
    images, two captions): compares two versions of a model (adapted vs merged vs reloaded)."""
    probe = probe or _probe(model)
    img, txt = model.eval()(probe["images"], probe["input_ids"], probe["attention_mask"])
    return img.float(), txt.float()


def merged_from_adapter(pipe: Pipeline, adapter_dir: Path):
    """Base model + adapter folder -> (merged model, ``logit_bias`` or None, max |Δ| of the embeddings).

    Raises:
        ExportError: missing files, or merged outputs differ from the adapted ones (atol 1e-4).
    """
    from mmtl.models import build_model
    from mmtl.runtime import seed_everything

    if read_extra(adapter_dir) is None:
        raise ExportError(f"{adapter_dir} has no {MMTL_EXTRA} (nor trainable.safetensors): the heads and logit "
                          "scale are missing; export the run's final export/ folder instead, it is already merged")
    seed_everything(pipe.train.seed)  # as the workers do: random-init towers (tiny configs) get the same weights
    model = build_model(pipe.model)
    try:
        load_adapter(model, adapter_dir)
    except (ValueError, FileNotFoundError) as exc:
        raise ExportError(str(exc)) from exc
    bias = load_extra(model, adapter_dir)
    probe = _probe(model)
    before = probe_embeddings(model, probe)
    merge_lora(model)
    after = probe_embeddings(model, probe)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    if diff > 1e-4:
        raise ExportError(f"merged outputs differ from base + adapter by {diff:.2e} (> 1e-4): adapter is broken")
    return model, bias, diff


def export_from_adapter(pipe: Pipeline, adapter_dir: Path, out: Path, merge: bool) -> dict[str, Any]:
    """Write ``model.safetensors`` (merged, with ``merge``) or the adapter folder (without) + ``pipeline.yaml``
    into ``out``. Returns ``{"merged": bool, "max_abs_diff"?: float, "model"?: merged model}`` (the caller
    checks that the written folder reloads to the model's outputs and drops ``model``).

    Raises:
        ExportError: see :func:`merged_from_adapter`.
    """
    import shutil

    from safetensors.torch import save_file

    if not merge:
        shutil.copytree(adapter_dir, out / "adapter")
        (out / "pipeline.yaml").write_text(pipe.to_yaml())
        return {"merged": False}
    model, bias, diff = merged_from_adapter(pipe, adapter_dir)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if bias is not None:
        sd["logit_bias"] = bias
    save_file(sd, str(out / "model.safetensors"))
    (out / "pipeline.yaml").write_text(pipe.to_yaml())
    return {"merged": True, "max_abs_diff": diff, "model": model}
