"""Frozen-feature extraction benchmark (not a test): images/s of mmtl's feature-cache extraction vs a plain
single-process torch loop, on the same images and the same model, side by side in one process.

Images: the first ``images`` samples of the pipeline's ``data.train`` shards, copied into one temporary
shard (members as they are). Model: the pipeline's model (``pipelines/quickstart.yaml``: EfficientNet-Lite0 at
224 px + MiniLM, packaged weights). Sides, each over the whole shard (read, decode, clean, transform,
tokenize, both towers), after one untimed warm-up batch:

* ``loop``: the extraction as it was before issue 19 (``torch.no_grad``, torch's default thread count,
  batches of 64, contiguous weights) -- the single-process torch loop of the target.
* ``local``: :func:`~mmtl.data.features.compute_shard_features` in this process (``torch.inference_mode``,
  channels-last weights), torch's default threads; ``local_1thread`` the same with 1 torch thread.
* ``ray``: the same with a :class:`~mmtl.data.encode_pool.RayEncoder` (``workers`` actors, 1 thread each),
  what ``mmtl run`` uses for >= 512 samples; the actors' start-up (``ray_startup_s``: Ray itself, the model
  sent and loaded) is timed apart and not in its images/s (paid once per run, not per shard).

Sides run interleaved ``runs`` times (median reported) so that outside load hits them alike; ``ratios`` are
side / ``loop``; ``cpu_ms_per_image``: CPU seconds per image of this process (the ray side: this process
and its descendants, Ray's processes included), steadier than wall time on a shared machine;
``max_abs_diff`` compares every side's features with ``loop``'s.
"""
from __future__ import annotations

import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

SIDES = ("loop", "local", "local_1thread", "ray")


def subset_shard(spec, images: int, out_dir: str) -> str:
    """One tar with the members of the first ``images`` sample keys of the shards in ``spec``; its path."""
    from mmtl.data.shardlist import resolve_shards

    out = Path(out_dir) / "bench-features-000000.tar"
    keys: set[str] = set()
    with tarfile.open(out, "w") as dst:
        for url in resolve_shards(spec):
            with tarfile.open(url) as src:
                for m in src:
                    if not m.isfile():
                        continue
                    key = m.name.rsplit("/", 1)[-1].split(".", 1)[0]
                    if key not in keys and len(keys) >= images:
                        return str(out)
                    keys.add(key)
                    dst.addfile(m, src.extractfile(m))
    return str(out)


