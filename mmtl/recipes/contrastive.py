"""Recipe of the contrastive strategies (``frozen``, ``full``, ``lora``): align the image and text towers'
embeddings with a global-batch InfoNCE (CLIP; Radford et al. 2021) or sigmoid (SigLIP; Zhai et al. 2023)
loss (:mod:`mmtl.train.losses`).

* Trains on cached frozen-tower outputs (``image_feat`` / ``text_feat`` rows) when the strategy keeps both
  towers frozen and unaugmented (:func:`mmtl.strategies.uses_feature_cache`), else streams and decodes
  ``data.train`` shards through Ray Data.
* Before training (with ``eval.before_training``; a resume reuses the first attempt's ``before_metrics.json``):
  zero-shot and retrieval of the untrained
  model (``before/*``); with cached features and ``eval.ridge_baseline``: a closed-form ridge map between the
  same frozen features (``ridge/*``).
* After training: the eval tasks of ``eval`` (retrieval recall@K both ways; zero-shot with
  ``eval.zero_shot``) on every ``eval.sets`` set, with the exported weights; the export is registered as an
  embedding pyfunc.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from mmtl.recipes.base import Recipe
from mmtl.strategies import get_strategy, uses_feature_cache
from mmtl.tracking import mlflow_utils as mlu


class ContrastiveRecipe(Recipe):
    """See module docstring."""

    name = "contrastive"

    def prepare(self) -> Optional[dict]:
        ctx, pipe = self.ctx, self.ctx.pipe
        self.feats = None
        self.before: dict[str, float] = {}
        if uses_feature_cache(pipe):
            sets = {"train": pipe.data.train, **ctx.specs, **({"val": pipe.data.val} if pipe.data.val else {})}
            self.feats = load_feature_sets(pipe, ctx.model, sets, ctx.cache_root, ctx.say)
            rejected: dict[str, int] = {}
            for fs in self.feats.values():
                for k, v in fs.stats.items():
                    rejected[k] = rejected.get(k, 0) + v
            mlu.log_metrics(ctx.uri, ctx.run_id, {f"data/{k}": v for k, v in rejected.items()})
        before_file = ctx.run_dir / "before_metrics.json"  # a resumed run reports the first attempt's numbers
        if pipe.eval.before_training and not ctx.resuming:
            from mmtl.eval.evaluate import evaluate_sets

            scores = evaluate_sets(ctx.model, pipe, self._embedded())
            self.before.update({f"before/{k}": v for k, v in scores.items()})
            tmp = before_file.with_name(f".{before_file.name}.tmp")
            tmp.write_text(json.dumps(self.before, indent=1))
            tmp.replace(before_file)
        elif pipe.eval.before_training and before_file.is_file():
            self.before.update(json.loads(before_file.read_text()))
        if pipe.eval.ridge_baseline and self.feats is not None:
            self.before.update(self._ridge())
        if self.feats is None:
            return None
        if pipe.data.caption_locales is not None:
            return self._locale_arrays()
        return {"image_feat": self.feats["train"].image, "text_feat": self.feats["train"].text}

    def evaluate(self, export_dir: Optional[Path]) -> dict[str, float]:
        from safetensors.torch import load_file

        from mmtl.eval.evaluate import evaluate_sets

        ctx = self.ctx
        sd = load_file(str(export_dir / "model.safetensors"))
        model = get_strategy(ctx.pipe.strategy.kind).trained_model(ctx.model)  # LoRA: merged, like the export
        model.load_state_dict({k: v for k, v in sd.items() if k != "logit_bias"}, strict=True)
        return {**self.before, **evaluate_sets(model, ctx.pipe, self._embedded(model))}

    def summary(self, base: dict, metrics: dict) -> dict:
        pipe = self.ctx.pipe
        return {**base, "feature_cache": self.feats is not None, "trainable": self.ctx.trainable,
                "image_size": pipe.model.image_size, "metrics": {**self.ctx.final_train, **metrics}}

    # ---- helpers --------------------------------------------------------------------------------------------
    def _locale_arrays(self) -> dict:
        """Training arrays whose caption per (sample, epoch) follows ``data.caption_locales``
        (:func:`mmtl.data.locale_features.locale_training_arrays`); drawn-locale counts logged as ``data/*``."""
        from mmtl.data.features import model_cache_dir
        from mmtl.data.locale_features import locale_training_arrays
        from mmtl.data.locales import caption_mix, split_dir_of
        from mmtl.data.shardlist import resolve_shards
        from mmtl.data.stream import epochs_needed

        ctx, pipe, fs = self.ctx, self.ctx.pipe, self.feats["train"]
        split_dir = split_dir_of(resolve_shards(pipe.data.train)[0])
        mix = caption_mix(pipe.data.caption_locales, split_dir)
        epochs = epochs_needed(pipe.train.max_steps, pipe.train.effective_global_batch, len(fs))
        arrays, counts = locale_training_arrays(ctx.model, fs.uids, fs.image, fs.text, split_dir, mix,
                                                pipe.data.seed, epochs, model_cache_dir(ctx.cache_root, ctx.model),
                                                ctx.say)
        ctx.say(f"caption locales over {epochs} epochs: {dict(sorted(counts.items()))}")
        mlu.log_metrics(ctx.uri, ctx.run_id, {f"data/caption_locale_{k.replace(':', '_')}": v
                                              for k, v in counts.items()})
        return arrays

    def _embedded(self, model=None) -> dict:
        """``{set: EmbeddedSet}`` of the eval sets: from cached features, or by embedding their shards."""
        from mmtl.data.stream import clean_options
        from mmtl.eval.evaluate import EmbeddedSet, embed_features, embed_shards

        model = model or self.ctx.model
        out = {}
        for name, spec in self.ctx.specs.items():
            if self.feats is not None:
                fs = self.feats[name]
                img, txt = embed_features(model, fs.image, fs.text)
                out[name] = EmbeddedSet(img, txt, fs.meta)
            else:
                out[name] = embed_shards(model, spec, clean_options(self.ctx.pipe))
        return out

    def _ridge(self) -> dict[str, float]:
        from mmtl.eval.ridge import ridge_recall

        pipe, feats, out = self.ctx.pipe, self.feats, {}
        val = (feats["val"].image, feats["val"].text) if "val" in feats else None
        for name in pipe.eval.sets:
            for k, v in ridge_recall((feats["train"].image, feats["train"].text),
                                     (feats[name].image, feats[name].text), val, pipe.eval.recall_ks).items():
                out[f"ridge/{name}/{k}"] = v
        return out


def load_feature_sets(pipe, model, specs: dict, cache_root: Path, say) -> dict:
    """``{name: FeatureSet}``: the frozen towers' pooled outputs of every set in ``specs`` (``{name: shard
    spec}``), computed once per shard and cached under ``cache_root`` (:mod:`mmtl.data.features`)."""
    from mmtl.data.features import load_features
    from mmtl.data.stream import clean_options

    opts = clean_options(pipe, count_tokens=model.count_tokens)
    out = {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        out[name] = load_features(spec, model, cache_root, opts)
        say(f"features[{name}]: {len(out[name])} samples ({time.perf_counter() - t0:.1f}s, cache {cache_root})")
    return out
