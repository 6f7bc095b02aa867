"""Checkpoint save / resume / export for the DeepSpeed engine inside Ray Train workers.

Layout of one checkpoint directory (every rank writes its own files into a local temp dir and reports it
with ``ray.train.report(..., checkpoint=...)``; Ray merges them into one storage directory and only
registers the checkpoint once every rank has reported, so a crash mid-save never leaves a half checkpoint
as "latest"):

* ``ds/`` DeepSpeed state (``exclude_frozen_parameters=True``: frozen tower weights are not copied),
* ``mmtl_meta.json`` (rank 0): global step, world size, ZeRO stage, samples seen,
* ``rng_rank{r}.safetensors`` + ``rng_rank{r}.json``: each rank's torch / numpy / python RNG state,
* ``export/`` (final checkpoint only, rank 0): ``model.safetensors`` (consolidated fp32 state dict) and
  ``pipeline.yaml`` (resolved pipeline).

Nothing here is unpickled by mmtl: RNG state is stored as safetensors + JSON.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

META = "mmtl_meta.json"
TAG = "ds"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint cannot be resumed with the current settings (e.g. another world size)."""


def save_rng(d: Path, rank: int) -> None:
    """Write this rank's RNG states (torch CPU as safetensors; numpy and python as JSON)."""
    save_file({"torch": torch.get_rng_state()}, str(d / f"rng_rank{rank}.safetensors"))
    np_state = np.random.get_state()
    py_state = random.getstate()
    (d / f"rng_rank{rank}.json").write_text(
        json.dumps(
            {
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "python": [py_state[0], list(py_state[1]), py_state[2]],
            }
        )
    )


def load_rng(d: Path, rank: int) -> bool:
    """Restore this rank's RNG states; returns False when the files are absent."""
    st, js = d / f"rng_rank{rank}.safetensors", d / f"rng_rank{rank}.json"
    if not (st.exists() and js.exists()):
        return False
    torch.set_rng_state(load_file(str(st))["torch"])
    data = json.loads(js.read_text())
    n = data["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = data["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    return True


def save_checkpoint(engine, d: Path, meta: dict, rank: int) -> None:
    """Every rank: DeepSpeed state + RNG into ``d``; rank 0 also writes :data:`META`."""
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    engine.save_checkpoint(str(d), tag=TAG, exclude_frozen_parameters=frozen)
    save_rng(d, rank)
    if rank == 0:
        (d / META).write_text(json.dumps(meta, indent=1))


def read_meta(d: Path) -> Optional[dict]:
    p = Path(d) / META
    return json.loads(p.read_text()) if p.exists() else None


def check_compatible(meta: dict, world_size: int, zero_stage: int) -> None:
    """Raise :class:`CheckpointMismatchError` when a checkpoint's world size differs from the current one
    (DeepSpeed's ZeRO optimizer partitions are per rank)."""
    if meta.get("world_size") != world_size:
        raise CheckpointMismatchError(
            f"checkpoint at step {meta.get('step')} was written by {meta.get('world_size')} workers, this run has"
            f" {world_size}: set train.num_workers={meta.get('world_size')} to resume it, or start fresh with"
            " train.resume=never (or a new train.name) and warm-start from its export/model.safetensors"
        )


def restore_checkpoint(engine, d: Path, rank: int, world_size: int, zero_stage: int) -> dict:
    """Load DeepSpeed state (module, optimizer, LR schedule) and RNG from ``d``; return its meta."""
    meta = read_meta(d)
    if meta is None:
        raise CheckpointMismatchError(f"{d} is not an mmtl checkpoint (no {META})")
    check_compatible(meta, world_size, zero_stage)
    engine.load_checkpoint(str(d), tag=TAG, load_module_strict=False)
    load_rng(d, rank)
    return meta


def consolidated_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the wrapped model (all ranks must call; under ZeRO-3 parameters are
    gathered). Keys are the model's own (the ``model.`` prefix of the wrapper is stripped)."""
    module = engine.module
    params = list(module.parameters())
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    else:
        sd = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    out = {}
    for k, v in sd.items():
        out[k[len("model."):] if k.startswith("model.") else k] = v.contiguous()
    return out


def write_export(d: Path, state_dict: dict, pipeline_yaml: str) -> Path:
    """Write ``export/model.safetensors`` and ``export/pipeline.yaml`` under ``d``; returns the folder."""
    out = Path(d) / "export"
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out / "model.safetensors"))
    (out / "pipeline.yaml").write_text(pipeline_yaml)
    return out
