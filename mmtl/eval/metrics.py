"""Retrieval and zero-shot classification metrics (CLIP_benchmark's definitions and names).

* Retrieval recall@K (Karpathy & Fei-Fei 2015; CLIP_benchmark ``image_retrieval_recall@k``): the fraction of
  queries whose ground-truth match ranks in the top K by cosine similarity. Names here use ``_at_`` since
  MLflow forbids ``@``: ``image_to_text_recall_at_1`` (image queries, text gallery), ``text_to_image_...``.
* Zero-shot (Radford et al. 2021, Sec. 3.1.4): class embeddings are the normalised mean of the normalised
  embeddings of every prompt template filled with the class name (template ensemble in embedding space);
  ``acc1``/``acc5`` top-K accuracy, ``mean_per_class_recall`` the unweighted mean of per-class recalls.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def ranks(queries: torch.Tensor, gallery: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Rank of each query's true match: the number of gallery items scoring strictly higher by cosine
    similarity than the truth (row i of ``gallery`` for query i; ties favour the truth, so rank 0 = top 1).

    Args:
        queries: (N, D); gallery: (N, D); normalised inside.
        chunk: queries scored at once (memory O(chunk * N)); the result does not depend on it.

    Returns:
        (N,) int64 ranks in [0, N).
    """
    q, g = F.normalize(queries.float(), dim=-1), F.normalize(gallery.float(), dim=-1)
    out = []
    for i in range(0, len(q), chunk):
        s = q[i : i + chunk] @ g.t()
        rows = torch.arange(s.shape[0])
        truth = s[rows, rows + i].unsqueeze(1)
        out.append((s > truth).sum(dim=1))
    return torch.cat(out)


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                chunk: int = 2048) -> dict[str, float]:
    """Recall@K both ways for paired embeddings (row i of each is a positive pair): the share of queries
    whose true match has :func:`ranks` < K. The one recall@K of mmtl (training eval, ``mmtl eval``, ridge).

    Args:
        image_emb: (N, D), text_emb: (N, D); normalised inside.
        ks: cut-offs, used as given (K > N gives 1.0; callers drop those they do not want reported).
        chunk: queries scored at once (memory O(chunk * N)); the result does not depend on it.

    Returns:
        ``{"image_to_text_recall_at_K": r, ...}`` for each K, then ``{"text_to_image_recall_at_K": r, ...}``,
        with r in [0, 1].

    Raises:
        ValueError: shapes differ or N == 0.
    """
    if image_emb.shape != text_emb.shape or image_emb.shape[0] == 0:
        raise ValueError(f"need equal non-empty (N, D) embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    out = {}
    for name, r in (("image_to_text", ranks(image_emb, text_emb, chunk)),
                    ("text_to_image", ranks(text_emb, image_emb, chunk))):
        for k in ks:
            out[f"{name}_recall_at_{k}"] = float((r < k).float().mean())
    return out


def class_embeddings(
    classnames: Sequence[str], templates: Sequence[str], encode_text: Callable[[list[str]], torch.Tensor]
) -> torch.Tensor:
    """(C, D) normalised class embeddings: mean over templates of normalised ``encode_text(prompts)``.

    Templates use ``{}`` (or ``{c}``) for the class name.
    """
    rows = []
    for c in classnames:
        prompts = [t.replace("{c}", c).format(c) if "{}" in t else t.replace("{c}", c) for t in templates]
        e = F.normalize(encode_text(prompts).float(), dim=-1).mean(0)
        rows.append(F.normalize(e, dim=-1))
    return torch.stack(rows)


def zero_shot_metrics(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """Top-1/top-5 accuracy, mean per-class recall and chance level of zero-shot classification.

    Args:
        image_emb: (N, D); class_emb: (C, D); labels: N ints in [0, C).

    Returns:
        ``acc1``, ``acc5`` (when C >= 5), ``mean_per_class_recall``, ``chance`` (1/C), ``majority`` (share of
        the most frequent class), ``num_classes``, ``num_samples``.
    """
    y = torch.as_tensor(list(labels), dtype=torch.long)
    logits = F.normalize(image_emb.float(), dim=-1) @ class_emb.float().t()
    c = class_emb.shape[0]
    top = logits.topk(min(5, c), dim=1).indices
    out = {"acc1": float((top[:, 0] == y).float().mean())}
    if c >= 5:
        out["acc5"] = float((top == y[:, None]).any(1).float().mean())
    pred = top[:, 0]
    recalls = [float((pred[y == k] == k).float().mean()) for k in range(c) if (y == k).any()]
    out["mean_per_class_recall"] = float(np.mean(recalls)) if recalls else 0.0
    out["chance"] = 1.0 / c
    out["majority"] = float(np.bincount(y.numpy(), minlength=c).max() / max(1, len(y)))
    out["num_classes"], out["num_samples"] = float(c), float(len(y))
    return out


def confusion_matrix(pred: Sequence[int], labels: Sequence[int], num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred, labels):
        m[t, p] += 1
    return m
