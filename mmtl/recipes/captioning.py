"""Recipe ``captioning``: train a generative family's model (``model.family: blip``) to caption images.

Chosen by the model family (``TextGeneration.recipe_name``), not by the strategy: ``strategy.kind`` says what
trains, as for the contrastive models:

* ``frozen`` (``lock: both``): image tower and decoder frozen; the newly initialised parts train (projection,
  cross-attention, LM-head transform): the "frozen towers" setting of BLIP-style transfer;
* ``lora``: PEFT LoRA in the image tower (``towers: [image, text]``; timm rule: pointwise convs + Linear) and in
  the decoder's self-attention and MLP, trained together with the new parts;
* ``full``: everything trains (the reference).

Steps:
  1. :meth:`CaptioningRecipe.prepare` reads ``data.train`` and every ``eval.sets`` set once into memory
     (:mod:`mmtl.data.captions`: uint8 images at the input size, captions; empty captions skipped and counted,
     long captions truncated and counted, an image-less sample is an error naming it), tokenizes the captions,
     and computes the nearest-neighbour baseline's training features with the frozen pretrained image tower;
  2. the runner trains :class:`CaptioningModule` (Ray Train + DeepSpeed, checkpoints, resume) on the arrays
     ``pixels`` (N, S, S, 3) uint8, ``input_ids`` / ``attention_mask`` (N, L): teacher-forced next-token
     cross-entropy (``strategy.caption.label_smoothing``);
  3. :meth:`CaptioningRecipe.evaluate` loads the export and reports BLEU-4 / CIDEr-D / exact match and the
     baseline per set (:mod:`mmtl.eval.caption_eval`), with a PNG gallery and the captions logged to MLflow.

Limits: the training set is held in memory (uint8: 1,529 emoji at 128 px = 75 MB), no image augmentation.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from mmtl.config import Pipeline
from mmtl.recipes.base import Recipe
from mmtl.tracking import mlflow_utils as mlu


class CaptioningModule(nn.Module):
    """``forward(pixels, input_ids, attention_mask[, labels])`` -> the micro-batch's caption loss (nats per token;
    with ``labels``, chat-format samples: over the assistant turns).

    ``pixels`` (B, S, S, 3) uint8 are normalised here with the model's mean / std (exactly the eval transform);
    ``self.model`` is the captioner (its state dict keys become the export's).
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("mean", torch.tensor(model.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(model.std).view(1, 3, 1, 1), persistent=False)
        self._loss_sum, self._steps = 0.0, 0

    @classmethod
    def from_pipeline(cls, pipe: Pipeline, model: nn.Module) -> "CaptioningModule":
        return cls(model, pipe.strategy.caption.label_smoothing)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: Optional[torch.Tensor] = None, prompt_len: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(self.mean.dtype).div(255.0)
        images = (x - self.mean) / self.std
        if labels is not None:  # chat-format samples: loss on the assistant turns (model.chat_loss)
            loss = self.model.chat_loss(images, input_ids.long(), attention_mask.long(), labels.long(),
                                        self.label_smoothing)
        else:
            kw = {} if prompt_len is None else {"prompt_len": prompt_len.long()}  # per-sample (retrieval) prompts
            loss = self.model.caption_loss(images, input_ids.long(), attention_mask.long(), self.label_smoothing, **kw)
        self._loss_sum += float(loss.detach())
        self._steps += 1
        return loss

    def metrics(self) -> dict[str, float]:
        """Perplexity ``exp(mean loss)`` of the micro-batches since the last call (with label smoothing: of the
        smoothed loss), then reset."""
        if not self._steps:
            return {}
        out = {"perplexity": float(np.exp(min(self._loss_sum / self._steps, 50.0)))}
        self._loss_sum, self._steps = 0.0, 0
        return out


class CaptioningRecipe(Recipe):
    """See module docstring."""

    name = "captioning"
    train_module = CaptioningModule
    #: the strategy kinds this recipe trains
    strategies = ("frozen", "lora", "full")

    def prepare(self) -> Optional[dict]:
        """Caption sets, baseline features and the training arrays (see module docstring, step 1).

        Raises:
            ImagelessSampleError / ValueError: bad data (before Ray starts).
        """
        from mmtl.eval.caption_eval import baseline_features, read_caption_set

        ctx, pipe = self.ctx, self.ctx.pipe
        t0 = time.time()
        self.sets = {"train": read_caption_set(ctx.model, pipe, pipe.data.train)}
        for name, spec in ctx.specs.items():
            self.sets[name] = read_caption_set(ctx.model, pipe, spec)
        stats = {f"data/{n}_{k}": v for n, cs in self.sets.items() for k, v in cs.stats.items()}
        mlu.log_metrics(ctx.uri, ctx.run_id, stats)
        for n, cs in self.sets.items():
            ctx.say(f"data {n}: {len(cs)} image-caption pairs, {cs.stats}")
        train = self.sets["train"]
        self.retriever = None
        if pipe.strategy.caption.retrieval_k:
            self.arrays = self._retrieval_arrays(train)
        elif train.conversations is not None:
            self.arrays = self._chat_arrays(train)
            train = self.sets["train"]
        else:
            tok = ctx.model.tokenize(train.captions)
            self.arrays = {"pixels": train.pixels, "input_ids": tok["input_ids"].numpy(),
                           "attention_mask": tok["attention_mask"].numpy()}
        self.nn_train = None
        if pipe.strategy.caption.nn_baseline:  # the frozen pretrained tower: LoRA's B = 0, so ctx.model is the base
            self.nn_train = (ctx.model, train, baseline_features(ctx.model, train))
        self.data_s = round(time.time() - t0, 2)
        ctx.say(f"training arrays: {sum(a.nbytes for a in self.arrays.values()) / 2**20:.0f} MiB ({len(train)} "
                f"captions, images {train.pixels.shape[1:]}) in {self.data_s:.0f}s")
        return self.arrays

    def _retrieval_arrays(self, train) -> dict:
        """Training arrays with per-sample retrieval prompts (SmallCap; ``prompt_len``: the tokens kept out of the
        loss); sets :attr:`retriever` (saved into the export by :meth:`evaluate`).

        Raises:
            ValueError: a family without retrieval prompts (only ``blip``), chat-format samples, or a training
                set of at most ``retrieval_k`` captions."""
        from mmtl.eval.caption_eval import build_retriever, training_prompts

        ctx, k = self.ctx, self.ctx.pipe.strategy.caption.retrieval_k
        if not hasattr(ctx.model, "retriever") or train.conversations is not None:
            raise ValueError(f"strategy.caption.retrieval_k={k} needs model.family: blip with image-caption samples "
                             f"(got {ctx.pipe.model.family!r}"
                             f"{', chat-format samples' if train.conversations is not None else ''})")
        self.retriever = build_retriever(ctx.pipe, train)
        prompts = training_prompts(self.retriever, train)
        tok = ctx.model.tokenize(train.captions, prompts)
        mlu.log_metrics(ctx.uri, ctx.run_id, {"data/train_prompt_truncated": float(tok["prompt_truncated"])})
        ctx.say(f"retrieval prompts (k={k}, each training image leaves itself out; {tok['prompt_truncated']} cut to "
                f"model.context_length), e.g. {prompts[0]!r} -> {train.captions[0]!r}")
        return {"pixels": train.pixels, **{n: tok[n].numpy() for n in ("input_ids", "attention_mask", "prompt_len")}}

    def _chat_arrays(self, train) -> dict:
        """Training arrays of a chat-format set (labels on the assistant turns); conversations cut so that no image
        or no answer is left are dropped and counted (``data/train_conversation_too_long``).

        Raises:
            ValueError: the model family has no chat format (only ``llava``), or no conversation is left."""
        ctx = self.ctx
        if not hasattr(ctx.model, "tokenize_chats"):
            raise ValueError(f"strategy.caption.conversations_field is set but model.family="
                             f"{ctx.pipe.model.family!r} has no chat format (use model.family: llava)")
        tok = ctx.model.tokenize_chats(train.conversations)
        mlu.log_metrics(ctx.uri, ctx.run_id, {f"data/train_{k}": v for k, v in tok["stats"].items()})
        if tok["stats"]:
            ctx.say(f"chat samples: {tok['stats']} (model.context_length={ctx.pipe.model.context_length})")
        keep = tok["kept"]
        if not keep.any():
            raise ValueError("no conversation fits model.context_length with its image and an answer")
        self.sets["train"] = train.subset(keep)
        return {"pixels": train.pixels[keep], **{k: tok[k][keep] for k in ("input_ids", "attention_mask", "labels")}}

    def evaluate(self, export_dir: Optional[Path]) -> dict[str, float]:
        """Scores of the exported model on every ``eval.sets`` set, the baseline's beside them; the gallery and
        captions go to MLflow (artifact folder ``captioning/``)."""
        from mmtl.eval.caption_eval import evaluate_caption_sets
        from mmtl.tracking.registry import load_exported

        ctx = self.ctx
        if self.retriever is not None and export_dir is not None:  # the export carries the datastore and its tower
            self.retriever.save(export_dir)
        model, pipe = load_exported(export_dir)
        sets = {n: cs for n, cs in self.sets.items() if n != "train"}
        out = ctx.run_dir / "captioning"
        # the baseline uses the driver's copy, which never trains (LoRA's B = 0: the frozen pretrained tower)
        nn_train = self.nn_train
        metrics, files = evaluate_caption_sets(model, pipe, sets, out=out, nn_train=nn_train, say=ctx.say)
        mlu.log_artifacts(ctx.uri, ctx.run_id, list(files.values()), "captioning")
        self.files = {k: str(v) for k, v in files.items()}
        return metrics

    def register(self, export_dir: Path) -> Optional[dict]:
        from mmtl.tracking.caption_model import log_caption_model

        ctx, name = self.ctx, self.ctx.pipe.tracking.model_name
        registered = log_caption_model(ctx.uri, ctx.run_id, export_dir, name)
        if name:
            ctx.say(f"registered: {name} version {registered['version']}")
        return registered

    def summary(self, base: dict, metrics: dict) -> dict:
        pipe = self.ctx.pipe
        return {**base, "recipe": "captioning", "family": pipe.model.family, "strategy": pipe.strategy.kind,
                "data_time_s": self.data_s, "image_size": pipe.model.image_size,
                "num_train_captions": len(self.sets["train"]), "params_trainable": self.ctx.trainable.get(
                    "params_trainable"), "files": getattr(self, "files", {}),
                "java_metrics": "METEOR and SPICE not run (they need Java)",
                "metrics": {**self.ctx.final_train, **metrics}}

