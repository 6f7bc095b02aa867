"""Resolve the MODEL argument of ``mmtl eval`` to an export folder (``model.safetensors`` + ``pipeline.yaml``).

Accepted forms:

* a run directory of ``mmtl run`` (``<run_dir>/export/`` or ``summary.json`` with ``export_path``); its
  ``run.json`` names the MLflow run and tracking URI the run logged to;
* an export folder (``model.safetensors`` + ``pipeline.yaml``), or a downloaded MLflow model folder
  (``MLmodel`` + ``artifacts/model.safetensors`` + ``artifacts/pipeline.yaml``);
* an MLflow model URI: ``runs:/<run_id>/<path>`` (``runs:/<id>/model`` for models logged by mmtl),
  ``models:/<name>@<alias>`` or ``models:/<name>/<version>``. Only ``model.safetensors`` and
  ``pipeline.yaml`` are read from the downloaded model (never its pickled python model). The tracking URI
  comes from the ``tracking_uri`` argument (``--tracking-uri``), else ``$MLFLOW_TRACKING_URI``.

Every bad form raises :class:`ModelSpecError` (a ``ValueError``) with a message saying what was expected.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

EXPORT_FILES = ("model.safetensors", "pipeline.yaml")
FORMS = ("a run directory, an export folder (model.safetensors + pipeline.yaml), runs:/<run_id>/model, "
         "models:/<name>@<alias> or models:/<name>/<version>")
_RUNS = re.compile(r"^runs:/([^/]+)/(.+)$")
_MODELS_ALIAS = re.compile(r"^models:/([^/@]+)@([^/@]+)/?$")
_MODELS_VERSION = re.compile(r"^models:/([^/@]+)/([^/@]+)/?$")


class ModelSpecError(ValueError):
    """The MODEL argument names nothing loadable; the message says why and which forms are accepted."""


@dataclass
class ResolvedModel:
    """Where a MODEL argument points.

    ``kind``: "run_dir", "export", "mlflow_model_dir" or "mlflow_uri". ``mlflow_run_id`` /
    ``tracking_uri``: the MLflow run the model came from (None when unknown). ``temporary``: ``export_dir``
    is a download the caller should delete (see :meth:`cleanup`).
    """

    spec: str
    kind: str
    export_dir: Path
    run_dir: Optional[Path] = None
    mlflow_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    model_uri: Optional[str] = None
    registered: Optional[dict] = None
    temporary: Optional[Path] = None

    def cleanup(self) -> None:
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "export_dir": str(self.export_dir),
                "run_dir": str(self.run_dir) if self.run_dir else None, "mlflow_run_id": self.mlflow_run_id,
                "tracking_uri": self.tracking_uri, "model_uri": self.model_uri, "registered": self.registered}


def _is_export(d: Path) -> bool:
    return all((d / f).is_file() for f in EXPORT_FILES)


def _missing(d: Path) -> list[str]:
    return [f for f in EXPORT_FILES if not (d / f).is_file()]


def _find_export(root: Path) -> Optional[Path]:
    """The shallowest folder under ``root`` holding both export files (MLflow model layouts vary)."""
    if _is_export(root):
        return root
    hits = sorted((p.parent for p in root.rglob("model.safetensors") if _is_export(p.parent)),
                  key=lambda p: (len(p.parts), str(p)))
    return hits[0] if hits else None


def _run_json(run_dir: Path) -> tuple[Optional[str], Optional[str]]:
    p = run_dir / "run.json"
    if not p.is_file():
        return None, None
    try:
        state = json.loads(p.read_text())
    except (OSError, ValueError):
        return None, None
    return state.get("mlflow_run_id"), state.get("tracking_uri")


def _resolve_local(spec: str) -> ResolvedModel:
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelSpecError(f"model {spec!r} not found: expected {FORMS}")
    if not path.is_dir():
        if path.name in EXPORT_FILES and _is_export(path.parent):
            path = path.parent
        else:
            raise ModelSpecError(f"model {spec!r} is a file; expected {FORMS}")
    if _is_export(path):
        run_dir = path.parent if path.name == "export" and (path.parent / "run.json").is_file() else None
        rid, uri = _run_json(run_dir) if run_dir else (None, None)
        return ResolvedModel(spec, "export", path, run_dir=run_dir, mlflow_run_id=rid, tracking_uri=uri)
    if (path / "MLmodel").is_file():
        found = _find_export(path)
        if found is None:
            raise ModelSpecError(f"{spec!r} is an MLflow model folder without model.safetensors + pipeline.yaml: "
                                 "not a model logged by mmtl")
        return ResolvedModel(spec, "mlflow_model_dir", found)
    summary = path / "summary.json"
    export = path / "export"
    if summary.is_file():
        try:
            ep = json.loads(summary.read_text()).get("export_path")
        except (OSError, ValueError) as e:
            raise ModelSpecError(f"{summary} is not valid JSON: {e}") from None
        if ep:
            ep = Path(ep)
            if not ep.is_absolute():
                ep = path / ep
            cand = ep.parent if ep.name == "model.safetensors" or ep.is_file() else ep
            export = cand if cand.is_dir() or not export.is_dir() else export  # a moved run dir: its own export/
    if export.is_dir():
        if not _is_export(export):
            raise ModelSpecError(f"run directory {spec!r}: {export} lacks {', '.join(_missing(export))} "
                                 "(did the run finish?)")
        rid, uri = _run_json(path)
        return ResolvedModel(spec, "run_dir", export, run_dir=path, mlflow_run_id=rid, tracking_uri=uri)
    if summary.is_file() or (path / "run.json").is_file():
        raise ModelSpecError(f"run directory {spec!r} has no export ({export} not found): the run has not "
                             "finished training")
    present = [f for f in EXPORT_FILES if (path / f).is_file()]
    if present:
        raise ModelSpecError(f"export folder {spec!r} lacks {', '.join(_missing(path))}")
    raise ModelSpecError(f"folder {spec!r} is not a model: expected {FORMS}")


def mlflow_tracking_uri(tracking_uri: Optional[str]) -> Optional[str]:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else None; absolute, and an existing local store
    (:func:`mmtl.tracking.mlflow_utils.existing_store_uri`; ValueError otherwise)."""
    from mmtl.tracking.mlflow_utils import existing_store_uri

    return existing_store_uri(tracking_uri)


