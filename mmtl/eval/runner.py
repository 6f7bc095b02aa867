"""``mmtl eval``: evaluate an exported model on a shard set (zero-shot classification or image-text retrieval).

:func:`run_eval` resolves MODEL (:mod:`mmtl.eval.resolve`: run directory, export folder, ``runs:/`` or
``models:/`` URI), embeds the set, computes the metrics of :mod:`mmtl.eval.metrics` and writes report files:

* ``zero-shot``: ``zero_shot/acc1``, ``zero_shot/acc5`` (C >= 5), ``zero_shot/mean_per_class_recall``,
  ``zero_shot/chance``, ``zero_shot/majority``, ``zero_shot/num_classes``, ``zero_shot/num_samples``; files
  ``zero_shot_per_class.csv`` (support, correct, recall, precision, most confused class per class) and
  ``zero_shot_confusion.png`` (matplotlib when installed, else drawn with PIL).
* ``retrieval``: ``retrieval/image_to_text_recall_at_K``, ``retrieval/text_to_image_recall_at_K`` (for each K
  <= N), ``retrieval/num_samples``; file ``retrieval_examples.png``: 4 text queries (evenly spaced over the
  set) with their top-5 images, the true image framed green.

Every run also writes ``eval.json`` (the returned dict). Metric names hold no ``@`` (MLflow forbids it).

Embedding: in this process for up to :data:`RAY_THRESHOLD` samples; above it (or with ``use_ray=True``) with
Ray Data batch inference: ``ray.data.from_items`` over the shard list (one row per shard) and ``map_batches``
with :class:`ShardEmbedder` actors (``ActorPoolStrategy(min_size=1, max_size=ray_actors)``, ``num_cpus=1``
each) that hold the model (weights shipped through the object store, never unpickled from a file). Order and
results are the same either way.

MLflow: when the model came from an MLflow run (a run directory's ``run.json``, or a ``runs:/`` /
``models:/`` URI) and ``log_to_mlflow``, a new run ``eval-<task>-<data>`` is created in the source run's
experiment, nested under it (``mlflow.parentRunId``), with the metrics, params and the files under the
artifact folder ``eval/``. The training run itself is left untouched.

This module orchestrates; the parts live in :mod:`mmtl.eval.registry` (the tasks by name),
:mod:`mmtl.eval.args` (classes, templates), :mod:`mmtl.eval.options` (the options of ``mmtl eval``),
:mod:`mmtl.eval.batch_infer` (local and Ray Data embedding), :mod:`mmtl.eval.tasks` (the embedding tasks'
reports), :mod:`mmtl.eval.fusion_eval` (VQA / ITM), :mod:`mmtl.eval.reports` (CSV and PNG files) and
:mod:`mmtl.eval.mlflow_log` (the nested MLflow run).
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mmtl.eval.args import EvalError, parse_classes, parse_templates
from mmtl.eval.batch_infer import embed_local, embed_ray
from mmtl.eval.mlflow_log import log_eval_run
from mmtl.eval.registry import FUSION_TOKENS, GENERATED, get_task
from mmtl.eval.tasks import Say

RAY_THRESHOLD = 5_000
"""Above this many samples (tar-header count) the set is embedded with Ray Data."""


def _resolve(spec: str, tracking_uri: Optional[str]):
    from mmtl.eval.resolve import resolve_export

    return resolve_export(spec, tracking_uri)


def _load_model(res):
    """(model, pipeline) of a resolved export."""
    from mmtl.tracking.registry import load_exported

    return load_exported(res.export_dir)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


def _prompt(spec: Optional[str], export_dir: Path, res=None):
    """The learned prompt (:class:`mmtl.prompting.artifact.LoadedPrompt`) named by ``spec``, else the one in
    ``export_dir`` (a prompt_tuning export), else for a ``runs:/`` / ``models:/`` model its run's MLflow
    ``prompt/`` artifacts, else None. Raises EvalError for a bad ``spec``."""
    from mmtl.prompting.artifact import LoadedPrompt, download_prompt, find_prompt

    try:
        if spec is None:
            if find_prompt(export_dir):
                return LoadedPrompt(export_dir)
            if res is not None and res.kind == "mlflow_uri" and res.mlflow_run_id and res.temporary is not None:
                found = download_prompt(res.mlflow_run_id, res.tracking_uri, res.temporary / "prompt")
                return LoadedPrompt(found) if found else None
            return None
        return LoadedPrompt(spec)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None


def run_eval(spec: str, task: Optional[str], data: str, classes: Optional[str] = None, templates: Optional[str] = None,
             label_field: str = "category", ks: Sequence[int] = (1, 5, 10), batch_size: Optional[int] = None,
             out_dir: Optional[str] = None, log_to_mlflow: bool = True, tracking_uri: Optional[str] = None, *,
             use_ray: Optional[bool] = None, ray_threshold: int = RAY_THRESHOLD, ray_actors: int = 2,
             ray_address: Optional[str] = None, device: str = "auto", say: Optional[Say] = None,
             prompt: Optional[str] = None, locale: Optional[str] = None) -> dict:
    """Evaluate MODEL ``spec`` on the shard set ``data``; return a JSON-serialisable report.

    Args:
        spec: run directory, export folder, ``runs:/<id>/model``, ``models:/<name>@<alias>`` or
            ``models:/<name>/<version>`` (see :mod:`mmtl.eval.resolve`).
        task: "zero-shot", "retrieval", or "vqa" / "itm" for cross_attention models (accuracy overall and per
            question type, see :mod:`mmtl.eval.fusion_eval`); None: picked from the first samples of ``data``
            (:func:`mmtl.eval.autotask.choose_task`: labels -> zero-shot, answers -> vqa, else retrieval).
        data: shard spec (folder, glob, brace pattern, tar path or URI).
        classes: zero-shot class names: a file (one a line) or a comma list; default the pipeline's
            ``eval.zero_shot.classes``, else the sorted distinct ``label_field`` values of the data.
        templates: a file of prompt templates (one a line, each with ``{}``) or one template; default the
            pipeline's ``eval.zero_shot.templates``, else ``"a photo of a {}."``.
        label_field: json field with the class name (an int is taken as a class index).
        ks: recall@K cut-offs for retrieval (those > N are dropped and listed in ``ks_skipped``).
        batch_size: images per forward pass; None: the model pipeline's ``eval.batch_size``.
        out_dir: folder for the report files (created); None: files only go to MLflow (temporary folder).
        log_to_mlflow: log to a new run nested under the model's MLflow run, when there is one.
        tracking_uri: MLflow tracking URI for ``runs:/`` / ``models:/`` specs (default ``$MLFLOW_TRACKING_URI``);
            a run directory's own ``run.json`` URI takes precedence for logging.
        use_ray: True forces Ray Data batch inference, False forbids it; None: Ray above ``ray_threshold``
            samples.
        ray_actors: at most this many embedding actors (1 CPU each).
        ray_address: Ray cluster to join (default: as ``mmtl run``: a local instance if none runs).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        say: progress messages (default: none).
        prompt: a learned CoOp prompt (``mmtl.prompting``: a prompt_tuning run dir, its export or the
            ``prompt.safetensors`` file) used instead of templates for zero-shot, with base/new-class metrics
            (``zero_shot/base_acc1`` ...) where it has a split; default: the export's own prompt, if any.
        locale: retrieval per caption locale (``"de"``, ``"de,fr"``, ``"all"``; :mod:`mmtl.eval.locale_eval`):
            adds ``retrieval/<locale>/...`` and ``retrieval/mean[_non_en]/...`` metrics and a ``locales`` table.

    Returns ``{"task", "model" (resolution details), "data", "num_samples", "embedding" ("local"|"ray"),
    "metrics", "data_stats", "files", "out_dir", "mlflow", "seconds", ...}`` plus, for zero-shot, ``classes``,
    ``classes_from``, ``templates``, ``label_field``, ``skipped``, ``per_class``, ``confusion_matrix``; for
    retrieval ``ks``, ``ks_skipped``, ``examples``. Also written to ``<out_dir>/eval.json``.

    Raises:
        ModelSpecError: bad MODEL (see :mod:`mmtl.eval.resolve`).
        EvalError: bad task / classes / templates / labels (zero-shot on data without labels is refused before
            the model loads).
        MissingShardsError / EmptyDatasetError: the data.
    """
    from mmtl.data.shardlist import resolve_shards
    from mmtl.data.stream import count_samples

    say = say or (lambda m: None)
    t0 = time.time()
    if task is None or task == "zero-shot":  # picked / checked from the first samples, before the model loads
        from mmtl.eval.autotask import choose_task

        task = choose_task(task, data, label_field, say)
    kind = get_task(task)  # UnknownTaskError (an EvalError) for an unknown name
    if kind.source == FUSION_TOKENS:  # VQA / ITM accuracy per question type of a cross_attention model
        from mmtl.eval.fusion_eval import run_fusion_eval

        return run_fusion_eval(spec, task, data, batch_size, out_dir, log_to_mlflow, tracking_uri, say)
    if kind.source == GENERATED:  # captions of a generative model: BLEU-4 / CIDEr-D + nearest-neighbour baseline
        from mmtl.eval.caption_eval import run_caption_eval

        return run_caption_eval(spec, data, out_dir, log_to_mlflow, tracking_uri, say)
    if batch_size is not None and batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    ks = [int(k) for k in ks]
    if task == "retrieval" and (not ks or any(k < 1 for k in ks)):
        raise EvalError(f"ks must be positive integers, got {ks}")
    class_list = parse_classes(classes) if task == "zero-shot" else None
    template_list = parse_templates(templates) if task == "zero-shot" else None
    if prompt is not None and task != "zero-shot":
        raise EvalError("--prompt (a learned CoOp prompt) applies to --task zero-shot only")
    if locale is not None and task != "retrieval":
        raise EvalError("--locale (per-locale captions) applies to --task retrieval only")
    res = _resolve(spec, tracking_uri)
    tmp_out = None
    try:
        resolve_shards(data)  # missing data fails before the model loads
        model, pipe = _load_model(res)
        batch_size = batch_size or pipe.eval.batch_size
        say(f"model: {res.kind} {res.export_dir}" + (f" (MLflow run {res.mlflow_run_id})" if res.mlflow_run_id else ""))
        if use_ray is None:
            n_est = count_samples(data)
            use_ray = n_est > ray_threshold
            say(f"data: ~{n_est} samples -> embedding {'with Ray Data' if use_ray else 'in this process'}")
        with_text = kind.with_text
        if use_ray:
            emb = embed_ray(res.export_dir, data, batch_size=batch_size, with_text=with_text, device=device,
                            ray_actors=ray_actors, ray_address=ray_address)
        else:
            emb = embed_local(model, pipe, data, batch_size=batch_size, with_text=with_text, device=device)
            model.cpu()
        say(f"embedded {len(emb.image)} samples ({time.time() - t0:.1f}s)")
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
        else:
            out = tmp_out = Path(tempfile.mkdtemp(prefix="mmtl-eval-"))
        result: dict[str, Any] = {"task": task, "model": res.describe(), "data": str(data),
                                  "num_samples": len(emb.image), "embedding": "ray" if use_ray else "local",
                                  "data_stats": emb.stats}
        learned = None
        if task == "zero-shot":
            learned = _prompt(prompt, res.export_dir, res)
            if learned is not None:
                say(f"zero-shot with the learned prompt in {learned.dir}")
        part = kind.report(kind, emb=emb, model=model, pipe=pipe, classes=class_list, templates=template_list,
                           label_field=label_field, ks=ks, out=out, say=say, prompt=learned)
        result.update(part)
        if locale is not None:
            from mmtl.eval.locale_eval import locale_retrieval

            per = locale_retrieval(model, emb, data, locale, ks, batch_size)
            result["metrics"] = {**result["metrics"], **per["metrics"]}
            result["locales"] = per["locales"]
            say(f"locales: {', '.join(per['locales'])}")
        files = [Path(p) for p in part["files"].values()]
        eval_json = out / "eval.json"
        result["files"]["eval_json"] = eval_json
        result["out_dir"] = str(out) if tmp_out is None else None
        result["mlflow"] = {"logged": False, "reason": "disabled (--no-mlflow)"}
        if log_to_mlflow and not res.mlflow_run_id:
            result["mlflow"] = {"logged": False, "reason": "the model has no MLflow run (plain export folder)"}
        result["seconds"] = round(time.time() - t0, 3)
        eval_json.write_text(json.dumps(_jsonable(result), indent=2) + "\n", encoding="utf-8")
        if log_to_mlflow and res.mlflow_run_id:
            try:
                result["mlflow"] = log_eval_run(res, task, str(data), result, files + [eval_json], say)
            except Exception as e:  # the metrics are computed: report the failure, keep the result
                result["mlflow"] = {"logged": False, "reason": f"MLflow logging failed: {type(e).__name__}: {e}"}
                say(f"warning: {result['mlflow']['reason']}")
            result["seconds"] = round(time.time() - t0, 3)
            eval_json.write_text(json.dumps(_jsonable(result), indent=2) + "\n", encoding="utf-8")
        if tmp_out is not None:
            result["files"] = {}
        return _jsonable(result)
    finally:
        res.cleanup()
        if tmp_out is not None:
            shutil.rmtree(tmp_out, ignore_errors=True)
