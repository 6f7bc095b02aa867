"""Per-locale captions on the frozen-feature path: the frozen text tower's outputs of every locale caption
(cached like the shard features), and training arrays in which each sample's caption is drawn per epoch.

With ``data.caption_locales`` and cached features, training rows are ``epochs x N`` (sample, epoch) pairs:
``image_feat`` row ``e*N + i`` is sample ``i``'s image features, ``text_feat`` row ``e*N + i`` the features
of the caption :class:`~mmtl.data.locales.LocaleMix` draws for sample ``i`` in epoch ``e`` (both
:class:`~mmtl.data.arrays.RowIndexed` views, so nothing is copied). The index stream then shuffles all
``epochs x N`` rows, so each sample is seen once per epoch block with that block's caption.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mmtl.data.arrays import RowIndexed
from mmtl.data.locales import ENGLISH, LocaleMix, load_locale


def sample_key(uid: str) -> str:
    """``"<shard stem>/<key>"`` -> ``key``."""
    return uid.split("/", 1)[-1]


@torch.inference_mode()
def encode_by_length(tokenize: Callable, encode: Callable, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """``encode(input_ids, attention_mask)`` of ``texts`` in batches of similar token length, rows back in the
    order of ``texts``: (N, D) float32.

    ``tokenize``: B strings -> dict of (B, L) ``input_ids`` / ``attention_mask`` (right-padded); ``encode``
    trims each batch to its longest sequence (:meth:`TwoTowerModel.text_features`), so sorting by length
    cuts the padded positions a batch computes (emoji captions: 8-64 tokens) without changing any row beyond
    floating-point summation order.
    """
    if not texts:
        return torch.zeros((0, 0))
    tok = tokenize(texts)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    order = torch.argsort(mask.sum(dim=1), stable=True)
    parts = [encode(ids[order[i:i + batch_size]], mask[order[i:i + batch_size]]).float()
             for i in range(0, len(texts), batch_size)]
    out = torch.empty((len(texts), parts[0].shape[1]), dtype=torch.float32)
    out[order] = torch.cat(parts)
    return out


def encode_texts(model, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Frozen text-tower outputs (N, D_t) float32 of ``texts`` (the model's tokenizer, incl. its prefix),
    encoded in length-sorted batches (:func:`encode_by_length`)."""
    model.eval()
    if not texts:
        return np.zeros((0, 0), np.float32)
    return encode_by_length(model.tokenize, model.text_features, texts, batch_size).numpy()


def truncated_count(model, texts: list[str]) -> int:
    """How many of ``texts`` exceed the model's ``context_length`` in tokens (prefix and special tokens
    included), i.e. get cut by the tokenizer; 0 when the model has no ``count_tokens``/``context_length``."""
    ctx = int(getattr(model, "context_length", 0) or 0)
    if not ctx or not hasattr(model, "count_tokens"):
        return 0
    return sum(model.count_tokens(t) > ctx for t in texts)


def locale_text_features(model, keys: list[str], split_dir: str | Path, locale: str, cache_dir: str | Path,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(sample indices (M,), text features (M, D_t))`` for the samples of ``keys`` with a ``locale`` caption.

    Cached in ``<cache_dir>/locales/<locale>-<hash>.npz``, the hash covering the captions and keys
    (``cache_dir`` is the model's feature cache folder, so the text tower identity is in the path).
    Raises ValueError when ``split_dir`` has no sidecar for ``locale``.
    """
    caps = load_locale(split_dir, locale)
    idx = np.array([i for i, k in enumerate(keys) if k in caps], dtype=np.int64)
    texts = [caps[keys[i]] for i in idx]
    digest = hashlib.sha1(json.dumps([keys, texts], ensure_ascii=False).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "locales" / f"{locale}-{digest}.npz"
    if path.is_file():
        return idx, np.load(path)["text"]
    feats = encode_texts(model, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    np.savez(tmp, text=feats)
    os.replace(tmp, path)
    return idx, feats


def locale_training_arrays(model, uids: list[str], image: np.ndarray, text: np.ndarray, split_dir: str | Path,
                           mix: dict[str, float], seed: int, epochs: int, cache_dir: str | Path,
                           say: Callable[[str], None] = lambda m: None) -> tuple[dict, dict[str, int]]:
    """Training arrays (module docstring) and the drawn-locale counts (``<locale>``, ``missing:<locale>``,
    ``fallback_en``) over all epochs, plus ``truncated:<locale>``: that locale's training captions longer than
    the model's ``context_length`` (each caption once, not per draw; :func:`truncated_count`).

    Args:
        uids: (N,) sample uids; image (N, D_v), text (N, D_t): the cached English features.
        mix: ``{locale: weight}`` (``en`` = the shard captions).
        epochs: epoch blocks to draw (each sample once per block).
    """
    keys = [sample_key(u) for u in uids]
    n = len(keys)
    tables, row_of = [text], {ENGLISH: np.arange(n)}
    offset = n
    truncated: dict[str, int] = {}
    for loc, w in mix.items():
        if loc == ENGLISH or w <= 0:
            continue
        idx, feats = locale_text_features(model, keys, split_dir, loc, cache_dir)
        caps = load_locale(split_dir, loc)
        truncated[f"truncated:{loc}"] = truncated_count(model, [caps[keys[i]] for i in idx])
        rows = np.full(n, -1, dtype=np.int64)
        rows[idx] = offset + np.arange(len(idx))
        row_of[loc] = rows
        tables.append(feats.astype(np.float32))
        offset += len(idx)
        say(f"locale {loc}: {len(idx)}/{n} training captions")
    table = np.concatenate(tables)
    lm = LocaleMix(captions={}, mix=mix, seed=seed)
    rows = np.empty(epochs * n, dtype=np.int64)
    for e in range(epochs):
        for i, k in enumerate(keys):
            loc = lm.pick(k, e, lambda lc, i=i: lc == ENGLISH or row_of[lc][i] >= 0)
            if loc is None:
                lm.counts["fallback_en"] = lm.counts.get("fallback_en", 0) + 1
                loc = ENGLISH
            rows[e * n + i] = row_of[loc][i]
    arrays = {"image_feat": RowIndexed(image, np.tile(np.arange(n), epochs)), "text_feat": RowIndexed(table, rows)}
    return arrays, {**lm.counts, **truncated}
