"""``mmtl retrain``: scheduled incremental retraining with a champion / challenger promotion.

One trigger (:func:`retrain`) does:

Object storage: with ``train.runs_root`` (or ``retrain.manifest_dir``) on ``s3://``, ``manifest.json`` and the
lock live in the store (``<runs_root>/retrain/``; the lock by S3 conditional writes,
:mod:`mmtl.jobs.object_lock`) and the hash cache and warm-start copies in the local staging folder
(:func:`manifest_location`).

1. **Lock.** ``<manifest_dir>/retrain.lock`` is created with ``O_CREAT | O_EXCL`` and holds the pid, hostname,
   process start time, a random token and timestamps; it is held for the whole cycle and a heartbeat thread
   touches it (mtime) every ``min(60, lock_ttl_s / 4)`` s. A lock is *stale* when its mtime is older than
   ``retrain.lock_ttl_s``, or when it was taken on this host by a process that no longer exists (pid gone or
   reused); a stale lock is broken (under a short-lived ``retrain.lock.break`` lock, so that two triggers that
   both saw it stale cannot both take over). A live lock: ``{"action": "locked"}`` (CLI exit code
   :data:`EXIT_LOCKED`).
2. **What is new.** Every shard of ``data.train`` is described by name (its path / URI), size and sha256
   (local hashes are cached in ``<manifest_dir>/hashes.json`` by path, size and mtime). The manifest of the
   last successful retrain is the newer of ``<manifest_dir>/manifest.json`` and the ``retrain/manifest.json``
   artifact of the newest MLflow run tagged ``mmtl.retrain=done`` for ``tracking.model_name``. A shard is
   known when the manifest has an entry with its sha256 and size (a renamed shard is not new data, a
   rewritten one is). Nothing new: ``{"action": "nothing_new"}``.
3. **Warm start.** When the registered model ``tracking.model_name`` has a version with alias ``champion``,
   its ``model.safetensors`` is copied to ``<manifest_dir>/warm_start/<name>-v<version>.safetensors`` (kept:
   exports of warm-started runs name it in their ``pipeline.yaml``) and set as ``model.init_from``
   (``retrain.warm_start=false``: train from the pipeline's own initialisation).
4. **Train** with :func:`mmtl.recipes.run_pipeline` on the new shards plus a replay share of the known shards
   still present (``ceil(replay_fraction * known)``, at least 1 when any; chosen by a hash of
   ``data.seed``, the new shards' hashes and each shard's hash: deterministic for the same inputs, different
   between retrains), run name ``<train.name>-retrain[-N]``, ``train.resume=never``. The run registers the new
   model version.
5. **Compare** on the eval set named by ``retrain.metric`` (``<set>/<metric>``, the set from ``data.test``,
   ``data.val`` or ``data.extra_eval``): the champion and the challenger are rebuilt from their exports and
   embedded and scored by the same code (:func:`mmtl.eval.evaluate.embed_shards` +
   :func:`~mmtl.eval.evaluate.evaluate_sets`), the champion before training (a bad metric name fails before
   any training). Higher is better. Alias ``challenger`` goes to the new version; alias ``champion`` moves to it
   only when ``challenger >= champion + margin`` (always when there is no champion yet).
6. **Record** on the run: metrics ``retrain/challenger``, ``retrain/champion``, ``retrain/margin``, tags
   ``retrain.decision`` (``promoted`` | ``kept``), ``retrain.*`` and ``mmtl.retrain=done``, artifacts
   ``retrain/manifest.json`` and ``retrain/decision.json``; then ``<manifest_dir>/manifest.json``. A kept
   retrain is successful too: its new shards become known (and replay candidates).

A failure anywhere leaves the manifest untouched (the next trigger retries the same new shards) and the lock
released.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from mmtl.config import Pipeline, RetrainConfig

Say = Callable[[str], None]
log = logging.getLogger("mmtl.retrain")

LOCK_NAME = "retrain.lock"
CHAMPION, CHALLENGER = "champion", "challenger"
from mmtl.jobs.lock import (  # noqa: E402,F401  (re-exported for callers of mmtl.jobs.retrain)
    EXIT_LOCKED, RetrainLock, _now_iso, describe_lock, exit_code, pid_alive, read_lock, stale_reason,
)
from mmtl.jobs.manifest import (  # noqa: E402,F401
    HASHES_NAME, MANIFEST_ARTIFACT, MANIFEST_NAME, _key, _write_json, choose_replay, describe_shards, diff_manifest, last_manifest, read_local_manifest,
)


def _champion(client, name: str):
    """The model version holding alias ``champion`` of ``name``, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _download_export(name: str, version: str, uri: str, dst: Path) -> Path:
    """Download ``models:/name/version`` (an mmtl pyfunc) and return its export folder, with ``model.init_from``
    cleared in its (temporary) ``pipeline.yaml``: the weights it holds are complete."""
    import yaml

    from mmtl.eval.resolve import resolve_export

    res = resolve_export(f"models:/{name}/{version}", tracking_uri=uri, download_dir=str(dst))
    p = res.export_dir / "pipeline.yaml"
    raw = yaml.safe_load(p.read_text())
    if (raw.get("model") or {}).get("init_from"):
        raw["model"]["init_from"] = None
        p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return res.export_dir


