"""Which module the DeepSpeed engine wraps, per ``strategy.kind``.

The contrastive strategies (``frozen``, ``full``, ``lora``) train :class:`~mmtl.train.step.ContrastiveModule`
(global-batch InfoNCE / SigLIP, see :mod:`mmtl.train.step`). Other strategies train a *task module*: an
``nn.Module`` that holds the (frozen or adapted) :class:`~mmtl.models.base.MultimodalModel` as ``self.model``
plus its own trainable parts, and whose ``forward(**micro_batch)`` returns the scalar loss of that micro-batch
(mean over its rows). The loop then runs a plain DeepSpeed step (gradients averaged over ranks by DeepSpeed,
micro-batches accumulated with ``train.grad_accum_steps``).

A task module may define ``metrics() -> dict[str, float]`` (values logged with each progress report, e.g.
training accuracy) and is constructed as ``cls.from_pipeline(pipe, model)``.
"""
from __future__ import annotations

import importlib

import torch.nn as nn

from mmtl.config import Pipeline

# strategy.kind -> "module:Class"; the class has a ``from_pipeline(pipe, model)`` classmethod.
TASK_MODULES: dict[str, str] = {
    "prompt_tuning": "mmtl.prompting.coop:CoOpModule",
    "cross_attention": "mmtl.fusion.task:FusionTaskModule",
}

# strategy.kind -> "module:function" run by ``mmtl run`` instead of the contrastive pipeline, called as
# ``fn(pipe, run_dir, uri, run_id, resuming, say, t_start) -> summary dict`` inside the MLflow run; it trains
# with :func:`mmtl.run.fit` and writes ``<run_dir>/summary.json``.
TASK_DRIVERS: dict[str, str] = {
    "prompt_tuning": "mmtl.prompting.run:run_prompt_tuning",
    "cross_attention": "mmtl.fusion.run:run_cross_attention",
}


def task_driver(kind: str):
    """The driver function of a task ``strategy.kind`` (see :data:`TASK_DRIVERS`)."""
    path, fn = TASK_DRIVERS[kind].split(":")
    return getattr(importlib.import_module(path), fn)


def is_contrastive(pipe: Pipeline) -> bool:
    """True when ``strategy.kind`` trains the contrastive objective (frozen, full, lora)."""
    return pipe.strategy.kind not in TASK_MODULES


def make_train_module(pipe: Pipeline, model: nn.Module) -> nn.Module:
    """The ``nn.Module`` the engine wraps for ``pipe.strategy.kind`` (see module docstring).

    Raises:
        ImportError: the task module of that kind is not installed in this build.
    """
    if is_contrastive(pipe):
        from mmtl.train.step import ContrastiveModule

        return ContrastiveModule(model, pipe.train.loss)
    path, cls = TASK_MODULES[pipe.strategy.kind].split(":")
    return getattr(importlib.import_module(path), cls).from_pipeline(pipe, model)
