"""MLflow tracking: run creation, params, per-step metrics from rank 0, system info, model registry.

Default store: with no ``tracking.uri`` every run under one runs root shares ``sqlite:///<runs_root>/mlflow.db``
with artifacts in ``<runs_root>/mlartifacts`` (so the registry and its aliases span runs). An ``http://``
server works the same way. Params longer than :data:`MAX_PARAM_CHARS` are not cut: the param records a
pointer and the full resolved pipeline is always logged as ``pipeline.yaml``.
"""
from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

MAX_PARAM_CHARS = 500
_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_name(name: str) -> str:
    """A legal MLflow metric name (``@`` -> ``_at_``; other illegal characters -> ``_``)."""
    return _BAD.sub("_", name.replace("@", "_at_"))


def tracking_uri(uri: Optional[str], runs_root: str) -> str:
    """The MLflow tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the shared local sqlite
    store under ``runs_root``."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    Path(runs_root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str, runs_root: str) -> str:
    """Get or create experiment ``name``; local stores put artifacts under ``<runs_root>/mlartifacts``."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = None
    if not uri.startswith(("http://", "https://", "databricks")):
        loc = (Path(runs_root).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=loc)


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
    params = []
    for k, v in flatten(pipeline).items():
        s = str(v)
        params.append(Param(k, s if len(s) <= MAX_PARAM_CHARS else f"<{len(s)} chars: see pipeline.yaml>"))
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
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buf += [Metric(metric_name(k), float(v), ts, step) for k, v in metrics.items()]
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
