"""Local Ray start-up and run-directory bookkeeping shared by ``mmtl run``, benchmarks and tests."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

FORWARDED_ENV = ("MMTL_KILL_AT", "MMTL_STEP_TRACE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Start (or join) Ray. A local instance listens on 127.0.0.1 only
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, set before Ray starts); no dashboard.

    ``address``: ``None`` joins ``RAY_ADDRESS`` or a ``ray start`` cluster on this machine if one runs,
    else starts a local instance; ``"local"`` always starts one; ``"ray://..."``/``"HOST:PORT"`` joins.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
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


def _finished(run_dir: Path) -> bool:
    p = run_dir / "summary.json"
    if not p.exists():
        return False
    try:
        return json.loads(p.read_text()).get("status") == "finished"
    except json.JSONDecodeError:
        return False


def select_run_dir(runs_root: str, name: str, resume: str, must_resume: bool = False) -> tuple[Path, bool]:
    """Pick the run directory: ``(path, resuming)``.

    ``resume="auto"`` continues the newest unfinished run named ``name`` or ``name-N``; otherwise (or when
    that run finished) a new ``name-N`` is used. ``must_resume`` (``mmtl run --resume``) raises
    FileNotFoundError when there is nothing unfinished to resume. The result is always a folder directly under
    ``runs_root``.

    Raises:
        ValueError: ``name`` is not a valid run name (:func:`mmtl.config.names.check_run_name`: a path, ``..``,
            glob or shell characters, too long).
    """
    from mmtl.config.names import check_run_name

    check_run_name(name)
    root = Path(runs_root)
    pat = re.compile(rf"^{re.escape(name)}(?:-(\d+))?$")
    children = list(root.iterdir()) if root.is_dir() else []
    existing = sorted(
        ((int(m.group(1) or 1), p) for p in children if (m := pat.match(p.name)) and p.is_dir()),
        key=lambda t: t[0],
    )
    if existing and (resume == "auto" or must_resume):
        n, last = existing[-1]
        if not _finished(last) and latest_checkpoint(last) is not None:
            return last, True
    if must_resume:
        raise FileNotFoundError(f"no unfinished run of {name!r} with a checkpoint under {root} to resume")
    n = existing[-1][0] + 1 if existing else 1
    path = root / (name if n == 1 else f"{name}-{n}")
    if path.exists() and _finished(path):  # name taken by a finished run
        path = root / f"{name}-{n + 1}"
    return path, False


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint a resume of ``run_dir`` continues from (None if none): Ray Train's registered latest
    checkpoint (``train/checkpoint_manager_snapshot.json``, what ``ray.train.get_checkpoint()`` hands the
    workers) when it holds mmtl's meta; else the directory with the highest step under ``run_dir/train`` (a
    checkpoint written but never registered, e.g. a crash during the report, is not what Ray resumes)."""
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
