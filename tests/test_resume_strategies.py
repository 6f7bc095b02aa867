"""Resume works for LoRA and frozen (LiT) runs exactly as for full runs: a run stopped after its step-2
checkpoint and resumed from it ends with the same weights as an uninterrupted run (one process, gloo, ZeRO-2,
DeepSpeed state + RNG + data position restored)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mmtl.config import build_pipeline
from mmtl.models import build_model, tiny_two_tower_config
from mmtl.strategies import apply_strategy
from mmtl.train.loop import run_training, seed_everything, single_process_group

STRATEGIES = {
    "lora": {"kind": "lora", "lora": {"r": 4, "alpha": 8.0, "dropout": 0.1}},
    "lit": {"kind": "frozen", "lock": "image"},
    "full": {"kind": "full"},
}


def _pipe(strategy: dict, max_steps: int):
    return build_pipeline({
        "data": {"train": "unused"}, "model": tiny_two_tower_config().model_dump(mode="json"),
        "strategy": strategy,
        "train": {"num_workers": 1, "zero_stage": 2, "micro_batch_size": 4, "max_steps": max_steps,
                  "checkpoint_every": 2, "lr": 0.01, "warmup_steps": 1, "weight_decay": 0.0},
    })


def _batches(model, n: int):
    g = torch.Generator().manual_seed(7)
    words = ["red", "blue", "circle", "square", "two", "bars", "arrow", "box"]
    for i in range(n):
        caps = [" ".join(words[(i + j + k) % len(words)] for k in range(3)) for j in range(4)]
        yield {"image": torch.randn(4, 3, 32, 32, generator=g), **model.tokenize(caps)}


def _train(strategy: dict, max_steps: int, resume_dir=None, keep: Path | None = None) -> dict:
    pipe = _pipe(strategy, max_steps)
    seed_everything(pipe.train.seed)
    model = build_model(pipe.model)
    apply_strategy(model, pipe.strategy, zero_stage=2)

    def report(metrics, ckpt):
        if ckpt is not None and keep is not None and metrics["steps"] == 2:
            shutil.copytree(ckpt, keep, dirs_exist_ok=True)

    with single_process_group():
        run_training(pipe, model, _batches(model, 8), resume_dir=resume_dir, report=report)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resume_matches_uninterrupted(name, tmp_path):
    full = _train(STRATEGIES[name], 4, keep=tmp_path / "ckpt2")
    assert (tmp_path / "ckpt2" / "mmtl_meta.json").exists()
    if name == "lora":
        assert (tmp_path / "ckpt2" / "adapter" / "mmtl_extra.safetensors").exists()
    resumed = _train(STRATEGIES[name], 4, resume_dir=tmp_path / "ckpt2")
    two = _train(STRATEGIES[name], 2)
    changed = [k for k in full if not torch.equal(full[k], two[k])]
    assert changed, "steps 3-4 changed nothing: the test could not tell resume from no resume"
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
