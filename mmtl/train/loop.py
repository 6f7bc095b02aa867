"""The per-worker training function run by ``ray.train.torch.TorchTrainer``.

Supports: ZeRO stages 0-3 on CPU (gloo) and GPU (NCCL) workers, fp32/bf16/fp16, gradient accumulation with
global-batch negatives, CLIP or SigLIP loss, warmup + cosine LR, checkpoints every ``checkpoint_every`` steps
and at the end (every rank saves, every rank reports), exact resume of global step, optimizer, LR schedule,
RNG state and data position (the micro-batches of finished steps are skipped), a consolidated safetensors
export, and rank-0 MLflow metrics. It also runs in one process without Ray (``ray_train=False``) for the
bare-loop benchmark and GPU checks.

Limits: data position on resume is step-exact in aggregate (each rank skips its share of finished
micro-batches); with dynamic streaming splits the exact rows a rank skips may differ from the ones it saw.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from mmtl.config import Pipeline
from mmtl.runtime import seed_everything
from mmtl.strategies import get_strategy
from mmtl.train.checkpoint import (checkpoint_meta, consolidated_state_dict, read_meta, restore_checkpoint,
                                   save_checkpoint, write_export)
from mmtl.train.ds_config import WarmupCosine, build_optimizer, deepspeed_config
from mmtl.train.ds_tuning import engine_zero_stage, skip_single_rank_allreduce, with_zero_stage
from mmtl.train.step import ContrastiveModule, train_step

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
__all__ = ["seed_everything", "build_engine", "make_train_module", "set_train_modes", "feature_batches",
           "run_training", "single_process_group"]

TrainModuleFactory = Optional[type]


def make_train_module(pipe: Pipeline, model: torch.nn.Module, train_module: TrainModuleFactory = None):
    """The ``nn.Module`` the DeepSpeed engine wraps: :class:`~mmtl.train.step.ContrastiveModule` (global-batch
    InfoNCE / SigLIP) when ``train_module`` is None, else ``train_module.from_pipeline(pipe, model)``: a *task
    module* (chosen by the recipe, e.g. CoOp's or the fusion module) holding the model as ``self.model`` plus
    its own trainable parts, whose ``forward(**micro_batch)`` returns the micro-batch's scalar loss and which
    may define ``metrics() -> dict[str, float]`` (logged with each progress report)."""
    if train_module is None:
        return ContrastiveModule(model, pipe.train.loss)
    return train_module.from_pipeline(pipe, model)


def build_engine(pipe: Pipeline, model: torch.nn.Module, train_module: TrainModuleFactory = None,
                 zero_stage: Optional[int] = None):
    """Wrap ``model`` in its train module (:func:`make_train_module`) and ``deepspeed.initialize`` it with the
    pipeline's ZeRO / precision / batch config, a client AdamW (own LR for tower weights with
    ``train.tower_lr``) and the warmup-cosine schedule.

    ``zero_stage``: the stage the engine runs; None: :func:`mmtl.train.ds_tuning.engine_zero_stage` for the
    current process group's world size (stage 0 instead of 1-2 on one fp32 rank: same updates, less copying).
    The engine's stage is ``engine.zero_optimization_stage()``."""
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if zero_stage is None:
        zero_stage = engine_zero_stage(pipe.train, world_size)

    # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU inference (~1 min of g++); training over
    # gloo/NCCL never uses it, so skip the build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    module = make_train_module(pipe, model, train_module)
    if pipe.train.precision != "fp32":  # params and buffers (e.g. BatchNorm stats) in the compute dtype
        module.to(_DTYPES[pipe.train.precision])
    optimizer = build_optimizer(pipe.train, module.named_parameters())
    scheduler = WarmupCosine(optimizer, pipe.train)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=with_zero_stage(deepspeed_config(pipe.train), zero_stage),
        dist_init_required=False,
    )
    if skip_single_rank_allreduce(pipe.train, world_size, zero_stage):
        engine.enable_backward_allreduce = False  # averaging over one rank: flatten + all-reduce + copy back for nothing
    return engine


