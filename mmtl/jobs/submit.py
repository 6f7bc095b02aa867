"""Ray Jobs submission: ``mmtl submit`` / ``status`` / ``logs`` / ``stop`` against a Ray dashboard address.

``submit`` validates the pipeline locally first (a bad pipeline or override fails before any server is
contacted), uploads the project directory as the job's ``working_dir`` (``runs/``, virtualenvs, ``.git``,
``mlruns``, ``*.db`` ... excluded), and starts ``mmtl run <pipeline> <overrides...>`` on the cluster.

The job's ``runtime_env`` is ``cluster/runtime_env.yaml`` (or :data:`DEFAULT_RUNTIME_ENV` when the project
has none) with, in increasing priority:

* settings forwarded from this process's environment when set (:data:`FORWARDED_ENV`, e.g.
  ``MLFLOW_TRACKING_URI``, ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_REGION``);
* secrets forwarded from this process's environment when set (:data:`SECRET_ENV`, e.g.
  ``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``). Their values are never printed or logged: every
  runtime_env shown goes through :func:`redact`. Note that Ray stores a job's runtime_env in its job table,
  so anyone who can reach the dashboard can read them there; on Kubernetes prefer Secret refs on the pods
  (``infra/kuberay``) and leave them out of the submitting environment;
* the ``env`` argument.

When ``MLFLOW_TRACKING_URI`` is forwarded and the pipeline (after overrides) names no ``tracking.uri``, the
entrypoint gets ``"tracking.uri=${MLFLOW_TRACKING_URI}"``: the job's shell expands it from the job's env, so
the value does not appear in the entrypoint text.

Paths: the pipeline must be inside ``working_dir`` (it is passed relative to it). Relative paths in the
pipeline resolve on the cluster against the uploaded copy; ``train.runs_root`` defaults to ``runs`` under the
job's temporary working directory, so on a real cluster pass ``train.runs_root=/mnt/runs`` (shared storage)
and a ``tracking.uri`` of an MLflow server.

Ray token authentication: a cluster started while ``~/.ray/auth_token`` exists runs with token auth, and its
jobs API answers 401 to a client that does not send the token (Ray's own client only sends it when
``RAY_AUTH_MODE=token`` is set). :func:`auth_headers` sends ``Authorization: Bearer <token>`` when
``RAY_AUTH_MODE=token``, or when the address is on this machine (loopback) and a token is found
(``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``); ``RAY_AUTH_MODE=disabled``
sends none. For a remote cluster with token auth set ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (or the
token file); a local token is never sent to a remote address unless asked to.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional, TextIO
from urllib.parse import urlsplit

from mmtl.jobs.runtime_env import (  # noqa: F401  (re-exported: mmtl.jobs.submit is the public entry)
    DEFAULT_EXCLUDES, DEFAULT_RUNTIME_ENV, FORWARDED_ENV, REDACTED, REQUIRED_ENV_VARS, RUNTIME_ENV_FILE, SECRET_ENV,
    SECRET_NAME, build_runtime_env, load_runtime_env, redact, redact_text,
)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

POINT_AT_CLUSTER = (
    "Point mmtl at your cluster's job-submission API (the Ray dashboard, port 8265): --dashboard http://HEAD:8265 "
    "or export RAY_ADDRESS=http://HEAD:8265. For a cluster started with `ray up CLUSTER.yaml`, "
    "`ray dashboard CLUSTER.yaml` tunnels it to http://127.0.0.1:8265 (the default); on this machine "
    "`ray start --head --dashboard-host 127.0.0.1` starts one.")
"""How to point the job commands at a cluster: added to every "cannot reach" error."""

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

Say = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- helpers


def resolve_address(address: Optional[str] = None) -> str:
    """The jobs API address: ``address``, else ``RAY_ADDRESS`` when it is an ``http(s)://`` dashboard address,
    else :data:`DEFAULT_ADDRESS`. ``host:port`` gets ``http://`` in front.

    (``RAY_ADDRESS`` may also hold a GCS ``host:6379`` address for ``ray.init``; that one is not a jobs API
    address and is ignored here.)
    """
    if not address:
        env = os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def _is_loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token() -> Optional[str]:
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        tok = Path(path).read_text().strip()
    except OSError:
        return None
    return tok or None


def auth_headers(address: str) -> dict:
    """HTTP headers for Ray token authentication (see the module docstring for when a token is sent).

    Raises:
        RuntimeError: ``RAY_AUTH_MODE=token`` but no token in ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
            ``~/.ray/auth_token``.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = _read_token()
    if mode == "token" and not token:
        raise RuntimeError("RAY_AUTH_MODE=token but no Ray auth token found: set RAY_AUTH_TOKEN, "
                           "RAY_AUTH_TOKEN_PATH, or create ~/.ray/auth_token (`ray get-auth-token`)")
    if token and (mode == "token" or _is_loopback(address)):
        return {"Authorization": f"Bearer {token}"}
    return {}


