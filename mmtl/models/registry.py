"""The model-family registry: ``model.family`` name -> family object (:mod:`mmtl.models.family`).

The built-in families are the explicit table :data:`BUILTIN_FAMILIES` (``two_tower``, ``open_clip``, ``hf``, ``blip``,
``llava``).
:func:`get_family` looks a name up, :func:`family_of` finds the family of a built model (``model.cfg.family``),
:func:`register_family` adds one at runtime (tests, experiments). Everything outside the family modules asks
the family object (:func:`mmtl.models.family.capability`) instead of comparing names.

Adding a family: (1) its module with the model and a family class (``name``, ``build``, ``tokenizer``,
``image_transform`` and whichever capabilities it has), (2) one entry in :data:`BUILTIN_FAMILIES`, (3) its name in
``ModelConfig.family``'s ``Literal`` (:mod:`mmtl.config`, which must not import models/). Plus tests and docs.
"""
from __future__ import annotations

from typing import Optional

from mmtl.models.blip import BlipFamily
from mmtl.models.family import ModelFamily
from mmtl.models.hf_clip import HFClipFamily
from mmtl.models.llava import LlavaFamily
from mmtl.models.open_clip_family import OpenClipFamily
from mmtl.models.two_tower import TwoTowerFamily

#: The built-in families, in the order they are listed in error messages.
BUILTIN_FAMILIES: tuple[type, ...] = (TwoTowerFamily, OpenClipFamily, HFClipFamily, BlipFamily, LlavaFamily)

_REGISTRY: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Register ``family`` (an instance) under ``family.name``; returns it.

    Raises:
        TypeError: ``family`` lacks a required member of :class:`~mmtl.models.family.ModelFamily`.
        ValueError: the name is empty or already registered (unless ``replace``).
    """
    if not isinstance(family, ModelFamily):
        missing = [m for m in ("name", "build", "tokenizer", "image_transform") if not hasattr(family, m)]
        raise TypeError(f"{type(family).__name__} is not a model family: it lacks {missing}")
    name = family.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(family).__name__}.name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"model family {name!r} is already registered ({type(_REGISTRY[name]).__name__})")
    _REGISTRY[name] = family
    return family


def unregister_family(name: str) -> ModelFamily:
    """Remove and return the family registered as ``name``; KeyError when there is none."""
    return _REGISTRY.pop(name)


def family_names() -> tuple[str, ...]:
    """Registered family names, built-ins first, then in registration order."""
    return tuple(_REGISTRY)


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name`` (``model.family``).

    Raises:
        ValueError: unknown name; the message lists the registered families.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"model.family={name!r} is unknown ({', '.join(_REGISTRY)})") from None


def find_family(model: object) -> Optional[ModelFamily]:
    """The family of a built model (``model.cfg.family``), or ``None`` when it has no ``cfg.family`` or that
    name is not registered."""
    name = getattr(getattr(model, "cfg", None), "family", None)
    return _REGISTRY.get(name) if isinstance(name, str) else None


def family_of(model: object) -> ModelFamily:
    """The family of a built model (``model.cfg.family``).

    Raises:
        ValueError: the model has no ``cfg`` (not built by an mmtl family), or its family is not registered.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or getattr(cfg, "family", None) is None:
        raise ValueError(f"{type(model).__name__} has no .cfg.family: not a model built by an mmtl model family")
    return get_family(cfg.family)


for _cls in BUILTIN_FAMILIES:
    register_family(_cls())
