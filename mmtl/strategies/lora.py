"""``lora``: PEFT LoRA adapters injected into the image and/or text tower; heads and logit scale trainable.

Supports:
  * ``strategy.lora.towers``: ``image``, ``text`` or both; a tower not listed is fully frozen.
  * ``r``, ``alpha`` (scaling ``alpha / r``), ``dropout`` (on the LoRA input, training mode only).
  * ``image_targets`` / ``text_targets``: module names in the tower, matched as PEFT does (the full dotted name,
    or its ending after a ``.``: ``c_fc`` matches ``transformer.resblocks.0.mlp.c_fc``), or ``re:<regex>``
    (full match on the dotted name). ``null`` takes the family default, asked from the model's family
    (``lora_default_targets``, :class:`mmtl.models.family.LoraDefaults`): candidate groups, first match wins.
    two_tower: image (timm) 1x1 pointwise convs ``conv_pw`` / ``conv_pwl`` and every ``nn.Linear``; text BERT-like
    ``query``, ``key``, ``value``, ``attention.output.dense`` (else ``q_proj/k_proj/v_proj/out_proj``, else
    DistilBERT ``q_lin/k_lin/v_lin/out_lin``). open_clip: MLP ``c_fc``, ``c_proj`` and the attention ``attn``
    (``nn.MultiheadAttention``, only when ``train.zero_stage < 3``), else the timm rule. hf: ``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj``. A model without a family or a family without defaults needs explicit
    targets.

  * Adapted layer types: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (``groups == 1``), ``nn.Embedding``,
    ``nn.MultiheadAttention`` (same q/k/v width; its ``out_proj`` is adapted with it), transformers ``Conv1D``.
  * Trainable: exactly the ``lora_*`` parameters, ``image_head``, ``text_head`` and ``logit_scale``; every
    tower weight (tower-internal projections of open_clip / hf included) stays frozen.
  * :func:`merge_lora` folds the adapters into the base weights and removes the PEFT layers (the state dict
    then has the base model's key names: it loads into ``build_model(cfg)`` without PEFT);
    :func:`merged_state_dict` does the same for a state dict (e.g. the consolidated DeepSpeed export);
    :func:`adapter_state_dict` / :func:`save_adapter` / :func:`load_adapter` handle the adapters alone
    (``adapter_model.safetensors`` + ``adapter_config.json``).

Limits:
  * LoRA on ``nn.MultiheadAttention`` (open_clip ``attn``) re-creates the base parameters on every forward:
    ZeRO-3 fails at engine init, so :func:`apply` raises ``ValueError`` for it when ``zero_stage == 3`` (the
    default targets then leave ``attn`` out). Under ZeRO-2 checkpoints must be saved with
    ``exclude_frozen_parameters=True`` and loaded with ``load_module_strict=False`` (mmtl does both).
  * Grouped / depthwise convs (``conv_dw``) are refused (PEFT needs ``r`` divisible by ``groups`` and cannot
    merge them); targeting the ``out_proj`` of an ``nn.MultiheadAttention`` alone is refused (its forward never
    calls it: target the attention module). One adapter per tower (no multi-adapter switching), no DoRA.
  * The zero stage is only known when the caller passes it (``apply_strategy(..., zero_stage=...)``); with
    ``None`` it is assumed to be below 3.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from mmtl.config import LoraConfig as MmtlLoraConfig
from mmtl.config import StrategyConfig

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "mmtl-lora"
META_ATTR = "mmtl_lora"  # plain dict attribute set on the model by apply(): r, alpha, dropout, modules per tower
_TOWERS = {"image": "image_tower", "text": "text_tower"}

_POINTWISE = ("conv_pw", "conv_pwl")


# ---- target resolution ----------------------------------------------------------------------------------
def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def _unsupported_reason(mod: nn.Module) -> Optional[str]:
    """None when PEFT LoRA can adapt (and merge) ``mod``, else why not."""
    if isinstance(mod, nn.MultiheadAttention):
        return None if mod._qkv_same_embed_dim else "nn.MultiheadAttention with different q/k/v widths"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None if mod.groups == 1 else f"grouped/depthwise conv (groups={mod.groups}) cannot be merged"
    if isinstance(mod, (nn.Linear, nn.Embedding)) or type(mod).__name__ == "Conv1D":
        return None
    return f"{type(mod).__name__} is not a Linear/Conv/Embedding/MultiheadAttention layer"


def _mha_out_projs(tower: nn.Module) -> set[str]:
    return {f"{n}.out_proj" for n, m in tower.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _resolve(tower: nn.Module, targets: Iterable[str], field: str, strict: bool) -> list[str]:
    """Dotted names of the modules of ``tower`` matched by ``targets`` (in module order).

    ``strict`` (user-given targets): a target matching nothing, an unsupported layer type or a lone
    MultiheadAttention ``out_proj`` is a ValueError naming ``field``; otherwise such matches are skipped.
    """
    targets = list(targets)
    mods = [(n, m) for n, m in tower.named_modules() if n]
    out_projs = _mha_out_projs(tower)
    chosen: list[str] = []
    for t in targets:
        hits = [(n, m) for n, m in mods if _matches(n, t)]
        if not hits and strict:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in mods if _unsupported_reason(m) is None})
            raise ValueError(f"{field}: target {t!r} matches no module of the tower "
                             f"(adaptable layer names: {leaves[:20]}{' ...' if len(leaves) > 20 else ''})")
        for n, m in hits:
            why = _unsupported_reason(m)
            if why is None and n in out_projs:
                why = ("the out_proj of an nn.MultiheadAttention is never called by its forward; "
                       "target the attention module itself")
            if why is not None:
                if strict:
                    raise ValueError(f"{field}: target {t!r} matches {n!r}: {why}")
                continue
            if n not in chosen:
                chosen.append(n)
    # modules inside a targeted MultiheadAttention are adapted with it
    mha = [n for n in chosen if isinstance(tower.get_submodule(n), nn.MultiheadAttention)]
    chosen = [n for n in chosen if not any(n.startswith(a + ".") for a in mha)]
    order = {n: i for i, (n, _) in enumerate(mods)}
    return sorted(chosen, key=order.__getitem__)


def _family(model) -> str:
    """The registered family name of ``model`` (:func:`mmtl.models.registry.find_family`), else ``"unknown"``."""
    from mmtl.models.registry import find_family

    fam = find_family(model)
    return fam.name if fam is not None else "unknown"


def _timm_default(tower: nn.Module) -> list[str]:
    out = []
    for n, m in tower.named_modules():
        if not n or _unsupported_reason(m) is not None:
            continue
        leaf = n.rsplit(".", 1)[-1]
        if (isinstance(m, nn.Conv2d) and leaf in _POINTWISE and m.kernel_size == (1, 1)) or isinstance(m, nn.Linear):
            out.append(n)
    return out


def default_targets(model, which: str, zero_stage: Optional[int] = None) -> tuple[list[str], str]:
    """(resolved module names, description) of the default LoRA targets of ``which`` tower: the first of the
    family's candidate groups (``lora_default_targets``) that matches adaptable modules; the group
    ``POINTWISE_AND_LINEAR`` is the timm rule (module docstring).

    Raises:
        ValueError: nothing adaptable found, or the model has no family with default targets (set
            ``strategy.lora.<which>_targets``).
    """
    from mmtl.models.family import POINTWISE_AND_LINEAR, LoraDefaults, capability
    from mmtl.models.registry import find_family

    tower = getattr(model, _TOWERS[which])
    fam = find_family(model)
    name = fam.name if fam is not None else "unknown"
    lora = capability(fam, LoraDefaults)
    groups = lora.lora_default_targets(model, which, zero_stage) if lora is not None else ()
    field = f"strategy.lora.{which}_targets"
    names: list[str] = []
    desc = ""
    for group in groups:
        if tuple(group) == (POINTWISE_AND_LINEAR,):
            names = _timm_default(tower)
        else:
            names = _resolve(tower, group, field, strict=False)
        if names:
            desc = ",".join(group)
            break
    if not names:
        raise ValueError(f"{field}: no default LoRA targets found in the {which} tower "
                         f"({type(tower).__name__}, family {name}); set {field} to module names")
    return names, f"default({name}): {desc}"


def resolve_targets(model, cfg: MmtlLoraConfig, zero_stage: Optional[int] = None) -> dict[str, dict[str, Any]]:
    """Per tower in ``cfg.towers``: ``{"targets": spec, "modules": [dotted names in the tower]}``.

    Raises:
        ValueError: bad targets (named field), or nn.MultiheadAttention targets with ``zero_stage == 3``.
    """
    if not cfg.towers:
        raise ValueError("strategy.lora.towers is empty: list 'image' and/or 'text'")
    out: dict[str, dict[str, Any]] = {}
    for which in dict.fromkeys(cfg.towers):
        user = cfg.image_targets if which == "image" else cfg.text_targets
        field = f"strategy.lora.{which}_targets"
        tower = getattr(model, _TOWERS[which])
        if user is None:
            names, spec = default_targets(model, which, zero_stage)
        else:
            if not user:
                raise ValueError(f"{field} is an empty list: give module names or null for the default")
            names, spec = _resolve(tower, user, field, strict=True), list(user)
        if zero_stage == 3:
            mha = [n for n in names if isinstance(tower.get_submodule(n), nn.MultiheadAttention)]
            if mha:
                raise ValueError(
                    f"{field}: LoRA on nn.MultiheadAttention ({', '.join(mha[:4])}{' ...' if len(mha) > 4 else ''})"
                    " cannot train under ZeRO-3 (PEFT re-creates its parameters on every forward and DeepSpeed "
                    "fails at init): use MLP targets (e.g. c_fc, c_proj) or train.zero_stage <= 2")
        out[which] = {"targets": spec, "modules": names}
    return out


# ---- injection --------------------------------------------------------------------------------------------
def _peft_config(r: int, alpha: float, dropout: float, modules: list[str]):
    from peft import LoraConfig

    pattern = "^(" + "|".join(re.escape(n) for n in modules) + ")$"
    return LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=pattern, bias="none")


def has_lora(model: nn.Module) -> bool:
    """True when ``model`` holds PEFT tuner layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _set_trainable(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    for head in (model.image_head, model.text_head):
        for p in head.parameters():
            p.requires_grad_(True)
    model.logit_scale.requires_grad_(True)


def _inject(model: nn.Module, meta: dict[str, Any]) -> None:
    from peft import inject_adapter_in_model

    if has_lora(model):
        raise ValueError("the model already has LoRA layers (apply the lora strategy once, to a fresh model)")
    for which, spec in meta["towers"].items():
        tower = getattr(model, _TOWERS[which])
        cfg = _peft_config(meta["r"], meta["alpha"], meta["dropout"], spec["modules"])
        injected = inject_adapter_in_model(cfg, tower)
        assert injected is tower  # in place: model.image_tower(...) is called exactly as before
    _set_trainable(model)
    setattr(model, META_ATTR, meta)


def apply(model, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
    """Inject LoRA per ``cfg.lora`` into ``model`` in place and set ``requires_grad`` (module docstring).

    Args:
        model: a :class:`~mmtl.models.base.MultimodalModel` without adapters.
        cfg: ``pipeline.strategy`` (``kind: lora``).
        zero_stage: ``train.zero_stage``; 3 refuses nn.MultiheadAttention targets (and leaves them out of
            the defaults). ``None``: unknown, treated as < 3.
    Raises:
        ValueError: bad targets or towers, MultiheadAttention targets under ZeRO-3, adapters already present.
    """
    lc = cfg.lora
    towers = resolve_targets(model, lc, zero_stage)
    meta = {"format": FORMAT, "version": 1, "r": int(lc.r), "alpha": float(lc.alpha), "dropout": float(lc.dropout),
            "family": _family(model), "zero_stage": zero_stage, "towers": towers}
    _inject(model, meta)


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
    _inject(model, meta)
    tensors = load_file(str(d / ADAPTER_FILE))
    expected = {k for k in model.state_dict() if "lora_" in k}
    if set(tensors) != expected:
        raise ValueError(f"{d / ADAPTER_FILE} does not fit the model: missing {sorted(expected - set(tensors))[:6]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:6]}")
    model.load_state_dict(tensors, strict=False)
    return model
