"""Step benchmark (not a test): step time of mmtl's training loop against a bare DeepSpeed loop driving the same
engine, and of that bare DeepSpeed loop against plain torch. ``mmtl bench step [--json]`` calls
:func:`bench_step`; ``python -m mmtl.bench.step [--json]`` runs it without the CLI.

Side by side in one run, per ZeRO stage, on the same model (same seed, same random init), the same pipeline
``train`` config and the same batches (synthetic images (B,3,H,W) + token ids (B,L), all tokens real):

- ``torch``: plain torch, no DeepSpeed: :class:`~mmtl.train.step.ContrastiveModule` + the pipeline's client
  AdamW (:func:`~mmtl.train.ds_config.build_optimizer`) + its LR schedule (``WarmupCosine``, constant here); forward, mmtl's loss
  (``ContrastiveModule.loss``), ``backward``, grad-norm clipping (``train.grad_clip``, as DeepSpeed does),
  ``step``, ``zero_grad``, ``float(loss)``;
- ``bare_ds``: ``build_engine(pipe, model)`` + a loop calling ``train_step(engine, [batch])`` directly;
- ``mmtl``: ``run_training(pipe, model, iter(batches), report=..., on_step=...)`` in this process (no Ray):
  mmtl's data plumbing (``_to_device``, accumulation grouping), per-step metrics, hooks, progress line
  every ``log_every`` steps (formatted as the worker does, not printed), ``report`` a no-op;
- ``mmtl_ray`` (``use_ray``): the real Ray Train worker, :func:`mmtl.train.worker.train_loop_per_worker`, in a
  ``TorchTrainer`` with 1 worker: pipeline validation, model build, ``get_dataset_shard`` +
  ``iter_torch_batches`` over a Ray Dataset holding the same batches, ``ray.train.report`` every
  ``log_every`` steps, progress lines on stderr. Per-step timestamps are taken in the worker (its
  ``run_training`` is wrapped to add a timestamping ``on_step``) and come back as the run's return value.

Reading the result (measured on 2 shared cores, see ``README``): with the default ~22 M-parameter model a step
is ~0.9-1.2 s and mmtl's loop is within noise of the bare DeepSpeed loop, in process and through Ray Train.
With fast steps (``--tiny``, cached frozen features, GPUs) the Ray side shows ``log_step_extra_s`` of up to 2 s:
Ray Train 2.60 (v2) blocks ``ray.train.report`` until its controller (polling every
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` = 2 s) has taken the previous report (result queue of size 1), and each
report is a barrier through a synchronisation actor, so metrics-only reports every ``log_every`` steps stall
the loop whenever ``log_every`` steps take under ~2 s.

Timing: a step is the period between two consecutive step completions (everything the loop does per step:
data fetch, step, metrics, hooks); the first ``warmup`` steps are not counted. The mmtl loop always ends with
a checkpoint + consolidated export (``checkpoint_every`` is set above ``max_steps``, so there is no other one):
it comes after the last step's timestamp, so it is not in the step times; it is reported apart
(``final_checkpoint_s``), as are engine build (``bare_ds``), Ray start-up and Ray worker start-up.
Per run: mean step time (wall, and CPU seconds of the process: less sensitive to other load on the machine);
over ``repeats`` runs: the median. The sides run interleaved (:func:`side_order`: ABBA, so the mmtl side does
not always follow the bare loop) so that load from other processes hits them alike. Each side uses ``threads`` torch intra-op threads (the Ray worker too).

Single-process DeepSpeed needs a process group: a gloo group of world size 1 on 127.0.0.1 is created (and
destroyed at the end) unless one exists. A Ray instance started here listens on loopback only, with worker
niceness ``ray_worker_niceness`` (Ray's default 15 would starve the Ray side under other load).

This module orchestrates the runs and formats the table; the sides live in :mod:`mmtl.bench.step_loops`
(model, batches, torch / bare DeepSpeed / mmtl loops) and :mod:`mmtl.bench.step_ray` (Ray Train), the
summaries in :mod:`mmtl.bench.step_summary`.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

from mmtl.bench.step_loops import (  # noqa: F401  (re-exported: the names mmtl.bench.step always had)
    _periods,
    _thread_periods,
    _quiet_deepspeed,
    bench_model_config,
    bench_pipeline,
    build_bench_model,
    make_batches,
    run_bare_ds,
    run_mmtl,
    run_torch,
    single_process_group,
)
from mmtl.bench.step_ray import _ray_dataset, _ray_worker_niceness, run_mmtl_ray, start_ray
from mmtl.bench.step_summary import _model_summary, _summarise
from mmtl.config import ModelConfig

SIDES = ("torch", "bare_ds", "mmtl", "mmtl_ray")

# ``mmtl bench step`` settings: the default finishes in ~4 min on 2 shared cores (ZeRO-2 only, the stage the
# headline ratios are about); ``--full`` is the long version (ZeRO 0 and 2, more steps and repeats: ~15-20 min).
PRESETS = {
    "default": {"steps": 12, "warmup": 3, "zero_stages": (2,), "repeats": 2},
    "full": {"steps": 30, "warmup": 5, "zero_stages": (0, 2), "repeats": 3},
}
# the ratios of issue 19's table, from the headline stage (ZeRO-2 when measured, else the first stage)
RATIO_KEYS = ("mmtl/bare_ds", "mmtl_ray/bare_ds", "bare_ds/torch")


def step_settings(full: bool = False, **given) -> dict:
    """The preset's settings (``full``: the long version) with the ``given`` ones that are not None on top."""
    out = dict(PRESETS["full" if full else "default"])
    out.update({k: (tuple(v) if k == "zero_stages" else v) for k, v in given.items() if v is not None})
    return out


