"""Linear probe of a frozen text tower on multi-label report labels (e.g. the MeSH labels of the IU X-ray
reports, :mod:`mmtl.datasets.iu_xray`): how much label information its sentence embeddings carry.

Embeddings: the model's pooled text features (``text_features``: masked mean of the last hidden states for a
``pooling: mean`` two-tower model), frozen, in inference mode; standardised with the train mean / std.
Classifier: one scikit-learn ``LogisticRegression`` per label (one-vs-rest, L2, ``C``, ``class_weight=
"balanced"``, lbfgs) on the train reports. Score: macro-F1 over the kept labels on the test reports
(unweighted mean of the per-label F1 at threshold 0.5; sklearn ``f1_score(average="macro")``), plus micro-F1.
Only labels with at least ``min_positives`` train reports and one test report are kept.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np
import torch


def read_labelled_reports(path: Union[str, Path]) -> dict[str, list[dict]]:
    """``reports.jsonl`` (``{"id", "split", "text", "labels"}`` per line) -> ``{split: [report, ...]}``."""
    out: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["split"], []).append(r)
    return out


@torch.inference_mode()
def embed_texts(model, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(N,) texts -> (N, D_t) float32 pooled text-tower features of ``model`` (a :class:`MultimodalModel`)."""
    model.eval()
    parts = []
    for i in range(0, len(texts), batch_size):
        tok = model.tokenize(texts[i:i + batch_size])
        parts.append(model.text_features(tok["input_ids"], tok["attention_mask"]).float().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.text_dim), np.float32)


def label_probe(train_x: np.ndarray, train_labels: list[list[str]], test_x: np.ndarray,
                test_labels: list[list[str]], min_positives: int = 20, c: float = 1.0, seed: int = 0) -> dict:
    """Fit the one-vs-rest probe on ``train_x`` (N, D) and score it on ``test_x`` (M, D) (module docstring).

    Returns ``macro_f1``, ``micro_f1``, ``labels`` (kept label count), ``per_label_f1`` ({label: F1}).

    Raises:
        ValueError: no label has ``min_positives`` train reports and a test report.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    counts: dict[str, int] = {}
    for labs in train_labels:
        for lab in labs:
            counts[lab] = counts.get(lab, 0) + 1
    in_test = {lab for labs in test_labels for lab in labs}
    keep = sorted(lab for lab, n in counts.items() if n >= min_positives and lab in in_test)
    if not keep:
        raise ValueError(f"no label has >= {min_positives} train reports and a test report")
    ytr = np.array([[lab in labs for lab in keep] for labs in train_labels], dtype=int)
    yte = np.array([[lab in labs for lab in keep] for labs in test_labels], dtype=int)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    pred = np.zeros_like(yte)
    for j in range(len(keep)):
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
        clf.fit(xtr, ytr[:, j])
        pred[:, j] = clf.predict(xte)
    per = f1_score(yte, pred, average=None, zero_division=0)
    return {"macro_f1": float(f1_score(yte, pred, average="macro", zero_division=0)),
            "micro_f1": float(f1_score(yte, pred, average="micro", zero_division=0)), "labels": len(keep),
            "per_label_f1": {lab: float(f) for lab, f in zip(keep, per)}}


def text_probe(model, reports: Union[str, Path], min_positives: int = 20, batch_size: int = 64) -> dict:
    """Embed the train / test reports of ``reports.jsonl`` with ``model``'s frozen text tower and run
    :func:`label_probe`. Returns its result plus ``train_reports`` and ``test_reports``.

    Raises:
        ValueError: the file has no ``train`` or no ``test`` report, or no label qualifies.
    """
    splits = read_labelled_reports(reports)
    if not splits.get("train") or not splits.get("test"):
        raise ValueError(f"{reports}: needs train and test reports, got {sorted(splits)}")
    tr, te = splits["train"], splits["test"]
    xtr = embed_texts(model, [r["text"] for r in tr], batch_size)
    xte = embed_texts(model, [r["text"] for r in te], batch_size)
    res = label_probe(xtr, [r["labels"] for r in tr], xte, [r["labels"] for r in te], min_positives)
    return {**res, "train_reports": len(tr), "test_reports": len(te)}
