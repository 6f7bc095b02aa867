"""Rules for user strings that become names: run names (a folder under the runs root, an MLflow run name),
eval-set names (metric prefixes), MLflow experiment and registered-model names.

Every check raises ``ValueError`` with the field, the reason and, where one exists, a safe name to use instead;
:func:`safe_run_name` makes a name safe (used for the default run name, the pipeline file's stem).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable

RUN_NAME_MAX = 100
"""Characters in a run name: the run folder also gets ``-N`` suffixes and Ray Train / checkpoint subfolders
below it; file systems stop at 255 bytes per name."""
SET_NAME_MAX = 64
MODEL_NAME_MAX = 256  # MLflow's registry stores names in a 256-character column
EXPERIMENT_NAME_MAX = 500  # MLflow's MAX_EXPERIMENT_NAME_LENGTH

_RUN_CHARS = "A-Za-z0-9._=+,-"
_SET_CHARS = "A-Za-z0-9_.-"
RESERVED_RUN_NAMES = frozenset({"cache", "mlartifacts", "mlruns", "retrain", "mlflow.db"})
"""Names of what mmtl keeps directly under the runs root (feature cache, MLflow store and artifacts, retrain
manifests): a run of that name would write into them."""
RESERVED_SET_NAMES = frozenset({"train", "before", "ridge", "model", "data"})
"""Metric prefixes mmtl writes itself (``train/loss``, ``before/...``, ``ridge/...``, ``model/...``,
``data/...``); ``train`` is also the training split."""


def _why_unsafe(name: str, max_len: int, chars: str) -> str | None:
    """Why ``name`` is not a safe name made of ``chars`` (a regex character-class body), or None."""
    if not name:
        return "it is empty"
    if name != name.strip():
        return "it starts or ends with whitespace"
    if len(name) > max_len:
        return f"it has {len(name)} characters (at most {max_len})"
    if "/" in name or "\\" in name:
        return "it contains a path separator (/ or \\)"
    if name in (".", "..") or name.startswith(".."):
        return "it is or starts with '..' (a parent folder)"
    bad = sorted({c for c in name if not re.match(f"[{chars}]", c)})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        return f"it contains {shown} (glob, shell or control characters, or spaces)"
    if not name[0].isascii() or not name[0].isalnum():
        return "it must start with a letter or digit"
    return None


def safe_run_name(name: str, max_len: int = RUN_NAME_MAX) -> str:
    """``name`` made into a valid run name: accents dropped, runs of other characters -> ``-``, leading
    punctuation removed; over ``max_len`` characters it is cut and ends in ``-`` + 8 hex digits of the full
    name's sha1 (so distinct long names stay distinct). Empty results become ``run``."""
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._=+,-]+", "-", text)
    text = re.sub(r"\.{2,}", ".", text).lstrip("._=+,-").rstrip("-") or "run"
    if text in RESERVED_RUN_NAMES:
        text = f"run-{text}"
    if len(text) > max_len:
        digest = hashlib.sha1(str(name).encode()).hexdigest()[:8]
        text = text[: max_len - 9].rstrip("-.") + "-" + digest
    return text


def check_run_name(name: str, field: str = "train.name") -> None:
    """Raise ValueError unless ``name`` is one folder name directly under the runs root (letters, digits and
    ``. _ = + , -``, starting with a letter or digit, at most :data:`RUN_NAME_MAX` characters, not one of
    :data:`RESERVED_RUN_NAMES`); the message suggests :func:`safe_run_name`."""
    why = _why_unsafe(name, RUN_NAME_MAX, _RUN_CHARS)
    if why is None and name in RESERVED_RUN_NAMES:
        why = f"mmtl keeps its own {name!r} under the runs root"
    if why:
        raise ValueError(f"{field}={name!r} cannot be a run name: {why}; it names a folder under train.runs_root "
                         f"and an MLflow run. Use for example {field}={safe_run_name(name)}")


def check_set_names(names: Iterable[str], field: str) -> None:
    """Raise ValueError unless every eval-set name is a valid metric prefix: letters, digits, ``_ . -``,
    starting with a letter or digit, at most :data:`SET_NAME_MAX` characters, not one of
    :data:`RESERVED_SET_NAMES`."""
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{field}: set name {name!r} must be text")
        why = _why_unsafe(name, SET_NAME_MAX, _SET_CHARS)
        if why is None and name in RESERVED_SET_NAMES:
            why = f"mmtl writes its own '{name}/...' metrics"
        if why:
            fix = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")[:SET_NAME_MAX] or "set"
            if fix in RESERVED_SET_NAMES:
                fix = f"{fix}_eval"
            raise ValueError(f"{field}: eval-set name {name!r} cannot be used: {why}; it becomes the metric prefix "
                             f"'{name}/...'. Use for example {fix!r}")


def check_model_name(name: str, field: str = "tracking.model_name") -> None:
    """Raise ValueError unless ``name`` is a registered-model name MLflow accepts and ``models:/NAME/1`` /
    ``models:/NAME@alias`` can spell: letters, digits and ``_ . -`` only (so no ``/``, ``:``, ``@``, ``%``, glob /
    shell / control characters or spaces), starting with a letter or digit, at most :data:`MODEL_NAME_MAX`
    characters."""
    why = _why_unsafe(name, MODEL_NAME_MAX, _SET_CHARS)
    if why:
        fix = re.sub(r"[^A-Za-z0-9_.-]+", "-", safe_run_name(name, MODEL_NAME_MAX))
        raise ValueError(f"{field}={name!r} cannot be a registered model name: {why}; it is used in models:/NAME/1 "
                         f"URIs. Use for example {field}={fix}")


def check_experiment_name(name: str, field: str = "tracking.experiment") -> None:
    """Raise ValueError when ``name`` is empty, has surrounding whitespace or control characters, or is longer
    than MLflow allows (:data:`EXPERIMENT_NAME_MAX`). ``/`` is allowed (Databricks experiments are paths)."""
    why = None
    if not name or not name.strip():
        why = "it is empty"
    elif name != name.strip():
        why = "it starts or ends with whitespace"
    elif len(name) > EXPERIMENT_NAME_MAX:
        why = f"it has {len(name)} characters (MLflow allows {EXPERIMENT_NAME_MAX})"
    elif any(unicodedata.category(c).startswith("C") for c in name):
        why = "it contains control characters"
    if why:
        raise ValueError(f"{field}={name!r} cannot be an MLflow experiment name: {why}")
