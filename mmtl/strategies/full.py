"""``full``: every parameter trainable, the same loop; the reference the other strategies are compared to.
Limits: memory scales with the whole model (optimizer state for all parameters); use ZeRO 2/3 + offload."""
from __future__ import annotations

from typing import Optional

from mmtl.config import StrategyConfig
from mmtl.strategies.base import Strategy, freeze


class FullStrategy(Strategy):
    """Every parameter of the model trains."""

    kind = "full"

    def apply(self, model, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """Make every parameter of ``model`` trainable."""
        freeze(model, False)

