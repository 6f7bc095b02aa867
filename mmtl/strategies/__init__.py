"""Transfer strategies: how a pretrained model is adapted. One strategy per file, each a
:class:`~mmtl.strategies.base.Strategy` object with hooks, registered in :data:`STRATEGIES` by
``strategy.kind``.

To add one: write ``mmtl/strategies/<kind>.py`` with a ``Strategy`` subclass (``kind = "<kind>"``, the hooks
it needs) and add it to the table below; it is trained by the contrastive recipe unless it names another
(``recipe = "<name>"``, :mod:`mmtl.recipes`).
"""
from __future__ import annotations

from typing import Optional

from mmtl.config import Pipeline, StrategyConfig
from mmtl.strategies.base import Strategy, trainable_summary
from mmtl.strategies.cross_attention import CrossAttentionStrategy
from mmtl.strategies.frozen import FrozenStrategy
from mmtl.strategies.full import FullStrategy
from mmtl.strategies.lora import LoraStrategy
from mmtl.strategies.prompt_tuning import PromptTuningStrategy
from mmtl.strategies.self_supervised import SelfSupervisedStrategy

__all__ = ["STRATEGIES", "Strategy", "get_strategy", "apply_strategy", "trainable_summary", "uses_feature_cache"]

STRATEGIES: dict[str, Strategy] = {s.kind: s for s in (
    FrozenStrategy(), FullStrategy(), LoraStrategy(), PromptTuningStrategy(), CrossAttentionStrategy(),
    SelfSupervisedStrategy(),
)}


def get_strategy(kind: str) -> Strategy:
    """The registered strategy of ``strategy.kind``.

    Raises:
        ValueError: unknown kind (the message lists the known ones).
    """
    try:
        return STRATEGIES[kind]
    except KeyError:
        raise ValueError(f"strategy.kind={kind!r} is unknown (known: {', '.join(STRATEGIES)})") from None


def apply_strategy(model, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> dict:
    """Check and apply ``cfg.kind`` to ``model`` in place and return :func:`trainable_summary`.

    ``zero_stage`` (``train.zero_stage``, optional) lets a strategy refuse what cannot train under that ZeRO
    stage before anything starts (``lora``: nn.MultiheadAttention targets under ZeRO-3).

    Raises:
        ValueError: unknown kind, or an option the kind does not support.
    """
    strategy = get_strategy(cfg.kind)
    strategy.check(cfg, zero_stage)
    strategy.apply(model, cfg, zero_stage)
    return trainable_summary(model)


def uses_feature_cache(pipe: Pipeline) -> bool:
    """True when the pipeline's strategy keeps both towers frozen and unaugmented, so their outputs can be
    cached (and ``data.cache_frozen_features`` is on)."""
    return bool(pipe.data.cache_frozen_features) and get_strategy(pipe.strategy.kind).uses_feature_cache(pipe)
