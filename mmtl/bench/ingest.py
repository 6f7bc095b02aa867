"""Ingest benchmark (not a test): samples/s of mmtl's Ray Data ingest vs plain webdataset + torch DataLoader.

Same shards, same transform and tokenizer objects (tiny two-tower config at ``image_size``, train mode), same
process count. mmtl: ``build_image_dataset(pipe, urls, epochs=1, train=True, processes=processes,
rows_per_block=batch_size)`` read with ``iter_torch_batches`` (Ray started once, ``startup_s`` apart).
Baseline: ``WebDataset(urls).shuffle(buf).decode("pil").to_tuple(img, txt).map(transform + tokenizer)`` in a
``DataLoader(num_workers=processes)``. One warm-up run per side, then ``runs`` interleaved runs per side so
that outside load hits both alike; medians, ``ratio`` = mmtl / baseline in the steady state (the samples
between 10% and 90% of a run over the time between them), ``ratio_total`` over whole runs. A whole run also
includes building the pipeline and starting its tasks/workers (reported apart as ``first_batch_s``), which
both sides pay once per epoch in real use.
"""
from __future__ import annotations

import io
import os
import random
import statistics
import tempfile
import time
from typing import Callable, Optional

import numpy as np

_COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (230, 210, 20),
           "purple": (140, 40, 170), "orange": (245, 140, 10), "black": (15, 15, 15), "white": (245, 245, 245),
           "pink": (240, 130, 180), "brown": (120, 70, 30)}
_SHAPES = ("circle", "square", "triangle", "stripe", "ring")
_BACKS = ("a noisy grey", "a grainy blue", "a speckled green", "a blurry brown", "a dark")