def set_train_modes(model: torch.nn.Module) -> None:
    """Train mode for every top-level part that has trainable parameters (dropout is active only there); fully
    frozen towers stay in eval mode so their outputs match the cached features. BatchNorm layers whose own
    parameters are frozen (a frozen base under LoRA or partial unlocking) also stay in eval mode: their running
    statistics belong to the frozen base and are not re-estimated (so base + adapter is the whole model)."""
    model.train()
    for child in model.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()


def _to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def feature_batches(it: Iterator[dict], arrays: dict) -> Iterator[dict]:
    """Map index batches ``{"idx": (B,)}`` to rows of in-memory arrays: ``{name: arrays[name][idx]}`` as
    tensors, for every name (contrastive: ``image_feat`` (B,D_v) and ``text_feat`` (B,D_t) cached tower
    outputs; task modules choose their own names, which must match their ``forward`` arguments). An array may
    be a :class:`mmtl.data.arrays.RowIndexed` view (rows shared between samples)."""
    for b in it:
        idx = b["idx"].numpy() if isinstance(b["idx"], torch.Tensor) else np.asarray(b["idx"])
        yield {name: torch.from_numpy(np.ascontiguousarray(a[idx])) for name, a in arrays.items()}


def run_training(
    pipe: Pipeline,
    model: torch.nn.Module,
    batches: Iterator[dict],
    *,
    rank: int = 0,
    world_size: int = 1,
    resume_dir: Optional[Path] = None,
    report: Optional[Callable[[dict, Optional[Path]], None]] = None,
    on_step: Optional[Callable[[int, dict], None]] = None,
    train_module: TrainModuleFactory = None,
) -> dict:
    """Train ``model`` on ``batches`` (an iterator of micro-batches) for ``train.max_steps`` optimizer steps.

    ``report(metrics, ckpt_dir_or_None)`` is called by every rank at each log and checkpoint step (Ray Train's
    ``report`` in workers). ``train_module``: see :func:`make_train_module` (None: contrastive). Returns the final metrics dict (``steps``, ``loss``, ``samples_per_s`` ...).

    Raises:
        FloatingPointError: non-finite loss with ``train.nonfinite=error``.
        CheckpointMismatchError: ``resume_dir`` was written with another world size.
    """
    cfg = pipe.train
    set_train_modes(model)
    stage = engine_zero_stage(cfg, world_size)
    if resume_dir is not None:  # the stage the checkpoint's engine ran (checkpoints before ds_tuning: configured)
        stage = int((read_meta(Path(resume_dir)) or {}).get("engine_zero_stage", cfg.zero_stage))
    engine = build_engine(pipe, model, train_module, zero_stage=stage)
    device, dtype = engine.device, _DTYPES[cfg.precision]
    start = 0
    if resume_dir is not None:
        start = int(restore_checkpoint(engine, resume_dir, rank, world_size, cfg.zero_stage)["step"])
    trace = os.environ.get("MMTL_STEP_TRACE")
    for _ in range(start * cfg.grad_accum_steps):  # data position: skip finished micro-batches
        next(batches, None)
    gbatch = cfg.effective_global_batch
    metrics: dict = {"steps": start}
    skipped, t_first = 0, time.perf_counter()
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        micro = [next(batches, None) for _ in range(cfg.grad_accum_steps)]
        if any(m is None for m in micro):
            metrics["stopped_early"] = f"data ran out at step {step}"
            break
        loss = train_step(engine, [_to_device(m, device, dtype) for m in micro], cfg.nonfinite)
        skipped += loss is None
        dt = time.perf_counter() - t0
        n = step + 1
        if trace:
            with open(f"{trace}.rank{rank}", "a") as f:
                f.write(f"{n}\n")
        _maybe_fail(n, rank)
        ls = getattr(model, "logit_scale", None)  # contrastive models; generative ones have none
        scale = {} if ls is None else {
            "train/logit_scale": float(ls.detach().float().exp().clamp(max=model.max_logit_scale))}
        task_metrics = getattr(engine.module, "metrics", None)
        metrics = {
            "steps": n,
            "train/loss": float("nan") if loss is None else loss,
            "train/lr": engine.get_lr()[0],
            **scale,
            "train/step_time_s": dt,
            "train/samples_per_s": gbatch / dt,
            "train/skipped_nonfinite_steps": skipped,
            "train/wall_s": time.perf_counter() - t_first,
            "train/peak_rss_mb": _peak_rss_mb(),
            **({f"train/{k}": v for k, v in task_metrics().items()} if task_metrics else {}),
        }
        if on_step:
            on_step(n, metrics)
        last = n == cfg.max_steps
        if n % cfg.checkpoint_every == 0 or last:
            _checkpoint(engine, pipe, n, rank, world_size, metrics, report, export=last)
        elif report and n % cfg.log_every == 0:
            report(metrics, None)
    else:
        return metrics
    _checkpoint(engine, pipe, metrics["steps"], rank, world_size, metrics, report, export=True)
    return metrics


