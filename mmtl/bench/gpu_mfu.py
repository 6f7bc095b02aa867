"""GPU throughput and MFU of the open_clip ViT-B-16 contrastive recipe (bf16), through ``mmtl run`` and a plain
torch loop on the same model and batch size. Prepared for a machine with one NVIDIA GPU; NOT RUN in this
project so far (no GPU was lent to the session that wrote it, issue 19).

``python -m mmtl.bench.gpu_mfu [--out DIR] [--micro-batch 256] [--steps 80] [--samples 24576]`` then:

1. writes ``samples`` synthetic 224-px JPEG/caption pairs into shards under ``DIR/shards``
   (:func:`mmtl.bench.ingest.write_bench_shards`);
2. writes ``DIR/pipeline.yaml`` (:func:`gpu_pipeline`): family open_clip, ``arch: ViT-B-16`` (random init: no
   download), contrastive ``full`` strategy, 1 GPU worker, ZeRO-2, bf16, ``micro_batch`` per step, ``steps``
   steps, no evaluation, no model logging; runs ``mmtl run DIR/pipeline.yaml`` (a subprocess, its own local
   Ray) and reads the run's ``summary.json``: samples/s over the whole training (``steps * batch /
   train/wall_s``, the first steps included) and at the last step (``train/samples_per_s``);
3. runs a plain torch loop in this process: the same model (``build_model``), fp32 weights with
   ``torch.autocast(bfloat16)``, fused AdamW, mmtl's contrastive loss, random batches already on the GPU
   (``warmup`` steps untimed, then ``steps`` timed with ``torch.cuda.synchronize``);
4. model FLOPs per step from the architecture: ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
   backward of the contrastive module on one micro-batch (matmuls, convolutions, attention); MFU = FLOPs per
   step / step time / the GPU's peak dense bf16 FLOP/s (:data:`PEAK_BF16`, by device name; ``--peak-tflops``
   overrides).

Prints one JSON object: ``mmtl`` and ``torch`` (samples/s, step s, MFU), ``mmtl/torch`` (throughput ratio),
``flops_per_step``, ``peak_flops``, ``device``. ``--dry-run`` only writes the pipeline and counts FLOPs (works
on CPU with ``--tiny``). ``--tiny`` without ``--dry-run`` runs every step on CPU with the tiny open_clip model (1 CPU
per worker, no GPU): a smoke test of the whole script, checked on 2026-11-30 against the current code
(``--tiny --micro-batch 4 --steps 3 --warmup 1 --samples 64``: ~7 min on the shared 2-core machine, rc 0). Budget on an H200: ~2 min of shard writing on 16 cores, ~1-2 min for ``mmtl run``
(Ray start, worker start, 80 steps), ~1 min for the torch loop.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

# peak dense bf16 tensor-core FLOP/s by device-name fragment (vendor data sheets, without sparsity)
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12}


def peak_flops(device_name: str, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of ``device_name`` (first fragment of :data:`PEAK_BF16` it contains), or the
    override; None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    for frag, peak in PEAK_BF16.items():
        if frag in device_name:
            return peak
    return None


def gpu_model_config(tiny: bool = False) -> dict:
    """open_clip ViT-B-16 (224 px, context 77, embed 512, random init); ``tiny``: the test-size open_clip."""
    if tiny:
        from mmtl.models import tiny_open_clip_config

        return tiny_open_clip_config().model_dump(mode="json")
    return {"family": "open_clip", "arch": "ViT-B-16", "embed_dim": 512, "image_size": 224, "context_length": 77}


def gpu_pipeline(shards: str, runs_root: str, micro_batch: int, steps: int, tiny: bool = False) -> dict:
    """The ``mmtl run`` pipeline of the GPU check (see the module docstring)."""
    return {
        "data": {"train": shards, "decode_cpus": 1.0},
        "model": gpu_model_config(tiny),
        "strategy": {"kind": "full"},
        "train": {"num_workers": 1, "use_gpu": not tiny, "gpus_per_worker": 1.0, "cpus_per_worker": 1.0 if tiny else 4.0,
                  "zero_stage": 2, "precision": "bf16", "micro_batch_size": micro_batch, "max_steps": steps,
                  "checkpoint_every": steps, "log_every": 10, "lr": 1e-4, "schedule": "constant",
                  "warmup_steps": 0, "name": "gpu-mfu", "runs_root": runs_root},
        "eval": {"sets": [], "before_training": False},
        "tracking": {"log_model": False},
    }


def _batch(model_cfg, micro_batch: int, device):
    import torch

    s, L = model_cfg.image_size, model_cfg.context_length
    ids = torch.randint(1, 40000, (micro_batch, L), device=device)
    return {"image": torch.randn(micro_batch, 3, s, s, device=device), "input_ids": ids,
            "attention_mask": torch.ones(micro_batch, L, dtype=torch.long, device=device)}


def flops_per_step(pipe, micro_batch: int, device: str = "cpu") -> int:
    """Model FLOPs of one training step (forward + backward of the contrastive module on one micro-batch),
    counted by ``FlopCounterMode`` from the architecture's ops."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmtl.models import build_model
    from mmtl.train.step import ContrastiveModule

    module = ContrastiveModule(build_model(pipe.model), pipe.train.loss).to(device)
    b = _batch(pipe.model, micro_batch, device)
    counter = FlopCounterMode(display=False)
    with counter:
        img, txt, scale = module(**b)
        module.loss(img, txt, scale).backward()
    return int(counter.get_total_flops())


