"""End-to-end runs on one local Ray instance (2 CPU workers, gloo): few and tiny, they share the instance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_pipeline
from mmtl.config import build_pipeline

pytestmark = pytest.mark.e2e


def _mlflow(summary):
    from mlflow.tracking import MlflowClient

    return MlflowClient(summary["mlflow_tracking_uri"])


def test_zero2_feature_cache_kill_resume_and_mlflow(ray_local, tiny_shards, tmp_path, monkeypatch):
    """ZeRO-2, frozen towers (cached features): a worker is SIGKILLed at step 13, Ray restarts the group from
    the step-10 checkpoint, the run finishes 24 steps; steps <= 10 are trained once; MLflow has it all."""
    from mmtl.recipes import run_pipeline

    trace = tmp_path / "trace"
    monkeypatch.setenv("MMTL_STEP_TRACE", str(trace))
    monkeypatch.setenv("MMTL_KILL_AT", f"13:1:{tmp_path / 'killed'}")
    raw = tiny_pipeline(tiny_shards, tmp_path / "runs", train={"max_steps": 24, "max_failures": 1, "zero_stage": 2,
                                                               "lr": 0.003})
    summary = run_pipeline(build_pipeline(raw), say=lambda m: None)
    assert (tmp_path / "killed").exists(), "the fault was not injected"
    steps0 = [int(x) for x in Path(f"{trace}.rank0").read_text().split()]
    assert steps0[:10] == list(range(1, 11)) and steps0[-1] == 24
    assert steps0.count(10) == 1 and steps0.count(11) == 2, steps0  # resumed at 11, nothing before it twice
    assert sorted(set(steps0)) == list(range(1, 25))
    on_disk = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert on_disk == summary
    for key in ("mlflow_run_id", "steps", "wall_time_s", "metrics", "export_path"):
        assert key in summary
    assert summary["steps"] == 24 and summary["feature_cache"] is True
    m = summary["metrics"]
    assert "test/image_to_text_recall_at_1" in m and "before/test/image_to_text_recall_at_1" in m
    assert all("@" not in k for k in m)
    assert Path(summary["export_path"]).exists()
    client = _mlflow(summary)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.zero_stage"] == "2"
    assert run.info.status == "FINISHED"
    losses = [x.value for x in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda x: x.step)]
    assert len(losses) >= 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    versions = client.search_model_versions("name='tiny-model'")
    assert any(v.run_id == run.info.run_id for v in versions)


@pytest.mark.parametrize("stage,precision,kind", [(1, "fp32", "lora"), (3, "bf16", "full")])
def test_image_stream_zero_stages(ray_local, tiny_shards, tmp_path, stage, precision, kind):
    """Images streamed through Ray Data (no feature cache): LoRA in both towers on ZeRO-1 fp32 (adapter saved,
    export merged so it loads without PEFT), every parameter trained on ZeRO-3 bf16."""
    from mmtl.recipes import run_pipeline

    raw = tiny_pipeline(tiny_shards, tmp_path / "runs", strategy={"kind": kind},
                        train={"zero_stage": stage, "precision": precision, "max_steps": 6, "checkpoint_every": 3},
                        eval={"before_training": False}, tracking={"model_name": None, "log_model": False})
    summary = run_pipeline(build_pipeline(raw), say=lambda m: None)
    assert summary["steps"] == 6 and summary["feature_cache"] is False
    assert summary["metrics"]["train/loss"] > 0
    from safetensors.torch import load_file

    sd = load_file(summary["export_path"])
    assert any(k.startswith("image_tower.") for k in sd) and "logit_scale" in sd
    assert not any("lora_" in k for k in sd)
    if kind == "lora":
        adapter = load_file(str(Path(summary["run_dir"]) / "adapter" / "adapter_model.safetensors"))
        assert adapter and all("lora_" in k for k in adapter)
        assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # trained, not empty
        from mmtl.tracking.registry import load_exported

        model, _ = load_exported(Path(summary["export_path"]).parent)  # plain model, no PEFT
        assert not any("lora_" in n for n, _ in model.named_parameters())
        _check_export_merge(Path(summary["run_dir"]), load_file(summary["export_path"]))
    assert summary["trainable"]["params_trainable"] > 0
    assert summary["trainable"]["est_model_state_bytes_per_worker"] > 0
    assert summary["metrics"]["train/peak_rss_mb"] > 50


def _check_export_merge(run_dir: Path, trained_sd):
    """`mmtl export RUN --merge` from the last checkpoint's adapter equals the export merged at training time;
    the step-3 checkpoint exports too (an interrupted run can be exported) and differs from the final one."""
    import torch
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from mmtl.cli import app

    res = CliRunner().invoke(app, ["export", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["merged"] and info["step"] == 6 and info["max_abs_diff"] < 1e-4
    merged = load_file(str(Path(info["out"]) / "model.safetensors"))
    assert set(merged) == set(trained_sd)
    for k, v in trained_sd.items():
        assert torch.allclose(merged[k], v, atol=1e-5), k
    early = run_dir / "early"
    res = CliRunner().invoke(app, ["export", str(run_dir), "--checkpoint", "3", "--out", str(early), "--json"])
    assert res.exit_code == 0, res.output
    sd3 = load_file(str(early / "model.safetensors"))
    assert any(not torch.equal(sd3[k], trained_sd[k]) for k in trained_sd)
    res = CliRunner().invoke(app, ["export", str(run_dir), "--no-merge", "--json"])
    assert res.exit_code == 0 and (Path(json.loads(res.stdout)["out"]) / "adapter" / "mmtl_extra.safetensors").exists()
    res = CliRunner().invoke(app, ["export", str(run_dir), "--checkpoint", "999"])
    assert res.exit_code == 2 and "no checkpoint at step 999" in res.output


def test_resume_after_failure_continues_at_checkpoint(ray_local, tiny_shards, tmp_path, monkeypatch, mlflow_server):
    """max_failures=0: the killed run fails; `--resume` continues from step 5 to 12 in the same MLflow run,
    tracked on a real `mlflow server` over http."""
    from mmtl.recipes import run_pipeline

    trace = tmp_path / "trace"
    monkeypatch.setenv("MMTL_STEP_TRACE", str(trace))
    monkeypatch.setenv("MMTL_KILL_AT", f"7:0:{tmp_path / 'killed'}")
    raw = tiny_pipeline(tiny_shards, tmp_path / "runs", train={"max_steps": 12, "checkpoint_every": 5,
                                                               "max_failures": 0},
                        tracking={"uri": mlflow_server, "model_name": "tiny-http"})
    with pytest.raises(RuntimeError, match="training failed"):
        run_pipeline(build_pipeline(raw), say=lambda m: None)
    summary = run_pipeline(build_pipeline(raw), must_resume=True, say=lambda m: None)
    steps = [int(x) for x in Path(f"{trace}.rank0").read_text().split()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10, 11, 12]
    assert summary["steps"] == 12 and Path(summary["run_dir"]).name == "tiny"
    client = _mlflow(summary)
    assert summary["mlflow_tracking_uri"] == mlflow_server
    run = client.get_run(summary["mlflow_run_id"])
    steps_logged = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps_logged == set(range(1, 13))  # one MLflow run across the failure and the resume
    assert "test/image_to_text_recall_at_1" in run.data.metrics
    assert client.get_model_version("tiny-http", summary["registered_model"]["version"]).run_id == run.info.run_id
    # a checkpoint from 2 workers refuses to resume with 1, before training
    from mmtl.train.checkpoint import CheckpointMismatchError, check_compatible, read_meta
    from mmtl.runtime import latest_checkpoint

    with pytest.raises(CheckpointMismatchError, match="num_workers=2"):
        check_compatible(read_meta(latest_checkpoint(Path(summary["run_dir"]))), 1, 2)
