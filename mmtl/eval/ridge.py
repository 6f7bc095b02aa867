"""Closed-form ridge-regression baseline between frozen image and text features.

A linear map ``W = (X^T X + lambda I)^-1 X^T Y`` (Hoerl & Kennard 1970) from centred, L2-normalised frozen
image features X (N, D_v) to frozen text features Y (N, D_t) fit on the train split; test images are mapped
into text-feature space and retrieval recall@K is computed by cosine against the test captions' features.
``lambda`` is chosen on the validation split (image->text R@1, ties to the larger lambda), or fixed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from mmtl.eval.metrics import recall_at_k

LAMBDAS = (0.01, 0.1, 1.0, 10.0, 100.0)


def _prep(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x - mean


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit the ridge map on (N, D_v) -> (N, D_t); returns (W (D_v, D_t), x_mean (D_v,), y_mean (D_t,))."""
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    yn = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    xm, ym = xn.mean(0), yn.mean(0)
    xc, yc = xn - xm, yn - ym
    a = xc.T.astype(np.float64) @ xc + lam * np.eye(xc.shape[1])
    w = np.linalg.solve(a, xc.T.astype(np.float64) @ yc)
    return w, xm, ym


def ridge_recall(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    val: Optional[tuple[np.ndarray, np.ndarray]] = None,
    ks: Sequence[int] = (1, 5, 10),
    lam: Optional[float] = None,
) -> dict[str, float]:
    """Recall@K of the ridge baseline on ``test`` = (image feats (N, D_v), text feats (N, D_t)).

    Returns ``recall_at_k`` names plus ``ridge_lambda``.
    """
    def score(l: float, split) -> dict[str, float]:
        w, xm, ym = fit_ridge(*train, l)
        pred = _prep(split[0], xm) @ w
        tgt = _prep(split[1], ym)
        return recall_at_k(torch.from_numpy(pred).float(), torch.from_numpy(tgt).float(), ks)

    if lam is None:
        lam = 1.0
        if val is not None and len(val[0]) > 1:
            best = max(LAMBDAS, key=lambda l: (score(l, val)["image_to_text_recall_at_1"], l))
            lam = best
    out = score(lam, test)
    out["ridge_lambda"] = float(lam)
    return out
