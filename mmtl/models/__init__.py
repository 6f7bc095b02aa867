"""Model families behind one interface (:class:`MultimodalModel`).

``build_model(cfg.model)`` dispatches on ``model.family``: ``two_tower`` (timm + transformers encoders from
local weights or weight packages), ``open_clip`` (an open_clip CLIP from ``arch`` or ``config``, optional local
weights file; :mod:`mmtl.models.open_clip_family`) and ``hf`` (transformers CLIP / SigLIP from a local dir or a
config; :mod:`mmtl.models.hf_clip`).
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
    "tiny_two_tower_config", "tiny_open_clip_config", "tiny_hf_clip_config", "fingerprint_of", "make_head",
]


def _unknown(cfg: ModelConfig) -> ValueError:
    return ValueError(f"model.family={cfg.family!r} is unknown (two_tower, open_clip, hf)")


def build_model(cfg: ModelConfig) -> MultimodalModel:
    """Build the model described by ``cfg`` (``pipeline.model``); towers come back in eval mode.

    Raises:
        ValueError / WeightsError: bad fields or weights (messages name the ``model.*`` field).
    """
    if cfg.family == "two_tower":
        from mmtl.models.two_tower import TwoTowerModel

        return TwoTowerModel(cfg)
    if cfg.family == "open_clip":
        from mmtl.models.open_clip_family import OpenClipModel

        return OpenClipModel(cfg)
    if cfg.family == "hf":
        from mmtl.models.hf_clip import HFClipModel

        return HFClipModel(cfg)
    raise _unknown(cfg)


def build_tokenizer(cfg: ModelConfig):
    """A picklable ``texts -> dict(input_ids, attention_mask)`` callable (``.count(text)`` counts tokens),
    identical to ``build_model(cfg).tokenize``."""
    if cfg.family == "two_tower":
        from mmtl.models.two_tower import load_tokenizer

        return load_tokenizer(cfg.text, cfg.context_length)[0]
    if cfg.family == "open_clip":
        from mmtl.models.open_clip_family import check_consistency, load_open_clip_tokenizer, \
            resolve_open_clip_config

        mc = resolve_open_clip_config(cfg)
        check_consistency(cfg, mc)
        return load_open_clip_tokenizer(cfg, mc)[0]
    if cfg.family == "hf":
        from mmtl.models.hf_clip import load_hf_tokenizer

        return load_hf_tokenizer(cfg)[0]
    raise _unknown(cfg)


def build_image_transform(cfg: ModelConfig, train: bool) -> Callable:
    """A picklable PIL RGB -> (3, image_size, image_size) transform, identical to
    ``build_model(cfg).image_transform(train)``."""
    if cfg.family == "two_tower":
        from mmtl.models.two_tower import make_image_transform, vision_mean_std

        mean, std = vision_mean_std(cfg.vision)
        return make_image_transform(cfg.image_size, mean, std, train)
    if cfg.family == "open_clip":
        from mmtl.models.open_clip_family import make_open_clip_transform

        return make_open_clip_transform(cfg, train)
    if cfg.family == "hf":
        from mmtl.models.hf_clip import make_hf_transform

        return make_hf_transform(cfg, train)
    raise _unknown(cfg)


def tiny_two_tower_config(**overrides) -> ModelConfig:
    """See :func:`mmtl.models.two_tower.tiny_two_tower_config`."""
    from mmtl.models.two_tower import tiny_two_tower_config as f

    return f(**overrides)


def tiny_open_clip_config(**overrides) -> ModelConfig:
    """See :func:`mmtl.models.open_clip_family.tiny_open_clip_config`."""
    from mmtl.models.open_clip_family import tiny_open_clip_config as f

    return f(**overrides)


def tiny_hf_clip_config(**overrides) -> ModelConfig:
    """See :func:`mmtl.models.hf_clip.tiny_hf_clip_config`."""
    from mmtl.models.hf_clip import tiny_hf_clip_config as f

    return f(**overrides)
