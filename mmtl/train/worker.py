"""Ray Train entry: ``train_loop_per_worker(config)`` builds the model and data iterator on each worker and
calls :func:`mmtl.train.loop.run_training` with Ray's checkpoint and report hooks.

``config`` keys: ``pipeline`` (dict), ``tracking_uri``, ``run_id`` (MLflow, rank 0 logs), ``features_ref``
(ObjectRef of cached frozen-tower outputs, or None to train on images), ``stats_actor`` (name of the
reject-count actor, or None), ``train_module`` (the recipe's task-module class, or None for contrastive;
see :func:`mmtl.train.loop.make_train_module`), ``driver_node_id`` and ``storage_shared``
(:func:`mmtl.train.placement.driver_context`: where each rank runs is gathered, recorded and checked before
the first step).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

from mmtl.config import Pipeline


def progress_line(n: int, total: int, m: dict, t_start: float) -> str:
    elapsed = time.perf_counter() - t_start
    eta = elapsed / max(1, n) * (total - n)
    return (
        f"[mmtl] step {n}/{total} loss {m['train/loss']:.4f} lr {m['train/lr']:.2e} "
        + (f"scale {m['train/logit_scale']:.1f} " if "train/logit_scale" in m else "")
        + f"{m['train/samples_per_s']:.0f} samples/s ETA {eta:.0f}s"
    )


def train_loop_per_worker(config: dict) -> None:
    """Per-worker function for ``TorchTrainer`` (see module docstring)."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    from mmtl.models import build_model
    from mmtl.runtime import seed_everything
    from mmtl.strategies import apply_strategy
    from mmtl.train.checkpoint import read_meta
    from mmtl.train.loop import feature_batches, run_training
    from mmtl.train.placement import gather_placement, record_placement, write_workers_file

    os.environ.update(config.get("env") or {})  # e.g. test hooks set in the driver after Ray started
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per report otherwise
    pipe = Pipeline.model_validate(config["pipeline"])
    torch.set_num_threads(max(1, int(pipe.train.cpus_per_worker)))  # fractional CPUs: one thread
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(pipe.train.seed)  # identical model init on every rank
    model = build_model(pipe.model)
    apply_strategy(model, pipe.strategy, zero_stage=pipe.train.zero_stage)
    seed_everything(pipe.train.seed + 1000 * (rank + 1))
    it = iter(
        ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=pipe.train.micro_batch_size, drop_last=True
        )
    )
    batches = feature_batches(it, ray.get(config["features_ref"])) if config.get("features_ref") else it

    logger = None
    if rank == 0 and config.get("run_id"):
        from mmtl.tracking.mlflow_utils import MetricLogger

        logger = MetricLogger(config["tracking_uri"], config["run_id"], every=pipe.train.log_every * 5)
    stats_actor = config.get("stats_actor")
    t_start = time.perf_counter()

    def on_step(n: int, metrics: dict) -> None:
        if rank != 0 or n % pipe.train.log_every:
            return
        extra = {}
        if stats_actor:
            try:
                extra = {f"data/rejected_{k}": v for k, v in ray.get(ray.get_actor(stats_actor).get.remote()).items()}
            except ValueError:
                pass
        if logger:
            logger.log({k: v for k, v in {**metrics, **extra}.items() if k != "steps"}, step=n)
        sys.stderr.write(progress_line(n, pipe.train.max_steps, metrics, t_start) + "\n")
        sys.stderr.flush()

    def report(metrics: dict, ckpt_dir) -> None:
        # Only checkpoint reports go through Ray: in Ray Train 2.60 each report is a barrier that waits for the
        # controller's next poll (~2 s); step metrics reach MLflow directly from rank 0 (on_step).
        if ckpt_dir is None:
            return
        if logger:
            logger.flush()
        if rank == 0:
            write_workers_file(ckpt_dir, placement)  # where each rank that wrote this checkpoint ran
        ray.train.report({**metrics, "workers": placement}, checkpoint=Checkpoint.from_directory(str(ckpt_dir)))

    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext() as d:
        resume_dir = Path(d) if d else None
        start = int((read_meta(resume_dir) or {}).get("step", 0)) if resume_dir else 0
        placement = gather_placement(rank, world, config, start)  # every rank; refuses a local runs root elsewhere
        if rank == 0:
            record_placement(placement, config.get("tracking_uri"), config.get("run_id"))
            if resume_dir:
                sys.stderr.write(f"[mmtl] resuming from {d}\n")
        run_training(pipe, model, batches, rank=rank, world_size=world, resume_dir=resume_dir,
                     report=report, on_step=on_step, train_module=config.get("train_module"))
    if logger:
        logger.close()
    torch.distributed.barrier() if torch.distributed.is_initialized() else None