def _client(address: Optional[str]):
    """A connected ``JobSubmissionClient``.

    Raises:
        ConnectionError: no Ray jobs API at the address, or it refused our credentials.
    """
    from ray.job_submission import JobSubmissionClient

    addr = resolve_address(address)
    headers = auth_headers(addr)
    try:
        return JobSubmissionClient(addr, headers=headers or None)
    except ConnectionError as exc:
        raise ConnectionError(f"cannot reach the Ray jobs API at {addr}: {exc}\n{POINT_AT_CLUSTER}") from exc
    except RuntimeError as exc:  # HTTP errors from the version check, e.g. 401/403 from token auth
        hint = ""
        if "401" in str(exc) or "403" in str(exc) or "uthentica" in str(exc):
            hint = (" (the cluster uses Ray token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or put "
                    "the cluster's token in ~/.ray/auth_token)")
        raise ConnectionError(f"Ray jobs API at {addr} refused the request: {exc}{hint}") from exc


def temporary_outputs(pipe, working_dir: str, tracking_from_env: bool = False) -> list[str]:
    """Why a submitted run's results would be lost when the job ends (empty: they are kept): the runs root
    (checkpoints, exports, ``summary.json``) or a file-based MLflow store inside ``working_dir``, which the
    cluster sees as the job's temporary copy of the project.

    Args:
        pipe: the loaded pipeline (paths resolved against the local project).
        working_dir: the folder uploaded as the job's working_dir.
        tracking_from_env: ``MLFLOW_TRACKING_URI`` is forwarded to the job (it sets ``tracking.uri``).
    """
    from mmtl.storage import is_remote

    root = Path(working_dir).resolve()

    def inside(path: str) -> bool:
        if is_remote(path):  # s3://, gs://: outlives the job
            return False
        p = Path(path).resolve()
        return p == root or root in p.parents

    out = []
    if inside(pipe.train.runs_root):
        out.append(f"train.runs_root ({pipe.train.runs_root}) is inside the uploaded working_dir, so on the cluster "
                   "it is in the job's temporary folder: checkpoints, exports and summary.json are lost when the job "
                   "ends. Add train.runs_root=/mnt/runs (storage every node shares).")
    uri = pipe.tracking.uri
    if not tracking_from_env and (uri is None or uri.startswith(("sqlite:", "file:"))):
        local = uri.split(":", 1)[1].lstrip("/") if uri else None
        if uri is None and is_remote(pipe.train.runs_root):
            out.append(f"train.runs_root is {pipe.train.runs_root} but the default MLflow store is a sqlite file on "
                       "the node that runs the job (object storage cannot hold one): add "
                       "tracking.uri=http://MLFLOW:5000 (an MLflow server) or export MLFLOW_TRACKING_URI.")
        elif uri is None and inside(pipe.train.runs_root) or (local and inside("/" + local)):
            out.append("the MLflow store is a file in the job's temporary folder: add tracking.uri=http://MLFLOW:5000 "
                       "(an MLflow server) or export MLFLOW_TRACKING_URI before submitting.")
    return out


def build_entrypoint(pipeline_rel: str, overrides: list[str], add_tracking_uri_from_env: bool = False) -> str:
    """``mmtl run <pipeline> <overrides...>``, each argument shell-quoted."""
    args = ["mmtl", "run", pipeline_rel, *overrides]
    cmd = " ".join(shlex.quote(a) for a in args)
    if add_tracking_uri_from_env:
        cmd += ' "tracking.uri=${MLFLOW_TRACKING_URI}"'
    return cmd


def _relative_pipeline(pipeline_path: str, working_dir: str) -> str:
    pipe = Path(pipeline_path).resolve()
    root = Path(working_dir).resolve()
    try:
        return pipe.relative_to(root).as_posix()
    except ValueError:
        raise ValueError(f"pipeline {pipeline_path} is not inside working_dir {root}: only working_dir is "
                         "uploaded to the cluster; move the pipeline under it or pass --working-dir") from None


# ------------------------------------------------------------------------------------------ public API


