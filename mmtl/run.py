"""``mmtl run``: one pipeline end to end on a Ray cluster (a local instance by default).

Order: select the run directory (resume or new) -> MLflow run -> model -> frozen-feature cache (when both
towers are frozen) -> eval before training -> Ray Train (``TorchTrainer`` + DeepSpeed) -> consolidated
export -> eval after training (+ ridge baseline) -> MLflow metrics, artifacts, registered model ->
``summary.json``.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mmtl.config import Pipeline
from mmtl.runtime import init_ray, latest_checkpoint, select_run_dir
from mmtl.tracking import mlflow_utils as mlu

Say = Callable[[str], None]


def _eval_specs(pipe: Pipeline) -> dict:
    avail = {"test": pipe.data.test, "val": pipe.data.val, **pipe.data.extra_eval}
    missing = [s for s in pipe.eval.sets if avail.get(s) is None]
    if missing:
        raise ValueError(f"eval.sets names {missing} but data has no such set (have: {[k for k, v in avail.items() if v]})")
    return {s: avail[s] for s in pipe.eval.sets}


def _features(pipe, model, specs: dict, cache_root: Path, say: Say) -> dict:
    from mmtl.data.features import load_features
    from mmtl.data.stream import clean_options

    opts = clean_options(pipe, count_tokens=model.count_tokens)
    out = {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        out[name] = load_features(spec, model, cache_root, opts)
        say(f"features[{name}]: {len(out[name])} samples ({time.perf_counter() - t0:.1f}s, cache {cache_root})")
    return out


def _embedded(model, pipe, feats: Optional[dict], specs: dict) -> dict:
    from mmtl.data.stream import clean_options
    from mmtl.eval.evaluate import EmbeddedSet, embed_features, embed_shards

    sets = {}
    for name, spec in specs.items():
        if feats is not None:
            fs = feats[name]
            img, txt = embed_features(model, fs.image, fs.text)
            sets[name] = EmbeddedSet(img, txt, fs.meta)
        else:
            sets[name] = embed_shards(model, spec, clean_options(pipe))
    return sets


def _ridge(pipe, feats) -> dict:
    from mmtl.eval.ridge import ridge_recall

    out = {}
    val = (feats["val"].image, feats["val"].text) if "val" in feats else None
    for name in pipe.eval.sets:
        for k, v in ridge_recall((feats["train"].image, feats["train"].text), (feats[name].image, feats[name].text),
                                 val, pipe.eval.recall_ks).items():
            out[f"ridge/{name}/{k}"] = v
    return out


def fit(pipe: Pipeline, run_dir: Path, arrays: Optional[dict], uri: str, run_id: str, say: Say):
    """Train with Ray Train (``TorchTrainer`` of ``train.num_workers`` workers, each running
    :func:`mmtl.train.worker.train_loop_per_worker`) and return the ``ray.train.Result``.

    ``arrays``: in-memory training rows ``{name: (N, ...) ndarray or RowIndexed}`` (all of N rows; a
    :class:`mmtl.train.arrays.RowIndexed` shares rows between samples) put in the object store once and indexed
    by a shuffled Ray Data index stream (cached frozen-tower outputs; task modules get these names as
    ``forward`` arguments), or ``None`` to stream and decode ``data.train`` shards.

    Raises:
        RuntimeError: training failed past ``train.max_failures`` (the run is left resumable).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from mmtl.data.stream import build_image_dataset, build_index_dataset, epochs_needed, make_stats_actor
    from mmtl.train.worker import train_loop_per_worker

    t = pipe.train
    import os

    from mmtl.runtime import FORWARDED_ENV, training_failure

    cfg = {"pipeline": pipe.model_dump(mode="json"), "tracking_uri": uri, "run_id": run_id,
           "features_ref": None, "stats_actor": None,
           "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
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
        ds = build_image_dataset(pipe, pipe.data.train, epochs_needed(t.max_steps, t.effective_global_batch, n), name)
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name="train", storage_path=str(run_dir.resolve()),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": ds},
    )
    say(f"training: {t.num_workers} workers, ZeRO-{t.zero_stage}, {t.precision}, global batch "
        f"{t.effective_global_batch}, {t.max_steps} steps")
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train raises TrainingFailedError when workers fail past max_failures
        raise RuntimeError(training_failure(exc, run_dir)) from exc
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return result


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


def copy_export(result, run_dir: Path, uri: str, run_id: str) -> Path:
    """Copy the final checkpoint's ``export/`` (and a LoRA ``adapter/``, logged to MLflow) into ``run_dir``;
    returns ``<run_dir>/export``."""
    export_dir = run_dir / "export"
    with result.checkpoint.as_directory() as d:
        if export_dir.exists():
            shutil.rmtree(export_dir)
        shutil.copytree(Path(d) / "export", export_dir)
        if (Path(d) / "adapter").exists():  # LoRA: the adapter alone, as an artifact
            shutil.rmtree(run_dir / "adapter", ignore_errors=True)
            shutil.copytree(Path(d) / "adapter", run_dir / "adapter")
            mlu.log_artifacts(uri, run_id, [run_dir / "adapter"], "adapter")
    return export_dir


