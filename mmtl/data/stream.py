"""Streaming ingest with Ray Data: shards -> clean samples -> model transform + tokenizer -> train workers.

One ordered list of stages (as open_clip's ``get_wds_dataset``): the shard list is expanded for every epoch
with a seeded per-epoch permutation (shard-level shuffle), each shard is read by the robust reader of
:mod:`mmtl.data.shardio` (decode by magic bytes, cleaning, rejects counted by reason) in a ``flat_map``
with a seeded in-shard shuffle buffer (sample-level shuffle), then ``map_batches`` applies the model's image
transform and tokenizer in parallel tasks. Nothing is materialised: Ray Train's ``get_dataset_shard``
streams the result to the workers (``streaming_split(equal=True)``, so every rank sees the same number of
rows and, with ``drop_last``, the same number of micro-batches: no rank waits in a collective).

Reject counts from the read tasks are sent to a named Ray actor (:class:`SampleStatsActor`) so rank 0 can
log them as metrics while training runs.
"""
from __future__ import annotations

import collections
import functools
import json
import math
import random
from typing import Any, Iterator, Optional

import numpy as np

from mmtl.config import Pipeline
from mmtl.data.samples import CleanOptions
from mmtl.data.shardio import iter_shard, resolve_shards

STATS_ACTOR_PREFIX = "mmtl-sample-stats-"


def clean_options(pipe: Pipeline, count_tokens=None) -> CleanOptions:
    """CleanOptions from the pipeline's data limits and model context length."""
    return CleanOptions(
        max_image_pixels=pipe.data.max_image_pixels,
        min_caption_chars=pipe.data.min_caption_chars,
        context_length=pipe.model.context_length if count_tokens else None,
        count_tokens=count_tokens,
    )


def epoch_items(shards: list[str], epochs: int, seed: int, shuffle: bool, start_epoch: int = 0) -> list[dict]:
    """One item per (epoch, shard), shards permuted per epoch with ``Random(seed + epoch)``."""
    from mmtl.data.shardio import shard_ids

    ids = dict(zip(shards, shard_ids(shards)))
    items = []
    for epoch in range(start_epoch, start_epoch + epochs):
        order = list(shards)
        if shuffle:
            random.Random(seed + epoch).shuffle(order)
        items += [{"shard": s, "epoch": epoch, "shard_id": ids[s]} for s in order]
    return items


