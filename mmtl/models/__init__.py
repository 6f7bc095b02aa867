"""Model families behind one interface (:class:`MultimodalModel`).

``build_model(cfg.model)`` dispatches on ``model.family``: ``two_tower`` (timm + transformers encoders from
local weights or weight packages). ``open_clip`` and ``hf`` are not implemented here yet.
``build_tokenizer`` / ``build_image_transform`` give the same preprocessing without building the towers
(for Ray Data workers).
"""
from __future__ import annotations

from typing import Callable

from mmtl.config import ModelConfig
from mmtl.models.base import MultimodalModel, fingerprint_of, make_head
from mmtl.models.weights import WeightsError

__all__ = [
    "MultimodalModel", "WeightsError", "build_model", "build_tokenizer", "build_image_transform",
    "tiny_two_tower_config", "fingerprint_of", "make_head",
]


def _not_yet(cfg: ModelConfig) -> NotImplementedError:
    return NotImplementedError(f"model.family={cfg.family!r} is not implemented yet (available: 'two_tower')")


def build_model(cfg: ModelConfig) -> MultimodalModel:
    """Build the model described by ``cfg`` (``pipeline.model``); towers come back in eval mode.

    Raises:
        NotImplementedError: family ``open_clip`` / ``hf``.
        ValueError / WeightsError: bad fields or weights (messages name the ``model.*`` field).
    """
    if cfg.family == "two_tower":
        from mmtl.models.two_tower import TwoTowerModel

        return TwoTowerModel(cfg)
    raise _not_yet(cfg)


def build_tokenizer(cfg: ModelConfig):
    """A picklable ``texts -> dict(input_ids, attention_mask)`` callable (``.count(text)`` counts tokens),
    identical to ``build_model(cfg).tokenize``."""
    if cfg.family == "two_tower":
        from mmtl.models.two_tower import load_tokenizer

        return load_tokenizer(cfg.text, cfg.context_length)[0]
    raise _not_yet(cfg)


def build_image_transform(cfg: ModelConfig, train: bool) -> Callable:
    """A picklable PIL RGB -> (3, image_size, image_size) transform, identical to
    ``build_model(cfg).image_transform(train)``."""
    if cfg.family == "two_tower":
        from mmtl.models.two_tower import make_image_transform, vision_mean_std

        mean, std = vision_mean_std(cfg.vision)
        return make_image_transform(cfg.image_size, mean, std, train)
    raise _not_yet(cfg)


def tiny_two_tower_config(**overrides) -> ModelConfig:
    """See :func:`mmtl.models.two_tower.tiny_two_tower_config`."""
    from mmtl.models.two_tower import tiny_two_tower_config as f

    return f(**overrides)