def side_order(sides: list[str], repeat: int) -> list[str]:
    """Order of the sides in repeat ``repeat`` (0-based): ABBA (the given order, then reversed) so that a load
    trend across a pair of repeats hits every side alike and no side always runs right after the same one;
    each further pair starts one side later."""
    k = (repeat // 2) % len(sides)
    order = sides[k:] + sides[:k]
    return order if repeat % 2 == 0 else order[::-1]


def headline_ratios(stages: dict) -> dict:
    """One flat dict of the headline ratios: wall (``step_s`` medians) and ``..._cpu`` (process CPU) for
    ``mmtl/bare_ds``, ``mmtl_ray/bare_ds`` (when Ray ran), ``bare_ds/torch``, ``mmtl/torch`` and
    ``mmtl_ray/torch``, plus ``stage`` (which stage they come from)."""
    if not stages:
        return {}
    name = "zero2" if "zero2" in stages else next(iter(stages))
    sides = stages[name]["sides"]
    out: dict = {"stage": name}
    for a, b in (("mmtl", "bare_ds"), ("mmtl_ray", "bare_ds"), ("bare_ds", "torch"), ("mmtl", "torch"),
                 ("mmtl_ray", "torch")):
        if a in sides and b in sides:
            out[f"{a}/{b}"] = round(sides[a]["step_s"] / sides[b]["step_s"], 4)
            out[f"{a}/{b}_cpu"] = round(sides[a]["cpu_step_s"] / max(sides[b]["cpu_step_s"], 1e-9), 4)
            if a == "mmtl_ray" and sides[a].get("thread_cpu_step_s"):
                out[f"{a}/{b}_thread_cpu"] = round(sides[a]["thread_cpu_step_s"]
                                                   / max(sides[b]["thread_cpu_step_s"], 1e-9), 4)
    return out


def bench_step(steps: int = 12, warmup: int = 3, zero_stages=(2,), micro_batch: int = 32, use_ray: bool = True,
               repeats: int = 2, model_cfg: Optional[ModelConfig] = None, threads: Optional[int] = 1,
               log_every: int = 10, ray_worker_niceness: Optional[int] = 0,
               say: Optional[Callable[[str], None]] = None) -> dict:
    """Measure step time of the mmtl loop, a bare DeepSpeed loop on the same engine and plain torch.

    The defaults are :data:`PRESETS` ``["default"]`` (about 4 minutes on 2 shared cores); ``PRESETS["full"]``
    is the long version (``mmtl bench step --full``).

    Args:
        steps: measured optimizer steps per run (after ``warmup`` unmeasured ones; warmup is at least 1).
        warmup: unmeasured first steps per run (engine/allocator warm-up).
        zero_stages: DeepSpeed ZeRO stages to measure (0-3), one block of runs each.
        micro_batch: samples per step (1 worker, no accumulation).
        use_ray: also run the real Ray Train worker (``mmtl_ray``); starts a local Ray instance (loopback,
            ``num_cpus=2``) unless Ray is already up, and shuts it down at the end if it started it.
        repeats: runs per side and stage (medians reported).
        model_cfg: the model; default :func:`bench_model_config` (~22 M params); tests pass a tiny one.
        threads: torch intra-op threads on every side (the Ray worker too); ``None`` keeps torch's default.
            Default 1: on a shared 2-core machine two OpenMP threads per process oversubscribe the cores
            and step times swing by 10x.
        log_every: ``train.log_every`` (progress line / Ray report period of the mmtl sides).
        ray_worker_niceness: niceness of Ray's worker processes when this call starts Ray (``None``: Ray's
            default 15, which starves the Ray side when other processes load the machine).
        say: progress lines (e.g. ``print``); None is quiet.

    Returns:
        dict with ``ratios`` (:func:`headline_ratios`: the headline wall and CPU ratios in one flat dict),
        ``stages`` keyed ``"zero<N>"``, each holding per side (``torch``, ``bare_ds``, ``mmtl``,
        ``mmtl_ray`` when ``use_ray``): ``step_s`` (median over repeats of the mean wall step time),
        ``cpu_step_s`` (same with process CPU time), ``step_median_s`` (median of all measured step periods),
        ``runs_step_s`` (per-run mean wall step time), ``log_step_extra_s`` (mmtl sides: what a log step
        costs over the others: progress line, Ray report); ``ratio`` ``{"mmtl/bare_ds", "mmtl_ray/bare_ds",
        "bare_ds/torch"}`` from ``step_s``, ``cpu_ratio`` the same from ``cpu_step_s``, ``paired_ratio`` the
        median over repeats of the per-repeat wall ratio (the two sides of a repeat ran minutes apart at
        most); ``engine_build_s``, ``final_checkpoint_s`` (mmtl, in process), ``ray`` (per-run worker
        start / first step / final checkpoint). At top level: ``model`` (config summary and ``params``), ``steps``, ``warmup``,
        ``repeats``, ``micro_batch``, ``threads``, ``ray`` (``startup_s`` of Ray; None without Ray),
        ``load_avg`` (1-min load before / after), ``cpu_count``, ``wall_s``.
    """
    say = say or (lambda m: None)
    warmup = max(1, int(warmup))
    steps, repeats = max(1, int(steps)), max(1, int(repeats))
    model_cfg = model_cfg or bench_model_config()
    n_batches = warmup + steps
    load_before = os.getloadavg()[0]
    t_bench = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    _quiet_deepspeed()
    batches = make_batches(model_cfg, n_batches, micro_batch)
    sides = [s for s in SIDES if use_ray or s != "mmtl_ray"]
    ray_started, ray_info, storage = False, None, None
    try:
        import deepspeed  # noqa: F401  (import cost out of the first timed run)

        _quiet_deepspeed()
        if use_ray:
            import ray

            startup = 0.0
            if not ray.is_initialized():
                startup = start_ray(ray_worker_niceness)
                ray_started = True
            dataset = _ray_dataset(batches)
            storage = tempfile.TemporaryDirectory(prefix="mmtl-bench-step-")
            ray_info = {"startup_s": round(startup, 2), "started_here": ray_started,
                        "worker_niceness": _ray_worker_niceness()}
            say(f"Ray up in {startup:.1f} s")
        stages = {}
        params = None
        done, total_runs = 0, len(zero_stages) * repeats * len(sides)
        with single_process_group():
            for stage in zero_stages:
                pipe = bench_pipeline(model_cfg, int(stage), micro_batch, n_batches, log_every)
                pristine = build_bench_model(pipe)
                if params is None:
                    from mmtl.strategies import trainable_summary

                    params = trainable_summary(pristine)
                runs: dict[str, list[dict]] = {s: [] for s in sides}
                for r in range(repeats):
                    say(f"zero{stage} repeat {r + 1}/{repeats}: {', '.join(sides)} ({n_batches} steps each; "
                        f"{time.perf_counter() - t_bench:.0f} s elapsed{_eta(t_bench, done, total_runs)})")
                    order = side_order(sides, r)
                    for side in order:
                        gc.collect()
                        if side == "mmtl_ray":
                            out = run_mmtl_ray(pipe, dataset, threads or torch.get_num_threads(), storage.name,
                                               f"bench-z{stage}-r{r}")
                        else:
                            fn = {"torch": run_torch, "bare_ds": run_bare_ds, "mmtl": run_mmtl}[side]
                            out = fn(pipe, copy.deepcopy(pristine), batches)
                        wall, cpu = _periods(out["marks"], warmup)
                        if len(wall) != steps:
                            raise RuntimeError(f"{side}: measured {len(wall)} steps, expected {steps}")
                        out.update(wall=wall, cpu=cpu, thread_cpu=_thread_periods(out["marks"], warmup))
                        runs[side].append(out)
                        done += 1
                        say(f"zero{stage} repeat {r + 1}/{repeats} {side:8s} "
                            f"{statistics.fmean(wall) * 1e3:8.1f} ms/step (cpu {statistics.fmean(cpu) * 1e3:.1f} ms, loop "
                            f"thread {statistics.fmean(out['thread_cpu']) * 1e3:.1f} ms)")
                stages[f"zero{stage}"] = _summarise(runs, warmup, log_every)
                del pristine
        return {
            "ratios": headline_ratios(stages),
            "stages": stages,
            "model": _model_summary(model_cfg, params),
            "steps": steps, "warmup": warmup, "repeats": repeats, "micro_batch": micro_batch,
            "threads": torch.get_num_threads(), "log_every": log_every, "ray": ray_info,
            "load_avg": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
            "cpu_count": os.cpu_count(), "wall_s": round(time.perf_counter() - t_bench, 1),
        }
    finally:
        torch.set_num_threads(old_threads)
        if ray_started:
            import ray

            ray.shutdown()
        if storage is not None:
            storage.cleanup()


def format_table(r: dict) -> str:
    """Plain-text table of :func:`bench_step`'s result."""
    m = r["model"]
    lines = [
        "headline ratios (" + r.get("ratios", {}).get("stage", "-") + "): "
        + ", ".join(f"{k} {v:.3f}" for k, v in r.get("ratios", {}).items() if k != "stage"),
        f"model: {m['vision']} @{m['image_size']}px + {m['text']} (ctx {m['context_length']}), "
        f"{(m['params'] or 0) / 1e6:.1f} M params (all trainable); micro-batch {r['micro_batch']}, "
        f"{r['steps']} steps after {r['warmup']} warm-up, {r['repeats']} repeats, {r['threads']} torch thread(s)",
        f"{'stage':6s} {'side':9s} {'ms/step':>9s} {'cpu ms':>9s} {'thread ms':>9s} {'median ms':>10s} "
        f"{'log step +ms':>13s}  "
        "runs (ms/step)",
    ]
    for name, st in r["stages"].items():
        for side, v in st["sides"].items():
            lines.append(f"{name:6s} {side:9s} {v['step_s'] * 1e3:9.1f} {v['cpu_step_s'] * 1e3:9.1f} "
                         f"{v['thread_cpu_step_s'] * 1e3:9.1f} "
                         f"{v['step_median_s'] * 1e3:10.1f} {_ms(v['log_step_extra_s']):>13s}  "
                         + " ".join(f"{x * 1e3:.0f}" for x in v["runs_step_s"]))
        lines.append(f"{name:6s} ratios (wall): " + ", ".join(f"{k} {v:.3f}" for k, v in st["ratio"].items()))
        lines.append(f"{name:6s} ratios (cpu):  " + ", ".join(f"{k} {v:.3f}" for k, v in st["cpu_ratio"].items()))
        lines.append(f"{name:6s} ratios (wall, paired per repeat): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in st["paired_ratio"].items()))
        extra = f"{name:6s} engine runs ZeRO {st.get('engine_zero_stage')}, build {st['engine_build_s']:.1f} s, mmtl final checkpoint+export " \
                f"{st['final_checkpoint_s']:.1f} s"
        if "ray" in st:
            ry = st["ray"]
            extra += (f"; Ray worker start {_fmt_list(ry['worker_start_s'])} s, worker to first step "
                      f"{_fmt_list(ry['worker_first_step_s'])} s, fit {_fmt_list(ry['fit_s'])} s")
        lines.append(extra)
    if r.get("ray"):
        lines.append(f"Ray start-up {r['ray']['startup_s']:.1f} s (started here: {r['ray']['started_here']}, "
                     f"worker niceness {r['ray']['worker_niceness']})")
    la = r["load_avg"]
    lines.append(f"load average {la['before']} -> {la['after']} on {r['cpu_count']} CPUs; {r['wall_s']:.0f} s in all")
    return "\n".join(lines)


def _eta(t0: float, done: int, total: int) -> str:
    if not done:
        return ""
    el = time.perf_counter() - t0
    return f", ETA {el / done * (total - done):.0f} s"


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e3:+.1f}"


def _fmt_list(xs: list) -> str:
    return "/".join(f"{x:.1f}" for x in xs)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to file descriptor 1 (DeepSpeed's log handler, Ray's forwarded worker output,
    C-level prints) to stderr while the benchmark runs; yields a writer to the real stdout (for ``--json``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        real.flush()
        real.close()


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmtl.bench.step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the long version (PRESETS['full'])")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--zero", type=int, nargs="+")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random model (smoke test: the step is then mostly framework overhead)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    a = ap.parse_args(argv)
    from mmtl.models import tiny_two_tower_config

    p = step_settings(a.full, steps=a.steps, warmup=a.warmup, zero_stages=a.zero, repeats=a.repeats)
    with stdout_to_stderr() as out:
        res = bench_step(**p, micro_batch=a.micro_batch, use_ray=not a.no_ray, threads=a.threads,
                         model_cfg=tiny_two_tower_config() if a.tiny else None,
                         say=lambda m: print(f"[bench step] {m}", file=sys.stderr, flush=True))
        out.write((json.dumps(res, indent=2) if a.json else format_table(res)) + "\n")


if __name__ == "__main__":
    main()