def _shuffled(it: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Buffered shuffle (as webdataset's ``shuffle``): memory is ``buffer`` samples."""
    if buffer <= 1:
        yield from it
        return
    buf: list = []
    for x in it:
        buf.append(x)
        if len(buf) >= buffer:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _read_shard_rows(item: dict, opts: CleanOptions, buffer: int, seed: int, stats_actor: Optional[str]):
    """flat_map body: clean samples of one shard as rows {uid, image (H,W,3) uint8, caption, meta}."""
    import ray

    stats: collections.Counter = collections.Counter()
    rng = random.Random(f"{seed}:{item['epoch']}:{item['shard']}")
    rows = []
    for s in _shuffled(iter_shard(item["shard"], opts, stats, shard_id=item["shard_id"]), buffer, rng):
        rows.append(
            {
                "uid": s.uid,
                "image": np.asarray(s.image, dtype=np.uint8),
                "caption": s.caption,
                "meta": json.dumps(s.meta),
            }
        )
    if stats_actor:
        try:
            ray.get_actor(stats_actor).add.remote(dict(stats))
        except ValueError:
            pass
    return rows


@functools.lru_cache(maxsize=4)
def _preprocessor(model_cfg_json: str, train: bool):
    """(image transform, tokenizer) for a model config, built once per process without the towers."""
    from mmtl.config import ModelConfig
    from mmtl.models import build_image_transform, build_tokenizer

    cfg = ModelConfig.model_validate_json(model_cfg_json)
    return build_image_transform(cfg, train), build_tokenizer(cfg)


def _transform_batch(batch: dict, model_cfg_json: str, train: bool) -> dict:
    """map_batches body: images -> (B,3,H,W) float32 by the model transform; captions -> token ids (B,L)."""
    import torch
    from PIL import Image

    tf, tokenize = _preprocessor(model_cfg_json, train)
    images = torch.stack([tf(Image.fromarray(np.asarray(a, dtype=np.uint8))) for a in batch["image"]])
    tok = tokenize([str(c) for c in batch["caption"]])
    return {
        "image": images.numpy(),
        "input_ids": tok["input_ids"].numpy(),
        "attention_mask": tok["attention_mask"].numpy(),
    }


def build_image_dataset(
    pipe: Pipeline, spec, epochs: int, stats_actor: Optional[str] = None, train: bool = True, start_epoch: int = 0
):
    """Ray Dataset of model-ready rows for ``epochs`` passes over the shards of ``spec``.

    Rows: ``image`` (3,H,W) float32, ``input_ids`` (L,) int64, ``attention_mask`` (L,) int64.

    Raises:
        MissingShardsError / EmptyDatasetError: before any read, when shards are missing or none match.
    """
    import ray

    shards = resolve_shards(spec)
    items = epoch_items(shards, epochs, pipe.data.seed, pipe.data.shuffle_shards and train, start_epoch)
    from mmtl.models import build_tokenizer

    opts = clean_options(pipe, count_tokens=build_tokenizer(pipe.model).count)
    reader = functools.partial(
        _read_shard_rows, opts=opts, buffer=pipe.data.shuffle_buffer if train else 0,
        seed=pipe.data.seed, stats_actor=stats_actor,
    )
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(reader, num_cpus=pipe.data.decode_cpus)
    return ds.map_batches(
        _transform_batch,
        fn_kwargs={"model_cfg_json": pipe.model.model_dump_json(), "train": train},
        batch_size=64,
        num_cpus=pipe.data.decode_cpus,
    )


def build_index_dataset(n: int, epochs: int, seed: int, shuffle: bool = True):
    """Ray Dataset of row indices into cached features: ``epochs`` concatenated permutations of ``range(n)``
    (sample-level shuffle with ``RandomState(seed + epoch)``). Rows: ``idx`` int64."""
    import ray

    parts = []
    for e in range(epochs):
        parts.append(np.random.RandomState(seed + e).permutation(n) if shuffle else np.arange(n))
    order = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    blocks = max(1, min(64, math.ceil(len(order) / 4096)))
    return ray.data.from_numpy(order).repartition(blocks).rename_columns({"data": "idx"})


def epochs_needed(steps: int, global_batch: int, samples_per_epoch: int) -> int:
    """Passes over ``samples_per_epoch`` samples needed for ``steps`` optimizer steps (+1 for rounding
    and per-worker ``drop_last``). Raises ValueError on an empty dataset."""
    if samples_per_epoch <= 0:
        raise ValueError("the training set has no usable sample")
    return math.ceil(steps * global_batch / samples_per_epoch) + 1


def make_stats_actor(name: str):
    """Create (or get) the named actor that sums reject counts reported by read tasks."""
    import ray

    @ray.remote(num_cpus=0)
    class SampleStatsActor:
        def __init__(self):
            self.counts: collections.Counter = collections.Counter()

        def add(self, counts: dict[str, int]) -> None:
            self.counts.update(counts)

        def get(self) -> dict[str, Any]:
            return dict(self.counts)

    return SampleStatsActor.options(name=name, get_if_exists=True, lifetime="detached").remote()


def count_samples(spec) -> int:
    """Upper bound of the samples in ``spec``: distinct keys per shard from tar headers only (no decode).
    Used to size the number of passes; rejects are discovered while streaming."""
    import tarfile

    from mmtl.data.shardio import open_shard

    total = 0
    for url in resolve_shards(spec):
        keys = set()
        try:
            with open_shard(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for m in tar:
                    if m.isfile():
                        keys.add(m.name.rsplit("/", 1)[-1].split(".", 1)[0])
        except (tarfile.TarError, EOFError, OSError):
            pass
        total += len(keys)
    return total
