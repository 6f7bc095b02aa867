"""``prompt_tuning`` strategy: CoOp (Zhou, Yang, Loy & Liu, "Learning to Prompt for Vision-Language Models",
IJCV 2022). The whole :class:`~mmtl.models.base.MultimodalModel` is frozen (towers, heads and logit scale);
the only trainable parameters are the context vectors of :class:`mmtl.prompting.coop.PromptLearner`, which
live in the train module :class:`mmtl.prompting.coop.CoOpModule`, not in the model.

Supports: families ``two_tower`` (BERT-like text encoders) and ``hf`` (transformers CLIP); class-shared
(M, D) or class-specific (C, M, D) context; any ZeRO stage (the frozen model holds no optimizer state).
Limits: ``open_clip`` and ``hf`` SigLIP text towers raise NotImplementedError when the strategy is applied
(:func:`mmtl.prompting.coop.check_family`); the feature cache is always used for the image side.
"""
from __future__ import annotations

from typing import Optional

from mmtl.config import StrategyConfig
from mmtl.strategies.base import Strategy, freeze


class PromptTuningStrategy(Strategy):
    """Everything in the model frozen; the train module adds the learned context."""

    kind = "prompt_tuning"
    recipe = "prompt_learning"

    def apply(self, model, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """Freeze every parameter of ``model`` (the context vectors are added by the train module).

        Raises:
            NotImplementedError: the model family has no text-with-context encoder (see module docstring).
        """
        from mmtl.prompting.coop import check_family

        check_family(model)
        freeze(model)
