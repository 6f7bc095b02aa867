"""Transfer strategies: how a pretrained model is adapted. One strategy per file, chosen by
``strategy.kind``; each exposes ``apply(model, cfg) -> None`` that sets ``requires_grad`` (and inserts
adapters), after which :func:`trainable_summary` reports what trains."""
from __future__ import annotations

from typing import Optional

from mmtl.config import Pipeline, StrategyConfig


def apply_strategy(model, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> dict:
    """Apply ``cfg.kind`` to ``model`` in place and return :func:`trainable_summary`.

    ``zero_stage`` (``train.zero_stage``, optional) lets a strategy refuse what cannot train under that ZeRO
    stage before anything starts (``lora``: nn.MultiheadAttention targets under ZeRO-3).

    Raises:
        ValueError: unknown kind, or an option the kind does not support.
    """
    if cfg.kind == "frozen":
        from mmtl.strategies.frozen import apply
    elif cfg.kind == "full":
        from mmtl.strategies.full import apply
    elif cfg.kind == "lora":
        from mmtl.strategies.lora import apply as apply_lora

        apply_lora(model, cfg, zero_stage=zero_stage)
        return trainable_summary(model)
    elif cfg.kind == "prompt_tuning":
        from mmtl.strategies.prompt_tuning import apply
    elif cfg.kind == "cross_attention":
        from mmtl.strategies.cross_attention import apply
    else:
        raise ValueError(f"strategy.kind={cfg.kind!r} is not available in this build")
    apply(model, cfg)
    return trainable_summary(model)


def trainable_summary(model) -> dict:
    """Counts of trainable and total parameters (elements) and the trainable share in [0, 1]."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": train, "trainable_share": train / max(1, total)}


def uses_feature_cache(pipe: Pipeline) -> bool:
    """True when both towers are fully frozen and not augmented, so their outputs can be cached."""
    s = pipe.strategy
    return (
        pipe.data.cache_frozen_features
        and s.kind == "frozen"
        and s.lock == "both"
        and s.unlock_image_blocks == 0
        and s.unlock_text_blocks == 0
    )
