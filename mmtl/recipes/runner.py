"""``mmtl run``: the run sequence, written once for every recipe.

Order: recipe and strategy of ``strategy.kind`` -> run directory (new, or resume the newest unfinished one:
the checkpoint must fit this pipeline) -> MLflow run -> seed -> ``build_model`` -> strategy ``apply`` ->
recipe ``prepare`` (feature / token caches, baselines; before Ray starts) -> report of what trains ->
Ray Train (``TorchTrainer`` + DeepSpeed, :func:`mmtl.train.fit.fit`) -> consolidated export copied into
``<run_dir>/export`` -> recipe ``evaluate`` on the exported weights -> MLflow metrics -> recipe ``register``
(MLflow model / registry) -> ``summary.json`` (also logged to MLflow). The MLflow run ends FINISHED, or
FAILED on any error. A step that fails after training keeps the checkpoint, the export and a
``summary.json`` with ``status: failed`` and the failed step; ``mmtl run ... --resume`` then redoes only the
steps after training.

A runs root on object storage (``s3://...``, :mod:`mmtl.storage`) is probed before anything starts; the run
works in a local staging folder whose files are uploaded at the start and at the end (finished or failed), and
Ray Train writes the checkpoints to the bucket.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from mmtl import storage
from mmtl.config import Pipeline
from mmtl.recipes import check_pipeline, recipe_for
from mmtl.recipes.base import Recipe, RunContext, Say
from mmtl.runtime import init_ray, latest_checkpoint, local_checkpoint, push_run, run_uri, seed_everything, select_run_dir
from mmtl.strategies import apply_strategy, trainable_summary
from mmtl.tracking import mlflow_utils as mlu
from mmtl.train.checkpoint import check_compatible, read_meta


def eval_specs(pipe: Pipeline) -> dict:
    """``{name: shard spec}`` of the sets named in ``eval.sets`` (``test``, ``val`` or a ``data.extra_eval`` key).

    Raises:
        ValueError: a named set is not configured in ``data``.
    """
    avail = {"test": pipe.data.test, "val": pipe.data.val, **pipe.data.extra_eval}
    missing = [s for s in pipe.eval.sets if avail.get(s) is None]
    if missing:
        raise ValueError(f"eval.sets names {missing} but data has no such set (have: {[k for k, v in avail.items() if v]})")
    return {s: avail[s] for s in pipe.eval.sets}


def run_pipeline(pipe: Pipeline, *, address: Optional[str] = None, must_resume: bool = False,
                 say: Say = print, on_run_dir: Optional[Callable[[Path], None]] = None) -> dict:
    """Run ``pipe`` end to end and return the summary (also written to ``<run_dir>/summary.json``).

    ``address`` is accepted for the CLI's sake (the caller joins that cluster before calling); Ray is
    started (or joined) here only when training starts. ``on_run_dir(run_dir)`` is called once the run folder
    exists (the CLI starts ``<run_dir>/console.log`` there); a ``console.log`` in the run folder is logged to
    the MLflow run at the end, finished or failed.

    Raises:
        PipelineError / ValueError: bad configuration, unknown strategy kind (before anything starts).
        MissingShardsError / EmptyDatasetError: data problems (missing shards: before anything is written).
        FileNotFoundError: a missing ``model.init_from``, before anything is written.
        SharedStorageError (a ValueError): a local runs root or tracking store while workers may run on other
            nodes of the cluster (:mod:`mmtl.train.placement`), before anything is written.
        CheckpointMismatchError: resuming a checkpoint written with other settings (world size, ZeRO stage,
            precision, family, strategy, trainable set ...), before training.
        RuntimeError: training failed (the run is left resumable).
        RunStepError: a step after training failed (checkpoint, export and a failed summary are kept;
            ``--resume`` redoes only the steps after training).
    """
    from mmtl.config.workers import check_local_devices
    from mmtl.train.placement import check_placement

    t_start = time.time()
    check_pipeline(pipe)
    check_local_devices(pipe.train, address)  # GPUs / CPUs the local Ray instance will have, before anything runs
    recipe_cls = recipe_for(pipe.strategy.kind, pipe.model.family)
    specs = eval_specs(pipe)
    check_inputs_exist(pipe, specs, recipe_cls)  # before a run folder or an MLflow run exists
    if storage.is_remote(pipe.train.runs_root):  # bucket, credentials, endpoint: before anything starts
        storage.preflight(pipe.train.runs_root, "train.runs_root")
    check_placement(pipe, address, say)  # a cluster of several nodes: the runs root must be shared
    run_dir, resuming = select_run_dir(pipe.train.runs_root, pipe.train.name, pipe.train.resume, must_resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    if on_run_dir is not None:
        on_run_dir(run_dir)
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
        lineage = init_lineage(pipe.model.init_from)
        if lineage:
            mlu.set_tags(uri, run_id, lineage)
            say(f"warm start from run {lineage.get('mmtl.parent_run_id', '?')} ({lineage['mmtl.init_from']})")
    push_run(run_dir)  # object storage: pipeline.yaml and run.json are in the store before training
    say(f"run dir {run_dir}  mlflow run {run_id}")
    ctx = RunContext(pipe=pipe, run_dir=run_dir, uri=uri, run_id=run_id, resuming=resuming, say=say,
                     specs=specs, t_start=t_start)
    try:
        summary = run_recipe(recipe_cls(ctx))
    except BaseException:
        try:  # never leave the run RUNNING; the original error is what the user needs to see
            _log_console(uri, run_id, run_dir)
            mlu.end_run(uri, run_id, "FAILED")
        except Exception as exc:  # noqa: BLE001
            say(f"warning: could not mark MLflow run {run_id} FAILED: {type(exc).__name__}: {exc}")
        _push_quietly(run_dir, say)
        raise
    _log_console(uri, run_id, run_dir)
    mlu.end_run(uri, run_id, "FINISHED")
    push_run(run_dir)
    return summary


def _push_quietly(run_dir: Path, say: Say) -> None:
    """:func:`mmtl.runtime.push_run` after a failure: a store error is reported, the original error is raised."""
    try:
        push_run(run_dir)
    except Exception as exc:  # noqa: BLE001
        say(f"warning: could not upload {run_dir} to {run_uri(run_dir)}: {type(exc).__name__}: {exc}")


def _log_console(uri: str, run_id: str, run_dir: Path) -> None:
    """Log ``<run_dir>/console.log`` (the command's full output so far) to the MLflow run, when it exists."""
    path = run_dir / "console.log"
    if path.is_file():
        mlu.log_artifacts(uri, run_id, [path])


def check_inputs_exist(pipe: Pipeline, specs: dict, recipe_cls: Optional[type[Recipe]] = None) -> None:
    """Fail before anything is written when an input is missing: every shard of ``data.train``, ``data.val``
    and the eval sets (local and remote), and a local ``model.init_from``; with ``recipe_cls``, also when a
    shard holds samples the recipe cannot read (image-only or text-only shards given to a paired recipe:
    :meth:`Recipe.data_modality`, checked from tar headers).

    Raises:
        MissingShardsError: a shard is missing (names it); FileNotFoundError: ``model.init_from`` is missing;
        UnpairedShardError: a shard's samples do not fit the recipe (names the shard and the recipe).
    """
    from mmtl.data.shardio import check_shard_modality
    from mmtl.data.shardlist import resolve_shards

    for spec in [pipe.data.train, pipe.data.val, *specs.values()]:
        if spec:
            resolve_shards(spec)
            if recipe_cls is not None:
                check_shard_modality(spec, recipe_cls.data_modality(pipe), recipe_cls.name)
    init = pipe.model.init_from
    if init and "://" not in init and not Path(init).expanduser().exists():
        raise FileNotFoundError(f"model.init_from={init!r}: not found (train the model it points to first, e.g. "
                                "the quickstart for the emoji-coop pipeline)")


def init_lineage(init_from: Optional[str]) -> dict[str, str]:
    """MLflow tags naming where ``model.init_from`` came from: ``mmtl.init_from`` and, when it is an mmtl run
    folder, its export, or a file inside its export (a ``run.json`` up to 3 folders above), the parent's
    ``mmtl.parent_run_id``, ``mmtl.parent_tracking_uri``, ``mmtl.parent_run_dir``, ``mmtl.parent_strategy``
    and ``mmtl.parent_data_train`` (the parent's train shard spec: its data manifest). ``{}`` without
    ``init_from``; only ``mmtl.init_from`` for a URI or a folder outside any run."""
    if not init_from:
        return {}
    tags = {"mmtl.init_from": str(init_from)}
    if "://" in init_from:
        return tags
    p = Path(init_from).expanduser().resolve()
    for d in [p, *list(p.parents)[:3]]:
        if (d / "run.json").is_file():
            try:
                state = json.loads((d / "run.json").read_text())
            except ValueError:
                return tags
            tags.update({"mmtl.parent_run_id": str(state.get("mlflow_run_id", "")),
                         "mmtl.parent_tracking_uri": str(state.get("tracking_uri", "")), "mmtl.parent_run_dir": str(d)})
            if (d / "pipeline.yaml").is_file():
                import yaml

                raw = yaml.safe_load((d / "pipeline.yaml").read_text()) or {}
                tags["mmtl.parent_strategy"] = str((raw.get("strategy") or {}).get("kind", ""))
                tags["mmtl.parent_data_train"] = json.dumps((raw.get("data") or {}).get("train"))[:5000]
            break
    return tags


class RunStepError(RuntimeError):
    """A step after training failed; the checkpoint, export and a ``summary.json`` with ``status: failed`` are
    kept. Attributes: ``step`` (``export``, ``evaluate``, ``log_metrics``, ``register`` or ``summary``)."""

    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.step = step


def run_recipe(recipe: Recipe) -> dict:
    """The sequence after the MLflow run exists (module docstring); returns the summary.

    A resumed run whose training already finished (its last checkpoint is at ``train.max_steps`` and holds the
    export) does not train again: it redoes only export, evaluation and registration.

    Raises:
        ValueError / FileNotFoundError: from the recipe's preparation (before Ray starts).
        RuntimeError: training failed (the run is left resumable).
        RunStepError: a step after training failed (what exists is kept; the message says how to redo it).
    """
    from mmtl.train.fit import fit, finished_checkpoint, report_trainable

    ctx, pipe = recipe.ctx, recipe.ctx.pipe
    seed_everything(pipe.train.seed)
    ctx.model = build_model_for(pipe)
    ctx.trainable = apply_strategy(ctx.model, pipe.strategy, zero_stage=pipe.train.zero_stage)
    arrays = recipe.prepare()
    base: dict = {"steps": 0, "export_path": None, "registered_model": None}
    ckpt = None
    if recipe.trains():
        (ctx.run_dir / "pipeline.yaml").write_text(pipe.to_yaml())  # with what prepare() resolved
        ctx.trainable = report_trainable(pipe, trainable_summary(recipe.module_to_report()), ctx.uri, ctx.run_id,
                                         ctx.say)
        ckpt = finished_checkpoint(ctx.run_dir, pipe.train.max_steps) if ctx.resuming else None
        if ckpt is not None:
            ctx.say(f"training already finished ({ckpt.name}): redoing only export, evaluation and registration")
            ctx.final_train = dict(read_meta(ckpt).get("train_metrics") or {})
            ctx.steps = base["steps"] = pipe.train.max_steps
        else:
            init_ray()
            t_train = time.time()
            result = fit(pipe, ctx.run_dir, arrays, ctx.uri, ctx.run_id, ctx.say, train_module=recipe.train_module,
                         build_dataset=recipe.stream())
            base["train_time_s"] = round(time.time() - t_train, 2)
            final = result.metrics or {}
            ctx.final_train = {k: v for k, v in final.items() if k.startswith("train/")}
            ctx.steps = base["steps"] = int(final.get("steps", 0))
            base["workers"] = final.get("workers")  # where each rank ran (mmtl.train.placement)
            ckpt = local_checkpoint(ctx.run_dir, result.checkpoint.path)  # object storage: a local mirror
    return _after_training(recipe, ckpt, base)


def _after_training(recipe: Recipe, ckpt: Optional[Path], base: dict) -> dict:
    """Export, evaluate, log, register, write the summary; on failure keep what exists (:class:`RunStepError`)."""
    from mmtl.train.fit import copy_export

    ctx, pipe = recipe.ctx, recipe.ctx.pipe
    step, export_dir = "export", None
    try:
        if ckpt is not None:
            export_dir = copy_export(ckpt, ctx.run_dir, ctx.uri, ctx.run_id)
            base["export_path"] = str(export_dir / "model.safetensors")
        step = "evaluate"
        metrics = recipe.evaluate(export_dir)
        step = "log_metrics"
        mlu.log_metrics(ctx.uri, ctx.run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                        step=ctx.steps)
        step = "register"
        if export_dir is not None and pipe.tracking.log_model:
            base["registered_model"] = recipe.register(export_dir)
        step = "summary"
        base["wall_time_s"] = round(time.time() - ctx.t_start, 2)
        summary = recipe.summary({**ctx.common_summary(), **base}, metrics)
        write_json_atomic(ctx.run_dir / "summary.json", summary)
        mlu.log_artifacts(ctx.uri, ctx.run_id, [ctx.run_dir / "summary.json"])
        return summary
    except Exception as exc:
        if ckpt is None:  # nothing trained: nothing to keep
            raise
        raise _step_failed(ctx, step, exc, ckpt, base) from exc


def _step_failed(ctx: RunContext, step: str, exc: Exception, ckpt: Path, base: dict) -> RunStepError:
    summary = {**ctx.common_summary(), **base, "status": "failed", "failed_step": step,
               "error": f"{type(exc).__name__}: {exc}", "checkpoint": str(ckpt),
               "wall_time_s": round(time.time() - ctx.t_start, 2)}
    path = ctx.run_dir / "summary.json"
    write_json_atomic(path, summary)
    try:
        mlu.log_artifacts(ctx.uri, ctx.run_id, [path])
    except Exception:  # noqa: BLE001 - the tracking store may be what failed; the file is kept locally
        pass
    kept = f"checkpoint {ckpt}" + (f", export {base['export_path']}" if base.get("export_path") else "")
    return RunStepError(
        f"step {step!r} failed after training finished: {type(exc).__name__}: {exc}\n"
        f"kept: {kept}, {path} (status: failed); the MLflow run {ctx.run_id} is marked FAILED.\n"
        f"redo only the steps after training (no retraining): mmtl run <the same pipeline and overrides> "
        f"--resume", step)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def build_model_for(pipe: Pipeline):
    """``build_model(pipe.model)`` (the family registry builds it)."""
    from mmtl.models import build_model

    return build_model(pipe.model)
