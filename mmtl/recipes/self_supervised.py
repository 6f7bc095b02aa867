"""Recipe of ``strategy.kind: self_supervised``: adapt one tower on unpaired in-domain data, then let an
alignment pipeline warm-start from it (``model.init_from: <this run dir or its export>``).

  1. the runner builds the model; :mod:`mmtl.strategies.self_supervised` freezes all but the adapted tower;
  2. :meth:`SelfSupervisedRecipe.prepare` checks the unpaired train data (warns when every sample is a copy of
     one), reads the eval sets (``eval.sets``: held-out texts / images) and, with ``eval.before_training``,
     measures the untrained tower + head on them (masked-LM perplexity, or NT-Xent loss and top-1);
  3. the runner trains :class:`mmtl.train.selfsup.SelfSupervisedModule` on rows streamed by
     :func:`mmtl.data.unpaired.build_unpaired_dataset` (views / masks made in the Ray Data map stage) with the
     common loop (Ray Train + DeepSpeed, checkpoints, resume, MLflow step metrics ``train/mlm_loss``,
     ``train/mlm_perplexity`` or ``train/ntxent_loss``, ``train/ntxent_top1``);
  4. the export holds the adapted tower (``text_tower.*`` / ``image_tower.*``, the keys alignment recipes load)
     and the head (``ssl_head.*``, ignored by ``model.init_from``); :meth:`evaluate` measures it on the same
     held-out masks / views; the export folder is logged to MLflow as artifacts (no MLflow model: it is not
     an image-text model yet).
"""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Optional

from mmtl.config import Pipeline
from mmtl.recipes.base import Recipe
from mmtl.tracking import mlflow_utils as mlu
from mmtl.train.selfsup import SelfSupervisedModule

MAX_EVAL_SAMPLES = 5000
DUPLICATE_SCAN = 2000