def _eval_spec(pipe: Pipeline, metric: str):
    set_name = metric.split("/", 1)[0]
    avail = {"test": pipe.data.test, "val": pipe.data.val, **pipe.data.extra_eval}
    if "/" not in metric or not avail.get(set_name):
        have = [k for k, v in avail.items() if v]
        raise ValueError(f"retrain.metric={metric!r} must be '<eval set>/<metric>' with a set the data has "
                         f"(have: {have}), e.g. 'test/image_to_text_recall_at_1'")
    return set_name, avail[set_name]


def score_export(export_dir: Path, pipe: Pipeline, metric: str) -> tuple[float, dict]:
    """Rebuild the model of ``export_dir`` and score it on ``metric``'s eval set with ``pipe``'s eval and
    cleaning settings; returns ``(metric value, all metrics of that set)``."""
    import torch

    from mmtl.data.stream import clean_options
    from mmtl.eval.evaluate import embed_shards, evaluate_sets
    from mmtl.tracking.registry import load_exported

    set_name, spec = _eval_spec(pipe, metric)
    model, _ = load_exported(export_dir)
    with torch.no_grad():
        metrics = evaluate_sets(model, pipe, {set_name: embed_shards(model, spec, clean_options(pipe))})
    if metric not in metrics:
        raise ValueError(f"retrain.metric={metric!r} is not computed; {set_name} has {sorted(metrics)}")
    return float(metrics[metric]), metrics


def decide(challenger: float, champion: Optional[float], margin: float) -> str:
    """``promoted`` when there is no champion or ``challenger >= champion + margin``, else ``kept``."""
    if champion is None:
        return "promoted"
    return "promoted" if challenger >= champion + margin else "kept"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ---------------------------------------------------------------- the job

def retrain(pipe: Pipeline, say: Say = print, address: Optional[str] = None) -> dict:
    """One scheduled retrain trigger (see module docstring). Returns a dict whose ``action`` is
    ``"locked"``, ``"nothing_new"`` or ``"retrained"`` (then ``decision`` is ``"promoted"`` or ``"kept"``).

    Raises:
        ValueError: no ``tracking.model_name`` / ``log_model`` off, a bad ``retrain.metric``.
        MissingShardsError / EmptyDatasetError: ``data.train`` problems.
        RuntimeError: training failed (from :func:`mmtl.recipes.run_pipeline`).
    """
    from mlflow.tracking import MlflowClient

    from mmtl import storage
    from mmtl.tracking import mlflow_utils as mlu

    cfg = pipe.retrain or RetrainConfig()
    name = pipe.tracking.model_name
    if not name or not pipe.tracking.log_model:
        raise ValueError("mmtl retrain needs tracking.model_name and tracking.log_model=true: the champion and "
                         "challenger are versions of that registered model")
    _eval_spec(pipe, cfg.metric)
    manifest_dir, store = manifest_location(pipe)
    manifest_dir.mkdir(parents=True, exist_ok=True)
    if store is None:
        lock = RetrainLock(manifest_dir / LOCK_NAME, cfg.lock_ttl_s)
    else:  # object storage: the lock by S3 conditional writes; the last manifest read from the store
        from mmtl.jobs.object_lock import ObjectLock

        lock = ObjectLock(storage.join(store, LOCK_NAME), cfg.lock_ttl_s)
    if not lock.acquire():
        h = lock.holder or {}
        since = datetime.fromtimestamp(float(h["created_at"]), timezone.utc).isoformat(timespec="seconds") \
            if h.get("created_at") else "?"
        msg = (f"another retrain holds {lock.path} (pid {h.get('pid')} on {h.get('hostname')} since {since}); "
               "not starting")
        say(msg)
        return {"action": "locked", "message": msg, "lock": h, "lock_path": str(lock.path)}
    if lock.broken:
        say(f"broke a stale retrain lock ({lock.broken})")
    try:
        if store is not None:
            _sync_manifest(manifest_dir, store, pull=True)
        result = _retrain_locked(pipe, cfg, name, manifest_dir, say, address, MlflowClient, mlu)
        if store is not None and result.get("action") == "retrained":
            _sync_manifest(manifest_dir, store, pull=False)
            result["manifest"] = storage.join(store, MANIFEST_NAME)
        return result
    finally:
        lock.release()


