"""Ray Data knobs against mmtl's ingest wall gap with full JPEG decodes (issue 19): variants of the mmtl side of
``mmtl bench ingest`` interleaved with its webdataset + DataLoader baseline on the same synthetic shards.

``python -m mmtl.bench.ingest_knobs SAMPLES RUNS VARIANTS`` (e.g. ``10000 3 mmtl,pf4,c3,nobars``), variants:
``mmtl`` (as the benchmark: 2 tasks, ``prefetch_batches=1``, full decodes), ``pf4`` (``iter_torch_batches(
prefetch_batches=4)``), ``c3`` / ``c4`` (3 / 4 concurrent read tasks on 2 CPUs), ``nobars`` (Ray Data progress
bars off), ``c3_nobars``, ``draft`` / ``draft_c3`` (``data.jpeg_draft: 1.5``). Prints the medians (steady
samples/s, CPU ms per sample, whole-run samples/s) and the steady ratios to the baseline as one JSON object.
Shards are written into a new temporary folder (removed at the end).
"""
import json
import os
import shutil
import statistics
import sys
import tempfile

import ray
import torch

from mmtl.bench import ingest as B
from mmtl.config import build_pipeline
from mmtl.data.shardio import resolve_shards
from mmtl.data.stream import build_image_dataset, count_samples
from mmtl.models import build_image_transform, build_tokenizer, tiny_two_tower_config
from mmtl.runtime import init_ray


def main() -> None:
    """Run the variants named on the command line (see the module docstring); print the JSON result."""
    samples, runs = int(sys.argv[1]), int(sys.argv[2])
    variants = sys.argv[3].split(",")

    def say(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    tmp = tempfile.mkdtemp(prefix="mmtl-ingest-knobs-")
    B.write_bench_shards(tmp, samples, shards=8)
    urls = resolve_shards(tmp)
    mj = tiny_two_tower_config(image_size=64).model_dump(mode="json")
    pipe = build_pipeline({"data": {"train": tmp, "jpeg_draft": None}, "model": mj})
    pipe_d = build_pipeline({"data": {"train": tmp, "jpeg_draft": 1.5}, "model": mj})
    tf, tok = build_image_transform(pipe.model, True), build_tokenizer(pipe.model)
    os.environ["RAY_worker_niceness"] = "0"
    init_ray("local", num_cpus=2)
    expected = count_samples(urls)

    def mmtl(p=pipe, processes=2, prefetch=1, bars=True):
        ctx = ray.data.DataContext.get_current()
        old = ctx.enable_progress_bars
        ctx.enable_progress_bars = bars
        try:
            clock = B._Clock(expected)
            ds = build_image_dataset(p, urls, epochs=1, train=True, processes=processes, rows_per_block=64)
            for b in ds.iter_torch_batches(batch_size=64, prefetch_batches=prefetch):
                clock.batch(int(b["image"].shape[0]))
            return clock.result()
        finally:
            ctx.enable_progress_bars = old

    sides = {"baseline": lambda: B._run_baseline(urls, tf, tok, 64, 2, pipe.data.shuffle_buffer, expected),
             "mmtl": lambda: mmtl(), "pf4": lambda: mmtl(prefetch=4), "c3": lambda: mmtl(processes=3),
             "c4": lambda: mmtl(processes=4), "nobars": lambda: mmtl(bars=False), "draft": lambda: mmtl(pipe_d),
             "c3_nobars": lambda: mmtl(processes=3, bars=False), "draft_c3": lambda: mmtl(pipe_d, processes=3)}
    sides = {k: sides[k] for k in ["baseline"] + variants}
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    for k, fn in sides.items():
        fn()  # warm-up
    rec = {k: [] for k in sides}
    for i in range(runs):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for k in order:
            o = sides[k]()
            rec[k].append(o)
            say(f"run {i} {k:10s} steady {o['steady_per_s']:.0f}/s cpu {o['steady_cpu_ms']:.2f} ms/sample "
                f"whole {o['n'] / o['wall_s']:.0f}/s first {o['startup_s']:.2f} s load {os.getloadavg()[0]:.1f}")
    med = {k: {"steady": statistics.median(o["steady_per_s"] for o in v),
               "cpu_ms": statistics.median(o["steady_cpu_ms"] for o in v),
               "whole": statistics.median(o["n"] / o["wall_s"] for o in v)} for k, v in rec.items()}
    print(json.dumps({"median": med, "ratio_steady": {k: round(v["steady"] / med["baseline"]["steady"], 3) for k, v in med.items()},
                      "load": [load0, os.getloadavg()[0]], "samples": samples, "runs": runs}, indent=1))
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