def torch_loop(pipe, micro_batch: int, steps: int, warmup: int, device: str = "cuda") -> dict:
    """Plain torch: fp32 weights, bf16 autocast, fused AdamW, mmtl's contrastive loss, batches on device."""
    import torch

    from mmtl.models import build_model
    from mmtl.train.step import ContrastiveModule

    module = ContrastiveModule(build_model(pipe.model), pipe.train.loss).to(device).train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=pipe.train.lr,
                            fused=device == "cuda")
    batches = [_batch(pipe.model, micro_batch, device) for _ in range(4)]
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            img, txt, scale = module(**batches[i % len(batches)])
            loss = module.loss(img.float(), txt.float(), scale.float())
        loss.backward()
        if pipe.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), pipe.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"step_s": step, "samples_per_s": micro_batch / step}


def run_mmtl(yaml_path: Path, run_dir: Path, timeout_s: int) -> dict:
    """``mmtl run`` as a subprocess; samples/s from its ``summary.json``."""
    t0 = time.perf_counter()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    script = Path(sys.executable).parent / "mmtl"  # the console script next to this interpreter
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "from mmtl.cli import main; main()"]
    proc = subprocess.run(cmd + ["run", str(yaml_path)], env=env, timeout=timeout_s, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    summaries = sorted(run_dir.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not summaries:
        raise RuntimeError(f"mmtl run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {"summary": json.loads(summaries[-1].read_text()), "wall_s": wall, "stderr_tail": proc.stderr[-1500:]}


def _train_metrics(summary: dict) -> dict:
    """The final ``train/*`` metrics of the run (``summary["metrics"]``; other places as a fallback)."""
    for key in ("metrics", "train", "final_train", "train_metrics"):
        if isinstance(summary.get(key), dict) and summary[key]:
            return {k: v for k, v in summary[key].items() if str(k).startswith("train/")}
    return {k: v for k, v in summary.items() if str(k).startswith("train/")}


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmtl.bench.gpu_mfu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/gpu-mfu")
    ap.add_argument("--micro-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps of the torch loop")
    ap.add_argument("--samples", type=int, default=24576, help="synthetic pairs (>= steps * micro-batch / 1)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: by name)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds for `mmtl run`")
    ap.add_argument("--skip-mmtl", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="write the pipeline and count FLOPs only")
    ap.add_argument("--tiny", action="store_true", help="tiny open_clip model (smoke test, e.g. on CPU)")
    a = ap.parse_args(argv)

    import torch
    import yaml

    from mmtl.bench.ingest import write_bench_shards
    from mmtl.config import build_pipeline

    def say(m: str) -> None:
        print(f"[gpu-mfu] {m}", file=sys.stderr, flush=True)
    out = Path(a.out).resolve()
    shards = out / "shards"
    raw = gpu_pipeline(str(shards), str(out / "runs"), a.micro_batch, a.steps, a.tiny)
    pipe = build_pipeline(raw)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    flops = flops_per_step(pipe, a.micro_batch, device)
    peak = peak_flops(name, a.peak_tflops)
    res: dict = {"device": name, "arch": raw["model"].get("arch") or "tiny open_clip", "micro_batch": a.micro_batch,
                 "steps": a.steps, "flops_per_step": flops, "peak_flops": peak, "ran": not a.dry_run}
    say(f"{name}: {flops / 1e12:.2f} TFLOP per step of {a.micro_batch}; peak {peak}")

    def mfu(step_s: float) -> Optional[float]:
        return round(flops / step_s / peak, 4) if peak else None

    if not a.dry_run:
        if not a.skip_mmtl:
            if not any(shards.glob("*.tar")):
                t0 = time.perf_counter()
                write_bench_shards(str(shards), a.samples, shards=32)
                say(f"wrote {a.samples} pairs in {time.perf_counter() - t0:.0f} s")
            say("mmtl run ...")
            r = run_mmtl(out / "pipeline.yaml", out / "runs", a.timeout)
            tm = _train_metrics(r["summary"])
            steps_done = a.steps
            gb = a.micro_batch
            overall = steps_done * gb / float(tm["train/wall_s"]) if tm.get("train/wall_s") else None
            last = tm.get("train/samples_per_s")
            res["mmtl"] = {"samples_per_s_overall": overall, "samples_per_s_last_step": last,
                           "step_s": gb / last if last else None, "mfu": mfu(gb / last) if last else None,
                           "mfu_overall": mfu(gb / overall) if overall else None, "run_wall_s": round(r["wall_s"], 1)}
            say(f"mmtl: {res['mmtl']}")
        if not a.skip_torch:
            t = torch_loop(pipe, a.micro_batch, a.steps, a.warmup, device)
            res["torch"] = {**t, "mfu": mfu(t["step_s"])}
            say(f"torch: {res['torch']}")
        if "mmtl" in res and "torch" in res and res["mmtl"]["samples_per_s_last_step"]:
            res["mmtl/torch"] = round(res["mmtl"]["samples_per_s_last_step"] / res["torch"]["samples_per_s"], 4)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
