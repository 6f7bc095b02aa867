"""The ingest benchmark runs end to end on a tiny set (its figures are not checked: it is a benchmark), and the
fused Ray Data ingest it measures yields every clean sample exactly once per epoch."""
from __future__ import annotations

import collections

import numpy as np
import pytest

pytestmark = pytest.mark.e2e


def test_bench_ingest_result_is_well_formed(ray_local, tmp_path):
    from mmtl.bench.ingest import bench_ingest, write_bench_shards

    assert len(write_bench_shards(str(tmp_path), 64, shards=2)) == 2
    r = bench_ingest(str(tmp_path), runs=1, batch_size=16, warmup=False)
    assert r["samples"] == r["baseline_samples"] == 64
    assert set(r["samples_per_s"]) == {"mmtl", "baseline", "mmtl_nodraft"} and min(r["samples_per_s"].values()) > 0
    rate, total = r["samples_per_s"], r["samples_per_s_total"]
    assert r["ratio"] == pytest.approx(rate["mmtl"] / rate["baseline"], rel=0.02, abs=2e-3)
    assert r["ratio_total"] == pytest.approx(total["mmtl"] / total["baseline"], rel=0.02, abs=2e-3)
    assert r["ratios"]["mmtl/baseline"] == r["ratio"] and r["ratios"]["mmtl/baseline_total"] == r["ratio_total"]
    assert set(r["ratios"]) == {"mmtl/baseline", "mmtl/baseline_total", "mmtl_nodraft/baseline",
                                "mmtl_nodraft/baseline_total"} and all(v > 0 for v in r["ratios"].values())
    assert r["jpeg_draft"] == {"mmtl": 1.5, "mmtl_nodraft": 0.0}  # side mmtl: the defaults (draft on)
    assert {"mmtl_decode_image_draft", "transform_after_draft", "transform_batched_64_after_draft"} <= set(r["per_sample_ms"])
    assert all(0 < r["first_batch_s"][k] <= r["times_s"][k][0] for k in ("mmtl", "baseline", "mmtl_nodraft"))
    assert all(v > 0 for v in r["cpu_ms_per_sample"].values())
    assert r["runs"] == 1 and r["image_size"] == 64 and r["processes"] == 2 and r["startup_s"] == 0.0
    assert len(r["times_s"]["mmtl"]) == len(r["times_s"]["baseline"]) == 1 and r["warmup_s"] == {}
    assert set(r["per_sample_ms"]) >= {"pil_decode_rgb", "mmtl_decode_image", "transform", "transform_batched_64",
                                       "mmtl_read_clean", "tokenize_batched_64"}
    assert set(r["load_avg"]) == {"before", "after"}
    assert isinstance(r["limits"], str) and "draft" in r["limits"]


def _key(img: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> bytes:
    return np.asarray(img, np.float32).round(4).tobytes() + ids.astype(np.int64).tobytes() + \
        mask.astype(np.int64).tobytes()


def test_build_image_dataset_yields_each_clean_sample_once_per_epoch(ray_local, tiny_shards, tmp_path):
    from conftest import tiny_pipeline
    from mmtl.config import build_pipeline
    from mmtl.data.shardio import iter_samples, resolve_shards
    from mmtl.data.stream import build_image_dataset, clean_options
    from mmtl.models import build_image_transform, build_tokenizer

    pipe = build_pipeline(tiny_pipeline(tiny_shards, tmp_path))
    spec = tiny_shards["test"]  # 48 distinct samples in 2 shards
    assert len(resolve_shards(spec)) == 2
    tf, tokenize = build_image_transform(pipe.model, False), build_tokenizer(pipe.model)
    want, want_ids = collections.Counter(), collections.Counter()
    for s in iter_samples(spec, clean_options(pipe, count_tokens=tokenize.count)):
        tok = tokenize([s.caption])
        ids = tok["input_ids"][0].numpy().astype(np.int64)
        want[_key(tf(s.image).numpy(), ids, tok["attention_mask"][0].numpy())] += 1
        want_ids[ids.tobytes()] += 1
    assert sum(want.values()) == 48 and len(want) == 48

    # eval mode (deterministic transform): every clean sample's exact row, once per epoch; the tasks yield
    # 5-row batches (32 + 16 samples per shard: partial last batches), each its own block (not one per shard)
    ds = build_image_dataset(pipe, spec, epochs=2, train=False, processes=2, rows_per_block=5)
    got: collections.Counter = collections.Counter()
    sizes = []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        got.update(_key(*row) for row in zip(b["image"], b["input_ids"], b["attention_mask"]))
        sizes.append(len(b["image"]))
    assert max(sizes) <= 5 and len(sizes) >= 2 * (7 + 4), sizes
    assert sum(got.values()) == 2 * 48
    assert got == collections.Counter({k: 2 * v for k, v in want.items()})

    # train mode (random crops, shuffled): still 2 x samples rows, model-ready, each caption as often as in the data
    n, size, ctx, ids = 0, pipe.model.image_size, pipe.model.context_length, collections.Counter()
    for b in build_image_dataset(pipe, spec, epochs=2, train=True, processes=2).iter_batches(batch_format="numpy"):
        assert b["image"].shape[1:] == (3, size, size) and b["image"].dtype == np.float32
        assert b["input_ids"].shape[1:] == (ctx,) and b["attention_mask"].shape[1:] == (ctx,)
        n += len(b["image"])
        ids.update(r.tobytes() for r in b["input_ids"].astype(np.int64))
    assert n == 2 * 48 and ids == collections.Counter({k: 2 * v for k, v in want_ids.items()})