def manifest_location(pipe: Pipeline) -> tuple[Path, Optional[str]]:
    """``(local manifest folder, store URI or None)``: ``retrain.manifest_dir`` or ``<train.runs_root>/retrain``.
    When that is on object storage (``s3://...``) the local folder is its staging folder
    (:func:`mmtl.storage.staging_root`: hash cache, warm-start copies) and the store keeps ``manifest.json`` and
    the lock."""
    from mmtl import storage

    cfg = pipe.retrain or RetrainConfig()
    where = cfg.manifest_dir or (storage.join(pipe.train.runs_root, "retrain") if storage.is_remote(pipe.train.runs_root)
                                 else str(Path(pipe.train.runs_root) / "retrain"))
    if storage.is_remote(where):
        return storage.staging_root(where), where
    return Path(where), None


def _sync_manifest(manifest_dir: Path, store: str, pull: bool) -> None:
    """Pull ``manifest.json`` from the store into ``manifest_dir`` (a local copy the store lacks is removed: the
    store is the record), or push the local one (one PUT: the store shows the old or the new manifest)."""
    from mmtl import storage

    local, remote = manifest_dir / MANIFEST_NAME, storage.join(store, MANIFEST_NAME)
    if pull:
        data = storage.read_bytes(remote)
        if data is None:
            local.unlink(missing_ok=True)
        else:
            _write_json(local, json.loads(data))
    else:
        storage.write_bytes(remote, local.read_bytes())


