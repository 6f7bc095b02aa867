"""LoRA adapters as files and merged weights: merge, save/load, the per-checkpoint ``adapter/`` folder and
``mmtl export`` of a LoRA checkpoint. The hooks of :class:`mmtl.strategies.lora.LoraStrategy` call these.

Folder layout: ``adapter_model.safetensors`` (the ``lora_*`` weights, model-level names, fp32) +
``adapter_config.json`` (r, alpha, dropout, family, per tower the requested targets and adapted modules) +
``trainable.safetensors`` in checkpoints (the other trainable weights: heads, logit scale, SigLIP
``logit_bias``), so base model + folder is the whole trained model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mmtl.config import Pipeline, StrategyConfig
from mmtl.strategies.base import ExportError
from mmtl.strategies.lora import ADAPTER_FILE, CONFIG_FILE, FORMAT, META_ATTR, apply, inject_lora

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
    out = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out.update(extra)
    return out


# ---- adapters alone ------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA weights (``*lora_*`` keys, model-level names), detached CPU copies."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


def adapter_meta(model: nn.Module) -> dict[str, Any]:
    """The adapter config recorded by :func:`apply` (r, alpha, dropout, per tower targets + modules)."""
    meta = getattr(model, META_ATTR, None)
    if not meta:
        raise ValueError("model has no mmtl LoRA adapters (apply strategy.kind=lora first)")
    return meta


def write_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``adapter_model.safetensors`` (``tensors``) + ``adapter_config.json`` (``meta``) into ``out_dir``."""
    from safetensors.torch import save_file

    if not tensors:
        raise ValueError("no LoRA weights to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / ADAPTER_FILE),
              metadata={"format": FORMAT})
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    return out


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Save the adapters of ``model`` (after :func:`apply`): ``adapter_model.safetensors`` with the
    ``lora_*`` weights and ``adapter_config.json`` with r, alpha, dropout, family and per tower the
    requested targets and the adapted module names. Returns the folder.

    Raises:
        ValueError: ``model`` has no LoRA adapters.
    """
    return write_adapter(out_dir, adapter_state_dict(model), adapter_meta(model))


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Inject the adapters saved by :func:`save_adapter` into a fresh base ``model`` (same architecture and
    base weights) and load their weights; trainable set as after :func:`apply`. Returns ``model``.

    Raises:
        FileNotFoundError: missing files; ValueError: not an mmtl adapter, or weights not matching the model.
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    for f in (ADAPTER_FILE, CONFIG_FILE):
        if not (d / f).exists():
            raise FileNotFoundError(f"{d / f} not found: not an mmtl LoRA adapter folder")
    meta = json.loads((d / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d / CONFIG_FILE}: format {meta.get('format')!r} is not {FORMAT!r}")
    inject_lora(model, meta)
    tensors = load_file(str(d / ADAPTER_FILE))
    expected = {k for k in model.state_dict() if "lora_" in k}
    if set(tensors) != expected:
        raise ValueError(f"{d / ADAPTER_FILE} does not fit the model: missing {sorted(expected - set(tensors))[:6]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:6]}")
    model.load_state_dict(tensors, strict=False)
    return model


# ---- the per-checkpoint adapter folder ------------------------------------------------------------------
TRAINABLE_FILE = "trainable.safetensors"


def save_adapters(engine_module, out_dir: Path, zero_stage: int) -> Optional[Path]:
    """Write the LoRA adapters of the engine's model (``engine.module``, a ContrastiveModule, or the model
    itself) to ``out_dir`` as :func:`save_adapter` does (``adapter_model.safetensors`` in
    fp32 + ``adapter_config.json``), plus :data:`TRAINABLE_FILE`: the other trainable weights (projection
    heads, logit scale, and the SigLIP ``logit_bias`` of the wrapper), so that base model + this folder is the
    whole trained model (``mmtl export RUN --merge``). Every rank must call it (under ZeRO-3 the parameters are
    gathered); rank 0 writes and gets the folder back, other ranks get ``None``.

    Raises:
        ValueError: the model has no mmtl LoRA adapters.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    model = getattr(engine_module, "model", engine_module)
    meta = adapter_meta(model)
    params = [p for p in engine_module.parameters() if p.requires_grad]

    def grab() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        lora = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}
        rest = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()
                if p.requires_grad and "lora_" not in n}
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
    out = write_adapter(out_dir, sd, meta)
    save_file({k: v.contiguous() for k, v in rest.items()}, str(out / TRAINABLE_FILE))
    return out


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
    from safetensors.torch import load_file

    from mmtl.models import build_model
    from mmtl.runtime import seed_everything

    if not (adapter_dir / TRAINABLE_FILE).exists():
        raise ExportError(f"{adapter_dir} has no {TRAINABLE_FILE} (written by mmtl >= 0.2); export the run's final "
                          "export/ folder instead, it is already merged")
    seed_everything(pipe.train.seed)  # as the workers do: random-init towers (tiny configs) get the same weights
    model = build_model(pipe.model)
    load_adapter(model, adapter_dir)
    rest = load_file(str(adapter_dir / TRAINABLE_FILE))
    bias = rest.pop("logit_bias", None)
    own = dict(model.named_parameters())
    unknown = sorted(set(rest) - set(own))
    if unknown:
        raise ExportError(f"{adapter_dir / TRAINABLE_FILE} does not fit the model: unknown {unknown[:6]}")
    model.load_state_dict(rest, strict=False)
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
