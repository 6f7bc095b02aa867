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
    FileNotFoundError when there is nothing unfinished to resume.
    """
    root = Path(runs_root)
    pat = re.compile(rf"^{re.escape(name)}(?:-(\d+))?$")
    existing = sorted(
        ((int(m.group(1) or 1), p) for p in root.glob(f"{name}*") if p.is_dir() and (m := pat.match(p.name))),
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
    """The checkpoint directory with the highest step under ``run_dir/train`` (None if none)."""
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
