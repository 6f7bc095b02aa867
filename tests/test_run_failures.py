"""A step that fails after training keeps the finished work: checkpoint, export and a ``summary.json`` with
``status: failed`` are kept, the MLflow run is FAILED (never left RUNNING), the error names the step and how to
redo it, and ``--resume`` redoes only the steps after training (no retraining)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_pipeline
from mmtl.config import build_pipeline

pytestmark = pytest.mark.e2e


def test_eval_failure_after_training_keeps_work_and_resume_redoes_only_eval(ray_local, tiny_shards, tmp_path,
                                                                            monkeypatch):
    from mlflow.tracking import MlflowClient

    from mmtl.recipes import run_pipeline
    from mmtl.recipes.contrastive import ContrastiveRecipe
    from mmtl.recipes.runner import RunStepError

    raw = tiny_pipeline(tiny_shards, tmp_path / "runs", train={"max_steps": 6, "checkpoint_every": 3},
                        eval={"before_training": False})
    real_evaluate = ContrastiveRecipe.evaluate

    def broken(self, export_dir):
        raise OSError("disk full while evaluating")

    monkeypatch.setattr(ContrastiveRecipe, "evaluate", broken)
    with pytest.raises(RunStepError) as info:
        run_pipeline(build_pipeline(raw), say=lambda m: None)
    err = info.value
    assert err.step == "evaluate"
    assert "step 'evaluate' failed after training finished: OSError: disk full" in str(err)
    assert "--resume" in str(err) and "no retraining" in str(err)
    run_dir = Path(raw["train"]["runs_root"]) / "tiny"
    failed = json.loads((run_dir / "summary.json").read_text())
    assert failed["status"] == "failed" and failed["failed_step"] == "evaluate" and failed["steps"] == 6
    assert Path(failed["export_path"]).is_file() and Path(failed["checkpoint"]).is_dir()
    client = MlflowClient(failed["mlflow_tracking_uri"])
    assert client.get_run(failed["mlflow_run_id"]).info.status == "FAILED"
    ckpts = sorted(p.name for p in (run_dir / "train").glob("checkpoint_*"))

    monkeypatch.setattr(ContrastiveRecipe, "evaluate", real_evaluate)
    said: list[str] = []
    summary = run_pipeline(build_pipeline(raw), must_resume=True, say=said.append)
    assert summary["status"] == "finished" and summary["run_dir"] == str(run_dir)
    assert summary["mlflow_run_id"] == failed["mlflow_run_id"] and summary["steps"] == 6
    assert "train_time_s" not in summary  # nothing was trained again
    assert any("training already finished" in m for m in said), said
    assert sorted(p.name for p in (run_dir / "train").glob("checkpoint_*")) == ckpts  # no new checkpoint
    assert summary["metrics"]["train/loss"] > 0  # the final train metrics come back from the checkpoint
    assert 0.0 <= summary["metrics"]["test/image_to_text_recall_at_1"] <= 1.0
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
