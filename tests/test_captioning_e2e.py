"""`mmtl run` of the emoji-captioning pipelines end to end with the tiny blip model on tiny synthetic shards
(Ray Train, 2 workers, DeepSpeed ZeRO-2), then `mmtl eval --task captioning`, the registered pyfunc and
`mmtl generate` on the run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pipeline(shards: dict, tmp_path: Path, name: str, kind: str, **caption):
    from mmtl.config import build_pipeline
    from mmtl.models.blip import tiny_blip_config

    pipe_file = "emoji-captioning-lora.yaml" if kind == "lora" else "emoji-captioning.yaml"
    raw = yaml.safe_load((ROOT / "pipelines" / pipe_file).read_text())
    raw["data"] = {"train": shards["train"], "test": shards["test"]}
    raw["eval"]["sets"] = ["test"]  # the pipelines also score val; the tiny shards' val set is not needed here
    long = {"context_length": 40} if caption.get("retrieval_k") else {}  # room for the retrieval prompt
    raw["model"] = tiny_blip_config(decoder={"image_layer": -3}, **long).model_dump(mode="json")
    raw["strategy"]["caption"].update(caption_field=None, num_beams=2, max_new_tokens=6, gallery=4, **caption)
    raw["train"].update(runs_root=str(tmp_path / "runs"), name=name, max_steps=4, micro_batch_size=8,
                        warmup_steps=0, checkpoint_every=2, log_every=1, lr=0.01)
    raw["tracking"]["model_name"] = f"cap-{name}"
    return build_pipeline(raw)


@pytest.mark.e2e
def test_captioning_runs_evaluates_and_generates(ray_local, tiny_shards, tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from mmtl.cli import app
    from mmtl.eval.runner import run_eval
    from mmtl.recipes import run_pipeline

    summary = run_pipeline(_pipeline(tiny_shards, tmp_path, "lora", "lora"), say=lambda m: None)
    m = summary["metrics"]
    assert summary["recipe"] == "captioning" and summary["steps"] == 4 and math.isfinite(m["train/loss"])
    assert m["train/perplexity"] > 1 and "train/logit_scale" not in m
    for k in ("bleu4", "cider_d", "exact_match"):
        assert 0 <= m[f"test/captioning/{k}"] <= 10 and f"test/nn_baseline/{k}" in m
    assert m["test/captioning/num_samples"] == 48
    sd = load_file(summary["export_path"])
    assert not any("lora_" in k for k in sd)  # merged: loads without PEFT
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "captioning" / "gallery_test.png").is_file() and (run_dir / "adapter").is_dir()
    # mmtl eval on the run reproduces the run's numbers (same export, same decoding)
    report = run_eval(str(run_dir), "captioning", tiny_shards["test"], out_dir=str(tmp_path / "ev"))
    assert report["metrics"]["captioning/cider_d"] == pytest.approx(m["test/captioning/cider_d"])
    assert report["metrics"]["nn_baseline/cider_d"] == pytest.approx(m["test/nn_baseline/cider_d"])
    assert report["mlflow"]["logged"]
    # the registered pyfunc: image bytes (+ optional prompt) -> text
    import mlflow.pyfunc
    import pandas as pd

    from tests.conftest import synthetic_pair

    mlflow.set_tracking_uri(summary["mlflow_tracking_uri"])
    pyf = mlflow.pyfunc.load_model("models:/cap-lora/1")
    out = pyf.predict(pd.DataFrame({"image": [synthetic_pair(0)[0], synthetic_pair(1)[0]]}))
    assert list(out.columns) == ["text"] and len(out) == 2
    # mmtl generate, greedy and beams
    img = tmp_path / "x.png"
    img.write_bytes(synthetic_pair(3)[0])
    for beams in ("1", "3"):
        r = CliRunner().invoke(app, ["generate", str(run_dir), "--image", str(img), "--num-beams", beams,
                                     "--max-new-tokens", "5", "--json"])
        assert r.exit_code == 0, r.output
        assert '"text"' in r.output
    r = CliRunner().invoke(app, ["generate", str(run_dir), "--image", str(tmp_path / "missing.png")])
    assert r.exit_code == 2 and "no such file" in " ".join(r.output.split())


@pytest.mark.e2e
def test_retrieval_augmented_captioning_end_to_end(ray_local, tiny_shards, tmp_path):
    """strategy.caption.retrieval_k: the run trains on leave-one-out prompts, saves the datastore into the export,
    and `mmtl eval` on the run, the registered pyfunc (models:/) and `mmtl generate` all retrieve from it."""
    import io

    import mlflow.pyfunc
    import pandas as pd
    from PIL import Image
    from typer.testing import CliRunner

    from mmtl.cli import app
    from mmtl.eval.runner import run_eval
    from mmtl.models.caption_retrieval import DATASTORE_FILE, TOWER_FILE
    from mmtl.recipes import run_pipeline
    from mmtl.tracking.caption_model import caption_images
    from mmtl.tracking.registry import load_exported
    from tests.conftest import synthetic_pair

    pipe = _pipeline(tiny_shards, tmp_path, "ra", "frozen", retrieval_k=2)
    summary = run_pipeline(pipe, say=lambda m: None)
    m = summary["metrics"]
    assert summary["steps"] == 4 and math.isfinite(m["train/loss"]) and 0 <= m["test/captioning/cider_d"] <= 10
    export = Path(summary["export_path"]).parent
    assert (export / DATASTORE_FILE).is_file() and (export / TOWER_FILE).is_file()
    rows = json.loads((Path(summary["run_dir"]) / "captioning" / "captions_test.json").read_text())
    assert all(r["prompt"].startswith("similar: ") and r["prompt"].count(". ") >= 2 for r in rows)
    model, p = load_exported(export)
    assert model.retriever is not None and model.retriever.k == 2 and len(model.retriever.captions) == 192
    report = run_eval(str(summary["run_dir"]), "captioning", tiny_shards["test"], out_dir=str(tmp_path / "ev"))
    assert report["metrics"]["captioning/cider_d"] == pytest.approx(m["test/captioning/cider_d"])
    img_bytes = synthetic_pair(3)[0]
    want = caption_images(model, p, [Image.open(io.BytesIO(img_bytes)).convert("RGB")])[0]
    mlflow.set_tracking_uri(summary["mlflow_tracking_uri"])
    pyf = mlflow.pyfunc.load_model("models:/cap-ra/1")  # the datastore travels with the MLflow model
    assert pyf.predict(pd.DataFrame({"image": [img_bytes]}))["text"].tolist() == [want]
    img = tmp_path / "x.png"
    img.write_bytes(img_bytes)
    r = CliRunner().invoke(app, ["generate", str(summary["run_dir"]), "--image", str(img), "--num-beams",
                                 str(p.strategy.caption.num_beams), "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().split("\t")[1] == want