def _loop_features(model, url: str, opts, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The pre-issue-19 extraction: no_grad, default threads, contiguous weights, transform in the loop."""
    import torch

    from mmtl.data.batches import encode_batches
    from mmtl.data.shardio import iter_shard

    tf = model.image_transform(train=False)

    def encode(batch):
        images = torch.stack([tf(s.image) for s in batch])
        tok = model.tokenize([s.caption for s in batch])
        return (model.image_features(images).float().numpy(),
                model.text_features(tok["input_ids"], tok["attention_mask"]).float().numpy())

    img, txt = [], []
    with torch.no_grad():
        for _, (i, t) in encode_batches(iter_shard(url, opts), encode, batch_size):
            img.append(i)
            txt.append(t)
    return np.concatenate(img), np.concatenate(txt)


def bench_features(pipeline: str = "pipelines/quickstart.yaml", images: int = 256, runs: int = 1,
                   workers: int = 2, batch_size: int = 64, sides: tuple = SIDES,
                   say: Callable[[str], None] = lambda m: None) -> dict:
    """Run the sides (module docstring); returns images/s per side, ``ratios`` (side / loop), ``max_abs_diff``,
    ``ray_startup_s``, the load average before and after, the settings."""
    import torch
    from tqdm.auto import tqdm

    from mmtl.config import load_pipeline
    from mmtl.data.encode_pool import LocalEncoder, RayEncoder
    from mmtl.data.features import compute_shard_features
    from mmtl.data.stream import clean_options
    from mmtl.models import build_model

    pipe = load_pipeline(pipeline)
    model = build_model(pipe.model).eval()
    opts = clean_options(pipe, count_tokens=model.count_tokens)
    default_threads = torch.get_num_threads()
    load0 = os.getloadavg()
    from mmtl.bench.ingest import _cpu_now

    rates: dict[str, list[float]] = {s: [] for s in sides}
    cpu_ms: dict[str, list[float]] = {s: [] for s in sides}
    feats: dict[str, tuple] = {}
    ray_startup = None
    import ray

    started_ray = "ray" in sides and not ray.is_initialized()
    with tempfile.TemporaryDirectory(prefix="mmtl-bench-features-") as tmp:
        url = subset_shard(pipe.data.train, images, tmp)
        warm = subset_shard(pipe.data.train, min(8, images), tempfile.mkdtemp(dir=tmp))
        encoders: dict[str, object] = {}
        if "ray" in sides:
            t0 = time.perf_counter()
            encoders["ray"] = RayEncoder(model, workers)
            compute_shard_features(model, warm, opts, batch_size=4, progress=False, encoder=encoders["ray"])
            ray_startup = time.perf_counter() - t0
            say(f"ray: {workers} actors ready in {ray_startup:.1f} s")
        encoders["local"] = LocalEncoder(model)
        encoders["local_1thread"] = LocalEncoder(model, threads=1)
        n = None
        total = runs * len(sides)
        bar = tqdm(total=total, desc="bench features", unit="side", leave=False)
        try:
            for r in range(runs):
                for side in sides:
                    cpu_now = _cpu_now if side == "ray" else time.process_time
                    if side == "loop":
                        _loop_features(model, warm, opts, batch_size)
                        t0, c0 = time.perf_counter(), cpu_now()
                        img, txt = _loop_features(model, url, opts, batch_size)
                    else:
                        enc = encoders[side]
                        if side != "ray":
                            compute_shard_features(model, warm, opts, batch_size, progress=False, encoder=enc)
                        t0, c0 = time.perf_counter(), cpu_now()
                        arr = compute_shard_features(model, url, opts, batch_size, progress=False, encoder=enc)
                        img, txt = arr["image"], arr["text"]
                    dt, cpu = time.perf_counter() - t0, cpu_now() - c0
                    n = len(img)
                    rates[side].append(n / dt)
                    cpu_ms[side].append(cpu / n * 1e3)
                    feats.setdefault(side, (img, txt))
                    torch.set_num_threads(default_threads)
                    bar.update(1)
                    say(f"run {r + 1}/{runs} {side}: {n / dt:.1f} images/s (load {os.getloadavg()[0]:.2f})")
        finally:
            bar.close()
            if "ray" in encoders:
                encoders["ray"].close()
            if started_ray:
                ray.shutdown()
    med = {s: round(statistics.median(v), 2) for s, v in rates.items()}
    diff = {}
    if "loop" in feats:
        ref = feats["loop"]
        diff = {s: float(max(np.abs(f[0] - ref[0]).max(), np.abs(f[1] - ref[1]).max()))
                for s, f in feats.items() if s != "loop"}
    return {
        "images": n, "runs": runs, "workers": workers, "batch_size": batch_size,
        "torch_default_threads": default_threads, "model": pipe.model.vision.timm_name if pipe.model.vision else
        pipe.model.family, "image_size": pipe.model.image_size,
        "images_per_s": med,
        "cpu_ms_per_image": {s: round(statistics.median(v), 1) for s, v in cpu_ms.items()},
        "runs_images_per_s": {s: [round(x, 2) for x in v] for s, v in rates.items()},
        "ratios": {f"{s}/loop": round(med[s] / med["loop"], 3) for s in sides if s != "loop" and "loop" in med},
        "max_abs_diff": diff, "ray_startup_s": None if ray_startup is None else round(ray_startup, 2),
        "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def format_table(r: dict) -> str:
    """The result as text lines (images/s, ratio to the loop, max |diff| per side)."""
    lines = [f"{r['images']} images, {r['model']} @ {r['image_size']} px, median of {r['runs']} run(s); "
             f"load {r['load_before'][0]} -> {r['load_after'][0]}"]
    for s, v in r["images_per_s"].items():
        ratio = r["ratios"].get(f"{s}/loop")
        extra = f"  ratio {ratio:.2f}  max|diff| {r['max_abs_diff'][s]:.1e}" if ratio is not None else ""
        lines.append(f"  {s:14s} {v:7.2f} images/s  {r['cpu_ms_per_image'][s]:6.1f} CPU ms/image{extra}")
    if r["ray_startup_s"] is not None:
        lines.append(f"  ray start-up (Ray + {r['workers']} actors with the model): {r['ray_startup_s']} s, "
                     "not in its images/s")
    return "\n".join(lines)
