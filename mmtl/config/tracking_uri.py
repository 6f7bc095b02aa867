"""Where the MLflow tracking store is, as strings and paths only (no MLflow import): checking a tracking URI,
making a relative ``sqlite:``/``file:`` URI absolute, the default store of a runs root and its artifact root.
:mod:`mmtl.tracking.mlflow_utils` resolves the URI once per run with these."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

_REMOTE = ("http://", "https://", "databricks", "postgresql", "mysql", "mssql", "uc:", "mlflow-artifacts:")

def check_tracking_uri(uri: str, field: str = "tracking.uri") -> None:
    """Raise ValueError for a tracking URI no two processes can share: empty, or an in-memory sqlite store
    (``sqlite://``, ``sqlite:///:memory:``)."""
    text = str(uri).strip()
    if not text:
        raise ValueError(f"{field} is empty: leave it out (null) for the default store under train.runs_root")
    if text.startswith("sqlite:"):
        path = text.split("?", 1)[0][len("sqlite:"):]
        if path in ("", "//", "///") or path.endswith(":memory:"):
            raise ValueError(f"{field}={uri!r} is an in-memory sqlite store: every Ray worker would get its own empty "
                             "store. Use a file, e.g. sqlite:////abs/path/mlflow.db, or null for the default store")


def absolute_tracking_uri(uri: str, base: Path | str) -> str:
    """``uri`` with a relative local store made absolute against ``base``: ``sqlite:///rel.db``,
    ``file:rel`` / ``file:./rel`` and a plain path (MLflow's file store) become ``sqlite:////abs/rel.db`` /
    ``file:///abs/rel``; ``~`` is expanded; absolute and remote URIs are returned unchanged.

    Raises:
        ValueError: see :func:`check_tracking_uri`.
    """
    check_tracking_uri(uri)
    text = str(uri).strip()
    if text.startswith(_REMOTE):
        return text
    base = Path(base)
    if text.startswith("sqlite:///"):
        rest, _, query = text[len("sqlite:///"):].partition("?")
        path = Path(os.path.expanduser(rest))
        path = path if path.is_absolute() else base / path
        return f"sqlite:///{os.path.normpath(path)}" + (f"?{query}" if query else "")
    if text.startswith("file:"):
        rest = text[len("file:"):]
        if rest.startswith("//") and not rest.startswith("///"):  # file://host/... : leave to MLflow
            return text
        rest = rest.lstrip("/") if rest.startswith("///") else rest
        path = Path(os.path.expanduser(("/" + rest) if text.startswith("file:///") else rest))
        path = path if path.is_absolute() else base / path
        return Path(os.path.normpath(path)).as_uri()
    if "://" in text or re_scheme(text):
        return text
    path = Path(os.path.expanduser(text))  # a plain path: MLflow's file store
    return Path(os.path.normpath(path if path.is_absolute() else base / path)).as_uri()


def re_scheme(text: str) -> bool:
    """True when ``text`` starts with a URI scheme (``name:``) that is not a Windows drive letter."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", text))


def default_tracking_uri(runs_root: str) -> str:
    """The shared local store of a runs root: ``sqlite:///<runs_root absolute>/mlflow.db``; for a runs root on
    object storage, in its local staging folder (:func:`mmtl.storage.local_root`: a sqlite file cannot live in
    a bucket; give an MLflow server as ``tracking.uri`` to keep runs beyond this machine)."""
    from mmtl.storage import local_root

    return f"sqlite:///{Path(local_root(runs_root)).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(uri: Optional[str], runs_root: str) -> str:
    """The one tracking URI a run uses (no side effects): ``uri`` (made absolute against the current directory if
    it is still relative; pipelines resolve theirs against the project root when loaded), else
    ``$MLFLOW_TRACKING_URI`` (relative to the current directory), else :func:`default_tracking_uri`.

    Raises:
        ValueError: an unusable URI (:func:`check_tracking_uri`), naming where it came from.
    """
    if uri:
        return absolute_tracking_uri(uri, Path.cwd())
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        try:
            return absolute_tracking_uri(env, Path.cwd())
        except ValueError as exc:
            raise ValueError(str(exc).replace("tracking.uri", "$MLFLOW_TRACKING_URI")) from None
    return default_tracking_uri(runs_root)


def local_store_path(uri: str) -> Optional[Path]:
    """The file (sqlite) or folder (file store) of an absolute local tracking URI, else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if uri.startswith("file:///"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    return None


def existing_store_uri(uri: Optional[str]) -> Optional[str]:
    """For commands that read a store (``mmtl eval runs:/...``): ``uri`` (``--tracking-uri``), else
    ``$MLFLOW_TRACKING_URI``, made absolute against the current directory; None when neither is set.

    Raises:
        ValueError: a local store (sqlite file or file-store folder) that does not exist: opening it would
            create a new, empty store instead of reading the one meant.
    """
    text = (uri or os.environ.get("MLFLOW_TRACKING_URI") or "").strip()
    if not text:
        return None
    out = absolute_tracking_uri(text, Path.cwd())
    local = local_store_path(out)
    if local is not None and not local.exists():
        src = "--tracking-uri" if uri else "$MLFLOW_TRACKING_URI"
        raise ValueError(f"{src} {text!r} names {local}, which does not exist (no MLflow store there); a run's "
                         "store is <runs_root>/mlflow.db unless its tracking.uri says otherwise")
    return out


def artifact_root(uri: str, runs_root: str) -> Optional[str]:
    """Where new experiments of a local store keep artifacts: ``<runs_root>/mlartifacts`` (also for a runs root
    on object storage: ``s3://bucket/prefix/mlartifacts``); None for a server (its own artifact store)."""
    from mmtl.storage import is_remote, join

    if uri.startswith(("http://", "https://", "databricks")):
        return None
    if is_remote(runs_root):
        return join(runs_root, "mlartifacts")
    return str(Path(runs_root).resolve() / "mlartifacts")