def _peak_rss_mb() -> float:
    """Peak resident memory of this worker process so far (MiB; ``getrusage`` ru_maxrss, KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _checkpoint(engine, pipe, step, rank, world_size, metrics, report, export: bool) -> None:
    d = Path(tempfile.mkdtemp(prefix=f"mmtl-ckpt-{step}-r{rank}-"))
    try:
        meta = checkpoint_meta(pipe, step, world_size, engine.module)
        meta["engine_zero_stage"] = int(engine.zero_optimization_stage())  # mmtl.train.ds_tuning; resume uses it
        meta["train_metrics"] = {k: v for k, v in metrics.items() if k.startswith("train/")}  # for a redo after training
        save_checkpoint(engine, d, meta, rank)
        strategy = get_strategy(pipe.strategy.kind)
        strategy.save_extras(engine.module, d, pipe)  # e.g. LoRA's adapter/, every checkpoint, every rank
        if export:
            sd = consolidated_state_dict(engine, pipe.train.zero_stage)
            if rank == 0:
                write_export(d, strategy.export_state_dict(pipe, sd), pipe.to_yaml())
        if report:
            report(metrics, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def single_process_group():
    """A gloo process group of world size 1 on 127.0.0.1, to drive :func:`run_training` / DeepSpeed in one
    process without Ray (benchmarks, GPU checks, tests), unless a group exists. On exit it destroys the group
    it made, restores the env vars it set and drops DeepSpeed's cached communication backend (which would
    otherwise keep pointing at the destroyed group: "Group ... is not registered")."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        try:  # DeepSpeed's own teardown also drops the groups it cached (world, data parallel ...)
            import deepspeed.comm as ds_dist
            import deepspeed.comm.comm as ds_comm

            if ds_comm.cdb is not None:
                ds_dist.destroy_process_group()
                ds_comm.cdb = None
        except ImportError:  # pragma: no cover
            pass
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _maybe_fail(step: int, rank: int) -> None:
    """Fault-injection hook for tests: ``MMTL_KILL_AT="<step>:<rank>:<marker file>"`` SIGKILLs this worker
    process once (the marker file records that it happened), 3 s after finishing that step.

    The delay matters: Ray Train registers a reported checkpoint when its controller next polls the workers
    (about every second); a worker that dies before that loses the report and the run resumes from the
    checkpoint before it (still correct, just older)."""
    spec = os.environ.get("MMTL_KILL_AT")
    if not spec:
        return
    at, who, marker = spec.split(":", 2)
    if step == int(at) and rank == int(who) and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(3.0)
        os.kill(os.getpid(), 9)