def submit(pipeline_path: str, address: Optional[str], overrides: list[str], runtime_env_file: str | None = None,
           env: dict | None = None, working_dir: str = ".", pip: list[str] | None = None, *,
           submission_id: Optional[str] = None, say: Optional[Say] = _stderr) -> str:
    """Validate ``pipeline_path`` (+ ``overrides``) locally, then submit ``mmtl run`` as a Ray job.

    Args:
        pipeline_path: pipeline YAML, inside ``working_dir``.
        address: Ray dashboard / jobs API address (``None``: see :func:`resolve_address`).
        overrides: dotted ``a.b.c=value`` overrides, passed to ``mmtl run`` verbatim.
        runtime_env_file: base runtime_env YAML (default ``<working_dir>/cluster/runtime_env.yaml``).
        env: extra env vars for the job (highest priority).
        working_dir: the directory uploaded as the job's working_dir (the project root).
        pip: extra pip requirements installed for the job.
        submission_id: optional job id to use.
        say: where the one-line summary goes (runtime_env redacted); ``None`` prints nothing.

    Returns:
        The job's submission id.

    Raises:
        PipelineError: the pipeline or an override is invalid (before any server is contacted).
        ValueError: the pipeline is not inside ``working_dir``, or the runtime_env file is not a mapping.
        FileNotFoundError: ``working_dir`` or ``runtime_env_file`` does not exist.
        RuntimeError: ``RAY_AUTH_MODE=token`` without a token, or the server rejected the submission.
        ConnectionError: no Ray jobs API at ``address``.
    """
    from mmtl.config import load_pipeline

    overrides = list(overrides or [])
    pipe = load_pipeline(pipeline_path, overrides)  # fails here, before any network I/O
    if not Path(working_dir).is_dir():
        raise FileNotFoundError(f"working_dir not found: {working_dir}")
    rel = _relative_pipeline(pipeline_path, working_dir)
    rt = build_runtime_env(working_dir, runtime_env_file, env, pip)
    add_uri = pipe.tracking.uri is None and bool(rt["env_vars"].get("MLFLOW_TRACKING_URI"))
    if say:
        for warning in temporary_outputs(pipe, working_dir, add_uri):
            say(f"warning: {warning}")
    entrypoint = build_entrypoint(rel, overrides, add_tracking_uri_from_env=add_uri)
    addr = resolve_address(address)
    if say:
        say(redact_text(f"submitting to {addr}: {entrypoint}\nruntime_env: {redact(rt)}"))
    client = _client(addr)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=rt, submission_id=submission_id,
                               metadata={"mmtl_pipeline": rel, "mmtl_run_name": str(pipe.train.name)})
    if say:
        say(f"submitted job {job_id}")
    return job_id


def status(job_id: str, address: Optional[str] = None) -> str:
    """The job's status: ``PENDING``, ``RUNNING``, ``STOPPED``, ``SUCCEEDED`` or ``FAILED``.

    Raises:
        ConnectionError: no Ray jobs API at ``address``.
        RuntimeError: no such job (HTTP 404) or another server error.
    """
    st = _client(address).get_job_status(job_id)
    return getattr(st, "value", str(st))


def job_info(job_id: str, address: Optional[str] = None) -> dict:
    """Status, message, entrypoint, start/end times of a job (for ``mmtl status --verbose``); the job's
    runtime_env is returned redacted.

    Raises:
        ConnectionError / RuntimeError: as :func:`status`.
    """
    info = _client(address).get_job_info(job_id)
    rt = redact(dict(info.runtime_env or {}))
    return {"job_id": job_id, "status": getattr(info.status, "value", str(info.status)), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time,
            "runtime_env": rt}


def logs(job_id: str, address: Optional[str] = None, follow: bool = False, out: Optional[TextIO] = None) -> str:
    """Print the job's logs (stdout + stderr of ``mmtl run``) to ``out`` (default stdout) and return them.

    With ``follow`` the logs are streamed as they come (``tail_job_logs``) until the job ends.

    Raises:
        ConnectionError: no Ray jobs API at ``address``.
        RuntimeError: no such job, or the log stream closed before the job ended.
    """
    out = out or sys.stdout
    client = _client(address)
    if not follow:
        text = client.get_job_logs(job_id)
        out.write(text)
        out.flush()
        return text

    chunks: list[str] = []

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            chunks.append(chunk)
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())
    return "".join(chunks)


def stop(job_id: str, address: Optional[str] = None) -> bool:
    """Ask the cluster to stop the job. Returns True if it was running and is being stopped, False if it had
    already finished.

    Raises:
        ConnectionError: no Ray jobs API at ``address``.
        RuntimeError: no such job or another server error.
    """
    return bool(_client(address).stop_job(job_id))


def wait(job_id: str, address: Optional[str] = None, timeout_s: float = 600.0, poll_s: float = 2.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED and return that status.

    Raises:
        TimeoutError: still not finished after ``timeout_s``.
        ConnectionError / RuntimeError: as :func:`status`.
    """
    client = _client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.get_job_status(job_id)
        st = getattr(st, "value", str(st))
        if st in TERMINAL:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {st} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def describe_cli() -> str:
    """The commands this module backs (for the CLI's help text)."""
    return (
        "mmtl submit PIPELINE [OVERRIDES...] --dashboard URL [--runtime-env FILE] [--env K=V]... "
        "[--working-dir DIR] [--pip PKG]... [--wait]\n"
        "mmtl status JOB_ID --dashboard URL\n"
        "mmtl logs JOB_ID --dashboard URL [--follow]\n"
        "mmtl stop JOB_ID --dashboard URL\n"
        f"--dashboard defaults to RAY_ADDRESS (an http(s):// dashboard address) or {DEFAULT_ADDRESS}."
    )
