"""`mmtl run pipelines/diagram-vqa.yaml` end to end on a tiny generated diagram set and the tiny two-tower
model (Ray Train, 2 workers, DeepSpeed ZeRO-2), then `mmtl eval --task vqa|itm` on the run."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tiny_pipeline(tmp_path: Path, name: str, model_name=None, **fusion):
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
    raw["tracking"]["model_name"] = model_name
    return build_pipeline(raw)


@pytest.mark.e2e
def test_diagram_vqa_pipeline_tiny(ray_local, tmp_path):
    from safetensors.torch import load_file

    from mmtl.eval.runner import run_eval
    from mmtl.recipes import run_pipeline

    summary = run_pipeline(_tiny_pipeline(tmp_path, "vqa", model_name="vqa-tiny", resampler_tokens=2,
                                          self_attention=True, image_layer=-3), say=lambda m: None)
    m = summary["metrics"]
    assert summary["steps"] == 3 and math.isfinite(m["train/loss"]) and "train/vqa_acc" in m
    assert 0 <= m["test/vqa/overall"] <= 1
    assert {"test/vqa/count", "test/vqa/colour", "test/vqa/position"} <= set(m)
    assert summary["num_answers"] >= 2 and summary["image_tokens"] == [16, 48]  # image_layer -3: a 4x4 grid of 48-d tokens
    assert any(abs(g) > 0 for g in summary["tanh_gates"].values())  # the gates left 0
    sd = load_file(summary["export_path"])
    assert any(k.startswith("fusion.resampler.") for k in sd) and any(k.startswith("head.") for k in sd)
    exported = yaml.safe_load((Path(summary["run_dir"]) / "export" / "pipeline.yaml").read_text())
    assert len(exported["strategy"]["fusion"]["answers"]) == summary["num_answers"]
    report = run_eval(summary["run_dir"], "vqa", str(tmp_path / "d" / "test"), out_dir=str(tmp_path / "ev"),
                      log_to_mlflow=True)
    assert report["metrics"]["vqa/overall"] == pytest.approx(m["test/vqa/overall"])
    assert report["mlflow"]["logged"] and (tmp_path / "ev" / "eval.json").exists()
    # registered: mmtl eval on the registry URI, and the pyfunc answers questions from image bytes
    assert summary["registered_model"]["name"] == "vqa-tiny" and summary["registered_model"]["version"] == "1"
    uri = summary["mlflow_tracking_uri"]
    reg = run_eval("models:/vqa-tiny/1", "vqa", str(tmp_path / "d" / "test"), tracking_uri=uri, log_to_mlflow=False)
    assert reg["metrics"]["vqa/overall"] == pytest.approx(m["test/vqa/overall"])
    _check_pyfunc(uri, "models:/vqa-tiny/1", summary, tmp_path / "d" / "test", ["answer", "score"])


@pytest.mark.e2e
def test_diagram_itm_pipeline_tiny(ray_local, tmp_path):
    """Image-text matching (hard negatives + ITC) through the same Ray Train loop, then `mmtl eval --task itm`."""
    from safetensors.torch import load_file

    from mmtl.eval.runner import run_eval
    from mmtl.recipes import run_pipeline

    summary = run_pipeline(_tiny_pipeline(tmp_path, "itm", task="itm"), say=lambda m: None)
    m = summary["metrics"]
    assert summary["task"] == "itm" and summary["steps"] == 3 and summary["num_answers"] == 0
    assert math.isfinite(m["train/loss"]) and 0 <= m["train/itm_acc"] <= 1
    assert 0 <= m["test/itm/accuracy"] <= 1 and {"test/itm/count", "test/itm/position"} <= set(m)
    sd = load_file(summary["export_path"])
    assert {"itc_scale", "itc_image.weight", "itc_text.weight"} <= set(sd) and any(k.startswith("head.") for k in sd)
    report = run_eval(summary["run_dir"], "itm", str(tmp_path / "d" / "test"), out_dir=str(tmp_path / "ev"))
    assert report["metrics"]["itm/accuracy"] == pytest.approx(m["test/itm/accuracy"])
    assert summary["registered_model"] == {"uri": summary["registered_model"]["uri"]}  # logged, not registered
    _check_pyfunc(summary["mlflow_tracking_uri"], summary["registered_model"]["uri"], summary, tmp_path / "d" / "test",
                  ["match_prob"])


def _check_pyfunc(uri: str, model_uri: str, summary: dict, shards: Path, columns: list[str]) -> None:
    """The MLflow pyfunc scores (image bytes, text) rows exactly like the export loaded directly."""
    import collections
    import io

    import mlflow.pyfunc
    import pandas as pd

    from mmtl.data.samples import CleanOptions
    from mmtl.data.shardio import iter_samples
    from mmtl.fusion.export import load_fusion_export
    from mmtl.tracking.fusion_model import predict_rows

    samples = [s for _, s in zip(range(5), iter_samples(str(shards), CleanOptions(), collections.Counter()))]
    blobs = []
    for s in samples:
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    mlflow.set_tracking_uri(uri)
    texts = [s.caption for s in samples]
    out = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": blobs, "text": texts}))
    assert list(out.columns) == columns and len(out) == 5
    module, pipe = load_fusion_export(Path(summary["run_dir"]) / "export")
    direct = predict_rows(module, pipe, [s.image for s in samples], [s.caption for s in samples])
    for col in columns:
        if col == "answer":
            assert list(out[col]) == direct[col] and set(direct[col]) <= set(pipe.strategy.fusion.answers)
        else:
            np.testing.assert_allclose(out[col].to_numpy(), direct[col], atol=1e-5)
            assert ((out[col] >= 0) & (out[col] <= 1)).all()
