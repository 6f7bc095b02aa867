"""Recipe of ``strategy.kind: cross_attention``: frozen towers, trained fusion + VQA / ITM head.

  1. the runner builds the model and freezes it (:mod:`mmtl.strategies.cross_attention`);
  2. :meth:`FusionRecipe.prepare` computes the frozen towers' tokens of ``data.train`` and every ``eval.sets``
     set once (:mod:`mmtl.fusion.features`, cached under ``data.cache_dir`` or ``<runs_root>/cache``);
  3. VQA: the answer vocabulary is ``strategy.fusion.answers``, else ``answers_file``, else the
     ``max_answers`` most frequent train answers; it is written into the pipeline (so into the export's
     ``pipeline.yaml``); soft-score targets (:func:`mmtl.fusion.heads.soft_scores`);
  4. the runner trains :class:`mmtl.fusion.task.FusionTaskModule` (Ray Train + DeepSpeed, the common loop:
     checkpoints, resume, MLflow step metrics) on the in-memory arrays ``image_tokens``, ``text_tokens``,
     ``text_mask`` (+ ``answer_target`` for VQA, ``image_id`` / ``text_id`` for ITM);
  5. :meth:`FusionRecipe.evaluate` loads the export and evaluates it with the ``vqa`` / ``itm`` task of
     :mod:`mmtl.eval.registry` (accuracy overall and per question type).

With ``tracking.log_model`` the export is logged as the run's MLflow model (a pyfunc answering questions or
scoring matches, :mod:`mmtl.tracking.fusion_model`) and registered under ``tracking.model_name`` when set. No
evaluation before training (the gates start at 0 and the head is random: it would be chance).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from mmtl.config import Pipeline
from mmtl.fusion.task import FusionTaskModule
from mmtl.recipes.base import Recipe
from mmtl.tracking import mlflow_utils as mlu


def answer_vocab(pipe: Pipeline, train_answers: list[list[str]]) -> list[str]:
    """The VQA answer vocabulary (see module docstring, step 3), normalised like the data's answers
    (:func:`mmtl.fusion.features.normalize_answer`: "Red" and "red" are one answer).

    Raises:
        FileNotFoundError: ``answers_file`` is missing; ValueError: fewer than 2 answers.
    """
    from mmtl.fusion.features import normalize_answer
    from mmtl.fusion.heads import build_vocab

    f = pipe.strategy.fusion
    if f.answers:
        vocab = [normalize_answer(a) or "" for a in f.answers]
    elif f.answers_file:
        p = Path(f.answers_file)
        if not p.is_file():
            raise FileNotFoundError(f"strategy.fusion.answers_file={f.answers_file!r} not found")
        vocab = [normalize_answer(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        return build_vocab(train_answers, f.max_answers)
    if "" in vocab:
        raise ValueError("the answer vocabulary has an empty answer")
    dups = sorted({a for a in vocab if vocab.count(a) > 1})
    if dups:
        raise ValueError(f"the answer vocabulary lists {dups} more than once")
    if len(vocab) < 2:
        raise ValueError(f"the answer vocabulary needs >= 2 answers, got {vocab}")
    return vocab


def train_arrays(pipe: Pipeline, ts) -> dict[str, np.ndarray]:
    """The named arrays the workers index (see :class:`mmtl.fusion.task.FusionTaskModule`)."""
    from mmtl.fusion.heads import soft_scores

    arrays = {"image_tokens": ts.image_tokens, "text_tokens": ts.text_tokens, "text_mask": ts.text_mask}
    if pipe.strategy.fusion.task == "itm":  # ids of the image and of the text: known positives are no negatives
        texts = {c: i for i, c in enumerate(sorted(set(ts.captions)))}
        arrays["image_id"] = ts.image_tokens.rows.copy()
        arrays["text_id"] = np.array([texts[c] for c in ts.captions], dtype=np.int64)
    if pipe.strategy.fusion.task == "vqa":
        vocab = {a: i for i, a in enumerate(pipe.strategy.fusion.answers)}
        arrays["answer_target"] = np.stack([soft_scores(a, vocab) for a in ts.answers])
    return arrays


class FusionRecipe(Recipe):
    """See module docstring."""

    name = "fusion"
    train_module = FusionTaskModule

    def prepare(self) -> Optional[dict]:
        """Tokens, answer vocabulary and the training arrays.

        Raises:
            ValueError / FileNotFoundError: bad fusion options or answer vocabulary, too many image tokens for
            the position table (before Ray starts).
        """
        from mmtl.data.stream import clean_options
        from mmtl.fusion.features import load_or_compute

        ctx, pipe = self.ctx, self.ctx.pipe
        f = pipe.strategy.fusion
        opts = clean_options(pipe, count_tokens=ctx.model.count_tokens)  # caption_truncated is counted
        t_tok = time.time()
        self.sets = {"train": load_or_compute(ctx.model, pipe.data.train, f, opts, ctx.cache_root, ctx.say)}
        for name, spec in ctx.specs.items():
            self.sets[name] = load_or_compute(ctx.model, spec, f, opts, ctx.cache_root, ctx.say)
        self.token_s = time.time() - t_tok
        if f.task == "vqa":
            f.answers = answer_vocab(pipe, self.sets["train"].answers)
            ctx.say(f"answer vocabulary: {len(f.answers)} answers")
        self.module = FusionTaskModule.from_pipeline(pipe, ctx.model)
        ctx.say(f"trains: {f.kind} fusion + {f.task} head")
        mlu.log_metrics(ctx.uri, ctx.run_id,
                        {f"data/{n}_{k}": v for n, ts in self.sets.items() for k, v in ts.stats.items()})
        n_media = self.sets["train"].image_tokens.shape[1] + int(f.kind == "xattn" and f.global_token)
        if f.kind == "xattn" and n_media > f.max_image_tokens:  # fail here, not inside the Ray workers
            raise ValueError(f"{n_media} image tokens per image > strategy.fusion.max_image_tokens="
                             f"{f.max_image_tokens} (the learned position table): raise max_image_tokens or set "
                             "image_pool")
        self.arrays = train_arrays(pipe, self.sets["train"])
        ctx.say(f"training arrays: {sum(a.nbytes for a in self.arrays.values()) / 2**20:.0f} MiB "
                f"({len(self.sets['train'])} samples, image tokens {self.arrays['image_tokens'].shape[1:]})")
        return self.arrays

    def module_to_report(self):
        return self.module

    def evaluate(self, export_dir: Optional[Path]) -> dict[str, float]:
        from safetensors.torch import load_file

        from mmtl.eval.fusion_eval import evaluate_tokens
        from mmtl.fusion.export import split_state_dict

        pipe, module = self.ctx.pipe, self.module
        module.load_state_dict(split_state_dict(load_file(str(export_dir / "model.safetensors"))), strict=True)
        module.eval()
        metrics: dict[str, float] = {}
        for name, ts in self.sets.items():
            if name == "train" and len(ts) > 4000:
                continue
            metrics.update({f"{name}/{k}": v for k, v in evaluate_tokens(module, pipe, ts).items()})
        for name in self.sets:
            line = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in metrics.items()
                             if k.startswith(f"{name}/") and "num_samples" not in k and "out_of_vocab" not in k)
            self.ctx.say(f"{name}: {line}")
        return metrics

    def register(self, export_dir: Path) -> Optional[dict]:
        from mmtl.tracking.fusion_model import log_fusion_model

        ctx, name = self.ctx, self.ctx.pipe.tracking.model_name
        registered = log_fusion_model(ctx.uri, ctx.run_id, export_dir, ctx.pipe.strategy.fusion.task, name)
        if name:
            ctx.say(f"registered: {name} version {registered['version']}")
        return registered

    def summary(self, base: dict, metrics: dict) -> dict:
        f, pipe = self.ctx.pipe.strategy.fusion, self.ctx.pipe
        gates = {k: float(np.tanh(v.detach().numpy()).item()) for k, v in self.module.named_parameters()
                 if k.endswith("_gate")}
        return {**base, "strategy": "cross_attention", "fusion": f.kind, "task": f.task,
                "token_time_s": round(self.token_s, 2), "image_size": pipe.model.image_size,
                "image_tokens": list(self.arrays["image_tokens"].shape[1:]), "num_answers": len(f.answers or []),
                "params_trainable": self.ctx.trainable["params_trainable"], "tanh_gates": gates,
                "metrics": {**self.ctx.final_train, **metrics}}
