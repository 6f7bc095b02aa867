"""Frozen-tower token features of a VQA / ITM shard set, computed once and cached.

A sample is an image, its caption (the question) and its json (``strategy.fusion.answers_field``,
``qtype_field``, ``image_id_field``). Samples sharing an ``image_id`` share one image-token computation; each
distinct text runs through the text tower once. For ``task: itm`` the text is the caption followed by the
first answer ("how many circles are there? 2"), for ``vqa`` the caption alone. VQA samples without a
usable answer are skipped and counted (``no_answers`` in the stats, logged as ``data/<set>_no_answers``);
answers are normalised by :func:`normalize_answer` (values of other types are dropped and counted as
``bad_answer``); a ``question_type`` / ``image_id`` that is not a string or integer is counted
(``bad_question_type`` / ``bad_image_id``) and replaced by "all" / the sample key;
a sample whose ``image_id`` was already used for different pixels gets its own image (counted as
``image_id_conflict``), so a reused id never puts a question on the wrong picture.

Arrays of a :class:`TokenSet` (``N`` samples, ``M`` distinct images, ``T`` image tokens, ``L`` text tokens
trimmed to the longest question of the set): ``image_tokens`` a :class:`~mmtl.data.arrays.RowIndexed`
view (N, T, D_v) over an (M, T, D_v) float16 table (an image's questions share its row), ``text_tokens``
(N, L, D_t) float16, ``text_mask`` (N, L) int64. Memory is about ``M * T * D_v * 2 + N * L * D_t * 2`` bytes
(e.g. 3,000 images x 36 tokens x 1,280 = 276 MB); ``strategy.fusion.image_pool`` average-pools a square
token grid by that factor first.

Cache: ``<cache_root>/fusion-<key>.npz`` + ``.json``, where ``key`` hashes both tower fingerprints, the shard
files (names, sizes, mtimes), the fields read, ``image_layer`` and ``image_pool``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from mmtl.config import CrossAttentionConfig
from mmtl.data.arrays import RowIndexed
from mmtl.models.tokens import text_tokens_trimmable

_VERSION = 4  # 4: inference mode + channels-last weights (issue 19; float rounding ~1e-5)


@dataclass
class TokenSet:
    """Token features + labels of one shard set (see module docstring for shapes)."""

    image_tokens: RowIndexed
    text_tokens: np.ndarray
    text_mask: np.ndarray
    captions: list[str]
    answers: list[list[str]]
    qtypes: list[str]
    image_ids: list[str]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


def normalize_answer(v) -> Optional[str]:
    """One reference answer as a class label: strings lower-cased with whitespace collapsed ("Red " -> "red"),
    integers and integral floats as digits (2.0 -> "2"), other floats as written; None for anything else
    (None, booleans, lists, dicts), which the caller counts as ``bad_answer``."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else str(v)
    if isinstance(v, str):
        return " ".join(v.lower().split()) or None
    return None


def _answers(meta: dict, key: str, stats) -> list[str]:
    """The usable reference answers under ``key`` (a list or one value), normalised; bad values counted."""
    v = meta.get(key)
    if v is None:
        return []
    out = []
    for a in (v if isinstance(v, (list, tuple)) else [v]):
        norm = normalize_answer(a)
        if norm is None:
            if not (isinstance(a, str) and not a.strip()):  # blank strings are simply absent
                stats["bad_answer"] += 1
            continue
        out.append(norm)
    return out


def _scalar(meta: dict, key: Optional[str], default: str, stats, reason: str) -> str:
    """``meta[key]`` as a string when it is a str / int, else ``default`` (counted as ``reason`` unless absent)."""
    v = meta.get(key) if key else None
    if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
        return str(v)
    if v is not None:
        stats[reason] += 1
    return default


