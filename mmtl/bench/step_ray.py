"""The Ray Train side of the step benchmark (:mod:`mmtl.bench.step`): the real mmtl worker in a
``TorchTrainer`` with 1 worker, timestamped from inside, over a Ray Dataset of the benchmark's batches."""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from mmtl.bench.step_loops import _now
from mmtl.config import Pipeline


def _ray_entry(config: dict):
    """Ray Train worker function: :func:`mmtl.train.worker.train_loop_per_worker` with a timestamping
    ``on_step`` added around mmtl's own; returns the timestamps (``Result.return_value``)."""
    t_enter = time.time()
    torch.set_num_threads(int(config["bench_threads"]))
    import mmtl.train.loop as loop
    from mmtl.train.worker import train_loop_per_worker

    orig = loop.run_training
    marks: list = []
    offset = time.time() - time.perf_counter()

    def timed(*args, on_step=None, **kwargs):
        def stamp(n: int, metrics: dict) -> None:
            marks.append(_now())
            if on_step:
                on_step(n, metrics)

        return orig(*args, on_step=stamp, **kwargs)

    loop.run_training = timed
    try:
        train_loop_per_worker(config)
    finally:
        loop.run_training = orig
    t_end = time.perf_counter()
    return {"marks": marks, "t_enter": t_enter, "first_step_wall": marks[0][0] + offset if marks else None,
            "final_checkpoint_s": t_end - marks[-1][0] if marks else None, "threads": torch.get_num_threads(),
            "niceness": os.nice(0)}


def run_mmtl_ray(pipe: Pipeline, dataset, threads: int, storage: str, name: str) -> dict:
    """One ``TorchTrainer.fit()`` of the real mmtl worker (1 worker, ``cpus_per_worker`` CPUs, gloo)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    cfg = {"pipeline": pipe.model_dump(mode="json"), "tracking_uri": None, "run_id": None, "features_ref": None,
           "stats_actor": None, "bench_threads": threads}
    trainer = TorchTrainer(
        _ray_entry, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                     resources_per_worker={"CPU": pipe.train.cpus_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=1),
                             logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": dataset},
    )
    t_fit = time.time()
    result = trainer.fit()
    fit_s = time.time() - t_fit
    if result.error:
        raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    out = dict(result.return_value)
    out["worker_start_s"] = out["t_enter"] - t_fit
    out["worker_first_step_s"] = out["first_step_wall"] - out["t_enter"]
    out["fit_s"] = fit_s
    return out


def _ray_dataset(batches: list[dict]):
    """The batches as a materialized Ray Dataset, one block per micro-batch (as the training ingest's blocks of
    ``rows_per_block`` rows; ``from_items``' default would cut them into ~200 blocks of 2-3 rows, and every
    worker batch would then gather and concatenate a dozen tiny blocks)."""
    import ray.data

    rows = []
    for b in batches:
        img, ids, mask = b["image"].numpy(), b["input_ids"].numpy(), b["attention_mask"].numpy()
        rows.extend({"image": img[i], "input_ids": ids[i], "attention_mask": mask[i]} for i in range(len(img)))
    return ray.data.from_items(rows, override_num_blocks=len(batches)).materialize()


def _ray_worker_niceness() -> Optional[int]:
    import ray

    @ray.remote(num_cpus=0)
    def nice() -> int:
        return os.nice(0)

    try:
        return int(ray.get(nice.remote(), timeout=60))
    except Exception:  # noqa: BLE001 - informative only
        return None


def start_ray(ray_worker_niceness: Optional[int]) -> float:
    """Start a local Ray instance (loopback, ``num_cpus=2``) whose workers run at niceness
    ``ray_worker_niceness`` (``None``: Ray's default); ``RAY_worker_niceness`` is restored after. Returns the
    seconds it took."""
    from mmtl.runtime import init_ray

    old_nice = os.environ.get("RAY_worker_niceness")
    if ray_worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(int(ray_worker_niceness))
    t0 = time.perf_counter()
    try:
        init_ray("local", num_cpus=2)
    finally:
        if ray_worker_niceness is not None:
            if old_nice is None:
                os.environ.pop("RAY_worker_niceness", None)
            else:
                os.environ["RAY_worker_niceness"] = old_nice
    return time.perf_counter() - t0
