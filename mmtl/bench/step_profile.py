"""Profile of one training step: plain torch vs bare DeepSpeed (same model, batches, optimizer) on CPU.

``python -m mmtl.bench.step_profile [--zero 2] [--steps 3] [--tiny]`` runs a few warm-up steps of each side, then
profiles ``steps`` steps of each with ``torch.profiler`` (aten ops by self CPU time) and ``cProfile`` (Python
functions by cumulative time: where DeepSpeed's own code spends it), and prints the top rows of both, plus
the per-step difference of the top ops between the two sides (what DeepSpeed adds). The model and batches
are the step benchmark's (:mod:`mmtl.bench.step_loops`), one torch thread.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Callable, Optional

import torch


def _torch_stepper(pipe, model) -> Callable[[dict], None]:
    from mmtl.bench.step_loops import torch_stepper

    return torch_stepper(pipe, model)


def _ds_stepper(pipe, model) -> Callable[[dict], None]:
    from mmtl.train.loop import build_engine
    from mmtl.train.step import train_step

    engine = build_engine(pipe, model)
    return lambda b: train_step(engine, [b], pipe.train.nonfinite)


def profile_steps(zero_stage: int = 2, steps: int = 3, warmup: int = 3, micro_batch: int = 32, tiny: bool = False,
                  top: int = 15, say: Optional[Callable[[str], None]] = None) -> dict:
    """Per side (``torch``, ``bare_ds``): mean step ms, top aten ops by self CPU ms per step, top Python
    functions by cumulative ms per step (cProfile, separate pass). Returns a JSON-able dict."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    from mmtl.bench.step_loops import (_quiet_deepspeed, bench_model_config, bench_pipeline, build_bench_model,
                                       make_batches)
    from mmtl.models import tiny_two_tower_config
    from mmtl.train.loop import single_process_group

    say = say or (lambda m: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _quiet_deepspeed()
    cfg = tiny_two_tower_config() if tiny else bench_model_config()
    n = warmup + 2 * steps
    batches = make_batches(cfg, n, micro_batch)
    out: dict = {"zero_stage": zero_stage, "steps": steps, "micro_batch": micro_batch, "sides": {}}
    try:
        with single_process_group():
            pipe = bench_pipeline(cfg, zero_stage, micro_batch, n + 1)
            pristine = build_bench_model(pipe)
            _quiet_deepspeed()
            for side, make in (("torch", _torch_stepper), ("bare_ds", _ds_stepper)):
                step = make(pipe, copy.deepcopy(pristine))
                _quiet_deepspeed()
                for b in batches[:warmup]:
                    step(b)
                t0 = time.perf_counter()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for b in batches[warmup:warmup + steps]:
                        step(b)
                wall_prof = (time.perf_counter() - t0) / steps
                ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
                op_ms = {e.key: round(e.self_cpu_time_total / 1e3 / steps, 2) for e in ops[:top * 2]}
                pr = cProfile.Profile()
                t0 = time.perf_counter()
                pr.enable()
                for b in batches[warmup + steps:warmup + 2 * steps]:
                    step(b)
                pr.disable()
                wall = (time.perf_counter() - t0) / steps
                st = pstats.Stats(pr, stream=io.StringIO())
                funcs = []
                for (fname, line, fn), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
                    if "deepspeed" in fname or side == "torch" and "torch/optim" in fname:
                        funcs.append((ct, f"{fname.split('site-packages/')[-1]}:{line}({fn})"))
                funcs.sort(reverse=True)
                out["sides"][side] = {
                    "step_ms_profiled": round(wall_prof * 1e3, 1), "step_ms_cprofile": round(wall * 1e3, 1),
                    "top_ops_self_cpu_ms_per_step": dict(list(op_ms.items())[:top]),
                    "top_python_cum_ms_per_step": {name: round(ct / steps * 1e3, 1) for ct, name in funcs[:top]},
                    "_all_ops": op_ms,
                }
                say(f"{side}: {wall_prof * 1e3:.0f} ms/step under torch.profiler")
                del step
    finally:
        torch.set_num_threads(threads)
    a, b = out["sides"]["bare_ds"].pop("_all_ops"), out["sides"]["torch"].pop("_all_ops")
    diff = {k: round(a.get(k, 0.0) - b.get(k, 0.0), 2) for k in set(a) | set(b)}
    out["ds_minus_torch_self_cpu_ms_per_step"] = dict(sorted(diff.items(), key=lambda kv: -kv[1])[:top])
    return out


def main(argv: Optional[list[str]] = None) -> None:
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m mmtl.bench.step_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    r = profile_steps(a.zero, a.steps, a.warmup, a.micro_batch, a.tiny,
                      say=lambda m: print(f"[step profile] {m}", file=sys.stderr, flush=True))
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
