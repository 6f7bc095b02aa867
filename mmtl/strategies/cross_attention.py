"""``cross_attention``: frozen towers, trainable token-level fusion + task head (``strategy.fusion``).

Supports: ``strategy.fusion.kind: xattn`` (Flamingo-style gated cross-attention blocks, text queries over
image tokens, tanh gates at 0, optional Perceiver resampler) or ``late`` (the baseline: an MLP on the
concatenated pooled features); ``task: vqa`` (answer classification, soft scores) or ``itm`` (image-text
matching with in-batch hard negatives). Every family with token outputs (``two_tower``, ``hf``, ``open_clip``
ViT). The fusion and head live in :class:`mmtl.fusion.task.FusionTaskModule`; the recipe
(:mod:`mmtl.recipes.fusion`) precomputes the frozen towers' tokens once and trains through the common Ray
Train + DeepSpeed loop.

Limits: the whole :class:`~mmtl.models.base.MultimodalModel` (towers, its projection heads, logit scale) is
frozen; ``strategy.lock`` must stay ``both`` and ``unlock_*_blocks`` 0; LoRA in the towers
(``strategy.fusion.tower_lora``) is refused, because tokens are precomputed (it would need the towers in the
training step). Hard negatives for ITM come from each worker's micro-batch only.
"""
from __future__ import annotations

from typing import Optional

from mmtl.config import StrategyConfig
from mmtl.strategies.base import Strategy, freeze


class CrossAttentionStrategy(Strategy):
    """Frozen model; the fusion module and head are added by the train module."""

    kind = "cross_attention"
    recipe = "fusion"

    def check(self, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """Raise ValueError naming the field for options this strategy does not support."""
        if cfg.fusion.tower_lora:
            raise ValueError("strategy.fusion.tower_lora=true is not supported: cross_attention precomputes the "
                             "frozen towers' tokens; set it to false (or use strategy.kind=lora for adapted towers)")
        if cfg.lock != "both" or cfg.unlock_image_blocks or cfg.unlock_text_blocks:
            raise ValueError(f"strategy.kind=cross_attention keeps both towers frozen: got lock={cfg.lock!r}, "
                             f"unlock_image_blocks={cfg.unlock_image_blocks}, "
                             f"unlock_text_blocks={cfg.unlock_text_blocks}")

    def apply(self, model, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """Freeze every parameter of ``model`` and put it in eval mode.

        Raises:
            ValueError: see :meth:`check`.
        """
        self.check(cfg, zero_stage)
        freeze(model)
        model.eval()
