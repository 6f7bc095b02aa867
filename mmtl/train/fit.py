"""Launch training on the Ray cluster and collect its result: :func:`fit` (a ``TorchTrainer`` of
``train.num_workers`` workers running :func:`mmtl.train.worker.train_loop_per_worker`), the pre-training
report of what trains (:func:`report_trainable`) and the copy of the final export (:func:`copy_export`).
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Callable, Optional

from mmtl.config import Pipeline
from mmtl.runtime import FORWARDED_ENV, training_failure
from mmtl.tracking import mlflow_utils as mlu

Say = Callable[[str], None]


def fit(pipe: Pipeline, run_dir: Path, arrays: Optional[dict], uri: str, run_id: str, say: Say,
        train_module: Optional[type] = None, build_dataset: Optional[Callable] = None):
    """Train with Ray Train (``TorchTrainer`` of ``train.num_workers`` workers, each running
    :func:`mmtl.train.worker.train_loop_per_worker`) and return the ``ray.train.Result``.

    ``arrays``: in-memory training rows ``{name: (N, ...) ndarray or RowIndexed}`` (all of N rows; a
    :class:`mmtl.data.arrays.RowIndexed` shares rows between samples) put in the object store once and indexed
    by a shuffled Ray Data index stream (cached frozen-tower outputs; task modules get these names as
    ``forward`` arguments), or ``None`` to stream and decode ``data.train`` shards. ``train_module``: the
    recipe's task-module class (:func:`mmtl.train.loop.make_train_module`), None for the contrastive module.
    ``build_dataset(pipe, spec, epochs, stats_actor_name)``: the recipe's own Ray Dataset of streamed rows
    (e.g. :func:`mmtl.data.unpaired.build_unpaired_dataset`); None: :func:`mmtl.data.stream.build_image_dataset`.

    Raises:
        RuntimeError: training failed past ``train.max_failures`` (the run is left resumable).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from mmtl.data.stream import build_image_dataset, build_index_dataset, epochs_needed, make_stats_actor
    from mmtl.train.placement import driver_context
    from mmtl.train.worker import train_loop_per_worker

    t = pipe.train
    cfg = {"pipeline": pipe.model_dump(mode="json"), "tracking_uri": uri, "run_id": run_id,
           "features_ref": None, "stats_actor": None, "train_module": train_module,
           "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **driver_context(pipe)}
    if arrays is not None:
        lengths = {name: len(a) for name, a in arrays.items()}
        n = len(next(iter(arrays.values())))
        if set(lengths.values()) != {n}:
            raise ValueError(f"training arrays must all have the same number of rows, got {lengths}")
        cfg["features_ref"] = ray.put(arrays)
        ds = build_index_dataset(n, epochs_needed(t.max_steps, t.effective_global_batch, n), pipe.data.seed)
    else:
        from mmtl.data.stream import count_samples

        name = f"mmtl-sample-stats-{run_id}"
        stats_handle = make_stats_actor(name)  # noqa: F841  (kept alive for the whole fit)
        cfg["stats_actor"] = name
        n = count_samples(pipe.data.train)
        ds = (build_dataset or build_image_dataset)(pipe, pipe.data.train,
                                                   epochs_needed(t.max_steps, t.effective_global_batch, n), name)
    note = batch_larger_than_data(pipe, n) if train_module is None else None
    if note:
        say(note)
    from mmtl.runtime import run_uri
    from mmtl.storage import ray_storage

    # checkpoints: the run folder, or for a runs root on object storage the run's URI (Ray Train uploads them)
    storage_path, storage_fs = ray_storage(run_uri(run_dir)) if run_uri(run_dir) else (str(run_dir.resolve()), None)
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                                     placement_strategy=t.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name="train", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": ds},
    )
    say(f"training: {t.num_workers} workers ({t.placement_strategy}), ZeRO-{t.zero_stage}, {t.precision}, global batch "
        f"{t.effective_global_batch}, {t.max_steps} steps")
    sigint = signal.getsignal(signal.SIGINT)  # Ray Train installs its own Ctrl-C handler and leaves it behind
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train raises TrainingFailedError when workers fail past max_failures
        raise RuntimeError(training_failure(exc, run_dir)) from exc
    finally:
        if signal.getsignal(signal.SIGINT) is not sigint:
            signal.signal(signal.SIGINT, sigint)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return result


