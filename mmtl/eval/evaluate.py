"""Evaluate a model on the pipeline's eval sets: retrieval recall@K and prompt-ensemble zero-shot accuracy.

Metric names: ``<set>/<metric>``, e.g. ``test/image_to_text_recall_at_1``, ``test/zero_shot_acc1``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mmtl.config import Pipeline
from mmtl.eval.metrics import class_embeddings


@dataclass
class EmbeddedSet:
    """Normalised embeddings of one eval set: ``image`` (N, D), ``text`` (N, D), per-sample ``meta``."""

    image: torch.Tensor
    text: torch.Tensor
    meta: list[dict] = field(default_factory=list)


@torch.no_grad()
def embed_features(model, image_feats, text_feats, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Project cached frozen-tower outputs (N, D_v), (N, D_t) -> normalised (N, D) each."""
    model.eval()
    xi, xt = torch.as_tensor(image_feats), torch.as_tensor(text_feats)
    dtype = next(model.image_head.parameters()).dtype
    img = torch.cat([model.project_image(xi[i : i + batch_size].to(dtype)) for i in range(0, len(xi), batch_size)])
    txt = torch.cat([model.project_text(xt[i : i + batch_size].to(dtype)) for i in range(0, len(xt), batch_size)])
    return img.float(), txt.float()


@torch.no_grad()
def embed_shards(model, spec, opts, batch_size: int = 64) -> EmbeddedSet:
    """Embed every clean sample of ``spec`` with the full towers (one process; for eval-sized sets).

    Returns ``image`` (N, D) and ``text`` (N, D) float32 embeddings (the model's projections, L2-normalised).

    Raises:
        MissingShardsError / EmptyDatasetError: from shard resolution; RuntimeError: no clean sample at all.
    """
    from mmtl.data.batches import encode_batches
    from mmtl.data.shardio import iter_samples

    model.eval()
    tf = model.image_transform(train=False)
    imgs, txts, meta = [], [], []

    def encode(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        from mmtl.data.encode_pool import fast_inference

        with fast_inference(model):  # inference mode, channels-last weights (restored); plain tensors out
            img = model.encode_image(torch.stack([tf(s.image) for s in batch])).float().numpy()
            tok = model.tokenize([s.caption for s in batch])
            txt = model.encode_text(tok["input_ids"], tok["attention_mask"]).float().numpy()
        return torch.from_numpy(img), torch.from_numpy(txt)

    from tqdm.auto import tqdm

    name = Path(str(spec).rstrip("/")).name or str(spec)
    with tqdm(desc=f"embedding {name}", unit="sample", leave=False, disable=None) as bar:
        for batch, (img, txt) in encode_batches(iter_samples(spec, opts), encode, batch_size, progress=bar.update):
            imgs.append(img)
            txts.append(txt)
            meta.extend(s.meta for s in batch)
    return EmbeddedSet(torch.cat(imgs), torch.cat(txts), meta)


@torch.no_grad()
def encode_prompts(model, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (P, D) of the P ``prompts`` (no grad)."""
    tok = model.tokenize(prompts)
    return model.encode_text(tok["input_ids"], tok["attention_mask"])


def zero_shot_classes(pipe: Pipeline, sets: dict[str, EmbeddedSet]) -> Optional[list[str]]:
    """Class names from ``eval.zero_shot.classes`` or the sorted labels found in the eval sets' meta
    (:func:`mmtl.data.labels.resolve_classes`); None without ``eval.zero_shot`` or without any label."""
    from mmtl.data.labels import resolve_classes

    zs = pipe.eval.zero_shot
    if zs is None:
        return None
    classes, _ = resolve_classes([("pipeline", zs.classes)], (m for s in sets.values() for m in s.meta),
                                 zs.label_field)
    return classes or None


def evaluate_sets(model, pipe: Pipeline, sets: dict[str, EmbeddedSet]) -> dict[str, float]:
    """Training-time entry point for contrastive models: the ``retrieval`` task on every set, and the
    ``zero-shot`` task where samples carry ``eval.zero_shot.label_field`` (:mod:`mmtl.eval.registry`).

    Args:
        model: the embedding model (its text tower encodes the class prompts).
        sets: ``{set name: EmbeddedSet}`` with image (N, D) and text (N, D) embeddings.

    Returns:
        ``{"<set>/image_to_text_recall_at_K", "<set>/text_to_image_recall_at_K", "<set>/num_samples",
        "<set>/zero_shot_acc1", ...}`` (:func:`~mmtl.eval.registry.set_metric_name`); recall@K for the
        ``eval.recall_ks`` <= N of each set (else K=1).
    """
    from mmtl.eval.registry import evaluate_task, set_metric_name

    out: dict[str, float] = {}
    ks = [k for k in pipe.eval.recall_ks]
    classes = zero_shot_classes(pipe, sets)
    cls_emb = None
    if classes:
        cls_emb = class_embeddings(classes, pipe.eval.zero_shot.templates, lambda p: encode_prompts(model, p))
    for name, s in sets.items():
        ks_n = [k for k in ks if k <= len(s.image)] or [1]
        for k, v in evaluate_task("retrieval", image=s.image, text=s.text, ks=ks_n).items():
            out[set_metric_name(name, k)] = v
        if cls_emb is not None:
            field_ = pipe.eval.zero_shot.label_field
            idx = {c: i for i, c in enumerate(classes)}
            keep = [i for i, m in enumerate(s.meta) if str(m.get(field_)) in idx]  # class names only (no indices)
            if keep:
                labels = [idx[str(s.meta[i].get(field_))] for i in keep]
                for k, v in evaluate_task("zero-shot", image=s.image[keep], class_emb=cls_emb, labels=labels).items():
                    out[set_metric_name(name, k)] = v
    return out