def synthetic_image(i: int, size: int = 224, quality: int = 90) -> tuple[bytes, str]:
    """A JPEG (``size`` px) of 2-4 coloured shapes on a smooth noisy background, and its caption (~25 KB at
    224 px, q=90: close to photo JPEGs of that size in codec cost)."""
    from PIL import Image, ImageDraw

    r, rng = random.Random(i), np.random.default_rng(i)
    back = r.randrange(len(_BACKS))
    img = Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    d = ImageDraw.Draw(img)
    names = []
    for _ in range(r.randint(2, 4)):
        color, shape = r.choice(list(_COLORS)), r.choice(_SHAPES)
        names.append(f"{color} {shape}")
        w = r.randrange(size // 8, size // 3)
        x, y = r.randrange(0, size - w), r.randrange(0, size - w)
        fill, box = _COLORS[color], (x, y, x + w, y + w)
        {"circle": lambda: d.ellipse(box, fill=fill), "square": lambda: d.rectangle(box, fill=fill),
         "triangle": lambda: d.polygon([(x, y + w), (x + w // 2, y), (x + w, y + w)], fill=fill),
         "stripe": lambda: d.rectangle((0, y, size, y + w // 4), fill=fill),
         "ring": lambda: d.ellipse(box, outline=fill, width=max(2, w // 8))}[shape]()
    arr = np.asarray(img).astype(np.int16) + rng.integers(-14, 15, (size, size, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    caption = f"a {names[0]}" + "".join(f", a {n}" for n in names[1:-1]) + \
        (f" and a {names[-1]}" if len(names) > 1 else "") + f" on {_BACKS[back]} background"
    return buf.getvalue(), caption


def write_bench_shards(out_dir: str, samples: int, shards: int = 8, image_px: int = 224) -> list[str]:
    """Write ``samples`` synthetic JPEG/caption pairs into ``shards`` shards (ShardWriter); returns the paths."""
    from mmtl.data.build import ShardWriter

    per = max(1, -(-samples // max(1, shards)))
    with ShardWriter(out_dir, prefix="bench", max_samples_per_shard=per) as w:
        for i in range(samples):
            data, cap = synthetic_image(i, image_px)
            w.write(f"{i:08d}", data, "jpg", cap, {"width": image_px, "height": image_px})
    return [str(p) for p in w.shards]


def _cpu_now() -> float:
    """CPU s of this process, reaped children and live descendants (Ray's gcs/raylet/workers, DataLoader workers)."""
    import psutil

    t, total = os.times(), 0.0
    for c in psutil.Process().children(recursive=True):
        try:
            total += sum(c.cpu_times()[:2])
        except psutil.Error:
            pass
    return total + t.user + t.system + t.children_user + t.children_system


class _Clock:
    """Per-run timestamps: time to the first batch (start-up) and the steady-state window (from the batch that
    crosses ``lo`` of the expected samples to the one that crosses ``hi``), with CPU (this process and its
    descendants) read at the window's ends only."""

    def __init__(self, expected: int, lo: float = 0.1, hi: float = 0.9):
        self.expected, self.lo, self.hi = max(1, expected), lo, hi
        self.n, self.first = 0, None
        self.win: dict = {}
        self.c0, self.t0 = _cpu_now(), time.perf_counter()

    def batch(self, k: int) -> None:
        self.n += k
        now = time.perf_counter()
        if self.first is None:
            self.first = now - self.t0
        for name, frac in (("lo", self.lo), ("hi", self.hi)):
            if name not in self.win and self.n >= frac * self.expected:
                self.win[name] = (self.n, now, _cpu_now())

    def result(self) -> dict:
        dt, cpu = time.perf_counter() - self.t0, _cpu_now() - self.c0
        out = {"n": self.n, "wall_s": dt, "cpu_s": cpu, "startup_s": self.first or dt, "steady_per_s": None,
               "steady_cpu_ms": None}
        if "lo" in self.win and "hi" in self.win and self.win["hi"][0] > self.win["lo"][0]:
            (n0, t0, c0), (n1, t1, c1) = self.win["lo"], self.win["hi"]
            out["steady_per_s"] = (n1 - n0) / max(t1 - t0, 1e-9)
            out["steady_cpu_ms"] = (c1 - c0) / (n1 - n0) * 1e3
        return out


def _run_mmtl(pipe, urls: list[str], batch_size: int, processes: int, expected: int) -> dict:
    from mmtl.data.stream import build_image_dataset

    clock = _Clock(expected)
    ds = build_image_dataset(pipe, urls, epochs=1, train=True, processes=processes, rows_per_block=batch_size)
    for b in ds.iter_torch_batches(batch_size=batch_size):
        clock.batch(int(b["image"].shape[0]))
    return clock.result()


class _ToTensors:  # (PIL image, caption) -> (image, input_ids (L,), attention_mask (L,)); a class: picklable
    def __init__(self, transform: Callable, tokenize: Callable):
        self.transform, self.tokenize = transform, tokenize

    def __call__(self, sample):
        tok = self.tokenize([sample[1]])
        return self.transform(sample[0]), tok["input_ids"][0], tok["attention_mask"][0]


def _run_baseline(urls: list[str], transform, tokenize, batch_size: int, processes: int,
                  buffer: int, expected: int) -> dict:
    import torch
    import webdataset as wds

    clock = _Clock(expected)
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False).shuffle(buffer).decode("pil")
          .to_tuple("jpg;jpeg;png;webp", "txt").map(_ToTensors(transform, tokenize)))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=processes)
    for img, _ids, _mask in loader:
        clock.batch(int(img.shape[0]))
    del loader
    return clock.result()


def _stage_costs(urls: list[str], pipe, transform, tokenize, pipe_draft=None, n: int = 200) -> dict[str, float]:
    """Milliseconds per sample of each stage in this process, single-threaded torch, best of 3 (a lower bound
    that outside load disturbs less). Samples come from the first shard(s)."""
    import itertools
    import tarfile

    import torch
    from PIL import Image

    from mmtl.data import samples, shardio, stream
    from mmtl.data.imagebatch import ImageBatcher

    raw, caps = [], []
    for url in urls[:4]:
        with tarfile.open(url) as tar:
            for m in (m for m in tar if m.isfile()):
                if m.name.endswith((".jpg", ".jpeg", ".png", ".webp")) and len(raw) < n:
                    raw.append(tar.extractfile(m).read())
                elif m.name.endswith(".txt") and len(caps) < n:
                    caps.append(tar.extractfile(m).read().decode("utf-8", "replace"))
    opts = stream.clean_options(pipe)  # as the stream: truncation is flagged by the batched tokenizer call
    out: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def timed(name: str, fn: Callable[[], list], per: Optional[int] = None) -> list:
            best, r = float("inf"), []
            for _ in range(3):
                t0 = time.perf_counter()
                r = fn()
                best = min(best, time.perf_counter() - t0)
            out[name] = round(best / max(1, len(r) if per is None else per) * 1e3, 3)
            return r

        timed("pil_decode_rgb", lambda: [Image.open(io.BytesIO(d)).convert("RGB") for d in raw])
        imgs = timed("mmtl_decode_image", lambda: [samples.decode_image(d, pipe.data.max_image_pixels) for d in raw])
        timed("transform", lambda: [transform(im) for im in imgs])

        def batched(images: list) -> list:  # the stream's path: geometry per image, ToTensor + Normalize per 64
            b, out = ImageBatcher(transform), []
            for i in range(0, len(images), 64):
                for im in images[i:i + 64]:
                    b.add(im)
                out.extend(b.flush())
            return out

        timed("transform_batched_64", lambda: batched(imgs))
        if pipe_draft is not None:
            px = stream.draft_px(pipe_draft)
            small = timed("mmtl_decode_image_draft",
                          lambda: [samples.decode_image(d, pipe.data.max_image_pixels, px) for d in raw])
            timed("transform_after_draft", lambda: [transform(im) for im in small])
            timed("transform_batched_64_after_draft", lambda: batched(small))
        timed("tokenize_per_sample", lambda: [tokenize([c]) for c in caps])
        timed("tokenize_batched_64", lambda: [stream.tokenize_flagged(tokenize, caps[i:i + 64], pipe.model.context_length)
                                             for i in range(0, len(caps), 64)], len(caps))
        timed("mmtl_read_clean", lambda: list(itertools.islice(shardio.iter_samples(urls, opts), n)))
    finally:
        torch.set_num_threads(threads)
    return out


def alt_side(draft: float) -> str:
    """Name of the second mmtl side, run with ``data.jpeg_draft = draft``: ``mmtl_nodraft`` (0: full JPEG decodes)
    or ``mmtl_draft``."""
    return "mmtl_nodraft" if not draft else "mmtl_draft"


def _eta(t0: float, done: int, total: int) -> str:
    el = time.perf_counter() - t0
    return f" ({el:.0f} s elapsed, ETA {el / max(1, done) * (total - done):.0f} s)"


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0f}"


def _limits(r: dict) -> str:
    c, p = r["per_sample_ms"], r["processes"]
    base = c["pil_decode_rgb"] + c["transform"] + c["tokenize_per_sample"]
    mine = c["mmtl_read_clean"] + c["transform_batched_64"] + c["tokenize_batched_64"]
    return (
        f"Both sides are CPU-bound on {p} processes. Work per sample in one process, full decodes: baseline "
        f"~{base:.2f} ms (PIL decode {c['pil_decode_rgb']:.2f} + transform {c['transform']:.2f} + per-sample "
        f"tokenize {c['tokenize_per_sample']:.2f}); mmtl ~{mine:.2f} ms (tar scan + decode by magic bytes + RGB/EXIF "
        f"+ caption cleaning {c['mmtl_read_clean']:.2f} + geometry per image with ToTensor/Normalize per 64 "
        f"{c['transform_batched_64']:.2f} + batched tokenize that also flags truncated captions "
        f"{c['tokenize_batched_64']:.2f}): ceilings of ~{p * 1e3 / base:.0f} and ~{p * 1e3 / mine:.0f} "
        f"samples/s. On top, each side shares the cores with its consumer (DataLoader main process: collation, "
        "unpickling; Ray: the driver's streaming executor, iter_torch_batches, raylet/GCS, object-store copies of "
        "model-ready tensors); cpu_ms_per_sample counts all of it. The JPEG decode and the bicubic crop of the "
        "full 224-px image dominate: JPEG draft decoding (data.jpeg_draft, on by default at 1.5: libjpeg DCT "
        "downscale to >= jpeg_draft x image_size before the transform; side mmtl; side mmtl_nodraft decodes in "
        "full) cuts both (training stream only; evaluation and frozen features always decode in full); a training "
        "comparison (19 + 19 runs) found no metric moved beyond run-to-run noise (docs/benchmarks.md). Load average {r['load_avg']['before']} -> {r['load_avg']['after']} on {os.cpu_count()} cores: "
        "outside load slows both sides; runs are interleaved so that it hits both alike.")


# ``mmtl bench ingest`` settings: the default takes ~2-3 min on 2 shared cores; ``--full`` is the long version.
PRESETS = {"default": {"samples": 10000, "runs": 3}, "full": {"samples": 30000, "runs": 5}}


def bench_ingest(path: str | None = None, samples: int = 10000, runs: int = 3, image_size: int = 64,
                 processes: int = 2, batch_size: int = 64, warmup: bool = True, worker_niceness: Optional[int] = 0,
                 draft: Optional[float] = 0.0, say: Optional[Callable[[str], None]] = None) -> dict:
    """Measure samples/s of ``build_image_dataset`` against webdataset + DataLoader on the same shards.

    Args:
        path: shard spec; None writes ``samples`` synthetic 224-px JPEG pairs into 8 shards in a temp folder.
        runs: measured runs per side (median reported), at least 1; ``warmup``: one unmeasured run per side first
            (the second mmtl side reuses the Ray workers that ``mmtl``'s warm-up warmed).
        processes: DataLoader workers = Ray CPUs when this call starts Ray (a running Ray, e.g. pytest's
            ``ray_local``, is used as is) = concurrent mmtl tasks. ``batch_size``: both sides (= rows_per_block).
        draft: also measure mmtl with ``data.jpeg_draft = draft`` (:func:`alt_side`: side ``mmtl_nodraft`` for
            0, the default: full JPEG decodes, or ``mmtl_draft``); None skips that side. Side ``mmtl`` runs the
            pipeline defaults (``data.jpeg_draft`` 1.5: draft decodes).
        worker_niceness: of Ray workers when this call starts Ray (Ray's default, 15, starves them under
            outside load; DataLoader workers inherit the caller's); None keeps Ray's.
        say: progress lines (e.g. ``print``); None is quiet.

    Returns: ``ratios`` {"mmtl/baseline" (steady state), "mmtl/baseline_total" (whole runs), and with ``draft``
        the same for the second mmtl side, e.g. "mmtl_nodraft/baseline"}, ``samples_per_s``
        {"mmtl", "baseline"} (steady state: samples between 10% and 90% of a run over the time between them,
        median over runs), ``samples_per_s_total`` (whole runs, start-up included), ``ratio`` / ``ratio_total``
        (the same as in ``ratios``), ``samples`` / ``baseline_samples`` (per run), ``startup_s`` (Ray start-up;
        0.0 if Ray was up), ``first_batch_s`` (per side: pipeline start-up, the time to the first batch),
        ``times_s`` (every run), ``warmup_s``, ``cpu_ms_per_sample`` (CPU of this process + descendants per
        sample in the steady window, median), ``cpu_ms_per_sample_total`` (whole runs), ``per_sample_ms``
        (CPU ms per sample of each stage in one process), ``load_avg`` {"before", "after"} (1-min), ``limits``
        (in words), settings.
    """
    import ray
    import torch

    from mmtl.config import build_pipeline
    from mmtl.data import stream
    from mmtl.data.shardio import resolve_shards
    from mmtl.data.stream import count_samples
    from mmtl.models import build_image_transform, build_tokenizer, tiny_two_tower_config
    from mmtl.runtime import init_ray

    say = say or (lambda m: None)
    runs = max(1, int(runs))
    load_before = os.getloadavg()[0]
    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="mmtl-bench-ingest-")
        say(f"writing {samples} synthetic 224-px JPEG pairs into 8 shards under {tmp.name}")
        write_bench_shards(tmp.name, samples, shards=8)
        path = tmp.name
    started_here, threads = False, torch.get_num_threads()
    try:
        urls = resolve_shards(path)
        model_json = tiny_two_tower_config(image_size=image_size).model_dump(mode="json")
        pipe = build_pipeline({"data": {"train": path}, "model": model_json})
        pipe_alt = build_pipeline({"data": {"train": path, "jpeg_draft": draft}, "model": model_json}) \
            if draft is not None else None
        alt = alt_side(draft) if pipe_alt is not None else None
        transform, tokenize = build_image_transform(pipe.model, True), build_tokenizer(pipe.model)
        startup_s = 0.0
        if not ray.is_initialized():
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            old = os.environ.get("RAY_worker_niceness")
            if worker_niceness is not None:
                os.environ["RAY_worker_niceness"] = str(int(worker_niceness))
            t0 = time.perf_counter()
            try:
                init_ray("local", num_cpus=processes)
            finally:  # only for the workers of this Ray instance
                if old is None:
                    os.environ.pop("RAY_worker_niceness", None)
                else:
                    os.environ["RAY_worker_niceness"] = old
            startup_s, started_here = time.perf_counter() - t0, True
        say(f"Ray up in {startup_s:.1f} s; {len(urls)} shards, image_size={image_size}, processes={processes}, "
            f"batch_size={batch_size}")
        expected = count_samples(urls)
        sides = {"baseline": lambda: _run_baseline(urls, transform, tokenize, batch_size, processes,
                                                   pipe.data.shuffle_buffer, expected),
                 "mmtl": lambda: _run_mmtl(pipe, urls, batch_size, processes, expected)}
        if alt is not None:
            sides[alt] = lambda: _run_mmtl(pipe_alt, urls, batch_size, processes, expected)
        torch.set_num_threads(1)  # the driver / DataLoader main process only batches: keep both sides alike
        warm: dict[str, float] = {}
        # warm-up: one unmeasured run per pipeline kind (the second mmtl side runs on the Ray workers mmtl warmed)
        warm_sides = [k for k in sides if k != alt] if warmup else []
        t_runs, total_runs, done = time.perf_counter(), runs * len(sides) + len(warm_sides), 0
        for k, fn in ((k, sides[k]) for k in warm_sides):
            o = fn()
            if k == "mmtl":  # the exact count of clean samples (count_samples is an upper bound: rejects)
                expected = o["n"]
            warm[k] = round(o["wall_s"], 2)
            done += 1
            say(f"warm-up {k}: {o['n']} samples in {o['wall_s']:.2f} s{_eta(t_runs, done, total_runs)}")
        rec: dict[str, list[dict]] = {k: [] for k in sides}
        for i in range(runs):
            for k, fn in sides.items():
                o = fn()
                rec[k].append(o)
                done += 1
                say(f"run {i + 1}/{runs} {k}: {o['n']} samples in {o['wall_s']:.2f} s = "
                    f"{o['n'] / o['wall_s']:.0f} samples/s overall, {_fmt(o['steady_per_s'])} steady, first batch "
                    f"after {o['startup_s']:.2f} s{_eta(t_runs, done, total_runs)}")

        def med(k: str, key: str, scale: float = 1.0, nd: int = 1):
            xs = [o[key] for o in rec[k] if o[key] is not None]
            return round(statistics.median(xs) * scale, nd) if xs else None

        steady = {k: med(k, "steady_per_s") for k in sides}
        total = {k: round(statistics.median(o["n"] / o["wall_s"] for o in v), 1) for k, v in rec.items()}
        ratios = {}
        for k in [s for s in sides if s != "baseline"]:
            ratios[f"{k}/baseline"] = round(steady[k] / steady["baseline"], 3) if steady[k] and steady["baseline"] \
                else None
            ratios[f"{k}/baseline_total"] = round(total[k] / max(total["baseline"], 1e-9), 3)
        ratio, ratio_total = ratios["mmtl/baseline"], ratios["mmtl/baseline_total"]
        result = {
            "ratios": ratios, "jpeg_draft": {"mmtl": pipe.data.jpeg_draft, **({alt: draft} if alt else {})},
            "samples_per_s": steady, "samples_per_s_total": total,
            "ratio": ratio, "ratio_total": ratio_total,
            "runs": runs, "samples": rec["mmtl"][-1]["n"], "baseline_samples": rec["baseline"][-1]["n"],
            "image_size": image_size, "processes": processes, "batch_size": batch_size, "shards": len(urls),
            "startup_s": round(startup_s, 2),
            "first_batch_s": {k: med(k, "startup_s", nd=3) for k in sides},
            "times_s": {k: [round(o["wall_s"], 3) for o in v] for k, v in rec.items()}, "warmup_s": warm,
            "cpu_ms_per_sample": {k: med(k, "steady_cpu_ms", nd=3) for k in sides},
            "cpu_ms_per_sample_total": {k: round(statistics.median(o["cpu_s"] / max(1, o["n"]) for o in v) * 1e3, 3)
                                        for k, v in rec.items()},
            "steady_window": "samples between 10% and 90% of the run (start-up and drain excluded)",
            "per_sample_ms": _stage_costs(urls, pipe, transform, tokenize,
                                          next((p for p in (pipe, pipe_alt) if p is not None and stream.draft_px(p)),
                                               None)),
        }
        result["load_avg"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
        result["limits"] = _limits(result)
        return result
    finally:
        torch.set_num_threads(threads)
        if started_here:
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
