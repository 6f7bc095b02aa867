"""Frozen-feature extraction: the fast paths (inference mode, channels-last weights, Ray actors) give the
features of the plain single-process loop; the benchmark runs end to end on a tiny model (its figures are not
checked: it is a benchmark)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_pipeline, write_split


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mmtl.config import load_pipeline
    from mmtl.data.stream import clean_options
    from mmtl.models import build_model

    root = tmp_path_factory.mktemp("bench_features")
    shards = {"train": str(write_split(root / "train", 40, per_shard=40)),
              "val": str(write_split(root / "val", 8, start=100)),
              "test": str(write_split(root / "test", 8, start=200))}
    path = root / "tiny.yaml"
    path.write_text(json.dumps(tiny_pipeline(shards, root / "runs")))  # JSON is YAML 1.2
    pipe = load_pipeline(str(path))
    model = build_model(pipe.model).eval()
    url = str(sorted((root / "train").glob("*.tar"))[0])
    return path, model, url, clean_options(pipe, count_tokens=model.count_tokens)


def test_fast_local_features_equal_the_plain_loop(tiny):
    import torch

    from mmtl.bench.features import _loop_features
    from mmtl.data.encode_pool import LocalEncoder
    from mmtl.data.features import compute_shard_features

    _, model, url, opts = tiny
    img, txt = _loop_features(model, url, opts, batch_size=16)
    threads = torch.get_num_threads()
    arr = compute_shard_features(model, url, opts, batch_size=16, progress=False, encoder=LocalEncoder(model, 1))
    assert arr["image"].shape == img.shape == (40, model.image_dim) and arr["text"].shape == txt.shape
    assert np.abs(arr["image"] - img).max() < 1e-4 and np.abs(arr["text"] - txt).max() < 1e-4
    assert len(arr["uids"]) == 40 and json.loads(str(arr["stats"]))["samples_ok"] == 40
    # nothing leaks out of the fast path: threads, grad mode and the weights' memory format are as before
    assert torch.get_num_threads() == threads and not torch.is_inference_mode_enabled()
    conv = next(m for m in model.image_tower.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()


def test_ray_encoder_keeps_order_and_counts_once(ray_local, tiny):
    from mmtl.data.encode_pool import LocalEncoder, RayEncoder
    from mmtl.data.features import compute_shard_features, encode_samples
    from mmtl.data.shardio import iter_shard

    _, model, url, opts = tiny
    ref = compute_shard_features(model, url, opts, batch_size=6, progress=False, encoder=LocalEncoder(model))
    with RayEncoder(model, workers=2) as enc:
        seen = []
        arr = compute_shard_features(model, url, opts, batch_size=6, progress=False, encoder=enc)
        out = list(enc.encode_batches(iter_shard(url, opts), encode_samples, 16, progress=seen.append))
        assert [len(b) for b, _ in out] == seen == [16, 16, 8] and [len(r[0]) for _, r in out] == [16, 16, 8]
    assert list(arr["uids"]) == list(ref["uids"]) and str(arr["stats"]) == str(ref["stats"])
    assert np.abs(arr["image"] - ref["image"]).max() < 1e-4 and np.abs(arr["text"] - ref["text"]).max() < 1e-4


def test_bench_features_result_is_well_formed(tiny):
    from mmtl.bench.features import bench_features, format_table

    path, *_ = tiny
    r = bench_features(str(path), images=24, runs=1, batch_size=8, sides=("loop", "local", "local_1thread"))
    assert r["images"] == 24 and set(r["images_per_s"]) == {"loop", "local", "local_1thread"}
    assert set(r["ratios"]) == {"local/loop", "local_1thread/loop"} and all(v > 0 for v in r["ratios"].values())
    assert r["ratios"]["local/loop"] == pytest.approx(r["images_per_s"]["local"] / r["images_per_s"]["loop"],
                                                      rel=0.02)
    assert all(d < 1e-4 for d in r["max_abs_diff"].values()) and r["ray_startup_s"] is None
    assert all(v > 0 for v in r["cpu_ms_per_image"].values()) and len(r["load_before"]) == 3
    assert "local/loop" not in format_table(r) and "ratio" in format_table(r)
