"""Linear probe of a frozen text tower on multi-label report labels (e.g. the MeSH labels of the IU X-ray
reports, :mod:`mmtl.datasets.iu_xray`): how much label information its sentence embeddings carry.

Embeddings: the model's pooled text features (``text_features``: masked mean of the last hidden states for a
``pooling: mean`` two-tower model), frozen, in inference mode; standardised with the train mean / std.
Classifier: one-vs-rest L2 logistic regression with balanced class weights (the objective of scikit-learn's
``LogisticRegression(C=1, class_weight="balanced")``, all labels fitted at once with torch L-BFGS:
:func:`fit_logistic`) on the train reports. Score: macro-F1 over the kept labels on the test reports (unweighted
mean of the per-label F1 at probability 0.5), plus micro-F1.
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


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest L2 logistic regression for every column of ``y`` at once (the columns are independent terms
    of one objective, so this equals one fit per label): ``x`` (N, D) float, ``y`` (N, K) in {0, 1}. Objective
    per label, as scikit-learn's ``LogisticRegression(C=c, class_weight="balanced")``:
    ``0.5 ||w||^2 + c * sum_i s_i * BCE(x_i . w + b, y_i)`` with ``s_i = N / (2 N_{y_i})``; full-batch L-BFGS
    (torch, float64). Returns ``(W (D, K), b (K,))``."""
    xt, yt = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    n = len(xt)
    pos = yt.sum(0).clamp(min=1)
    weight = torch.where(yt > 0, n / (2 * pos), n / (2 * (n - pos).clamp(min=1)))
    w = torch.zeros(xt.shape[1], yt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(yt.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, weight=weight, reduction="sum")
        loss = 0.5 * (w * w).sum() + c * bce
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def macro_micro_f1(y: np.ndarray, pred: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(macro-F1, micro-F1, per-label F1 (K,)) of 0/1 arrays (N, K); F1 = 2TP / (2TP + FP + FN), 0 when the
    denominator is 0 (scikit-learn's ``zero_division=0``)."""
    tp = (y * pred).sum(0).astype(float)
    fp = ((1 - y) * pred).sum(0).astype(float)
    fn = (y * (1 - pred)).sum(0).astype(float)
    den = 2 * tp + fp + fn
    per = np.where(den > 0, 2 * tp / np.maximum(den, 1e-12), 0.0)
    tot = 2 * tp.sum() + fp.sum() + fn.sum()
    return float(per.mean()), float(2 * tp.sum() / tot) if tot else 0.0, per


def label_probe(train_x: np.ndarray, train_labels: list[list[str]], test_x: np.ndarray,
                test_labels: list[list[str]], min_positives: int = 20, c: float = 1.0) -> dict:
    """Fit the one-vs-rest probe on ``train_x`` (N, D) and score it on ``test_x`` (M, D) (module docstring).

    Returns ``macro_f1``, ``micro_f1``, ``labels`` (kept label count), ``per_label_f1`` ({label: F1}).

    Raises:
        ValueError: no label has ``min_positives`` train reports and a test report.
    """
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
    w, b = fit_logistic((train_x - mu) / sd, ytr, c)
    pred = (((test_x - mu) / sd) @ w + b > 0).astype(int)
    macro, micro, per = macro_micro_f1(yte, pred)
    return {"macro_f1": macro, "micro_f1": micro, "labels": len(keep),
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
