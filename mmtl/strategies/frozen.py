"""``frozen``: pretrained towers frozen, projection heads and logit scale trainable.

Supports: ``lock: both`` (both towers frozen; their outputs are cached when not augmented), ``lock: image``
(LiT, Zhai et al. 2022: image tower frozen, text tower trained), ``lock: text``, ``lock: none`` (towers
trainable, same as ``full``); ``unlock_image_blocks`` / ``unlock_text_blocks`` unfreeze the last N blocks
of a frozen tower (timm ``blocks``/``stages``, transformers ``encoder.layer``, open_clip
``transformer.resblocks``). Limits: a block is a top-level entry of those containers; towers without them
cannot be partially unlocked (ValueError). Generative families (``blip``): the newly initialised parts
(projection, cross-attention, LM-head transform; ``TextGeneration.new_parameters``) always train; with
``lock: both`` they are all that trains.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from mmtl.config import Pipeline, StrategyConfig
from mmtl.strategies.base import Strategy, freeze, new_parameters


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """The ordered list of a tower's blocks, searched under common attribute paths.

    Raises:
        ValueError: when no known block container exists.
    """
    for path in ("blocks", "stages", "encoder.layer", "transformer.resblocks", "layers", "model.encoder.layer",
                 "trunk.blocks", "transformer.encoder.layer", "visual.transformer.resblocks"):
        obj = tower
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, (nn.ModuleList, nn.Sequential)) and len(obj) > 0:
            return list(obj)
    raise ValueError(f"cannot find blocks to unlock in {type(tower).__name__}")


class FrozenStrategy(Strategy):
    """Frozen towers (per ``strategy.lock``, optionally with the last blocks unlocked), trainable heads."""

    kind = "frozen"

    def apply(self, model, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """Set ``requires_grad`` per ``cfg`` (see module docstring)."""
        freeze(model, False)
        lock_image = cfg.lock in ("both", "image")
        lock_text = cfg.lock in ("both", "text")
        freeze(model.image_tower, lock_image)
        freeze(model.text_tower, lock_text)
        for tower, n, locked in ((model.image_tower, cfg.unlock_image_blocks, lock_image),
                                 (model.text_tower, cfg.unlock_text_blocks, lock_text)):
            if n and locked:
                for block in tower_blocks(tower)[-n:]:
                    freeze(block, False)
        for p in new_parameters(model).values():  # generative families: projector, cross-attention, LM-head transform
            p.requires_grad_(True)

    def uses_feature_cache(self, pipe: Pipeline) -> bool:
        """Both towers locked with no unlocked blocks: their outputs do not change during training."""
        s = pipe.strategy
        return s.lock == "both" and s.unlock_image_blocks == 0 and s.unlock_text_blocks == 0