def batch_larger_than_data(pipe: Pipeline, n: int) -> Optional[str]:
    """A warning when the contrastive global batch (``train.effective_global_batch``) is larger than the ``n``
    training samples, else None. Batches are cut from concatenated permutations of the samples, so such a batch
    holds a sample several times, and the InfoNCE loss (CLIP, Radford et al. 2021, eq. in :mod:`mmtl.train.losses`)
    takes each copy for a negative of the others. The message names the ``train.micro_batch_size`` that keeps
    every sample at most once a batch."""
    t = pipe.train
    g = t.effective_global_batch
    if n <= 0 or n >= g:
        return None
    per = max(1, n // (t.num_workers * t.grad_accum_steps))
    return (f"warning: global batch {g} is larger than the {n} training samples: each batch repeats samples and "
            f"the contrastive loss counts the copies as negatives of each other; train.micro_batch_size={per} "
            f"(global batch {per * t.num_workers * t.grad_accum_steps}) keeps each sample once a batch")


def report_trainable(pipe: Pipeline, counts: dict, uri: str, run_id: str, say: Say) -> dict:
    """Print and log to MLflow, before training, the trainable parameter count and share (``counts`` from
    :func:`mmtl.strategies.trainable_summary` of the module that trains) and the estimated model-state memory
    per worker (:mod:`mmtl.train.memory`). Returns ``counts`` + ``est_model_state_bytes_per_worker`` (bytes)."""
    from mmtl.train.memory import describe, model_state_bytes

    say(f"trainable parameters: {counts['params_trainable']:,} of {counts['params_total']:,}"
        f" ({100 * counts['trainable_share']:.2f}%)")
    est = model_state_bytes(counts["params_total"], counts["params_trainable"], pipe.train)
    say(f"estimated memory: {describe(est)}")
    mlu.log_metrics(uri, run_id, {**{f"model/{k}": v for k, v in counts.items()},
                                  **{f"model/est_{k}_bytes_per_worker": v for k, v in est.items()}})
    return {**counts, "est_model_state_bytes_per_worker": est["total"]}


def copy_export(ckpt_dir: Path, run_dir: Path, uri: str, run_id: str) -> Path:
    """Copy a final checkpoint's ``export/`` (and an ``adapter/`` written by the strategy, e.g. LoRA's, logged
    to MLflow) into ``run_dir``; each folder is copied beside its target and renamed into place, so a crash
    never leaves a half-copied export. The export copy gets the family's native format too
    (:func:`mmtl.models.exported.write_native_formats`: open_clip's files for open_clip runs). Returns
    ``<run_dir>/export``.

    Raises:
        FileNotFoundError: ``ckpt_dir`` has no ``export/`` (not a final checkpoint).
        ValueError: the open_clip format of an open_clip run could not be written (its message says why).
    """
    from mmtl.models.exported import write_native_formats

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "export").is_dir():
        raise FileNotFoundError(f"{ckpt_dir} has no export/: not the final checkpoint of a run")
    export_dir = _replace_dir(ckpt_dir / "export", run_dir / "export", write_native_formats)
    if (ckpt_dir / "adapter").exists():  # e.g. LoRA: the adapter alone, as an artifact
        _replace_dir(ckpt_dir / "adapter", run_dir / "adapter")
        mlu.log_artifacts(uri, run_id, [run_dir / "adapter"], "adapter")
    return export_dir


def _replace_dir(src: Path, dst: Path, finish: Optional[Callable[[Path], object]] = None) -> Path:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if finish is not None:
        finish(tmp)  # e.g. add the native formats before the folder appears under its name
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def finished_checkpoint(run_dir: Path, max_steps: int) -> Optional[Path]:
    """The run's latest checkpoint when training already reached ``max_steps`` and it holds the final
    ``export/`` (a resumed run then skips training and redoes only export, eval and registration), else None."""
    from mmtl.runtime import latest_checkpoint
    from mmtl.train.checkpoint import read_meta

    ckpt = latest_checkpoint(run_dir)
    meta = read_meta(ckpt) if ckpt is not None else None
    if meta and int(meta.get("step", -1)) >= max_steps and (ckpt / "export").is_dir():
        return ckpt
    return None
