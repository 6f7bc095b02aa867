"""MLflow tracking: run creation, params, per-step metrics from rank 0, system info, model registry.

Default store: with no ``tracking.uri`` every run under one runs root shares ``sqlite:///<runs_root>/mlflow.db``
with artifacts in ``<runs_root>/mlartifacts`` (so the registry and its aliases span runs). An ``http://``
server works the same way. Params longer than :data:`MAX_PARAM_CHARS` are not cut: the param records a
pointer and the full resolved pipeline is always logged as ``pipeline.yaml``.

One store: the tracking URI is resolved once, in the driver (:func:`resolve_tracking_uri`: ``tracking.uri``,
else ``$MLFLOW_TRACKING_URI``, else the default), to an absolute URI: a relative ``sqlite:`` / ``file:`` / plain
path URI in a pipeline is relative to the pipeline's project root (done by :func:`mmtl.config.load_pipeline`),
one from the environment or ``--tracking-uri`` to the current directory. That URI is passed to every worker,
used as the registry URI too, and for every artifact download (:func:`download_artifacts`), so no process
falls back to MLflow's default store (``./mlflow.db`` in its own working directory). In-memory sqlite is
refused (each process would get its own empty store).
"""
from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

MAX_PARAM_CHARS = 500
MAX_KEY_CHARS = 250  # MLflow's limit for metric, param and tag keys
_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_name(name: str) -> str:
    """A legal MLflow metric / param key: ``@`` -> ``_at_``; other illegal characters -> ``_``; no empty, ``.``
    or ``..`` path parts, no leading or doubled ``/`` (MLflow refuses keys that are not unique as file paths);
    over :data:`MAX_KEY_CHARS` characters it is cut and ends in ``_`` + 8 hex digits of the full key's sha1."""
    import hashlib

    key = _BAD.sub("_", str(name).replace("@", "_at_"))
    parts = [p for p in key.split("/") if p not in ("", ".")]
    key = "/".join("_" * len(p) if set(p) == {"."} else p for p in parts) or "_"
    if len(key) > MAX_KEY_CHARS:
        key = key[: MAX_KEY_CHARS - 9] + "_" + hashlib.sha1(str(name).encode()).hexdigest()[:8]
    return key


from mmtl.config.tracking_uri import (absolute_tracking_uri, artifact_root, check_tracking_uri,  # noqa: E402,F401
                                      default_tracking_uri, existing_store_uri, local_store_path, re_scheme,
                                      resolve_tracking_uri)


def tracking_uri(uri: Optional[str], runs_root: str) -> str:
    """:func:`resolve_tracking_uri`, and the folder of a local sqlite store (or a file store) created, so every
    process opens the same file. Call once, in the driver, and pass the result on."""
    out = resolve_tracking_uri(uri, runs_root)
    local = local_store_path(out)
    if local is not None:
        (local.parent if out.startswith("sqlite:") else local).mkdir(parents=True, exist_ok=True)
    return out


def artifact_location(uri: str, artifact_uri: str) -> str:
    """Where the artifacts behind ``artifact_uri`` are stored (``file://``, ``mlflow-artifacts:``, ``s3://`` ...),
    looked up in the store ``uri`` with a client bound to it (and run artifacts listed in the run's own
    artifact location), for ``models:/NAME/VERSION``, ``models:/NAME/latest``,
    ``models:/NAME@ALIAS``, ``models:/m-<logged model id>`` and ``runs:/RUN_ID/PATH`` (a run artifact, or the
    run's logged model named by PATH's first part), each optionally followed by ``/sub/path``. MLflow's own
    ``models:/`` and ``runs:/`` resolution uses the process-wide default registry (MLflow 3: ``./mlflow.db``,
    created if absent) whatever ``tracking_uri``/``registry_uri`` it is given (mlflow#16412, #8953; also
    ``MlflowClient.list_artifacts`` of a run, through its logged-model fallback). Other URIs are returned as is.

    Raises:
        mlflow.exceptions.MlflowException: unknown run, model, version or alias.
        ValueError: a malformed URI.
    """
    client = _client(uri)

    def join(base: str, sub: str) -> str:
        return base.rstrip("/") + ("/" + sub.strip("/") if sub.strip("/") else "")

    if artifact_uri.startswith("models:/"):
        rest = artifact_uri[len("models:/"):].strip("/")
        head, _, tail = rest.partition("/")
        if head.startswith("m-") and "@" not in head:
            return join(client.get_logged_model(head).artifact_location, tail)
        if "@" in head:
            name, alias = head.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
            sub = tail
        else:
            name = head
            version, _, sub = tail.partition("/")
            if not version:
                raise ValueError(f"{artifact_uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
            if version == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    from mlflow.exceptions import MlflowException

                    raise MlflowException(f"registered model {name!r} has no versions")
                version = str(max(int(v.version) for v in versions))
            mv = client.get_model_version(name, version)
        if str(mv.source).startswith("models:/m-"):  # MLflow 3: the version points at a logged model
            return join(client.get_logged_model(str(mv.source)[len("models:/"):].strip("/")).artifact_location, sub)
        return join(client.get_model_version_download_uri(mv.name, mv.version), sub)
    if artifact_uri.startswith("runs:/"):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        rest = artifact_uri[len("runs:/"):].strip("/")
        run_id, _, path = rest.partition("/")
        run = client.get_run(run_id)
        first, _, sub = path.partition("/")
        repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=uri, registry_uri=uri)
        if not first or any(f.path.split("/")[-1] == first for f in repo.list_artifacts()):
            return join(run.info.artifact_uri, path)
        for m in client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                             filter_string=f"name = '{first}'"):
            if m.source_run_id == run_id:
                return join(m.artifact_location, sub)
        return join(run.info.artifact_uri, path)
    return artifact_uri


