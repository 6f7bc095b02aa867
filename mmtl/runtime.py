"""Local Ray start-up and run-directory bookkeeping shared by ``mmtl run``, benchmarks and tests."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

FORWARDED_ENV = ("MMTL_KILL_AT", "MMTL_STEP_TRACE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None,
             env: Optional[dict[str, str]] = None) -> None:
    """Start (or join) Ray. A local instance listens on 127.0.0.1 only
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, set before Ray starts); no dashboard.

    ``address``: ``None`` joins ``RAY_ADDRESS`` or a ``ray start`` cluster on this machine if one runs,
    else starts a local instance; ``"local"`` always starts one; ``"ray://..."``/``"HOST:PORT"`` joins.
    ``env``: environment variables Ray's own processes must see from their start (e.g. Serve's proxy mode,
    :func:`mmtl.serve.proxy.proxy_env`): put into this process's environment before Ray starts, so the raylet
    and every worker inherit them, and into the job's runtime_env. Ignored when Ray is already initialised.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    if ray.is_initialized():
        return
    os.environ.update(env or {})
    env = {**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **(env or {})}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"})
    kwargs = dict(log_to_driver=True, configure_logging=True, logging_level="WARNING")
    if not os.environ.get("RAY_JOB_ID"):  # inside a submitted job the job's runtime_env applies
        kwargs["runtime_env"] = {"env_vars": env}
    if address in (None, "local") and not os.environ.get("RAY_ADDRESS"):
        # no dashboard: its agent listens on every interface even with the loopback setting
        kwargs.update(address="local" if address == "local" else None, include_dashboard=False,
                      num_cpus=num_cpus or os.cpu_count())
        if address is None:
            kwargs.pop("address")
    else:
        kwargs["address"] = address
    ray.init(**kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


RUN_URI_FILE = ".mmtl_run_uri"
"""In a staging run folder (runs root on object storage, :mod:`mmtl.storage`): the run's URI in the store."""
NOT_PUSHED = ("train", RUN_URI_FILE)  # train/: Ray Train writes checkpoints to the store itself


def run_uri(run_dir: Path) -> Optional[str]:
    """The store URI of a staging run folder (``<runs_root URI>/<name>``), or None for a local run folder."""
    p = Path(run_dir) / RUN_URI_FILE
    return p.read_text().strip() if p.is_file() else None


def push_run(run_dir: Path) -> list[str]:
    """Upload mmtl's files of a staging run folder (all but ``train/``; ``summary.json`` last) to its store URI;
    a no-op for a local run folder. Returns the uploaded relative paths."""
    uri = run_uri(run_dir)
    if uri is None:
        return []
    from mmtl import storage

    return storage.upload_dir(Path(run_dir), uri, exclude=NOT_PUSHED, last=("summary.json",))


def _summary_status(raw: Optional[bytes]) -> Optional[str]:
    try:
        return json.loads(raw).get("status") if raw else None
    except (ValueError, AttributeError):
        return None


def _finished(run_dir: Path) -> bool:
    uri = run_uri(run_dir)
    if uri is not None:
        from mmtl import storage

        return _summary_status(storage.read_bytes(storage.join(uri, "summary.json"))) == "finished"
    p = run_dir / "summary.json"
    return p.exists() and _summary_status(p.read_bytes()) == "finished"


def _open_run(root: str, name: str, pull: bool = False) -> Path:
    """The folder a run works in: ``root/name``, or for a runs root URI the staging folder
    (:func:`mmtl.storage.staging_root`) marked with the run's URI; ``pull`` downloads the run's files (all but
    ``train/``) into it."""
    from mmtl import storage

    if not storage.is_remote(root):
        return Path(root) / name
    d = storage.staging_root(root) / name
    d.mkdir(parents=True, exist_ok=True)
    (d / RUN_URI_FILE).write_text(storage.join(root, name))
    if pull:
        storage.download_dir(storage.join(root, name), d, exclude=NOT_PUSHED)
    return d


def _run_names(root: str) -> list[str]:
    from mmtl import storage

    if storage.is_remote(root):
        return storage.list_dirs(root)
    r = Path(root)
    return [p.name for p in r.iterdir() if p.is_dir()] if r.is_dir() else []


def select_run_dir(runs_root: str, name: str, resume: str, must_resume: bool = False) -> tuple[Path, bool]:
    """Pick the run directory: ``(path, resuming)``.

    ``resume="auto"`` continues the newest unfinished run named ``name`` or ``name-N``; otherwise (or when
    that run finished) a new ``name-N`` is used. ``must_resume`` (``mmtl run --resume``) raises
    FileNotFoundError when there is nothing unfinished to resume. The result is always a folder directly under
    ``runs_root``; for a runs root on object storage (``s3://...``) it is the run's local staging folder
    (:mod:`mmtl.storage`), whose :func:`run_uri` names the run in the store (a resumed run's files are pulled).

    Raises:
        ValueError: ``name`` is not a valid run name (:func:`mmtl.config.names.check_run_name`: a path, ``..``,
            glob or shell characters, too long).
    """
    from mmtl.config.names import check_run_name

    check_run_name(name)
    from mmtl import storage

    pat = re.compile(rf"^{re.escape(name)}(?:-(\d+))?$")
    existing = sorted(((int(m.group(1) or 1), n) for n in _run_names(runs_root) if (m := pat.match(n))),
                      key=lambda t: t[0])
    if existing and (resume == "auto" or must_resume):
        n, last = existing[-1]
        path = _open_run(runs_root, last)
        if not _finished(path) and latest_checkpoint(path) is not None:
            return _open_run(runs_root, last, pull=True), True
    if must_resume:
        raise FileNotFoundError(f"no unfinished run of {name!r} with a checkpoint under {runs_root} to resume")
    n = existing[-1][0] + 1 if existing else 1
    new = name if n == 1 else f"{name}-{n}"
    if new in [e for _, e in existing] and _finished(_open_run(runs_root, new)):  # name taken by a finished run
        new = f"{name}-{n + 1}"
    if storage.is_remote(runs_root):  # a new run: nothing of an earlier staging copy may be pushed
        shutil.rmtree(storage.staging_root(runs_root) / new, ignore_errors=True)
    return _open_run(runs_root, new), False


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint a resume of ``run_dir`` continues from (None if none): Ray Train's registered latest
    checkpoint (``train/checkpoint_manager_snapshot.json``, what ``ray.train.get_checkpoint()`` hands the
    workers) when it holds mmtl's meta; else the directory with the highest step under ``run_dir/train`` (a
    checkpoint written but never registered, e.g. a crash during the report, is not what Ray resumes)."""
    if run_uri(run_dir) is not None:
        return _remote_checkpoint(Path(run_dir))
    snap = Path(run_dir) / "train" / "checkpoint_manager_snapshot.json"
    try:
        name = json.loads(snap.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
        if name and (snap.parent / name / "mmtl_meta.json").is_file():
            return snap.parent / name
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        pass
    best, best_step = None, -1
    for meta in Path(run_dir).glob("train/checkpoint_*/mmtl_meta.json"):
        try:
            step = int(json.loads(meta.read_text())["step"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
        if step > best_step:
            best, best_step = meta.parent, step
    return best


def _remote_checkpoint(run_dir: Path) -> Optional[Path]:
    """:func:`latest_checkpoint` of a staging run folder: chosen from the store by the same rule, returned as
    its local mirror (:func:`local_checkpoint`)."""
    from mmtl import storage

    train = storage.join(run_uri(run_dir), "train")
    snap = storage.read_bytes(storage.join(train, "checkpoint_manager_snapshot.json"))
    try:
        name = json.loads(snap)["latest_checkpoint_result"]["checkpoint_dir_name"] if snap else None
        if name and storage.read_bytes(storage.join(train, name, "mmtl_meta.json")) is not None:
            return local_checkpoint(run_dir, name)
    except (KeyError, TypeError, ValueError):
        pass
    best, best_step = None, -1
    for name in storage.list_dirs(train):
        try:
            step = int(json.loads(storage.read_bytes(storage.join(train, name, "mmtl_meta.json")) or b"")["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if name.startswith("checkpoint_") and step > best_step:
            best, best_step = name, step
    return local_checkpoint(run_dir, best) if best else None


def local_checkpoint(run_dir: Path, checkpoint: str) -> Path:
    """A checkpoint of ``run_dir`` as a local folder: ``checkpoint`` itself for a local run; for a staging run
    folder, ``<run_dir>/train/<name>`` holding everything of the checkpoint in the store but DeepSpeed's
    ``ds/`` state (``mmtl_meta.json``, RNG files, ``export/``, ``adapter/``), downloaded once."""
    uri = run_uri(run_dir)
    if uri is None:
        return Path(checkpoint)
    from mmtl import storage

    name = Path(str(checkpoint)).name
    dst = Path(run_dir) / "train" / name
    storage.download_dir(storage.join(uri, "train", name), dst, exclude=("ds",))
    return dst


def fetch_run(uri: str) -> Path:
    """A run on object storage (``s3://bucket/prefix/NAME``) as its local staging folder with the run's files
    pulled (all but ``train/``; checkpoints are mirrored on demand by :func:`latest_checkpoint` /
    :func:`local_checkpoint`). Used by ``mmtl eval URI`` and ``mmtl export URI``.

    Raises:
        FileNotFoundError: ``uri`` holds no mmtl run (no ``pipeline.yaml``).
    """
    from mmtl import storage

    uri = uri.rstrip("/")
    root, _, name = uri.rpartition("/")
    if storage.read_bytes(storage.join(uri, "pipeline.yaml")) is None:
        raise FileNotFoundError(f"{uri} is not an mmtl run (no pipeline.yaml there)")
    return _open_run(root, name, pull=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs with ``seed`` (NumPy: ``seed mod 2**32``)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_DETERMINISTIC = ("ValueError", "TypeError", "NotImplementedError", "KeyError", "AttributeError", "AssertionError",
                  "ImportError", "ModuleNotFoundError", "FloatingPointError", "CheckpointMismatchError",
                  "ZeRORuntimeException", "PipelineError", "FileNotFoundError", "IndexError", "ZeroDivisionError")


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: Ray Train's per-worker failures, ``RayTaskError.cause``, ``__cause__``."""
    out, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += list((getattr(e, "worker_failures", None) or {}).values())
        todo += [getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__]
    return out


def resume_can_help(exc: BaseException) -> bool:
    """False when every failure inside ``exc`` is a programming or configuration error (ValueError, TypeError,
    DeepSpeed's ZeRORuntimeException, a checkpoint mismatch, a non-finite loss ...) that a rerun from the last
    checkpoint would hit again; True for crashes a rerun can get past (a killed or lost worker, OOM, a lost
    connection)."""
    leaves = [e for e in _causes(exc) if not getattr(e, "worker_failures", None)
              and getattr(e, "cause", None) is None and getattr(e, "controller_failure", None) is None]
    names = [{t.__name__ for t in type(e).__mro__} for e in leaves or [exc]]
    return not all(n & set(_DETERMINISTIC) for n in names)


def training_failure(exc: BaseException, run_dir: Path) -> str:
    """The message for a failed ``trainer.fit()``: the error, and ``rerun with --resume`` only when a resume
    can help (:func:`resume_can_help`) and the run has a checkpoint to resume from."""
    msg = f"training failed: {exc}"
    ckpt = latest_checkpoint(run_dir)
    if not resume_can_help(exc):
        return msg + "; this error does not depend on where training stopped: fix the setting it names and rerun"
    if ckpt is None:
        return msg + "; no checkpoint was written yet: rerunning starts from step 0"
    try:
        step = json.loads((ckpt / "mmtl_meta.json").read_text()).get("step")
    except (OSError, ValueError):
        step = "?"
    return msg + f"; rerun with --resume to continue from the last checkpoint (step {step})"


def out_of_memory(exc: BaseException) -> Optional[str]:
    """The message for Ray's ``OutOfMemoryError`` (its memory monitor stopped a worker because the machine's
    memory passed ``RAY_memory_usage_threshold``, 95% by default), else None: Ray's own usage line (``Memory on
    the node ... was X GB used / Y GB limit``) and what to do, without Ray's page of tuning advice."""
    try:
        from ray.exceptions import OutOfMemoryError
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    if not isinstance(exc, OutOfMemoryError):
        return None
    m = re.search(r"Memory on the node .*? was ([0-9.]+\s*GB used / [0-9.]+\s*GB limit)", str(exc))
    return ("Ray stopped a worker: the machine ran out of memory" + (f" ({m.group(1)})" if m else "") + ". "
            "Free memory (other programs, other Ray instances) and run the same command again: a run with a "
            "checkpoint continues from it, one without starts over in a new run folder (NAME-2); "
            "lower train.num_workers or train.micro_batch_size if it happens again")