def pool_grid(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, h*w, D) row-major square grid -> (B, ceil(h/f)*ceil(w/f), D) by average pooling (``factor`` f).

    Raises:
        ValueError: the token count is not a square.
    """
    if factor == 1:
        return tokens
    b, n, d = tokens.shape
    h = math.isqrt(n)
    if h * h != n:
        raise ValueError(f"strategy.fusion.image_pool needs a square token grid, got {n} tokens")
    grid = tokens.transpose(1, 2).reshape(b, d, h, h)
    grid = torch.nn.functional.avg_pool2d(grid, factor, ceil_mode=True)
    return grid.flatten(2).transpose(1, 2)


def image_token_batch(model, fcfg: CrossAttentionConfig, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (B, T, D_v) fusion image tokens: the ``image_layer`` tokens, pooled by
    ``image_pool`` (what training, eval and the registry model all use)."""
    return pool_grid(model.image_tokens(pixels, fcfg.image_layer), fcfg.image_pool)


def _key(model, spec, fcfg: CrossAttentionConfig) -> str:
    from mmtl.data.shardlist import resolve_shards

    files = []
    for s in resolve_shards(spec):
        p = Path(s)
        files.append([s, p.stat().st_size, int(p.stat().st_mtime)] if p.exists() else [s])
    ident = {"v": _VERSION, "image": model.fingerprint("image"), "text": model.fingerprint("text"), "files": files,
             "fields": [fcfg.answers_field, fcfg.qtype_field, fcfg.image_id_field], "pool": fcfg.image_pool,
             "layer": fcfg.image_layer, "task": fcfg.task}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def compute_tokens(model, spec, fcfg: CrossAttentionConfig, clean_opts, batch_size: int = 64,
                   say: Callable[[str], None] = lambda m: None) -> TokenSet:
    """Read ``spec`` and run the frozen towers (eval mode, no grad) over it; see module docstring.

    Raises:
        EmptyDatasetError / MissingShardsError: no samples.
    """
    import collections

    from mmtl.data.batches import encode_batches
    from mmtl.data.shardio import iter_samples
    from mmtl.data.shardlist import EmptyDatasetError

    t0 = time.perf_counter()
    stats: collections.Counter = collections.Counter()
    model.eval()
    tf = model.image_transform(train=False)
    captions, answers, qtypes, ids = [], [], [], []
    img_index: dict[str, int] = {}
    img_digest: dict[str, str] = {}  # image_id -> sha1 of its pixels (a reused id with other pixels is a conflict)

    def new_images():
        """Per sample: bookkeeping (labels, ids); yields the transformed pixels of each image not seen yet."""
        for s in iter_samples(spec, clean_opts, stats):
            ans = _answers(s.meta, fcfg.answers_field, stats)
            if fcfg.task == "vqa" and not ans:  # nothing to train on or score: skipped and counted
                stats["no_answers"] += 1
                continue
            iid = _scalar(s.meta, fcfg.image_id_field, s.uid, stats, "bad_image_id")
            digest = hashlib.sha1(s.image.tobytes()).hexdigest()
            if iid in img_digest and img_digest[iid] != digest:  # one image_id, another picture: keep both apart
                stats["image_id_conflict"] += 1
                iid = f"{iid}#{s.uid}"
            fresh = iid not in img_index
            if fresh:
                img_index[iid], img_digest[iid] = len(img_index), digest
            captions.append(s.caption)
            answers.append(ans)
            qtypes.append(_scalar(s.meta, fcfg.qtype_field, "all", stats, "bad_question_type"))
            ids.append(iid)
            if fresh:
                yield tf(s.image)

    def encode(pixels: torch.Tensor) -> np.ndarray:
        from mmtl.data.encode_pool import fast_inference

        with fast_inference(model):  # inference mode, channels-last weights (restored)
            return image_token_batch(model, fcfg, pixels).to(torch.float16).numpy()

    image_rows: list[np.ndarray] = []
    for _, toks in encode_batches(new_images(), encode, batch_size, collate=torch.stack):
        image_rows.extend(toks)
    if not captions:
        raise EmptyDatasetError(f"no usable samples in {spec} (skipped: {dict(stats)}; VQA samples need "
                                f"`{fcfg.answers_field}` in their json)")
    images = np.stack(image_rows)
    if fcfg.task == "itm":  # the text to match: question + its first answer ("how many circles? 2")
        captions = [f"{c} {a[0]}" if a else c for c, a in zip(captions, answers)]
    uniq = sorted(set(captions))  # questions repeat: each distinct text runs once
    tok = model.tokenize(uniq)
    n = max(int(tok["attention_mask"].sum(1).max()), 1)  # right padding: later positions are padding only
    trim = text_tokens_trimmable(model)  # the family's rule (masked encoders: two_tower, hf CLIP)
    parts = []
    for i in range(0, len(uniq), batch_size):
        b_ids, b_mask = tok["input_ids"][i:i + batch_size], tok["attention_mask"][i:i + batch_size]
        if trim:  # masked bidirectional encoders: padding never changes the real tokens' states
            b_ids, b_mask = b_ids[:, :n], b_mask[:, :n]
        with torch.no_grad():
            parts.append(model.text_tokens(b_ids, b_mask)[:, :n].to(torch.float16).numpy())
    pos = {c: i for i, c in enumerate(uniq)}
    text_rows = np.array([pos[c] for c in captions])
    text, mask = np.concatenate(parts)[text_rows], tok["attention_mask"][:, :n].numpy().astype(np.int64)[text_rows]
    rows = np.array([img_index[i] for i in ids])
    out_stats = {**{k: int(v) for k, v in stats.items()}, "samples": len(captions), "images": len(img_index),
             "seconds": round(time.perf_counter() - t0, 1)}
    say(f"tokens: {len(captions)} samples, {len(img_index)} images, image tokens {images.shape[1:]}, "
        f"text tokens {text.shape[1:]} ({out_stats['seconds']} s)")
    return TokenSet(RowIndexed(images, rows), text, mask, captions, answers, qtypes, ids, out_stats)