def download_artifacts(uri: str, artifact_uri: str, dst: str) -> str:
    """Download ``artifact_uri`` (``runs:/``, ``models:/`` or a storage URI) from the store ``uri`` into ``dst``;
    returns the local path. ``models:/`` and ``runs:/`` are resolved in ``uri`` itself
    (:func:`artifact_location`), so nothing falls back to MLflow's default store in the current directory.

    Raises:
        mlflow.exceptions.MlflowException: unknown run / model / version / alias, or missing artifacts.
    """
    import mlflow.artifacts

    location = artifact_location(uri, artifact_uri)
    return mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=dst, tracking_uri=uri)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(uri: str, name: str, runs_root: str) -> str:
    """Get or create experiment ``name``; local stores put artifacts under ``<runs_root>/mlartifacts``."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = artifact_root(uri, runs_root)
    return client.create_experiment(name, artifact_location=Path(loc).as_uri() if loc else None)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def system_info() -> dict[str, str]:
    """Versions and hardware of this process's machine (logged as tags)."""
    import torch

    info = {
        "sys.python": platform.python_version(),
        "sys.platform": platform.platform(),
        "sys.cpu_count": str(os.cpu_count()),
        "sys.torch": torch.__version__,
        "sys.cuda_available": str(torch.cuda.is_available()),
    }
    for mod in ("ray", "deepspeed", "transformers", "timm", "open_clip", "peft", "mlflow"):
        try:
            info[f"sys.{mod}"] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional packages
            pass
    if torch.cuda.is_available():
        info["sys.gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return info


def start_run(uri: str, experiment: str, runs_root: str, run_name: str, pipeline: dict, pipeline_yaml: str) -> str:
    """Create a run, log the flattened pipeline as params (long values point to the YAML artifact),
    ``pipeline.yaml`` as an artifact and system info as tags; return the run id."""
    from mlflow.entities import Param, RunTag

    client = _client(uri)
    run = client.create_run(experiment_id(uri, experiment, runs_root), run_name=run_name)
    rid = run.info.run_id
    params, seen = [], set()
    for k, v in flatten(pipeline).items():
        s = str(v)
        key = metric_name(k)  # keys of free-form dicts are user text
        while key in seen:
            key = metric_name(key + "_")
        seen.add(key)
        params.append(Param(key, s if len(s) <= MAX_PARAM_CHARS else f"<{len(s)} chars: see pipeline.yaml>"))
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i : i + 100])
    client.log_batch(rid, tags=[RunTag(k, v) for k, v in system_info().items()])
    client.log_text(rid, pipeline_yaml, "pipeline.yaml")
    return rid


class MetricLogger:
    """Buffered metric logging to one run (rank 0 only); flushes every ``every`` calls and on ``close``."""

    def __init__(self, uri: str, run_id: str, every: int = 10):
        self.client, self.run_id, self.every = _client(uri), run_id, every
        self._buf: list = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step``; values that are not numbers (None: a metric undefined on this data,
        e.g. CIDEr-D of one image; text: its reason) are not metrics and are left to the run's JSON files."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buf += [Metric(metric_name(k), float(v), ts, step) for k, v in metrics.items()
                      if isinstance(v, (int, float))]
        if len(self._buf) >= self.every * max(1, len(metrics)):
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buf), 1000):
            self.client.log_batch(self.run_id, metrics=self._buf[i : i + 1000])
        self._buf = []

    close = flush


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: Optional[int] = None) -> None:
    """Log a dict of metrics once (names made legal)."""
    logger = MetricLogger(uri, run_id)
    logger.log(metrics, step or 0)
    logger.flush()


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(uri: str, run_id: str, paths: Iterable[Path], artifact_path: Optional[str] = None) -> None:
    client = _client(uri)
    for p in paths:
        p = Path(p)
        if p.is_dir():
            client.log_artifacts(run_id, str(p), artifact_path)
        elif p.exists():
            client.log_artifact(run_id, str(p), artifact_path)
