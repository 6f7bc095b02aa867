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
    tower weight (tower-internal projections of open_clip / hf included) stays frozen. Generative families
    (``blip``): ``lora_*`` + the newly initialised parts (projection, cross-attention, LM-head transform), which
    train in full; ``text`` is the decoder, whose default targets are its self-attention and MLP.
  * :mod:`mmtl.strategies.lora_adapters`: ``merge_lora`` folds the adapters into the base weights and removes
    the PEFT layers (the state dict then has the base model's key names: it loads into ``build_model(cfg)``
    without PEFT); ``merged_state_dict`` does the same for a state dict (e.g. the consolidated DeepSpeed
    export); ``save_adapter`` / ``load_adapter`` / ``save_adapters`` handle the adapters alone
    (a PEFT adapter folder, :mod:`mmtl.strategies.lora_peft`); ``export_from_adapter`` is ``mmtl export``.
  * :class:`LoraStrategy` hooks: every checkpoint holds ``adapter/`` (adapters + the other trainable weights);
    the final ``export/`` is merged; the driver merges its copy before loading the export.

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

Files: the adapter folder is a PEFT adapter (``adapter_config.json`` by ``LoraConfig.save_pretrained``, PEFT key
names) plus ``mmtl_adapter.json`` / ``mmtl_extra.safetensors``; which base model PEFT loads it on, per family:
:mod:`mmtl.strategies.lora_peft`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from mmtl.config import LoraConfig as MmtlLoraConfig
from mmtl.config import Pipeline, StrategyConfig
from mmtl.strategies.base import Strategy

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
    """``lora_*`` + the heads and logit scale of a two-tower model, or a generative model's new parameters."""
    from mmtl.strategies.base import new_parameters

    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    new = new_parameters(model)
    if new:
        for p in new.values():
            p.requires_grad_(True)
        return
    for head in (model.image_head, model.text_head):
        for p in head.parameters():
            p.requires_grad_(True)
    model.logit_scale.requires_grad_(True)


def inject_lora(model: nn.Module, meta: dict[str, Any]) -> None:
    """Inject the adapters described by ``meta`` (as recorded by :func:`apply`) into ``model`` in place and set
    the trainable set (``lora_*``, heads, logit scale).

    Raises:
        ValueError: the model already has LoRA layers.
    """
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
    from mmtl.strategies.lora_peft import peft_base

    family = _family(model)
    meta = {"format": FORMAT, "version": 2, "r": int(lc.r), "alpha": float(lc.alpha), "dropout": float(lc.dropout),
            "family": family, "zero_stage": zero_stage, "towers": towers, "peft_base": peft_base(family),
            "base_fingerprints": _fingerprints(model)}
    inject_lora(model, meta)


def _fingerprints(model) -> dict[str, str]:
    """The base towers' fingerprints (recorded in the adapter's ``mmtl_adapter.json``), {} when unavailable."""
    try:
        return {w: model.fingerprint(w) for w in ("image", "text")}
    except (AttributeError, NotImplementedError, ValueError):
        return {}


class LoraStrategy(Strategy):
    """``strategy.kind: lora`` (module docstring): adapters in the towers, heads and logit scale trainable."""

    kind = "lora"

    def check(self, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """Raise ValueError for an empty ``strategy.lora.towers`` (targets are checked against the model by
        :meth:`apply`)."""
        if not cfg.lora.towers:
            raise ValueError("strategy.lora.towers is empty: list 'image' and/or 'text'")

    def apply(self, model, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """See :func:`apply`."""
        apply(model, cfg, zero_stage)

    def save_extras(self, engine_module: nn.Module, ckpt_dir: Path, pipe: Pipeline) -> None:
        """The PEFT adapter (+ mmtl's record and the other trainable weights), every checkpoint, as ``adapter/``."""
        from mmtl.strategies.lora_adapters import save_adapters

        save_adapters(engine_module, ckpt_dir / "adapter", pipe.train.zero_stage, pipe.model)

    def export_state_dict(self, pipe: Pipeline, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Merged into the base weights: the export loads without PEFT."""
        from mmtl.strategies.lora_adapters import merged_state_dict

        return merged_state_dict(pipe.model, pipe.strategy, state_dict, zero_stage=pipe.train.zero_stage)

    def trained_model(self, model: nn.Module) -> nn.Module:
        """Drop the (untrained) adapters of the driver's copy by merging them: the export is merged."""
        from mmtl.strategies.lora_adapters import merge_lora

        return merge_lora(model)

    def export_checkpoint(self, pipe: Pipeline, ckpt: Path, out: Path, merge: bool) -> Optional[dict[str, Any]]:
        """From the checkpoint's ``adapter/`` (any step): merged weights, or the adapter folder with
        ``merge=False``; ``None`` when the checkpoint has no adapter (copy its ``export/``)."""
        if not (ckpt / "adapter").is_dir():
            return None
        from mmtl.strategies.lora_adapters import export_from_adapter

        return export_from_adapter(pipe, ckpt / "adapter", out, merge)

    def exported_is_merged(self) -> bool:
        """The final ``export/`` of a LoRA run is merged at training time."""
        return True
