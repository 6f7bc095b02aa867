"""`mmtl bench serve` end to end on a tiny export: Ray started by the benchmark itself (so in Serve's HAProxy mode,
as `mmtl serve` does), every cell measured with and without batching, what was measured recorded in the result."""
from __future__ import annotations

import os

import numpy as np
import pytest

from test_serve import _export, _free_port

PROXY_ENV = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_SERVE_HAPROXY_METRICS_PORT",
             "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S")


def _index(folder, export, n: int = 12) -> str:
    """A flat index of n solid-colour images embedded with ``export`` (thumbnails are real JPEGs: the load test
    posts them to /embed/image)."""
    from PIL import Image

    from mmtl.serve.embed import Embedder, model_fingerprint
    from mmtl.serve.index import Rows, write_index
    from mmtl.serve.index_build import thumbnail_jpeg

    emb = Embedder.from_export(export)
    images = [Image.new("RGB", (40, 40), (20 * i, 255 - 20 * i, 90)) for i in range(n)]
    vec = emb.encode_images(images)
    cols = {"key": [f"{i:04d}" for i in range(n)], "uid": [f"s/{i:04d}" for i in range(n)],
            "caption": [f"a shade number {i}" for i in range(n)], "shard": ["s.tar"] * n, "meta": ["{}"] * n,
            "thumbnail": [thumbnail_jpeg(im) for im in images]}
    model = {"spec": str(export), "kind": "export", "fingerprint": model_fingerprint(export)}
    write_index(folder, Rows(cols, vec, vec.copy()), model=model, kind="flat", shards=[])
    return str(folder)


@pytest.mark.e2e
def test_bench_serve_measures_every_cell(tmp_path, tiny_shards):
    import ray

    from mmtl.serve.loadtest import bench_serve

    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in PROXY_ENV}
    a = _export(tmp_path / "a", tiny_shards, 0)
    idx = _index(tmp_path / "idx", a)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("deployment: {num_replicas: 2, num_cpus: 0.5, torch_threads: 1}\n")
    try:
        r = bench_serve(str(a), idx, requests=6, concurrencies=(1, 4), time_limit_s=60, port=_free_port(),
                        config_path=str(cfg), warmup=2)
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    cells = {(c["batching"], c["route"], c["concurrency"]): c for c in r["cells"]}
    assert set(cells) == {(b, route, c) for b in (True, False) for route in ("search_text", "embed_image")
                          for c in (1, 4)} | {(True, "healthz", 1), (True, "healthz", 4)}
    for c in cells.values():
        assert c["done"] == 6 and c["errors"] == {} and c["rps"] > 0
        assert 0 < c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"]
    assert set(r["ratios"]) == {f"{b}/{route}" for b in ("batching", "no_batching")
                                for route in ("search_text", "embed_image")}
    assert r["ratios"]["batching/search_text"] == pytest.approx(
        cells[(True, "search_text", 4)]["rps"] / cells[(True, "search_text", 1)]["rps"], abs=0.01)
    assert r["setup"]["http_proxy"] == "haproxy" and r["setup"]["text_precision"] in ("bf16", "fp32")
    assert r["setup"]["config"]["deployment"]["num_replicas"] == 2
    assert r["mean_batch_size"]["off"]["text"] == 1.0 and r["mean_batch_size"]["on"]["text"] >= 1.0
    assert not np.isnan(r["targets"]["search_text rps c=4 >= 3x c=1 (batching)"]["value"])
