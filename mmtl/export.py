"""``mmtl export RUN``: write a standalone model folder from a run's checkpoint.

* LoRA runs (``strategy.kind: lora``): every checkpoint holds ``adapter/`` (the PEFT adapter weights +
  ``trainable.safetensors`` with the heads and logit scale). ``merge=True`` rebuilds the base model from the
  run's ``pipeline.yaml`` (base tower weights from their local paths, ``model.init_from`` applied), injects
  and loads the adapter, folds it into the base weights (:func:`mmtl.strategies.lora.merge_lora`) and writes
  ``model.safetensors`` + ``pipeline.yaml``: a plain export that loads without PEFT
  (:func:`mmtl.tracking.registry.load_exported`). Before writing it checks, on a fixed probe batch, that the
  merged model's image and text embeddings equal the adapted model's (``allclose``, atol 1e-4) and that the
  written folder reloads to the same outputs. ``merge=False`` writes the adapter folder + ``pipeline.yaml``.
* Other runs: the final checkpoint's consolidated ``export/`` is copied (nothing to merge).

Works on any checkpoint of a LoRA run (not only the last), so an interrupted run can be exported.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch


class ExportError(ValueError):
    """The run or checkpoint cannot be exported as asked (the message says why and what to do)."""


def find_checkpoint(run_dir: Path, checkpoint: Optional[str]) -> Path:
    """The checkpoint folder: ``checkpoint`` as a path, as a step number (``"200"``), or the latest.

    Raises:
        ExportError: no such run / checkpoint.
    """
    from mmtl.runtime import latest_checkpoint
    from mmtl.train.checkpoint import read_meta

    if not (run_dir / "pipeline.yaml").exists():
        raise ExportError(f"{run_dir} is not an mmtl run directory (no pipeline.yaml)")
    if checkpoint is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ExportError(f"{run_dir} has no checkpoint yet (train/checkpoint_*)")
        return ckpt
    if Path(checkpoint).is_dir():
        return Path(checkpoint)
    if checkpoint.isdigit():
        for d in sorted(run_dir.glob("train/checkpoint_*")):
            meta = read_meta(d)
            if meta and int(meta["step"]) == int(checkpoint):
                return d
        raise ExportError(f"no checkpoint at step {checkpoint} under {run_dir}/train (kept: train.keep_checkpoints)")
    raise ExportError(f"--checkpoint must be a folder or a step number, got {checkpoint!r}")


def _probe(model, pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = model.image_size
    return {"images": torch.randn(2, 3, size, size, generator=g),
            **model.tokenize(["a probe caption for the export check", "another probe"])}


@torch.no_grad()
def _embed(model, probe: dict) -> tuple[torch.Tensor, torch.Tensor]:
    img, txt = model.eval()(probe["images"], probe["input_ids"], probe["attention_mask"])
    return img.float(), txt.float()


def merged_from_adapter(pipe, adapter_dir: Path):
    """Base model + adapter folder -> (merged model, ``logit_bias`` or None, max |Δ| of the embeddings).

    Raises:
        ExportError: missing files, or merged outputs differ from the adapted ones (atol 1e-4).
    """
    from safetensors.torch import load_file

    from mmtl.models import build_model
    from mmtl.strategies.lora import load_adapter, merge_lora
    from mmtl.train.checkpoint import TRAINABLE_FILE

    if not (adapter_dir / TRAINABLE_FILE).exists():
        raise ExportError(f"{adapter_dir} has no {TRAINABLE_FILE} (written by mmtl >= 0.2); export the run's final "
                          "export/ folder instead, it is already merged")
    from mmtl.train.loop import seed_everything

    seed_everything(pipe.train.seed)  # as the workers do: random-init towers (tiny configs) get the same weights
    model = build_model(pipe.model)
    load_adapter(model, adapter_dir)
    rest = load_file(str(adapter_dir / TRAINABLE_FILE))
    bias = rest.pop("logit_bias", None)
    own = dict(model.named_parameters())
    unknown = sorted(set(rest) - set(own))
    if unknown:
        raise ExportError(f"{adapter_dir / TRAINABLE_FILE} does not fit the model: unknown {unknown[:6]}")
    model.load_state_dict(rest, strict=False)
    probe = _probe(model, pipe)
    before = _embed(model, probe)
    merge_lora(model)
    after = _embed(model, probe)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    if diff > 1e-4:
        raise ExportError(f"merged outputs differ from base + adapter by {diff:.2e} (> 1e-4): adapter is broken")
    return model, bias, diff


def export_run(run_dir: Path, out: Path, merge: bool = True, checkpoint: Optional[str] = None) -> dict:
    """Write an export of ``run_dir`` into ``out`` (see module docstring) and return what was written:
    ``{"out", "checkpoint", "step", "kind", "merged", "max_abs_diff"?}``.

    Raises:
        ExportError: not a run, no such checkpoint, nothing exportable, or a failed merge check.
    """
    import yaml
    from safetensors.torch import save_file

    from mmtl.config import Pipeline
    from mmtl.train.checkpoint import read_meta

    run_dir, out = Path(run_dir), Path(out)
    ckpt = find_checkpoint(run_dir, checkpoint)
    pipe = Pipeline.model_validate(yaml.safe_load((run_dir / "pipeline.yaml").read_text()))
    step = int((read_meta(ckpt) or {}).get("step", -1))
    info: dict = {"out": str(out), "checkpoint": str(ckpt), "step": step, "kind": pipe.strategy.kind, "merged": False}
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        if pipe.strategy.kind == "lora" and (ckpt / "adapter").is_dir():
            if merge:
                model, bias, diff = merged_from_adapter(pipe, ckpt / "adapter")
                sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
                if bias is not None:
                    sd["logit_bias"] = bias
                save_file(sd, str(tmp / "model.safetensors"))
                (tmp / "pipeline.yaml").write_text(pipe.to_yaml())
                _check_reload(tmp, model, pipe)
                info.update(merged=True, max_abs_diff=diff)
            else:
                shutil.copytree(ckpt / "adapter", tmp / "adapter")
                (tmp / "pipeline.yaml").write_text(pipe.to_yaml())
        elif (ckpt / "export").is_dir():
            shutil.copytree(ckpt / "export", tmp, dirs_exist_ok=True)
            info["merged"] = pipe.strategy.kind == "lora"  # the final LoRA export is merged at training time
        else:
            raise ExportError(f"{ckpt} has no export/ (only the final checkpoint of a {pipe.strategy.kind!r} run "
                              "carries one): finish the run with `mmtl run --resume`, or pick its last checkpoint")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic on one filesystem: a crash never leaves a half-written export
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _check_reload(export_dir: Path, model, pipe) -> None:
    from mmtl.tracking.registry import load_exported

    reloaded, _ = load_exported(export_dir)
    probe = _probe(model, pipe)
    for a, b in zip(_embed(model, probe), _embed(reloaded, probe)):
        if not torch.allclose(a, b, atol=1e-5):
            raise ExportError("the written export does not reload to the merged model's outputs")
