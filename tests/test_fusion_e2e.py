"""`mmtl run pipelines/diagram-vqa.yaml` end to end on a tiny generated diagram set and the tiny two-tower
model (Ray Train, 2 workers, DeepSpeed ZeRO-2), then `mmtl eval --task vqa|itm` on the run."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tiny_pipeline(tmp_path: Path, name: str, **fusion):
    from mmtl.config import build_pipeline
    from mmtl.datasets.diagrams import build_diagrams
    from mmtl.models import tiny_two_tower_config

    if not (tmp_path / "d").exists():
        build_diagrams(tmp_path / "d", train_images=24, test_images=8, image_size=64, seed=1)
    raw = yaml.safe_load((ROOT / "pipelines" / "diagram-vqa.yaml").read_text())
    raw["data"].update(train=str(tmp_path / "d" / "train"), test=str(tmp_path / "d" / "test"))
    raw["model"] = tiny_two_tower_config(image_size=64).model_dump(mode="json")
    raw["strategy"]["fusion"].update(n_heads=4, hidden=16, **fusion)
    raw["train"].update(runs_root=str(tmp_path / "runs"), name=name, max_steps=3, micro_batch_size=8,
                        warmup_steps=0, checkpoint_every=3, log_every=1, lr=0.01)
    return build_pipeline(raw)


@pytest.mark.e2e
def test_diagram_vqa_pipeline_tiny(ray_local, tmp_path):
    from safetensors.torch import load_file

    from mmtl.eval.cli_eval import run_eval
    from mmtl.run import run_pipeline

    summary = run_pipeline(_tiny_pipeline(tmp_path, "vqa", resampler_tokens=2), say=lambda m: None)
    m = summary["metrics"]
    assert summary["steps"] == 3 and math.isfinite(m["train/loss"]) and "train/vqa_acc" in m
    assert 0 <= m["test/vqa/overall"] <= 1
    assert {"test/vqa/count", "test/vqa/colour", "test/vqa/position"} <= set(m)
    assert summary["num_answers"] >= 2 and summary["image_tokens"] == [4, 256]
    assert any(abs(g) > 0 for g in summary["tanh_gates"].values())  # the gates left 0
    sd = load_file(summary["export_path"])
    assert any(k.startswith("fusion.resampler.") for k in sd) and any(k.startswith("head.") for k in sd)
    exported = yaml.safe_load((Path(summary["run_dir"]) / "export" / "pipeline.yaml").read_text())
    assert len(exported["strategy"]["fusion"]["answers"]) == summary["num_answers"]
    report = run_eval(summary["run_dir"], "vqa", str(tmp_path / "d" / "test"), out_dir=str(tmp_path / "ev"),
                      log_to_mlflow=True)
    assert report["metrics"]["vqa/overall"] == pytest.approx(m["test/vqa/overall"])
    assert report["mlflow"]["logged"] and (tmp_path / "ev" / "eval.json").exists()


@pytest.mark.e2e
def test_diagram_itm_pipeline_tiny(ray_local, tmp_path):
    """Image-text matching (hard negatives + ITC) through the same Ray Train loop, then `mmtl eval --task itm`."""
    from safetensors.torch import load_file

    from mmtl.eval.cli_eval import run_eval
    from mmtl.run import run_pipeline

    summary = run_pipeline(_tiny_pipeline(tmp_path, "itm", task="itm"), say=lambda m: None)
    m = summary["metrics"]
    assert summary["task"] == "itm" and summary["steps"] == 3 and summary["num_answers"] == 0
    assert math.isfinite(m["train/loss"]) and 0 <= m["train/itm_acc"] <= 1
    assert 0 <= m["test/itm/accuracy"] <= 1 and {"test/itm/count", "test/itm/position"} <= set(m)
    sd = load_file(summary["export_path"])
    assert {"itc_scale", "itc_image.weight", "itc_text.weight"} <= set(sd) and any(k.startswith("head.") for k in sd)
    report = run_eval(summary["run_dir"], "itm", str(tmp_path / "d" / "test"), out_dir=str(tmp_path / "ev"))
    assert report["metrics"]["itm/accuracy"] == pytest.approx(m["test/itm/accuracy"])
