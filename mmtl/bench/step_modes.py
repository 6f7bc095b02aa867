"""Why ``mmtl bench step`` measured the in-process mmtl loop at 1.07x the bare DeepSpeed loop (issue 19): an A/B of
the bare loop with the towers in eval mode (as ``build_model`` leaves them: what the benchmark's torch and bare
sides ran before) and in train mode (what ``run_training`` sets, dropout and batch statistics on), and the mmtl
loop, on the benchmark's model and batches, interleaved with the order alternated.

``python -m mmtl.bench.step_modes [REPEATS]`` (default 4; ~3 min at load ~2, 12 min at load 15-75) prints one JSON
object: median wall and process-CPU seconds per step of each side and their ratios. Measured 2026-11-30 (load
10 -> 45): bare train / bare eval CPU 1.09, mmtl / bare eval 1.08, mmtl / bare train 0.99.
"""
import copy
import gc
import json
import os
import statistics
import sys

import torch

from mmtl.bench.step_loops import (
    _periods,
    _quiet_deepspeed,
    bench_model_config,
    bench_pipeline,
    make_batches,
    run_bare_ds,
    run_mmtl,
    single_process_group,
)
from mmtl.models import build_model
from mmtl.strategies import apply_strategy
from mmtl.train.loop import seed_everything, set_train_modes


def main() -> None:
    """Run the A/B (see the module docstring) and print its JSON result."""
    torch.set_num_threads(1)
    _quiet_deepspeed()
    steps, warmup, repeats = 10, 2, int(sys.argv[1]) if len(sys.argv) > 1 else 4
    cfg = bench_model_config()
    pipe = bench_pipeline(cfg, 2, 32, steps + warmup)
    batches = make_batches(cfg, steps + warmup, 32)
    seed_everything(0)
    m_eval = build_model(pipe.model)  # towers in eval mode, as build_model leaves them
    apply_strategy(m_eval, pipe.strategy, zero_stage=2)
    m_train = copy.deepcopy(m_eval)
    set_train_modes(m_train)
    print("eval-mode modules:", sum(not m.training for m in m_eval.modules()), file=sys.stderr)
    sides = {"bare_eval": lambda: run_bare_ds(pipe, copy.deepcopy(m_eval), batches),
             "bare_train": lambda: run_bare_ds(pipe, copy.deepcopy(m_train), batches),
             "mmtl": lambda: run_mmtl(pipe, copy.deepcopy(m_eval), batches)}
    res = {k: {"wall": [], "cpu": []} for k in sides}
    load0 = os.getloadavg()[0]
    with single_process_group():
        names = list(sides)
        for r in range(repeats):
            order = names if r % 2 == 0 else names[::-1]
            order = order[r // 2 % 3:] + order[:r // 2 % 3]
            for k in order:
                gc.collect()
                out = sides[k]()
                w, c = _periods(out["marks"], warmup)
                res[k]["wall"].append(statistics.fmean(w))
                res[k]["cpu"].append(statistics.fmean(c))
                print(f"r{r} {k:10s} wall {res[k]['wall'][-1] * 1e3:.0f} cpu {res[k]['cpu'][-1] * 1e3:.0f} ms/step, "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in res.items()}
    out = {"median": med, "load": [load0, os.getloadavg()[0]],
           "bare_train/bare_eval_cpu": med["bare_train"]["cpu"] / med["bare_eval"]["cpu"],
           "mmtl/bare_eval_cpu": med["mmtl"]["cpu"] / med["bare_eval"]["cpu"],
           "mmtl/bare_train_cpu": med["mmtl"]["cpu"] / med["bare_train"]["cpu"],
           "mmtl/bare_train_wall": med["mmtl"]["wall"] / med["bare_train"]["wall"],
           "mmtl/bare_eval_wall": med["mmtl"]["wall"] / med["bare_eval"]["wall"], "runs": res}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
