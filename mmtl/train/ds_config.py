"""Build a DeepSpeed config dict and the client optimizer / LR schedule from the pipeline's ``train``.

The optimizer is a client ``torch.optim`` object (a DeepSpeed-config AdamW JIT-compiles a CPU fused Adam,
~90 s on first use). The schedule is linear warmup then cosine decay to ``min_lr_ratio * lr`` at
``max_steps`` (SGDR, Loshchilov & Hutter 2017, without restarts), stepped once per optimizer step.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from mmtl.config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict:
    """DeepSpeed JSON config for ``cfg``: ZeRO stage, offload, precision, clipping, batch sizes.

    ``train_batch_size`` = micro_batch_size * grad_accum_steps * num_workers (the global batch). With
    ``offload_optimizer`` it sets ``zero_force_ds_cpu_optimizer: false``: DeepSpeed's documented switch for
    ZeRO-Offload with a client optimizer (mmtl's torch AdamW / SGD), which it refuses otherwise.

    Raises:
        ValueError: settings that cannot work on the workers (:func:`mmtl.config.workers.worker_problems`; the
            pipeline loader refuses them first).
    """
    from mmtl.config.workers import worker_problems

    problems = worker_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    zero: dict = {"stage": cfg.zero_stage}
    offload = cfg.zero_stage >= 1 and cfg.offload_optimizer
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.effective_global_batch,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if offload:
        ds["zero_force_ds_cpu_optimizer"] = False
    if cfg.grad_clip:
        ds["gradient_clipping"] = cfg.grad_clip
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return ds


def is_tower_weight(name: str) -> bool:
    """True for a pretrained tower weight (``image_tower.`` / ``text_tower.`` anywhere in the dotted name) that is
    not a LoRA adapter weight; these train at ``train.tower_lr`` when it is set."""
    return ("image_tower." in name or "text_tower." in name) and "lora_" not in name


def build_optimizer(cfg: TrainConfig, params: Iterable) -> torch.optim.Optimizer:
    """Client optimizer over the trainable parameters; weight decay is not applied to 1-d params (biases,
    norms, logit scale), as in CLIP/open_clip.

    Args:
        params: ``nn.Parameter`` s, or ``(name, parameter)`` pairs (``named_parameters()``); with names,
            pretrained tower weights (:func:`is_tower_weight`) get ``train.tower_lr`` when it is set.

    Raises:
        ValueError: when there is no trainable parameter.
    """
    named = [p if isinstance(p, tuple) else ("", p) for p in params]
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters: check strategy.kind / strategy.lock")
    groups = []
    for tower in (False, True):
        lr = cfg.tower_lr if (tower and cfg.tower_lr is not None) else cfg.lr
        part = [p for n, p in named if is_tower_weight(n) == tower]
        groups += [{"params": [p for p in part if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in part if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``, then cosine
    to ``min_lr_ratio`` at ``max_steps`` (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR with :func:`lr_multiplier`; its state (``last_epoch`` = optimizer steps) is checkpointed."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self._cfg = cfg
        super().__init__(optimizer, lr_lambda=lambda s: lr_multiplier(s, cfg))

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "_cfg"}
