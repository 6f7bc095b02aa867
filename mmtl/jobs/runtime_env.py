"""The runtime_env of an mmtl job and the redaction of everything printed about it.

``runtime_env`` = ``cluster/runtime_env.yaml`` (or :data:`DEFAULT_RUNTIME_ENV`) + forwarded settings
(:data:`FORWARDED_ENV`) + forwarded secrets (:data:`SECRET_ENV`) + explicit env; see :mod:`mmtl.jobs.submit`.
Secrets are never printed: every runtime_env shown goes through :func:`redact`.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

import yaml

RUNTIME_ENV_FILE = "cluster/runtime_env.yaml"

#: Always excluded from the uploaded working_dir (added to the runtime_env file's own ``excludes``).
DEFAULT_EXCLUDES = [
    "runs/", ".venv/", "venv/", ".git", "mlruns/", "mlartifacts/", "*.db", "__pycache__/", "*.pyc",
    ".pytest_cache/", "*.egg-info/", "build/", "dist/", "/tmp/", "*.log",
]

#: Env vars ``cluster/runtime_env.yaml`` must set (tests/test_infra.py checks the file).
REQUIRED_ENV_VARS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "0",
    "PYTHONUNBUFFERED": "1",
    # `mmtl run` calls ray.init(runtime_env={"env_vars": ...}) with keys the job's runtime_env also sets;
    # without this Ray refuses to merge the two ("Failed to merge the Job's runtime env").
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}

#: Used when the project has no ``cluster/runtime_env.yaml`` (e.g. mmtl installed from a wheel).
DEFAULT_RUNTIME_ENV = {"env_vars": dict(REQUIRED_ENV_VARS), "excludes": list(DEFAULT_EXCLUDES)}

#: Non-secret settings copied from the submitting environment into the job's env when set.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
    "MMTL_KILL_AT", "MMTL_STEP_TRACE",
)

#: Secrets copied from the submitting environment into the job's env when set; never printed.
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCESS_KEY",
)

#: Any env var whose name matches this is redacted in printed output, forwarded or not.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|(^|_)(PASS|TOKEN|CREDENTIALS?|PRIVATE|KEY|CONNECTION_STRING)(_|$)",
                         re.IGNORECASE)
REDACTED = "***"


def _redact_uri(value: str) -> str:
    """``scheme://user:pass@host/...`` -> ``scheme://user:***@host/...``; other strings unchanged."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.password:
        netloc = f"{parts.username or ''}:{REDACTED}@{parts.hostname or ''}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return value


_URI_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^@\s/]+@")


def redact_text(text: str) -> str:
    """Mask ``user:password@`` inside any URI in ``text``."""
    return _URI_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)


def redact(runtime_env: dict) -> dict:
    """A copy of ``runtime_env`` safe to print: secret-looking env vars become ``***`` and passwords inside
    URIs are masked."""
    out = copy.deepcopy(runtime_env)
    env = out.get("env_vars") or {}
    for k, v in list(env.items()):
        if k in SECRET_ENV or SECRET_NAME.search(k):
            env[k] = REDACTED
        elif isinstance(v, str):
            env[k] = _redact_uri(v)
    return out


def load_runtime_env(runtime_env_file: Optional[str], working_dir: str) -> dict:
    """The base runtime_env: ``runtime_env_file``, else ``<working_dir>/cluster/runtime_env.yaml`` if it
    exists, else :data:`DEFAULT_RUNTIME_ENV`.

    Raises:
        FileNotFoundError: ``runtime_env_file`` given but missing.
        ValueError: the file is not a YAML mapping.
    """
    if runtime_env_file is None:
        cand = Path(working_dir) / RUNTIME_ENV_FILE
        if not cand.is_file():
            return copy.deepcopy(DEFAULT_RUNTIME_ENV)
        runtime_env_file = str(cand)
    path = Path(runtime_env_file)
    if not path.is_file():
        raise FileNotFoundError(f"runtime_env file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a runtime_env must be a YAML mapping, got {type(data).__name__}")
    return data


def build_runtime_env(working_dir: str, runtime_env_file: Optional[str] = None, env: Optional[dict] = None,
                      pip: Optional[list[str]] = None) -> dict:
    """The job's runtime_env (see the module docstring for what is merged, in which order).

    Raises:
        FileNotFoundError / ValueError: from :func:`load_runtime_env`.
    """
    rt = load_runtime_env(runtime_env_file, working_dir)
    rt["working_dir"] = str(Path(working_dir).resolve())
    rt["excludes"] = list(dict.fromkeys([*(rt.get("excludes") or []), *DEFAULT_EXCLUDES]))
    env_vars = {k: str(v) for k, v in (rt.get("env_vars") or {}).items()}
    for name in (*FORWARDED_ENV, *SECRET_ENV):
        if os.environ.get(name):
            env_vars[name] = os.environ[name]
    env_vars.update({k: str(v) for k, v in (env or {}).items()})
    rt["env_vars"] = env_vars
    if pip:
        rt["pip"] = list(dict.fromkeys([*(rt.get("pip") or []), *pip]))
    return rt
