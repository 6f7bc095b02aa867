"""Checkpoint save / resume / export for the DeepSpeed engine inside Ray Train workers.

Layout of one checkpoint directory (every rank writes its own files into a local temp dir and reports it
with ``ray.train.report(..., checkpoint=...)``; Ray merges them into one storage directory and only
registers the checkpoint once every rank has reported, so a crash mid-save never leaves a half checkpoint
as "latest"):

* ``ds/`` DeepSpeed state (``exclude_frozen_parameters=True``: frozen tower weights are not copied),
* ``mmtl_meta.json`` (rank 0, :func:`checkpoint_meta`): global step, world size, ZeRO stage, samples seen, the
  settings a resume must keep (:data:`RESUME_SETTINGS`: precision, optimizer, model family and architecture,
  strategy ...) and the trainable set (count and digest of the trainable parameter names and shapes),
* ``rng_rank{r}.safetensors`` + ``rng_rank{r}.json``: each rank's torch / numpy / python RNG state,
* ``export/`` (final checkpoint only, rank 0): ``model.safetensors`` (consolidated fp32 state dict) and
  ``pipeline.yaml`` (resolved pipeline).

Nothing here is unpickled by mmtl: RNG state is stored as safetensors + JSON.

Resume compatibility (:func:`check_compatible`, in the driver before training, and again in each worker before
loading): a checkpoint is refused, naming every field that differs and the value to set, when the world size,
ZeRO stage or any of :data:`RESUME_SETTINGS` differs (DeepSpeed stores ZeRO optimizer partitions per rank and
stage 0-2 / stage 3 in different files; optimizer states and parameters follow the precision, optimizer, model
and strategy), or when the trainable set differs (:func:`trainable_signature`). Converting through DeepSpeed's
universal checkpoints (``ds_to_universal``) is not implemented: it was not verified for mmtl's checkpoints
(frozen parameters excluded, a client optimizer), so mmtl refuses instead of converting.
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


RESUME_SETTINGS: dict[str, str] = {
    "train.precision": "DeepSpeed stores the optimizer state per precision (bf16_zero_pp_rank_* files for bf16)",
    "train.optimizer": "the optimizer state (AdamW moments / SGD momentum) is stored",
    "train.loss": "the siglip loss has a trainable logit bias, clip has none",
    "model.family": "the parameters belong to another model family",
    "model.arch": "the parameters belong to another architecture",
    "model.config": "the parameters belong to another architecture",
    "model.vision.timm_name": "the image tower is another architecture",
    "model.vision.timm_kwargs": "the image tower is built differently",
    "model.text.config": "the text tower is another architecture",
    "model.embed_dim": "the projection heads have other shapes",
    "model.head": "the projection heads are another kind",
    "model.decoder.image_layer": "the image-to-decoder projection reads tokens of another width",
    "strategy.kind": "another strategy trains other parameters",
    "strategy.lock": "another set of towers is trained",
    "strategy.unlock_image_blocks": "another set of blocks is trained",
    "strategy.unlock_text_blocks": "another set of blocks is trained",
    "strategy.lora.r": "the LoRA weights have other shapes",
    "strategy.lora.towers": "LoRA sits in other towers",
    "strategy.lora.image_targets": "LoRA sits in other layers",
    "strategy.lora.text_targets": "LoRA sits in other layers",
    "strategy.prompt.n_ctx": "the prompt context has another shape",
    "strategy.prompt.class_specific": "the prompt context has another shape",
    "strategy.fusion.task": "the fusion head is another task",
    "strategy.fusion.kind": "the fusion module is another kind",
    "strategy.fusion.n_blocks": "the fusion module has other layers",
    "strategy.fusion.n_heads": "the fusion module has other shapes",
    "strategy.fusion.self_attention": "the fusion module has other layers",
    "strategy.fusion.ff_mult": "the fusion module has other shapes",
    "strategy.fusion.hidden": "the task head has other shapes",
    "strategy.fusion.global_token": "the fusion module has other shapes",
    "strategy.fusion.resampler_tokens": "the resampler has other shapes",
    "strategy.fusion.resampler_depth": "the resampler has other layers",
    "strategy.fusion.max_image_tokens": "the position table has another shape",
}
"""Settings (dotted field paths) a resumed run must share with its checkpoint, with the reason shown when one
differs. The world size (``train.num_workers``) and ``train.zero_stage`` are recorded and checked too. Turning
``train.offload_optimizer`` on or off is allowed: DeepSpeed loads a stage 1/2 checkpoint either way (checked on
CPU with the tiny model)."""


def _get(pipe, dotted: str):
    """The value at ``dotted`` in ``pipe`` as JSON data (tuples -> lists), comparable with a saved meta."""
    node = pipe
    for part in dotted.split("."):
        node = getattr(node, part, None)
    node = node.model_dump(mode="json") if hasattr(node, "model_dump") else node
    return json.loads(json.dumps(node, default=str))


def trainable_signature(module: torch.nn.Module) -> dict:
    """``{"tensors", "params", "digest"}`` of ``module``'s trainable parameters: how many tensors and values,
    and a sha256 of their sorted ``name:shape`` lines (under ZeRO-3 the shape is the full ``ds_shape``)."""
    import hashlib

    lines, count = [], 0
    for name, p in module.named_parameters():
        if p.requires_grad:
            shape = tuple(getattr(p, "ds_shape", p.shape))
            lines.append(f"{name}:{'x'.join(map(str, shape))}")
            count += int(np.prod(shape)) if shape else 1
    lines.sort()
    return {"tensors": len(lines), "params": count,
            "digest": hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]}


#: settings a resume restores from the checkpoint's optimizer and LR-schedule state (DeepSpeed loads the param
#: groups' lr / weight decay / betas / eps and the scheduler's base LRs): a changed value is not used
RESTORED_SETTINGS = ("train.lr", "train.tower_lr", "train.weight_decay", "train.betas", "train.eps")


def checkpoint_meta(pipe, step: int, world_size: int, module: Optional[torch.nn.Module] = None) -> dict:
    """The :data:`META` dict of a checkpoint at optimizer step ``step``: step, world size, ZeRO stage, samples
    seen, the values of :data:`RESUME_SETTINGS`, the batch layout, and with ``module`` (the module DeepSpeed
    trains) its :func:`trainable_signature`."""
    t = pipe.train
    meta = {"step": step, "world_size": world_size, "zero_stage": t.zero_stage,
            "samples_seen": step * t.effective_global_batch, "format": 2,
            "settings": {k: _get(pipe, k) for k in RESUME_SETTINGS},
            "restored": {k: _get(pipe, k) for k in RESTORED_SETTINGS},
            "batch": {"micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
                      "global_batch": t.effective_global_batch}}
    if module is not None:
        meta["trainable"] = trainable_signature(module)
    return meta


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


def _show(v) -> str:
    import json as _json

    return "null" if v is None else _json.dumps(v) if isinstance(v, (dict, list)) else str(v).lower() \
        if isinstance(v, bool) else str(v)


def check_compatible(meta: dict, world_size: int, zero_stage: int, pipe=None) -> list[str]:
    """Raise :class:`CheckpointMismatchError` when the checkpoint described by ``meta`` cannot be resumed by a
    run with ``world_size`` workers, ``zero_stage`` and (when given) the settings of ``pipe``
    (:data:`RESUME_SETTINGS`; fields a checkpoint from an older mmtl did not record are not compared), or when
    it is at or past ``train.max_steps`` without the final export. The message names every field that differs
    and the value to set.

    Returns:
        notes on differences that do not block a resume (another batch layout: the data position is then
        counted in the new micro-batches).
    """
    step = meta.get("step")
    diffs: list[tuple[str, object, object, str]] = []
    if meta.get("world_size") is not None and meta.get("world_size") != world_size:
        diffs.append(("train.num_workers", meta.get("world_size"), world_size,
                      "DeepSpeed's ZeRO optimizer partitions are stored per rank"))
    if meta.get("zero_stage") is not None and meta.get("zero_stage") != zero_stage:
        diffs.append(("train.zero_stage", meta.get("zero_stage"), zero_stage,
                      "DeepSpeed stage 0-2 and stage 3 checkpoints hold different files and partitions"))
    notes: list[str] = []
    if pipe is not None:
        for key, was in (meta.get("settings") or {}).items():
            if key in RESUME_SETTINGS and _get(pipe, key) != was:
                diffs.append((key, was, _get(pipe, key), RESUME_SETTINGS[key]))
        batch = meta.get("batch") or {}
        t = pipe.train
        now = {"micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps}
        changed = [f"train.{k}={now[k]} (checkpoint: {batch[k]})" for k in now if k in batch and batch[k] != now[k]]
        if changed:
            notes.append(f"resuming with {', '.join(changed)}: the global batch is now {t.effective_global_batch}; "
                         f"the data position skips {step} steps of the new batch size")
        ignored = [f"{k}={_show(_get(pipe, k))} (checkpoint: {_show(was)})"
                   for k, was in (meta.get("restored") or {}).items() if _get(pipe, k) != was]
        if ignored:
            notes.append(f"warning: changed since the checkpoint but NOT used: {', '.join(ignored)}; a resumed run "
                         "continues the checkpoint's optimizer and learning-rate schedule. To train with the new "
                         "values start a new run (train.resume=never or another train.name)")
    if diffs:
        lines = "; ".join(f"{k}: checkpoint {_show(was)}, this run {_show(now)} ({why})" for k, was, now, why in diffs)
        fix = " ".join(f"{k}={_show(was)}" for k, was, _, _ in diffs)
        raise CheckpointMismatchError(
            f"cannot resume the checkpoint at step {step} with these settings: {lines}. To resume it, set {fix}; "
            "or start a new run with train.resume=never (or another train.name)")
    if pipe is not None and step is not None and step > pipe.train.max_steps:
        raise CheckpointMismatchError(
            f"the checkpoint is at step {step}, past train.max_steps={pipe.train.max_steps}: set "
            f"train.max_steps={step} or more to resume it, or start a new run with train.resume=never")
    return notes


def check_trainable(meta: dict, module: torch.nn.Module) -> None:
    """Raise :class:`CheckpointMismatchError` when ``module``'s trainable set differs from the one recorded in
    ``meta`` (checkpoints from an older mmtl record none and pass)."""
    was = meta.get("trainable")
    if not was:
        return
    now = trainable_signature(module)
    if now["digest"] != was.get("digest"):
        raise CheckpointMismatchError(
            f"the checkpoint at step {meta.get('step')} trained {was.get('tensors')} tensors ({was.get('params')} "
            f"values); this run trains {now['tensors']} ({now['params']}): the strategy or model differs from the "
            "one it was written with. Resume with the run's own pipeline.yaml, or start a new run with "
            "train.resume=never")


def restore_checkpoint(engine, d: Path, rank: int, world_size: int, zero_stage: int, pipe=None) -> dict:
    """Load DeepSpeed state (module, optimizer, LR schedule) and RNG from ``d``; return its meta.

    Raises:
        CheckpointMismatchError: no mmtl checkpoint, or one the current settings cannot resume
            (:func:`check_compatible`, :func:`check_trainable`), before anything is loaded.
    """
    meta = read_meta(d)
    if meta is None:
        raise CheckpointMismatchError(f"{d} is not an mmtl checkpoint (no {META})")
    check_compatible(meta, world_size, zero_stage, pipe)
    check_trainable(meta, engine.module)
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
