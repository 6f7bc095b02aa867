"""Recipe of ``strategy.kind: prompt_tuning`` (CoOp, Zhou et al., IJCV 2022).

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

from pathlib import Path
from typing import Optional

import numpy as np

from mmtl.prompting.coop import CoOpModule
from mmtl.recipes.base import Recipe
from mmtl.recipes.contrastive import load_feature_sets
from mmtl.tracking import mlflow_utils as mlu


def resolve_classes(pipe, train_meta: list[dict]) -> list[str]:
    """The class list (see module docstring). Raises ValueError with fewer than 2 classes."""
    from mmtl.data.labels import resolve_classes as first_class_list

    p, zs = pipe.strategy.prompt, pipe.eval.zero_shot
    classes, _ = first_class_list([("strategy.prompt.classes", p.classes),
                                   ("eval.zero_shot.classes", zs.classes if zs is not None else None)],
                                  train_meta, p.label_field)
    if len(classes) < 2:
        raise ValueError(f"strategy.prompt: need at least 2 classes, got {classes} (set strategy.prompt.classes or "
                         f"check strategy.prompt.label_field={p.label_field!r})")
    bad = [c for c in (p.base_classes or []) if c not in classes]
    if bad:
        raise ValueError(f"strategy.prompt.base_classes {bad} are not among the classes {classes}")
    return list(classes)


def labels_of(meta: list[dict], field: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(kept row positions, class indices into ``classes``) of the samples labelled with a known class."""
    from mmtl.data.labels import label_index

    keep, labels, _ = label_index(meta, field, classes)
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


class PromptLearningRecipe(Recipe):
    """See module docstring."""

    name = "prompt_learning"
    train_module = CoOpModule

    def prepare(self) -> Optional[dict]:
        """Features, classes, zero-shot baselines and the few-shot training rows.

        Raises:
            ValueError: see module docstring.
        """
        from mmtl.eval.evaluate import embed_features, encode_prompts
        from mmtl.eval.metrics import class_embeddings

        ctx, pipe = self.ctx, self.ctx.pipe
        p, model = pipe.strategy.prompt, ctx.model
        model.eval()
        self.feats = load_feature_sets(pipe, model, {"train": pipe.data.train, **ctx.specs}, ctx.cache_root,
                                       ctx.say)
        classes = self.classes = resolve_classes(pipe, self.feats["train"].meta)
        self.base = list(p.base_classes or classes)
        self.new = [c for c in classes if c not in self.base]
        pipe.strategy.prompt.classes = classes  # the workers build the learner from the resolved list
        ctx.say(f"CoOp classes: {len(classes)} ({len(self.base)} base, {len(self.new)} new); "
                f"{'class-specific' if p.class_specific else 'class-shared'} context, M={p.n_ctx}, init={p.init!r}")
        self.sets = {}
        for name in ctx.specs:
            keep, y = labels_of(self.feats[name].meta, p.label_field, classes)
            if not len(keep):
                raise ValueError(f"eval set {name!r} has no sample whose json {p.label_field!r} is one of {classes}")
            img, _ = embed_features(model, self.feats[name].image[keep], self.feats[name].text[keep])
            self.sets[name] = (img, y)
        self.templates = _templates(pipe)
        self.metrics: dict = {f"model/{k}": v for k, v in ctx.trainable.items()}
        self.skipped: dict[str, str] = {}

        def encode(q):
            return encode_prompts(model, q)

        for method, tpl in (("zs_single", self.templates[:1]), ("zs_ensemble", self.templates)):
            self._add(method, lambda names, t=tpl: class_embeddings(names, t, encode))
        if p.zero_shot_only:
            return None
        keep, y = labels_of(self.feats["train"].meta, p.label_field, self.base)
        if not len(keep):
            raise ValueError(f"data.train has no sample of the base classes {self.base} in json {p.label_field!r}")
        self.pick = few_shot(y, p.shots_per_class, pipe.data.seed)
        ctx.say(f"CoOp train rows: {len(self.pick)} ({p.shots_per_class or 'all'} per class)")
        self.probe = CoOpModule.from_pipeline(pipe, model)  # n_ctx / init / tokenizer errors here, before Ray
        return {"image_feat": self.feats["train"].image[keep[self.pick]], "label": y[self.pick]}

    def trains(self) -> bool:
        return not self.ctx.pipe.strategy.prompt.zero_shot_only

    def module_to_report(self):
        return self.probe

    def evaluate(self, export_dir: Optional[Path]) -> dict[str, float]:
        from mmtl.prompting.artifact import LoadedPrompt

        ctx = self.ctx
        if export_dir is None:
            return self.metrics
        self.metrics.update({f"model/{k}": v for k, v in ctx.trainable.items()})
        prompt_files = split_export(export_dir, ctx.model, ctx.pipe, self.classes, self.base, self.new)
        mlu.log_artifacts(ctx.uri, ctx.run_id, prompt_files, "prompt")
        learner = LoadedPrompt(export_dir).learner(ctx.model)
        self._add("coop", lambda names: learner.embed_classes(ctx.model, names))
        self.metrics.update(ctx.final_train)
        return self.metrics

    def summary(self, base: dict, metrics: dict) -> dict:
        out = {**base, "strategy": "prompt_tuning", "classes": self.classes, "base_classes": self.base,
               "new_classes": self.new, "templates": self.templates,
               "eval_samples": {k: len(v[1]) for k, v in self.sets.items()}, "prompt_path": None,
               "metrics": metrics, "skipped": self.skipped}
        if base["export_path"] is not None:
            out.update(train_rows=int(len(self.pick)),
                       prompt_path=str(Path(base["export_path"]).parent / "prompt.safetensors"))
        return out

    def _add(self, method: str, embed_fn) -> None:
        from mmtl.eval.prompt_eval import split_metrics

        for set_name, (img, labels) in self.sets.items():
            m, s = split_metrics(img, labels.tolist(), self.classes, embed_fn, self.base, self.new)
            self.metrics.update({f"{set_name}/{method}_{k}": v for k, v in m.items()})
            self.skipped.update({f"{set_name}/{method}_{k}": v for k, v in s.items()})


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