def _retrain_locked(pipe, cfg: RetrainConfig, name: str, manifest_dir: Path, say: Say, address, MlflowClient,
                    mlu) -> dict:
    from mmtl.data.shardio import resolve_shards

    uri = mlu.tracking_uri(pipe.tracking.uri, pipe.train.runs_root)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    shards = resolve_shards(pipe.data.train)
    t0 = time.perf_counter()
    current = describe_shards(shards, manifest_dir / HASHES_NAME)
    say(f"{len(current)} train shard(s) hashed in {time.perf_counter() - t0:.1f}s")
    previous = last_manifest(client, uri, pipe, manifest_dir, say)
    new, known = diff_manifest(current, previous)
    if not new:
        msg = (f"nothing new: all {len(current)} shard(s) of data.train were in the last retrain "
               f"(run {previous.get('mlflow_run_id')}, {previous.get('created')})")
        say(msg)
        return {"action": "nothing_new", "message": msg, "shards": len(current),
                "manifest": str(manifest_dir / MANIFEST_NAME), "last_mlflow_run_id": previous.get("mlflow_run_id")}
    replay = choose_replay(known, new, cfg.replay_fraction, pipe.data.seed)
    say(f"{len(new)} new shard(s), {len(known)} known; replaying {len(replay)}")

    champ = _champion(client, name)
    champ_score, champ_metrics, init_from = None, None, None
    work = Path(tempfile.mkdtemp(prefix="dl-", dir=manifest_dir))
    try:
        if champ is not None:
            export = _download_export(name, str(champ.version), uri, work)
            champ_score, champ_metrics = score_export(export, pipe, cfg.metric)
            say(f"champion {name} v{champ.version}: {cfg.metric} = {champ_score:.4f}")
            if cfg.warm_start:
                ws = manifest_dir / "warm_start" / f"{_safe(name)}-v{champ.version}.safetensors"
                if not ws.is_file():
                    ws.parent.mkdir(parents=True, exist_ok=True)
                    tmp = ws.with_name(f".{ws.name}.{uuid.uuid4().hex}")
                    shutil.copyfile(export / "model.safetensors", tmp)
                    os.replace(tmp, ws)
                init_from = str(ws)
                say(f"warm start from {name} v{champ.version} ({ws})")
        else:
            say(f"no {CHAMPION} alias on {name!r}: the new version will be promoted")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    train_set = {_key(e) for e in new + replay}
    tp = pipe.model_copy(deep=True)
    tp.data.train = [e["name"] for e in current if _key(e) in train_set]
    tp.model.init_from = init_from
    tp.train.name = f"{pipe.train.name or 'mmtl'}-retrain"
    tp.train.resume = "never"
    tp = Pipeline.model_validate(tp.model_dump(mode="json"))  # revalidate the edited copy

    from mmtl.recipes import run_pipeline
    from mmtl.runtime import init_ray

    if address:
        init_ray(address)
    summary = run_pipeline(tp, address=address, say=say)
    run_id, reg = summary["mlflow_run_id"], summary.get("registered_model") or {}
    version = str(reg.get("version")) if reg.get("version") is not None else None
    if version is None:
        raise RuntimeError(f"run {run_id} registered no model version of {name!r}")

    chall_score, chall_metrics = score_export(Path(summary["export_path"]).parent, tp, cfg.metric)
    decision = decide(chall_score, champ_score, cfg.margin)
    champ_txt = "none" if champ_score is None else f"{champ_score:.4f} (v{champ.version})"
    msg = (f"challenger {name} v{version}: {cfg.metric} = {chall_score:.4f}; champion {champ_txt}; "
           f"margin {cfg.margin:g} -> {decision}")
    say(msg)

    client.set_registered_model_alias(name, CHALLENGER, version)
    if decision == "promoted":
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "retrain.decision", decision)
    client.set_model_version_tag(name, version, "retrain.score", f"{chall_score:.6g}")

    record = {
        "action": "retrained", "decision": decision, "metric": cfg.metric, "margin": cfg.margin,
        "challenger": {"version": version, "score": chall_score, "run_id": run_id},
        "champion": None if champ is None else {"version": str(champ.version), "score": champ_score,
                                                "run_id": champ.run_id},
        "new_shards": [e["name"] for e in new], "replay_shards": [e["name"] for e in replay],
        "init_from": init_from, "mlflow_run_id": run_id, "mlflow_tracking_uri": uri,
        "run_dir": summary["run_dir"], "model_name": name, "message": msg,
    }
    manifest = {"format": 1, "created_at": time.time(), "created": _now_iso(), "mlflow_run_id": run_id,
                "model_name": name, "model_version": version, "decision": decision, "shards": current}
    metrics = {"retrain/challenger": chall_score, "retrain/margin": cfg.margin,
               "retrain/new_shards": len(new), "retrain/replay_shards": len(replay)}
    if champ_score is not None:
        metrics["retrain/champion"] = champ_score
    mlu.log_metrics(uri, run_id, metrics)
    with tempfile.TemporaryDirectory(dir=manifest_dir) as tmp:
        (Path(tmp) / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (Path(tmp) / "decision.json").write_text(json.dumps(
            {**record, "challenger_metrics": chall_metrics, "champion_metrics": champ_metrics}, indent=2))
        mlu.log_artifacts(uri, run_id, [Path(tmp) / "manifest.json", Path(tmp) / "decision.json"], "retrain")
    mlu.set_tags(uri, run_id, {
        "retrain.decision": decision, "retrain.metric": cfg.metric, "retrain.model_name": name,
        "retrain.challenger_version": version,
        "retrain.champion_version": "none" if champ is None else str(champ.version),
        "retrain.init_from": init_from or "none", "retrain.manifest": MANIFEST_ARTIFACT,
        "mmtl.retrain": "done",
    })
    _write_json(manifest_dir / MANIFEST_NAME, manifest)
    record["manifest"] = str(manifest_dir / MANIFEST_NAME)
    return record
