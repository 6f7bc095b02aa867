"""``self_supervised``: adapt one tower on unpaired in-domain data before alignment (recipe
:mod:`mmtl.recipes.self_supervised`). ``strategy.self_supervised.tower`` trains (``text``: masked-LM,
``image``: SimCLR or DINO); the other tower, both heads and the temperature stay frozen. With ``train_tower: false``
only the self-supervised head trains (the baseline run). The export holds only the adapted tower's tensors
under the model's own names (``text_tower.*`` / ``image_tower.*``), which ``model.init_from`` of an alignment
pipeline loads, and the MLM head / projector (``ssl_head.*``, skipped by ``model.init_from``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmtl.config import Pipeline, StrategyConfig
from mmtl.strategies.base import Strategy, freeze


class SelfSupervisedStrategy(Strategy):
    """Only ``<tower>_tower`` trains (or nothing of the model, with ``train_tower: false``)."""

    kind = "self_supervised"
    recipe = "self_supervised"

    def apply(self, model: nn.Module, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """Freeze ``model``, then unfreeze ``model.<tower>_tower`` unless ``train_tower`` is false."""
        freeze(model, True)
        s = cfg.self_supervised
        if s.train_tower:
            freeze(getattr(model, f"{s.tower}_tower"), False)

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