def run_pipeline(pipe: Pipeline, *, address: Optional[str] = None, must_resume: bool = False,
                 say: Say = print) -> dict:
    """Run ``pipe`` end to end and return the summary (also written to ``<run_dir>/summary.json``).

    Raises:
        PipelineError / ValueError: bad configuration (before anything starts).
        MissingShardsError / EmptyDatasetError: data problems, before training.
        CheckpointMismatchError: resuming a checkpoint written at another world size, before training.
        RuntimeError: training failed (the run is left resumable).
    """
    from mmtl.config_workers import check_local_devices
    from mmtl.models import build_model
    from mmtl.strategies import apply_strategy, uses_feature_cache
    from mmtl.train.checkpoint import check_compatible, read_meta
    from mmtl.train.loop import seed_everything
    from mmtl.train.tasks import is_contrastive, task_driver

    t_start = time.time()
    check_local_devices(pipe.train, address)  # GPUs / CPUs the local Ray instance will have, before anything runs
    specs = _eval_specs(pipe)
    run_dir, resuming = select_run_dir(pipe.train.runs_root, pipe.train.name, pipe.train.resume, must_resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resuming:
        meta = read_meta(latest_checkpoint(run_dir))
        for note in check_compatible(meta, pipe.train.num_workers, pipe.train.zero_stage, pipe):
            say(note)
        say(f"resuming {run_dir} from step {meta['step']}")
    (run_dir / "pipeline.yaml").write_text(pipe.to_yaml())
    uri = mlu.tracking_uri(pipe.tracking.uri, pipe.train.runs_root)
    state_file = run_dir / "run.json"
    if resuming and state_file.exists():
        run_id = json.loads(state_file.read_text())["mlflow_run_id"]
    else:
        run_id = mlu.start_run(uri, pipe.tracking.experiment, pipe.train.runs_root, run_dir.name,
                               pipe.model_dump(mode="json"), pipe.to_yaml())
        state_file.write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri}))
    say(f"run dir {run_dir}  mlflow run {run_id}")
    try:
        if is_contrastive(pipe):
            summary = _run(pipe, run_dir, uri, run_id, specs, resuming, say, t_start,
                           build_model, apply_strategy, uses_feature_cache, seed_everything)
        else:
            summary = task_driver(pipe.strategy.kind)(pipe, run_dir, uri, run_id, resuming, say, t_start)
    except BaseException:
        mlu.end_run(uri, run_id, "FAILED")
        raise
    mlu.end_run(uri, run_id, "FINISHED")
    return summary


def _run(pipe, run_dir, uri, run_id, specs, resuming, say, t_start, build_model, apply_strategy,
         uses_feature_cache, seed_everything) -> dict:
    from mmtl.tracking.registry import log_exported_model

    seed_everything(pipe.train.seed)
    model = build_model(pipe.model)
    summary_trainable = apply_strategy(model, pipe.strategy, zero_stage=pipe.train.zero_stage)
    summary_trainable = report_trainable(pipe, summary_trainable, uri, run_id, say)
    feats = None
    if uses_feature_cache(pipe):
        cache_root = Path(pipe.data.cache_dir or Path(pipe.train.runs_root) / "cache")
        feats = _features(pipe, model, {"train": pipe.data.train, **specs,
                                        **({"val": pipe.data.val} if pipe.data.val else {})}, cache_root, say)
        rejected = {}
        for fs in feats.values():
            for k, v in fs.stats.items():
                rejected[k] = rejected.get(k, 0) + v
        mlu.log_metrics(uri, run_id, {f"data/{k}": v for k, v in rejected.items()})
    metrics: dict[str, float] = {}
    if pipe.eval.before_training and not resuming:
        before = _embedded(model, pipe, feats, specs)
        from mmtl.eval.evaluate import evaluate_sets

        metrics.update({f"before/{k}": v for k, v in evaluate_sets(model, pipe, before).items()})
    if pipe.eval.ridge_baseline and feats is not None:
        metrics.update(_ridge(pipe, feats))
    init_ray()
    t_train = time.time()
    arrays = None if feats is None else {"image_feat": feats["train"].image, "text_feat": feats["train"].text}
    result = fit(pipe, run_dir, arrays, uri, run_id, say)
    train_s = time.time() - t_train
    export_dir = copy_export(result, run_dir, uri, run_id)
    from safetensors.torch import load_file

    sd = load_file(str(export_dir / "model.safetensors"))
    if pipe.strategy.kind == "lora":  # the export is merged: drop the (untrained) adapters of the driver's copy
        from mmtl.strategies.lora import merge_lora

        model = merge_lora(model)
    model.load_state_dict({k: v for k, v in sd.items() if k != "logit_bias"}, strict=True)
    from mmtl.eval.evaluate import evaluate_sets

    metrics.update(evaluate_sets(model, pipe, _embedded(model, pipe, feats, specs)))
    final_train = {k: v for k, v in (result.metrics or {}).items() if k.startswith("train/")}
    steps = int((result.metrics or {}).get("steps", 0))
    mlu.log_metrics(uri, run_id, metrics, step=steps)
    registered = None
    if pipe.tracking.log_model:
        registered = log_exported_model(uri, run_id, export_dir, pipe.tracking.model_name)
    summary = {
        "status": "finished",
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": uri,
        "mlflow_ui": f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000",
        "steps": steps,
        "wall_time_s": round(time.time() - t_start, 2),
        "train_time_s": round(train_s, 2),
        "feature_cache": feats is not None,
        "trainable": summary_trainable,
        "image_size": pipe.model.image_size,
        "metrics": {**final_train, **metrics},
        "export_path": str(export_dir / "model.safetensors"),
        "registered_model": registered,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    mlu.log_artifacts(uri, run_id, [run_dir / "summary.json"])
    return summary