def _resolve_uri(spec: str, tracking_uri: Optional[str], dst: Optional[str]) -> ResolvedModel:
    registered = None
    if spec.startswith("runs:/"):
        m = _RUNS.match(spec)
        if not m or not m.group(2).strip("/"):
            raise ModelSpecError(f"bad MLflow run URI {spec!r}: expected runs:/<run_id>/model")
    else:
        m_alias, m_ver = _MODELS_ALIAS.match(spec), _MODELS_VERSION.match(spec)
        if not (m_alias or m_ver) or (m_ver and not (m_ver.group(2).isdigit() or m_ver.group(2) == "latest")):
            raise ModelSpecError(f"bad MLflow model URI {spec!r}: expected models:/<name>@<alias> or "
                                 "models:/<name>/<version>")
    uri = mlflow_tracking_uri(tracking_uri)
    if not uri:
        raise ModelSpecError(f"{spec!r} is an MLflow URI but no tracking server is known: pass --tracking-uri or "
                             "set MLFLOW_TRACKING_URI")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if spec.startswith("runs:/"):
            run_id = m.group(1)
            client.get_run(run_id)
        else:
            if m_alias:
                name, alias = m_alias.groups()
                mv = client.get_model_version_by_alias(name, alias)
            elif m_ver.group(2) == "latest":
                name = m_ver.group(1)
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise ModelSpecError(f"registered model {name!r} has no versions at {uri}")
                mv = max(versions, key=lambda v: int(v.version))
            else:
                name = m_ver.group(1)
                mv = client.get_model_version(name, m_ver.group(2))
            run_id = mv.run_id
            registered = {"name": mv.name, "version": str(mv.version),
                          **({"alias": m_alias.group(2)} if m_alias else {})}
    except MlflowException as e:
        raise ModelSpecError(f"cannot resolve {spec!r} at {uri}: {_short(e)}") from None
    from mmtl.tracking import mlflow_utils as mlu

    tmp = Path(tempfile.mkdtemp(prefix="mmtl-model-", dir=dst))
    try:
        local = Path(mlu.download_artifacts(uri, spec, str(tmp)))  # registry = tracking store
    except MlflowException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelSpecError(f"cannot download {spec!r} from {uri}: {_short(e)}") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelSpecError(f"cannot download {spec!r} from {uri}: {e}") from None
    found = _find_export(local if local.is_dir() else local.parent)
    if found is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelSpecError(f"{spec!r} has no model.safetensors + pipeline.yaml: not a model logged by mmtl")
    return ResolvedModel(spec, "mlflow_uri", found, mlflow_run_id=run_id, tracking_uri=uri, model_uri=spec,
                         registered=registered, temporary=tmp)


def _short(e: Exception) -> str:
    msg = getattr(e, "message", None) or str(e)
    return msg.strip().splitlines()[0][:300] if msg.strip() else type(e).__name__


def resolve_export(spec: str, tracking_uri: Optional[str] = None, download_dir: Optional[str] = None) -> ResolvedModel:
    """Find the export folder ``spec`` names (downloading MLflow models into a temporary folder under
    ``download_dir``, default the system temp dir; call :meth:`ResolvedModel.cleanup` when done).

    Raises:
        ModelSpecError: for every bad form (missing path, folder without an export, malformed URI, no tracking
            URI, unknown run / model / alias / version, a model not logged by mmtl).
    """
    spec = str(spec).strip()
    if not spec:
        raise ModelSpecError(f"empty model; expected {FORMS}")
    if spec.startswith(("runs:/", "models:/")):
        return _resolve_uri(spec, tracking_uri, download_dir)
    if spec.startswith(("s3://", "gs://")):  # a run folder on object storage (mmtl.storage)
        from mmtl.runtime import fetch_run

        try:
            return _resolve_local(str(fetch_run(spec)))
        except (FileNotFoundError, OSError) as e:
            raise ModelSpecError(f"model {spec!r}: {e}") from None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", spec) and not Path(spec).exists():
        raise ModelSpecError(f"unsupported model URI {spec!r}: expected {FORMS}")
    return _resolve_local(spec)


def resolve_model(spec: str, tracking_uri: Optional[str] = None):
    """Load the model ``spec`` names; returns ``(model, pipeline, export_dir)``.

    For an MLflow URI the download is deleted once the weights are in memory and ``export_dir`` is None.
    Raises :class:`ModelSpecError` for bad forms, FileNotFoundError/ValueError from loading.
    """
    from mmtl.tracking.registry import load_exported

    res = resolve_export(spec, tracking_uri)
    try:
        model, pipe = load_exported(res.export_dir)
        return model, pipe, (None if res.temporary is not None else res.export_dir)
    finally:
        res.cleanup()
