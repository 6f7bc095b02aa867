"""Model families behind one interface (:class:`MultimodalModel`).

``build_model(cfg.model)`` asks the family registered as ``model.family`` (:mod:`mmtl.models.registry`,
protocol in :mod:`mmtl.models.family`): ``two_tower`` (timm + transformers encoders from local weights or
weight packages; :mod:`mmtl.models.two_tower`), ``open_clip`` (an open_clip CLIP from ``arch`` or ``config``,
optional local weights file; :mod:`mmtl.models.open_clip_family`) and ``hf`` (transformers CLIP / SigLIP from a
local dir or a config; :mod:`mmtl.models.hf_clip`).
``build_tokenizer`` / ``build_image_transform`` give the same preprocessing without building the towers
(for Ray Data workers).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import torch

from mmtl.config import ModelConfig
from mmtl.models.base import MultimodalModel, fingerprint_of, make_head
from mmtl.models.weights import WeightsError

log = logging.getLogger("mmtl.models")

__all__ = [
    "MultimodalModel", "WeightsError", "build_model", "warm_start", "build_tokenizer", "build_image_transform",
    "tiny_two_tower_config", "tiny_open_clip_config", "tiny_hf_clip_config", "fingerprint_of", "make_head",
]


def build_model(cfg: ModelConfig) -> MultimodalModel:
    """Build the model described by ``cfg`` (``pipeline.model``) with its family's ``build`` (see
    :mod:`mmtl.models.registry`); towers come back in eval mode.

    With ``model.init_from`` the state dict in that safetensors file is loaded on top (warm start, see
    :func:`warm_start`).

    Raises:
        ValueError / WeightsError: unknown ``model.family``, bad fields or weights (messages name the
            ``model.*`` field).
    """
    from mmtl.models.registry import get_family

    model = get_family(cfg.family).build(cfg)
    if cfg.init_from:
        warm_start(model, cfg.init_from)
    return model


def _init_file(path: str) -> Path:
    from mmtl.storage import fetch_file, is_remote

    if is_remote(path):  # a file or run folder on object storage: downloaded once into the staging folder
        p = fetch_file(path, ("model.safetensors", "artifacts/model.safetensors", "export/model.safetensors"))
        if p is None:
            raise WeightsError(f"model.init_from={path!r}: no such object (nor model.safetensors or "
                               "export/model.safetensors under it)")
        return p
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / "model.safetensors", p / "artifacts" / "model.safetensors", p / "export" / "model.safetensors"):
            if cand.is_file():
                return cand
        raise WeightsError(f"model.init_from={path!r}: folder has no model.safetensors (nor export/model.safetensors"
                           " of a run folder)")
    if not p.is_file():
        raise WeightsError(f"model.init_from={path!r}: file not found")
    return p


def _tensor_digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


@torch.no_grad()
def warm_start(model: MultimodalModel, path: str) -> dict:
    """Load the safetensors state dict at ``path`` (a file, a folder holding ``model.safetensors``, or a run
    folder holding ``export/model.safetensors``, e.g. a self-supervised run whose export is one tower) into
    ``model``: every tensor whose name and shape match is copied (``strict=False``); others are skipped and
    logged. When a tower's loaded weights differ from the ones it was built with, that tower's fingerprint is
    re-derived from the loaded content, so frozen-feature caches of the base towers are not reused.

    Returns ``{"loaded": n, "skipped": [...], "missing": [...]}``.

    Raises:
        WeightsError: ``path`` does not exist, or no tensor of it matches the model.
    """
    from safetensors.torch import load_file

    f = _init_file(path)
    sd = load_file(str(f))
    own = model.state_dict()
    matched = {k: v for k, v in sd.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    # logit_bias (SigLIP) and ssl_head.* (a self-supervised run's MLM head / projector) are not model tensors
    skipped = sorted(k for k in sd if k not in matched and k != "logit_bias" and not k.startswith("ssl_head."))
    if not matched:
        raise WeightsError(f"model.init_from={path!r}: none of its {len(sd)} tensors matches the model "
                           f"(e.g. {sorted(sd)[:3]} vs {sorted(own)[:3]}): built from another architecture?")
    fps = getattr(model, "_fingerprints", None)
    changed = {}
    for which in ("image", "text"):
        prefix = f"{which}_tower."
        part = {k: v for k, v in matched.items() if k.startswith(prefix)}
        if part and any(not torch.equal(own[k], v.to(own[k].dtype)) for k, v in part.items()):
            changed[which] = _tensor_digest(part)
    model.load_state_dict(matched, strict=False)
    if isinstance(fps, dict):
        for which, digest in changed.items():
            fps[which] = fingerprint_of({"base": fps[which], "init_from": digest})
    missing = sorted(k for k in own if k not in matched)
    if skipped or missing:
        log.warning("model.init_from=%s: loaded %d tensors, skipped %d (%s), %d model tensors not in the file (%s)",
                    path, len(matched), len(skipped), skipped[:5], len(missing), missing[:5])
    return {"loaded": len(matched), "skipped": skipped, "missing": missing, "towers_changed": sorted(changed)}


def fingerprint_loaded_content(model: MultimodalModel) -> None:
    """Re-derive both tower fingerprints from the towers' current weights (sha256 of their state dicts), for a
    model whose weights were loaded after it was built (an export: its towers were built without their weight
    files), so that two exports of one architecture never share a frozen-feature cache key."""
    from mmtl.models.weights import params_digest

    fps = getattr(model, "_fingerprints", None)
    if not isinstance(fps, dict):
        return
    for which, tower in (("image", model.image_tower), ("text", model.text_tower)):
        fps[which] = fingerprint_of({"base": fps[which], "content": params_digest(tower)})


def build_tokenizer(cfg: ModelConfig):
    """A picklable ``texts -> dict(input_ids, attention_mask)`` callable (``.count(text)`` counts tokens),
    identical to ``build_model(cfg).tokenize`` (the family's ``tokenizer``; no model is built).

    Raises:
        ValueError: unknown ``model.family`` or bad tokenizer fields.
    """
    from mmtl.models.registry import get_family

    return get_family(cfg.family).tokenizer(cfg)


def build_image_transform(cfg: ModelConfig, train: bool) -> Callable:
    """A picklable PIL RGB -> (3, image_size, image_size) transform, identical to
    ``build_model(cfg).image_transform(train)`` (the family's ``image_transform``; no model is built).

    Raises:
        ValueError: unknown ``model.family`` or bad preprocessing fields.
    """
    from mmtl.models.registry import get_family

    return get_family(cfg.family).image_transform(cfg, train)


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
