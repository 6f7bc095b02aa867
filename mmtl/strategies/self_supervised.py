"""``self_supervised``: adapt one tower on unpaired in-domain data before alignment (recipe
:mod:`mmtl.recipes.self_supervised`). ``strategy.self_supervised.tower`` trains (``text``: masked-LM,
``image``: SimCLR or DINO); the other tower, both heads and the temperature stay frozen. With ``train_tower: false``
only the self-supervised head trains (the baseline run). With ``strategy.unlock_image_blocks`` /
``unlock_text_blocks`` N > 0 only the adapted tower's last N blocks (:func:`mmtl.strategies.frozen.tower_blocks`)
and the modules registered after its block container (timm CNNs: ``conv_head``, ``bn2``; ViTs: ``norm``) train;
the earlier layers stay frozen, their BatchNorm layers in eval mode with their running statistics kept
(:func:`mmtl.train.loop.set_train_modes`). 0 (default): the whole tower. The export holds only the adapted tower's tensors
under the model's own names (``text_tower.*`` / ``image_tower.*``), which ``model.init_from`` of an alignment
pipeline loads, and the MLM head / projector (``ssl_head.*``, skipped by ``model.init_from``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmtl.config import Pipeline, StrategyConfig
from mmtl.strategies.base import Strategy, freeze
from mmtl.strategies.frozen import tower_blocks


def unfreeze_tail(tower: nn.Module, n: int) -> None:
    """Unfreeze the last ``n`` blocks of ``tower`` and every top-level child registered after the child that
    holds its block container (timm EfficientNet: ``conv_head`` + ``bn2``).

    Raises:
        ValueError: the tower has no known block container, or ``n`` exceeds its block count.
    """
    blocks = tower_blocks(tower)
    if n > len(blocks):
        raise ValueError(f"cannot unlock {n} blocks: the tower has {len(blocks)}")
    for block in blocks[-n:]:
        freeze(block, False)
    after = False
    for child in tower.children():
        if after:
            freeze(child, False)
        elif any(m is blocks[0] for m in child.modules()):
            after = True


class SelfSupervisedStrategy(Strategy):
    """Only ``<tower>_tower`` trains (or nothing of the model, with ``train_tower: false``)."""

    kind = "self_supervised"
    recipe = "self_supervised"

    def apply(self, model: nn.Module, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """Freeze ``model``, then unfreeze ``model.<tower>_tower`` (or its last ``unlock_<tower>_blocks`` blocks
        and what follows them) unless ``train_tower`` is false."""
        freeze(model, True)
        s = cfg.self_supervised
        if s.train_tower:
            tower = getattr(model, f"{s.tower}_tower")
            n = cfg.unlock_image_blocks if s.tower == "image" else cfg.unlock_text_blocks
            if n:
                unfreeze_tail(tower, n)
            else:
                freeze(tower, False)

    def export_state_dict(self, pipe: Pipeline, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep the adapted tower's tensors (``<tower>_tower.*``) and the head (``ssl_head.*``, which
        ``model.init_from`` ignores), dropping the frozen rest. DINO: the teacher's tower and head under those
        names (the teacher is DINO's output model); the student is dropped."""
        if pipe.strategy.self_supervised.method == "dino":  # DINO's result is the EMA teacher (Caron et al. 2021)
            teacher = {"image_tower." + k[len("teacher_tower."):]: v for k, v in state_dict.items()
                       if k.startswith("teacher_tower.")}
            teacher.update({"ssl_head." + k[len("teacher_head."):]: v for k, v in state_dict.items()
                            if k.startswith("teacher_head.")})
            if teacher:
                return teacher
        keep = (f"{pipe.strategy.self_supervised.tower}_tower.", "ssl_head.")
        return {k: v for k, v in state_dict.items() if k.startswith(keep)}