class SelfSupervisedRecipe(Recipe):
    """See module docstring."""

    name = "self_supervised"
    train_module = SelfSupervisedModule

    @classmethod
    def data_modality(cls, pipe: Pipeline) -> str:
        """``strategy.self_supervised.tower``: image-only or text-only shards (image-text pairs serve too)."""
        return pipe.strategy.self_supervised.tower

    def stream(self):
        from mmtl.data.unpaired import build_unpaired_dataset

        return build_unpaired_dataset

    def _samples(self, spec, limit: int) -> tuple[list, dict]:
        """Up to ``limit`` clean unpaired samples of ``spec`` (texts, or PIL images) and the reader's counts."""
        import collections
        import dataclasses

        from mmtl.data.shardio import iter_samples
        from mmtl.data.unpaired import unpaired_options

        opts = unpaired_options(self.ctx.pipe)
        if opts.modality == "text":
            opts = dataclasses.replace(opts, count_tokens=self.ctx.model.count_tokens)
        stats: collections.Counter = collections.Counter()
        got = [s.caption if opts.modality == "text" else s.image
               for s in itertools.islice(iter_samples(spec, opts, stats), limit)]
        return got, dict(stats)

    def _measure(self, items: list) -> dict[str, float]:
        from mmtl.train.selfsup import heldout_mlm, heldout_ntxent

        pipe, model = self.ctx.pipe, self.ctx.model
        if pipe.strategy.self_supervised.tower == "text":
            return heldout_mlm(self.module, items, model.tokenize, self.masker, seed=pipe.data.seed,
                               batch_size=pipe.eval.batch_size)
        if pipe.strategy.self_supervised.method == "dino":
            from mmtl.train.dino import heldout_dino

            return heldout_dino(self.module, items, self.views, seed=pipe.data.seed, batch_size=pipe.eval.batch_size)
        return heldout_ntxent(self.module, items, self.views, seed=pipe.data.seed, batch_size=pipe.eval.batch_size)

    def prepare(self) -> Optional[dict]:
        """Duplicate check, held-out sets, before-training measures; returns None (rows are streamed).

        Raises:
            ValueError: the text tower cannot take an MLM head (not BERT-style), SimCLR on a family other than
                two_tower, or an eval set has no usable sample.
        """
        from mmtl.data.unpaired import MLMMasker, image_views

        ctx, pipe = self.ctx, self.ctx.pipe
        s = pipe.strategy.self_supervised
        n = pipe.strategy.unlock_image_blocks if s.tower == "image" else pipe.strategy.unlock_text_blocks
        part = f"last {n} blocks of the " if n else ""
        self.module = SelfSupervisedModule.from_pipeline(pipe, ctx.model)
        self.warnings: list[str] = []
        if s.tower == "text":
            self.masker = MLMMasker(ctx.model.tokenizer.tokenizer, s.mlm_probability)
            what = f"{part}text tower + MLM head" if s.train_tower else "MLM head only (text tower frozen)"
            ctx.say(f"trains: {what}, masked-LM ({s.mlm_probability:.0%} masking; MLM head "
                    f"{self.module.head_source}, decoder tied to the word embeddings)")
        elif s.method == "dino":
            self.views = image_views(pipe.model, s)
            what = f"{part}image tower + DINO head" if s.train_tower else "DINO head only (image tower frozen)"
            ctx.say(f"trains: {what}, DINO self-distillation (EMA teacher from momentum {s.teacher_momentum}, 2 "
                    f"global + {s.local_crops} local crops of {s.local_px(pipe.model.image_size)} px, K "
                    f"{s.dino_out_dim}, tau student {s.student_temp} / teacher {s.teacher_temp})")
        else:
            self.views = image_views(pipe.model, s)
            what = f"{part}image tower + projector" if s.train_tower else "projector only (image tower frozen)"
            ctx.say(f"trains: {what}, SimCLR NT-Xent (tau {s.temperature}, projection {s.proj_hidden}->{s.proj_dim})")
        head, stats = self._samples(pipe.data.train, DUPLICATE_SCAN)
        digests = {hashlib.sha256(x.encode() if isinstance(x, str) else x.tobytes()).digest() for x in head}
        if len(head) > 1 and len(digests) == 1:
            self.warnings.append(f"all {len(head)} unpaired train samples read are copies of one {s.tower}: the "
                                 "self-supervised stage cannot learn from them")
        for w in self.warnings:
            ctx.say(f"warning: {w}")
        if stats.get("too_few_tokens"):
            ctx.say(f"{stats['too_few_tokens']} of the first {len(head) + stats['too_few_tokens']} train texts are "
                    f"shorter than {s.min_tokens} tokens: skipped (counted as data/rejected_too_few_tokens)")
        self.sets, self.before = {}, {}
        for name, spec in ctx.specs.items():
            items, st = self._samples(spec, MAX_EVAL_SAMPLES)
            if not items:
                raise ValueError(f"eval set {name!r} has no usable {s.tower} sample (reader counts: {st})")
            self.sets[name] = items
        if pipe.eval.before_training and not ctx.resuming:
            for name, items in self.sets.items():
                self.before[name] = self._measure(items)
                ctx.say(f"{name} before training: " + _line(self.before[name]))
            mlu.log_metrics(ctx.uri, ctx.run_id, {f"{n}/{k}_before": v for n, m in self.before.items()
                                                  for k, v in m.items()}, step=0)
        return None

    def module_to_report(self):
        return self.module

    def evaluate(self, export_dir: Optional[Path]) -> dict[str, float]:
        """Load the export (tower + head) into the module and measure the held-out sets again."""
        from safetensors.torch import load_file

        sd = load_file(str(export_dir / "model.safetensors"))
        if not any(k.startswith("ssl_head.") for k in sd):  # exports written before the head was kept
            sd.update(_head_from_checkpoint(self.ctx.run_dir))
        sd = {k if k.startswith("ssl_head.") else f"model.{k}": v for k, v in sd.items()}
        unknown = sorted(set(sd) - set(self.module.state_dict()))
        if unknown:
            raise ValueError(f"export has tensors the module does not: {unknown[:5]}")
        self.module.load_state_dict(sd, strict=False)
        metrics: dict[str, float] = {}
        for name, items in self.sets.items():
            after = self._measure(items)
            self.ctx.say(f"{name} after training: " + _line(after))
            metrics.update({f"{name}/{k}": v for k, v in after.items()})
            metrics.update({f"{name}/{k}_before": v for k, v in self.before.get(name, {}).items()})
        return metrics

    def register(self, export_dir: Path) -> Optional[dict]:
        """Log the export folder as MLflow artifacts ``export/`` (no MLflow model, no registry entry)."""
        mlu.log_artifacts(self.ctx.uri, self.ctx.run_id, [export_dir], "export")
        return None

    def summary(self, base: dict, metrics: dict) -> dict:
        s = self.ctx.pipe.strategy.self_supervised
        return {**base, "strategy": "self_supervised", "tower": s.tower, "method": s.method,
                "train_tower": s.train_tower, "warnings": self.warnings,
                "params_trainable": self.ctx.trainable.get("params_trainable"),
                "metrics": {**self.ctx.final_train, **metrics}}


def _head_from_checkpoint(run_dir: Path) -> dict:
    """``ssl_head.*`` tensors from the latest checkpoint's DeepSpeed model states (``ds/mp_rank_00_model_
    states.pt``, key ``module``), for an export that lacks them.

    Raises:
        FileNotFoundError: no checkpoint, a file that needs more than tensors to load, or no head in it (the
            measure after training would use a fresh head)."""
    import torch

    from mmtl.runtime import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    files = sorted(Path(ckpt).glob("ds/mp_rank_00_model_states.pt")) if ckpt else []
    if not files:
        raise FileNotFoundError(f"{run_dir}: the export has no ssl_head.* and no checkpoint holds one")
    try:  # weights_only: no code runs from the file; DeepSpeed's extra entries that need more are refused
        module = torch.load(files[-1], map_location="cpu", weights_only=True)["module"]
    except Exception as exc:  # noqa: BLE001 - re-raised with the file and what to do
        raise FileNotFoundError(f"{files[-1]}: cannot read its model states safely ({type(exc).__name__}: {exc}); "
                                "export the run again with this mmtl (the export keeps ssl_head.*)") from exc
    head = {k: v for k, v in module.items() if k.startswith("ssl_head.")}
    if not head:
        raise FileNotFoundError(f"{files[-1]} holds no ssl_head.* tensors")
    return head


def _line(m: dict) -> str:
    keys = (("mlm_perplexity", "mlm_loss", "masked_tokens") if "mlm_loss" in m else ("dino_loss", "teacher_entropy")
            if "dino_loss" in m else ("ntxent_loss", "ntxent_top1"))
    return ", ".join(f"{k} {m[k]:.4g}" for k in keys)
