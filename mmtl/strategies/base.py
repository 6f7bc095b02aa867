"""The strategy protocol: how a pretrained model is adapted, as one object with hooks.

A strategy is chosen by ``strategy.kind`` (:data:`mmtl.strategies.STRATEGIES`). The run sequence
(:mod:`mmtl.recipes.runner`) and the training loop (:mod:`mmtl.train.loop`) call only these hooks, so
everything a strategy needs beyond "set ``requires_grad``" (LoRA's adapter files, its merge at export time)
lives in the strategy's own file.

Hooks, in the order a run calls them:

=================================  ==========================================================================
``check(cfg, zero_stage)``         refuse options this strategy cannot train (before anything starts)
``apply(model, cfg, zero_stage)``  set ``requires_grad`` / insert adapters, in place (driver and every worker)
``uses_feature_cache(pipe)``       True when both towers are frozen, so their outputs can be cached
``save_extras(module, d, pipe)``   every checkpoint, every rank: extra files (LoRA: ``adapter/``)
``export_state_dict(pipe, sd)``    the final consolidated state dict -> what ``export/`` holds (LoRA: merged)
``trained_model(model)``           the driver's copy before the export is loaded into it (LoRA: merged)
``export_checkpoint(...)``         ``mmtl export``: write a model folder from any checkpoint, or ``None``
=================================  ==========================================================================
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from mmtl.config import Pipeline, StrategyConfig


class Strategy:
    """Base class with the default (no-op) hooks; a strategy overrides what it needs.

    Attributes:
        kind: the ``strategy.kind`` value it is registered under.
        recipe: the name of the recipe that runs it (:data:`mmtl.recipes.RECIPES`); ``"contrastive"`` trains
            the model's towers/heads with the CLIP/SigLIP loss.
    """

    kind: ClassVar[str] = ""
    recipe: ClassVar[str] = "contrastive"

    def check(self, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """Raise ValueError naming the field for options this strategy cannot train."""

    def apply(self, model: nn.Module, cfg: StrategyConfig, zero_stage: Optional[int] = None) -> None:
        """Set ``requires_grad`` (and insert adapters) on ``model`` in place.

        Raises:
            ValueError: an option the strategy does not support (message names the field).
        """
        raise NotImplementedError

    def uses_feature_cache(self, pipe: Pipeline) -> bool:
        """True when the frozen towers' outputs can be computed once and cached (default: never)."""
        return False

    def save_extras(self, engine_module: nn.Module, ckpt_dir: Path, pipe: Pipeline) -> None:
        """Write strategy-specific files into a checkpoint folder. Called on every rank at every checkpoint
        (under ZeRO-3 parameters may need gathering on all ranks); default: nothing."""

    def export_state_dict(self, pipe: Pipeline, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the final consolidated state dict (rank 0) to the one written to ``export/model.safetensors``;
        default: unchanged."""
        return state_dict

    def trained_model(self, model: nn.Module) -> nn.Module:
        """The driver's model, made ready to load the export's state dict (default: unchanged)."""
        return model

    def export_checkpoint(self, pipe: Pipeline, ckpt: Path, out: Path, merge: bool) -> Optional[dict[str, Any]]:
        """``mmtl export``: write a model folder from checkpoint ``ckpt`` into the (empty) folder ``out`` and
        return what was written, or ``None`` to copy the checkpoint's ``export/`` (default)."""
        return None

    def exported_is_merged(self) -> bool:
        """True when ``export/`` holds weights merged from adapters (reported by ``mmtl export``)."""
        return False


def trainable_summary(model: nn.Module) -> dict:
    """Counts of trainable and total parameters (elements) and the trainable share in [0, 1]."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": train, "trainable_share": train / max(1, total)}


def freeze(module: nn.Module, frozen: bool = True) -> None:
    """Set ``requires_grad = not frozen`` on every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(not frozen)


def new_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The newly initialised parameters of a generative family's model (``TextGeneration.new_parameters``,
    :mod:`mmtl.models.family`), which every strategy trains in full; ``{}`` for other families."""
    from mmtl.models.family import TextGeneration, capability
    from mmtl.models.registry import find_family

    gen = capability(find_family(model), TextGeneration)
    return gen.new_parameters(model) if gen is not None else {}


class ExportError(ValueError):
    """A run or checkpoint cannot be exported as asked (the message says why and what to do)."""