def load_or_compute(model, spec, fcfg: CrossAttentionConfig, clean_opts, cache_root: Optional[Path],
                    say: Callable[[str], None] = lambda m: None) -> TokenSet:
    """:func:`compute_tokens` through the cache under ``cache_root`` (None: no cache)."""
    if cache_root is None:
        return compute_tokens(model, spec, fcfg, clean_opts, say=say)
    key = _key(model, spec, fcfg)
    npz, meta = Path(cache_root) / f"fusion-{key}.npz", Path(cache_root) / f"fusion-{key}.json"
    if npz.exists() and meta.exists():
        arr, m = np.load(npz), json.loads(meta.read_text())
        say(f"tokens: {len(m['captions'])} samples from cache {npz.name}")
        return TokenSet(RowIndexed(arr["image_table"], arr["image_rows"]), arr["text_tokens"], arr["text_mask"],
                        m["captions"], m["answers"], m["qtypes"], m["image_ids"], m["stats"])
    ts = compute_tokens(model, spec, fcfg, clean_opts, say=say)
    npz.parent.mkdir(parents=True, exist_ok=True)
    tmp, tmp_meta = npz.with_name(npz.stem + ".tmp.npz"), meta.with_name(meta.stem + ".tmp.json")
    np.savez(tmp, image_table=ts.image_tokens.table, image_rows=ts.image_tokens.rows, text_tokens=ts.text_tokens,
             text_mask=ts.text_mask)
    tmp_meta.write_text(json.dumps({"captions": ts.captions, "answers": ts.answers, "qtypes": ts.qtypes,
                                    "image_ids": ts.image_ids, "stats": ts.stats}))
    tmp_meta.replace(meta)  # the npz last: a cache entry counts only when both files are whole
    tmp.replace(npz)
    return ts
