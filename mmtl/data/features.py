"""Frozen-tower feature cache: compute frozen, non-augmented tower outputs once per sample.

When both towers are frozen and inputs are not augmented, their outputs are a pure function of
(tower identity, weights, preprocessing, sample). They are computed once per shard and stored as
``<cache_root>/<image fingerprint>__<text fingerprint>__x<extraction version>/<shard stem>-<hash>.npz``
where the hash covers the shard's URL, size (bytes) and modification time, so a changed shard or a changed
model misses the cache.
Files are written atomically (temp file + ``os.replace``). Later epochs and later runs then cost only the
trainable part (projection heads, logit scale).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mmtl.data.samples import CleanOptions
from mmtl.data.shardio import iter_shard, resolve_shards, shard_ids


@dataclass
class FeatureSet:
    """Cached tower outputs of one split. ``image``: (N, D_v) float32; ``text``: (N, D_t) float32."""

    uids: list[str]
    captions: list[str]
    meta: list[dict]
    image: np.ndarray
    text: np.ndarray
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.uids)


def _shard_identity(url: str) -> str:
    if "://" in url and not url.startswith("file://"):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(url)
        info = fs.get_file_info(path)
        return f"{url}|{info.size}|{info.mtime_ns}"
    p = Path(url.removeprefix("file://"))
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def cache_file(cache_dir: Path, url: str) -> Path:
    """Cache path for one shard; its name changes when the shard's URL, size or mtime changes."""
    digest = hashlib.sha1(_shard_identity(url).encode()).hexdigest()[:16]
    stem = Path(url).name.split(".")[0]
    return cache_dir / f"{stem}-{digest}.npz"


def encode_samples(model, batch: list) -> tuple[np.ndarray, np.ndarray]:
    """Frozen-tower outputs of a batch of samples: ``image`` (B, D_v), ``text`` (B, D_t) float32 (the eval
    image transform, the model's tokenizer). Module-level so that Ray actors can run it."""
    tf = model.image_transform(train=False)
    images = torch.stack([tf(s.image) for s in batch]).contiguous(memory_format=torch.channels_last)
    tok = model.tokenize([s.caption for s in batch])
    return (model.image_features(images).float().numpy(),
            model.text_features(tok["input_ids"], tok["attention_mask"]).float().numpy())


def compute_shard_features(model, url: str, opts: CleanOptions, batch_size: int = 64,
                           shard_id: Optional[str] = None, progress: bool = True, encoder=None) -> dict:
    """Run the frozen towers over every clean sample of one shard.

    ``encoder``: a :mod:`mmtl.data.encode_pool` encoder (None: this process, :class:`LocalEncoder`).

    Returns a dict of numpy arrays: ``uids`` (N,), ``captions`` (N,), ``meta`` (N,) JSON strings,
    ``image`` (N, D_v) float32, ``text`` (N, D_t) float32 and ``stats`` (JSON of reject counts).
    """
    from tqdm.auto import tqdm

    from mmtl.data.encode_pool import LocalEncoder

    model.eval()
    encoder = encoder or LocalEncoder(model)
    stats: collections.Counter = collections.Counter()
    uids, caps, metas, img_out, txt_out = [], [], [], [], []
    bar = tqdm(desc=f"frozen features {Path(url).name}", unit="sample", leave=False,
                disable=None if progress else True)  # None: no bar when stderr is not a terminal
    for batch, (img, txt) in encoder.encode_batches(iter_shard(url, opts, stats, shard_id=shard_id),
                                                    encode_samples, batch_size, progress=bar.update):
        img_out.append(img)
        txt_out.append(txt)
        for s in batch:
            uids.append(s.uid)
            caps.append(s.caption)
            metas.append(json.dumps(s.meta))
    bar.close()
    dv = img_out[0].shape[1] if img_out else 0
    dt = txt_out[0].shape[1] if txt_out else 0
    return {
        "uids": np.array(uids, dtype=str),
        "captions": np.array(caps, dtype=str),
        "meta": np.array(metas, dtype=str),
        "image": np.concatenate(img_out) if img_out else np.zeros((0, dv), np.float32),
        "text": np.concatenate(txt_out) if txt_out else np.zeros((0, dt), np.float32),
        "stats": np.array(json.dumps(dict(stats))),
    }


def _atomic_save(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: Version of the extraction numerics, in the cache directory's name: 2 = inference mode + channels-last
#: weights (issue 19; features differ from version 1's by float rounding, ~1e-5), so that one run never
#: mixes shards extracted both ways.
EXTRACTION_VERSION = 2


def model_cache_dir(cache_root: str | Path, model) -> Path:
    """Directory of one (image tower, text tower) pair's cached features (and :data:`EXTRACTION_VERSION`)."""
    return Path(cache_root) / f"{model.fingerprint('image')}__{model.fingerprint('text')}__x{EXTRACTION_VERSION}"


def load_features(
    spec, model, cache_root: str | Path, opts: CleanOptions, progress: Optional[callable] = None
) -> FeatureSet:
    """Features of every clean sample of the shards in ``spec``, computing and caching missing shards (over all
    cores with Ray actors when they hold >= :data:`~mmtl.data.encode_pool.RAY_MIN_SAMPLES` samples, see
    :func:`~mmtl.data.encode_pool.open_encoder`).

    Raises:
        MissingShardsError / EmptyDatasetError: from shard resolution, before any computation.
    """
    from mmtl.data.encode_pool import open_encoder
    from mmtl.data.stream import count_samples

    cdir = model_cache_dir(cache_root, model)
    parts, stats = [], collections.Counter()
    shards = resolve_shards(spec)
    missing = [url for url in shards if not cache_file(cdir, url).exists()]
    with open_encoder(model, count_samples(missing) if missing else 0) as encoder:
        for url, sid in zip(shards, shard_ids(shards)):
            path = cache_file(cdir, url)
            if path.exists():
                arrays = dict(np.load(path, allow_pickle=False))
            else:
                arrays = compute_shard_features(model, url, opts, shard_id=sid, encoder=encoder)
                _atomic_save(path, arrays)
            stats.update(json.loads(str(arrays["stats"])))
            parts.append(arrays)
            if progress:
                progress(url)
    return FeatureSet(
        uids=[str(u) for p in parts for u in p["uids"]],
        captions=[str(c) for p in parts for c in p["captions"]],
        meta=[json.loads(str(m)) for p in parts for m in p["meta"]],
        image=np.concatenate([p["image"] for p in parts]).astype(np.float32),
        text=np.concatenate([p["text"] for p in parts]).astype(np.float32),
        stats=dict(stats),
    )
