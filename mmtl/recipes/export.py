"""``mmtl export RUN``: write a standalone model folder from a run's checkpoint.

* The run's strategy decides first (:meth:`mmtl.strategies.base.Strategy.export_checkpoint`). LoRA runs:
  every checkpoint holds ``adapter/`` (a PEFT adapter + ``mmtl_extra.safetensors`` with the heads
  and logit scale). ``merge=True`` rebuilds the base model from the run's ``pipeline.yaml`` (base tower
  weights from their local paths, ``model.init_from`` applied), injects and loads the adapter, folds it into
  the base weights (:mod:`mmtl.strategies.lora_adapters`) and writes ``model.safetensors`` +
  ``pipeline.yaml``: a plain export that loads without PEFT (:func:`mmtl.tracking.registry.load_exported`).
  Before writing it checks, on a fixed probe batch, that the merged model's image and text embeddings equal
  the adapted model's (``allclose``, atol 1e-4); here, that the written folder reloads to the same outputs.
  ``merge=False`` writes the adapter folder + ``pipeline.yaml``.
* Otherwise the final checkpoint's consolidated ``export/`` is copied (nothing to merge).
* Every export with merged weights also gets its family's native format
  (:func:`mmtl.models.exported.write_native_formats`): ``open_clip_model.safetensors`` +
  ``open_clip_config.json`` for open_clip runs. ``fmt="open_clip"`` (``--format open_clip``) makes that format
  required: a run open_clip cannot express (another family, a fusion model, an unmerged adapter) is an
  :class:`ExportError` saying what cannot be expressed.

Works on any checkpoint of a LoRA run (not only the last), so an interrupted run can be exported.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from mmtl.strategies import get_strategy
from mmtl.strategies.base import ExportError

__all__ = ["ExportError", "export_run", "find_checkpoint"]


def find_checkpoint(run_dir: Path, checkpoint: Optional[str]) -> Path:
    """The checkpoint folder: ``checkpoint`` as a path, as a step number (``"200"``), or the latest.

    Raises:
        ExportError: no such run / checkpoint.
    """
    from mmtl.runtime import latest_checkpoint, local_checkpoint, run_uri
    from mmtl.train.checkpoint import read_meta

    if not (run_dir / "pipeline.yaml").exists():
        raise ExportError(f"{run_dir} is not an mmtl run directory (no pipeline.yaml)")
    store = run_uri(run_dir)  # a run on object storage: checkpoints are downloaded whole when chosen
    if checkpoint is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ExportError(f"{run_dir} has no checkpoint yet (train/checkpoint_*)")
        return _whole(run_dir, ckpt) if store else ckpt
    if Path(checkpoint).is_dir():
        return Path(checkpoint)
    if checkpoint.isdigit():
        if store:
            from mmtl.storage import join, list_dirs

            for name in list_dirs(join(store, "train")):
                if name.startswith("checkpoint_"):
                    local_checkpoint(run_dir, name)  # meta (and export/adapter), not the DeepSpeed state
        for d in sorted(run_dir.glob("train/checkpoint_*")):
            meta = read_meta(d)
            if meta and int(meta["step"]) == int(checkpoint):
                return _whole(run_dir, d) if store else d
        raise ExportError(f"no checkpoint at step {checkpoint} under {run_dir}/train (kept: train.keep_checkpoints)")
    raise ExportError(f"--checkpoint must be a folder or a step number, got {checkpoint!r}")


def _whole(run_dir: Path, ckpt: Path) -> Path:
    """Download the rest of a mirrored checkpoint of a run on object storage (DeepSpeed's ``ds/`` state)."""
    from mmtl.runtime import run_uri
    from mmtl.storage import download_dir, join

    download_dir(join(run_uri(run_dir), "train", ckpt.name), ckpt)
    return ckpt


FORMATS = ("mmtl", "open_clip")
MMTL_FORMAT, OPEN_CLIP_FORMAT = FORMATS


def export_run(run_dir: Path, out: Path, merge: bool = True, checkpoint: Optional[str] = None,
               fmt: str = "mmtl") -> dict:
    """Write an export of ``run_dir`` into ``out`` (see module docstring) and return what was written:
    ``{"out", "checkpoint", "step", "kind", "merged", "max_abs_diff"?, "formats"}`` (``formats``: the
    native-format files written besides mmtl's, e.g. ``open_clip_model.safetensors``).

    ``out`` must be missing, empty, or an earlier export (it is replaced atomically); any other folder is
    refused, so an export never deletes unrelated files.

    Raises:
        ExportError: not a run, no such checkpoint, an ``out`` folder that is not ours to replace, nothing
            exportable, a failed merge check, an unknown ``fmt``, or a run ``fmt`` cannot express.
    """
    import yaml

    from mmtl.config import Pipeline
    from mmtl.models.exported import write_native_formats
    from mmtl.models.open_clip_export import open_clip_blocker
    from mmtl.train.checkpoint import read_meta

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    ckpt = find_checkpoint(run_dir, checkpoint)
    check_export_target(out, run_dir)
    pipe = Pipeline.model_validate(yaml.safe_load((run_dir / "pipeline.yaml").read_text()))
    step = int((read_meta(ckpt) or {}).get("step", -1))
    if fmt == OPEN_CLIP_FORMAT:
        why = open_clip_blocker(pipe.model.family, pipe.strategy.kind)
        if why is None and not merge and (ckpt / "adapter").is_dir():
            why = "--no-merge writes the LoRA adapter alone; open_clip needs merged weights (use --merge)"
        if why:
            raise ExportError(f"--format open_clip: this run cannot be expressed in open_clip's format: {why}")
    info: dict = {"out": str(out), "checkpoint": str(ckpt), "step": step, "kind": pipe.strategy.kind, "merged": False,
                  "formats": []}
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        strategy = get_strategy(pipe.strategy.kind)
        written = strategy.export_checkpoint(pipe, ckpt, tmp, merge)
        if written is not None:
            model = written.pop("model", None)
            if model is not None:
                _check_reload(tmp, model)
            info.update(written)
        elif (ckpt / "export").is_dir():
            shutil.copytree(ckpt / "export", tmp, dirs_exist_ok=True)
            info["merged"] = strategy.exported_is_merged()  # e.g. the final LoRA export is merged at training time
        else:
            raise ExportError(f"{ckpt} has no export/ (only the final checkpoint of a {pipe.strategy.kind!r} run "
                              "carries one): finish the run with `mmtl run --resume`, or pick its last checkpoint")
        if (tmp / "model.safetensors").exists():
            try:
                info["formats"] = write_native_formats(tmp, require=None if fmt == "mmtl" else fmt)
            except ValueError as exc:
                raise ExportError(str(exc)) from exc
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic on one filesystem: a crash never leaves a half-written export
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


EXPORT_ENTRIES = {"model.safetensors", "pipeline.yaml", "adapter", "prompt.safetensors", "prompt.json",
                  "open_clip_model.safetensors", "open_clip_config.json"}


def check_export_target(out: Path, run_dir: Path) -> None:
    """Refuse an ``--out`` folder whose contents an export would destroy: only a missing or empty folder, or an
    earlier export (nothing but :data:`EXPORT_ENTRIES`), is replaced; never the run directory or a folder
    holding it.

    Raises:
        ExportError: the message names the folder and what is in it.
    """
    out_r, run_r = out.resolve(), run_dir.resolve()
    if out_r == run_r or out_r in run_r.parents:
        raise ExportError(f"--out {out} is the run directory or holds it: choose another folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES)
        if other:
            raise ExportError(f"--out {out} is not empty and not an earlier export (it holds {other[:5]}): "
                              "choose a new or empty folder; nothing was changed")


def _check_reload(export_dir: Path, model) -> None:
    from mmtl.strategies.lora_adapters import probe_embeddings
    from mmtl.tracking.registry import load_exported

    reloaded, _ = load_exported(export_dir)
    for a, b in zip(probe_embeddings(model), probe_embeddings(reloaded)):
        if not torch.allclose(a, b, atol=1e-5):
            raise ExportError("the written export does not reload to the merged model's outputs")
