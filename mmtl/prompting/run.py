"""``mmtl run`` driver of ``strategy.kind: prompt_tuning`` (CoOp, Zhou et al., IJCV 2022).

Order: frozen model (``model.init_from`` e.g. a quickstart export) -> cached frozen image features of
``data.train`` and the eval sets -> classes (``strategy.prompt.classes``, else ``eval.zero_shot.classes``, else
the sorted ``label_field`` values of the train set) and base/new split -> few-shot subset
(``shots_per_class``) -> zero-shot baselines on every eval set (first template alone, and the template
ensemble of ``eval.zero_shot.templates``) -> Ray Train + DeepSpeed on ``{"image_feat", "label"}`` rows of the
base classes (:class:`~mmtl.prompting.coop.CoOpModule`) -> export split into the frozen model
(``export/model.safetensors``, loadable by ``mmtl eval``) and the learned prompt (``export/prompt.*``, logged
to MLflow under ``prompt/``) -> CoOp metrics on every eval set -> ``summary.json``.

Metric names: ``<set>/<method>_<subset>_<metric>``: method ``zs_single`` / ``zs_ensemble`` / ``coop``, subset
``all`` / ``base`` / ``new`` (see :mod:`mmtl.prompting.artifact`), metric ``acc1``, ``acc5``,
``mean_per_class_recall``, ``chance`` ... (legal MLflow names). ``zero_shot_only: true`` stops after the
baselines (the fashion-zero-shot pipeline).

Raises ValueError (before training) for: no classes, base classes not among the classes, a train set
without samples of the base classes, an eval set without labelled samples, or an ``init`` phrase whose token
count is not ``n_ctx``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch


def resolve_classes(pipe, train_meta: list[dict]) -> list[str]:
    """The class list (see module docstring). Raises ValueError with fewer than 2 classes."""
    p, zs = pipe.strategy.prompt, pipe.eval.zero_shot
    classes = p.classes or (zs.classes if zs is not None and zs.classes else None)
    if not classes:
        classes = sorted({str(m.get(p.label_field)) for m in train_meta if m.get(p.label_field) is not None})
    if len(classes) < 2:
        raise ValueError(f"strategy.prompt: need at least 2 classes, got {classes} (set strategy.prompt.classes or "
                         f"check strategy.prompt.label_field={p.label_field!r})")
    bad = [c for c in (p.base_classes or []) if c not in classes]
    if bad:
        raise ValueError(f"strategy.prompt.base_classes {bad} are not among the classes {classes}")
    return list(classes)


def labels_of(meta: list[dict], field: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(kept row positions, class indices into ``classes``) of the samples labelled with a known class."""
    from mmtl.data.labels import label_index as _label_index

    keep, labels, _ = _label_index(meta, field, classes)
    return np.asarray(keep, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def few_shot(labels: np.ndarray, shots: int | None, seed: int) -> np.ndarray:
    """Positions of at most ``shots`` samples per class (a seeded draw per class, kept in data order)."""
    if not shots:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def _templates(pipe) -> list[str]:
    zs = pipe.eval.zero_shot
    if zs is not None and zs.templates:
        return list(zs.templates)
    p = pipe.strategy.prompt
    return [f"{p.init} {{}}{p.class_suffix}" if p.init else f"{{}}{p.class_suffix}"]


def _method_metrics(name, embed_fn, sets, classes, base, new) -> tuple[dict, dict]:
    from mmtl.prompting.artifact import split_metrics

    out, skipped = {}, {}
    for set_name, (img, labels) in sets.items():
        m, s = split_metrics(img, labels.tolist(), classes, embed_fn, base, new)
        out.update({f"{set_name}/{name}_{k}": v for k, v in m.items()})
        skipped.update({f"{set_name}/{name}_{k}": v for k, v in s.items()})
    return out, skipped


def run_prompt_tuning(pipe, run_dir: Path, uri: str, run_id: str, resuming: bool, say, t_start: float) -> dict:
    """Run a prompt_tuning pipeline (see module docstring); returns the summary (also ``summary.json``)."""
    from mmtl.eval.evaluate import embed_features, encode_prompts
    from mmtl.eval.metrics import class_embeddings
    from mmtl.models import build_model
    from mmtl.prompting.artifact import LoadedPrompt
    from mmtl.run import _eval_specs, _features, copy_export, fit, report_trainable
    from mmtl.runtime import init_ray
    from mmtl.strategies import apply_strategy, trainable_summary
    from mmtl.tracking import mlflow_utils as mlu
    from mmtl.train.loop import seed_everything

    p = pipe.strategy.prompt
    specs = _eval_specs(pipe)
    seed_everything(pipe.train.seed)
    model = build_model(pipe.model)
    trainable = apply_strategy(model, pipe.strategy, zero_stage=pipe.train.zero_stage)
    model.eval()
    cache_root = Path(pipe.data.cache_dir or Path(pipe.train.runs_root) / "cache")
    feats = _features(pipe, model, {"train": pipe.data.train, **specs}, cache_root, say)
    classes = resolve_classes(pipe, feats["train"].meta)
    base = list(p.base_classes or classes)
    new = [c for c in classes if c not in base]
    pipe.strategy.prompt.classes = classes  # the workers build the learner from the resolved list
    say(f"CoOp classes: {len(classes)} ({len(base)} base, {len(new)} new); "
        f"{'class-specific' if p.class_specific else 'class-shared'} context, M={p.n_ctx}, init={p.init!r}")
    sets = {}
    for name in specs:
        keep, y = labels_of(feats[name].meta, p.label_field, classes)
        if not len(keep):
            raise ValueError(f"eval set {name!r} has no sample whose json {p.label_field!r} is one of {classes}")
        img, _ = embed_features(model, feats[name].image[keep], feats[name].text[keep])
        sets[name] = (img, y)
    templates = _templates(pipe)
    metrics: dict[str, float] = {f"model/{k}": v for k, v in trainable.items()}
    skipped: dict[str, str] = {}
    def encode(q):
        return encode_prompts(model, q)

    for method, tpl in (("zs_single", templates[:1]), ("zs_ensemble", templates)):
        m, s = _method_metrics(method, lambda names, t=tpl: class_embeddings(names, t, encode), sets, classes, base,
                               new)
        metrics.update(m)
        skipped.update(s)
    summary = {"status": "finished", "run_name": run_dir.name, "run_dir": str(run_dir), "mlflow_run_id": run_id,
               "mlflow_tracking_uri": uri,
               "mlflow_ui": f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000",
               "strategy": "prompt_tuning", "classes": classes, "base_classes": base, "new_classes": new,
               "templates": templates, "eval_samples": {k: len(v[1]) for k, v in sets.items()}, "steps": 0,
               "export_path": None, "prompt_path": None, "registered_model": None}
    if not p.zero_shot_only:
        keep, y = labels_of(feats["train"].meta, p.label_field, base)
        if not len(keep):
            raise ValueError(f"data.train has no sample of the base classes {base} in json {p.label_field!r}")
        pick = few_shot(y, p.shots_per_class, pipe.data.seed)
        arrays = {"image_feat": feats["train"].image[keep[pick]], "label": y[pick]}
        say(f"CoOp train rows: {len(pick)} ({p.shots_per_class or 'all'} per class)")
        from mmtl.prompting.coop import CoOpModule

        probe = CoOpModule.from_pipeline(pipe, model)  # n_ctx / init / tokenizer errors here, before Ray starts
        metrics.update({f"model/{k}": v for k, v in
                        report_trainable(pipe, trainable_summary(probe), uri, run_id, say).items()})
        init_ray()
        t_train = time.time()
        result = fit(pipe, run_dir, arrays, uri, run_id, say)
        summary["train_time_s"] = round(time.time() - t_train, 2)
        export_dir = copy_export(result, run_dir, uri, run_id)
        prompt_files = split_export(export_dir, model, pipe, classes, base, new)
        mlu.log_artifacts(uri, run_id, prompt_files, "prompt")
        learner = LoadedPrompt(export_dir).learner(model)
        m, s = _method_metrics("coop", lambda names: learner.embed_classes(model, names), sets, classes, base, new)
        metrics.update(m)
        skipped.update(s)
        final = result.metrics or {}
        metrics.update({k: v for k, v in final.items() if k.startswith("train/")})
        summary.update(steps=int(final.get("steps", 0)), train_rows=int(len(pick)),
                       export_path=str(export_dir / "model.safetensors"),
                       prompt_path=str(export_dir / "prompt.safetensors"))
        if pipe.tracking.log_model:
            from mmtl.tracking.registry import log_exported_model

            summary["registered_model"] = log_exported_model(uri, run_id, export_dir, pipe.tracking.model_name)
    mlu.log_metrics(uri, run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                    step=summary.get("steps", 0))
    summary.update(wall_time_s=round(time.time() - t_start, 2), metrics=metrics, skipped=skipped)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    mlu.log_artifacts(uri, run_id, [run_dir / "summary.json"])
    return summary


def split_export(export_dir: Path, model, pipe, classes, base, new) -> list[Path]:
    """Move the ``prompt_learner.*`` tensors out of ``export/model.safetensors`` (which then loads as the plain
    frozen model) into the prompt artifact ``export/prompt.safetensors`` + ``prompt.json``; returns its files.

    Raises:
        ValueError: the export holds no ``prompt_learner.ctx``.
    """
    from safetensors.torch import load_file, save_file

    from mmtl.prompting.artifact import save_prompt
    from mmtl.prompting.coop import family_of

    path = export_dir / "model.safetensors"
    sd = load_file(str(path))
    ctx = sd.pop("prompt_learner.ctx", None)
    if ctx is None:
        raise ValueError(f"{path} has no prompt_learner.ctx: not a prompt_tuning export")
    save_file({k: v for k, v in sd.items() if not k.startswith("prompt_learner.")}, str(path))
    p = pipe.strategy.prompt
    meta = {"classnames": list(base), "classes": list(classes), "base_classes": list(base), "new_classes": list(new),
            "n_ctx": p.n_ctx, "init": p.init, "class_specific": p.class_specific, "class_suffix": p.class_suffix,
            "label_field": p.label_field, "family": family_of(model), "text_fingerprint": model.fingerprint("text"),
            "embed_dim": model.embed_dim, "ctx_shape": list(ctx.shape)}
    return save_prompt(export_dir, ctx, meta)
