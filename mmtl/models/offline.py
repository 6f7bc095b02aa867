"""Lazy imports of the model libraries with the HuggingFace hub forced offline (mmtl never downloads).

Shared by every family module (:mod:`mmtl.models.two_tower`, :mod:`mmtl.models.hf_clip`,
:mod:`mmtl.models.open_clip_family`, :mod:`mmtl.models.open_clip_text`) so that none of them imports another
family's private helpers; importing this module imports neither library.
"""
from __future__ import annotations

import os


def _force_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def transformers_offline():
    """The ``transformers`` module, imported after setting ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``."""
    _force_offline()
    import transformers

    return transformers


def open_clip_offline():
    """The ``open_clip`` module, imported after setting ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``."""
    _force_offline()
    import open_clip

    return open_clip
