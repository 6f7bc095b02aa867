"""``full``: every parameter trainable, the same loop; the reference the other strategies are compared to.
Limits: memory scales with the whole model (optimizer state for all parameters); use ZeRO 2/3 + offload."""
from __future__ import annotations

from mmtl.config import StrategyConfig


def apply(model, cfg: StrategyConfig) -> None:
    """Make every parameter of ``model`` trainable."""
    for p in model.parameters():
        p.requires_grad_(True)
