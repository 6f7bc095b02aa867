"""Which ZeRO stage the DeepSpeed engine actually runs with, given the pipeline's ``train.zero_stage`` and the
number of ranks.

ZeRO stages 1 and 2 partition optimizer states and gradients across data-parallel ranks; on a single rank there
is nothing to partition, yet the ZeRO optimizer still keeps a flat fp32 copy of every parameter, copies each
gradient into reduction buckets and back, and copies the updated flat partition back into the parameters after
every step. Profiled on CPU (``python -m mmtl.bench.step_profile``, 22 M-parameter two-tower, fp32), that is
~+0.2 s of CPU per step over plain torch (``aten::copy_`` +126 ms, ``aten::cat`` +45 ms, and the AdamW update
on one 90 MB flat tensor instead of per-parameter tensors, ``sqrt``/``div`` +33 ms), CPU ratio to plain torch
1.29-1.32; stage 0 with the same client optimizer: 1.09-1.10; stage 0 without the backward all-reduce (which on
one rank flattens every gradient, all-reduces it with itself and copies it back): 0.96 (noise: plain torch
does the same work).

So with one rank, fp32 and no optimizer offload, the engine runs stage 0 without the backward all-reduce: the
same client AdamW on the same fp32 parameters, the same gradient clipping and LR schedule, so the same updates
(measured: after 11 steps the parameters equal plain torch's bit for bit, as they do with ZeRO-2). Mixed precision keeps the configured stage (stage 0 would switch to DeepSpeed's separate
bf16/fp16 optimizer wrappers), and so does optimizer offload (the reason to use ZeRO on one rank). Checkpoints
record the stage the engine ran with (``engine_zero_stage`` in ``mmtl_meta.json``) and a resumed run builds its
engine with that stage, so checkpoints written before this rule still load.
"""
from __future__ import annotations

from mmtl.config import TrainConfig


def engine_zero_stage(cfg: TrainConfig, world_size: int) -> int:
    """The ZeRO stage to build the engine with: 0 instead of 1 or 2 when ``world_size == 1``, precision is
    fp32 and the optimizer is not offloaded; ``cfg.zero_stage`` otherwise."""
    if world_size == 1 and cfg.zero_stage in (1, 2) and cfg.precision == "fp32" and not cfg.offload_optimizer:
        return 0
    return cfg.zero_stage


def with_zero_stage(ds_config: dict, stage: int) -> dict:
    """``ds_config`` (from :func:`mmtl.train.ds_config.deepspeed_config`) running ZeRO ``stage`` instead:
    a stage-0 config keeps no partitioning/offload keys."""
    if ds_config["zero_optimization"].get("stage") == stage:
        return ds_config
    return {**ds_config, "zero_optimization": {"stage": stage}}


def skip_single_rank_allreduce(cfg: TrainConfig, world_size: int, stage: int) -> bool:
    """True when the engine's backward all-reduce is an identity worth skipping: one rank, stage 0, fp32."""
    return world_size == 1 and stage == 0 and cfg.precision == "fp32"
