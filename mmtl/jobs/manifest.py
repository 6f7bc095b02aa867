"""Shard manifests for scheduled retraining: what is new since the last retrain, and the replay share
(see :mod:`mmtl.jobs.retrain`, step 2)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

from mmtl.config import Pipeline

Say = Callable[[str], None]
log = logging.getLogger("mmtl.retrain")
MANIFEST_NAME = "manifest.json"
HASHES_NAME = "hashes.json"
MANIFEST_ARTIFACT = "retrain/manifest.json"


def _sha256_stream(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _stat(url: str) -> tuple[int, Optional[int]]:
    """(size, mtime_ns or None) of a shard."""
    from mmtl.data.shardlist import filesystem, local_path

    local = local_path(url)
    if local is not None:
        st = os.stat(local)
        return st.st_size, st.st_mtime_ns
    fs, path = filesystem(url)
    info = fs.get_file_info(path)
    mtime = getattr(info, "mtime_ns", None)
    return int(info.size), mtime


def describe_shards(shards: Iterable[str], cache_file: Optional[Path] = None) -> list[dict]:
    """``[{"name", "size", "sha256"}]`` for each shard (reads every byte of shards not in the cache, which
    maps name -> size, mtime_ns, sha256 and is rewritten)."""
    from mmtl.data.shardio import open_shard

    cache: dict = {}
    if cache_file is not None and cache_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            cache = json.loads(cache_file.read_text())
    out, fresh = [], {}
    for url in shards:
        size, mtime = _stat(url)
        hit = cache.get(url)
        if hit and mtime is not None and hit.get("size") == size and hit.get("mtime_ns") == mtime:
            sha = hit["sha256"]
        else:
            with open_shard(url) as f:
                sha = _sha256_stream(f)
        if mtime is not None:
            fresh[url] = {"size": size, "mtime_ns": mtime, "sha256": sha}
        out.append({"name": url, "size": size, "sha256": sha})
    if cache_file is not None:
        _write_json(cache_file, fresh)
    return out


def _key(entry: dict) -> tuple[str, int]:
    return entry["sha256"], int(entry["size"])


def diff_manifest(current: list[dict], previous: Optional[dict]) -> tuple[list[dict], list[dict]]:
    """Split ``current`` shard entries into (new, known) against the ``previous`` manifest (None: all new).
    Identity is content (sha256 + size); order follows ``current``."""
    seen = {_key(e) for e in (previous or {}).get("shards", [])}
    new = [e for e in current if _key(e) not in seen]
    known = [e for e in current if _key(e) in seen]
    return new, known


def choose_replay(known: list[dict], new: list[dict], fraction: float, seed: int = 0) -> list[dict]:
    """``ceil(fraction * len(known))`` known shards (at least 1 when any, at most all), picked by a hash of
    ``seed``, the new shards' hashes and each shard's hash; returned in ``known`` order."""
    if not known:
        return []
    k = min(len(known), max(1, math.ceil(fraction * len(known) - 1e-9)))
    salt = hashlib.sha256(f"{seed}|{'|'.join(sorted(e['sha256'] for e in new))}".encode()).hexdigest()
    rank = sorted(range(len(known)),
                  key=lambda i: (hashlib.sha256(f"{salt}|{known[i]['sha256']}".encode()).hexdigest(), i))
    pick = set(rank[:k])
    return [e for i, e in enumerate(known) if i in pick]


def _write_json(path: Path, obj) -> None:
    """Atomic write (temp file + rename in the same folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_local_manifest(manifest_dir: Path) -> Optional[dict]:
    p = Path(manifest_dir) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); fix or delete it (the MLflow copy is used then)") from None


def _mlflow_manifest(client, uri: str, experiment: str, model_name: str, dst: Path) -> Optional[dict]:
    """The manifest artifact of the newest successful retrain run for ``model_name``, or None."""
    import mlflow.artifacts

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`mmtl.retrain` = 'done' and tags.`retrain.model_name` = '{model_name}'"
    runs = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        return None
    local = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path=MANIFEST_ARTIFACT,
                                                dst_path=str(dst), tracking_uri=uri)
    return json.loads(Path(local).read_text())


def last_manifest(client, uri: str, pipe: Pipeline, manifest_dir: Path, say: Say) -> Optional[dict]:
    """The newer (``created_at``) of the local manifest and the MLflow one."""
    local = read_local_manifest(manifest_dir)
    with tempfile.TemporaryDirectory(dir=manifest_dir) as tmp:
        remote = _mlflow_manifest(client, uri, pipe.tracking.experiment, pipe.tracking.model_name, Path(tmp))
    cands = [m for m in (local, remote) if m]
    if not cands:
        return None
    best = max(cands, key=lambda m: float(m.get("created_at", 0)))
    if local and remote and local.get("mlflow_run_id") != remote.get("mlflow_run_id"):
        say(f"local manifest (run {local.get('mlflow_run_id')}) and MLflow's (run {remote.get('mlflow_run_id')}) "
            f"differ: using the newer, run {best.get('mlflow_run_id')}")
    return best


# ---------------------------------------------------------------- registry and evaluation

