"""Inputs are checked before anything is written, and ``mmtl export`` never deletes what is not an export."""
from __future__ import annotations


import pytest

from conftest import tiny_pipeline
from mmtl.config import build_pipeline


def test_missing_shards_fail_before_a_run_folder_or_mlflow_run_exists(tiny_shards, tmp_path):
    from mmtl.data.shardlist import MissingShardsError
    from mmtl.recipes import run_pipeline

    shards = {**tiny_shards, "train": str(tmp_path / "nope" / "shard-{000000..000001}.tar")}
    raw = tiny_pipeline(shards, tmp_path / "runs")
    with pytest.raises(MissingShardsError, match="missing"):
        run_pipeline(build_pipeline(raw), say=lambda m: None)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_missing_init_from_fails_before_anything_is_written(tiny_shards, tmp_path):
    from mmtl.recipes import run_pipeline

    raw = tiny_pipeline(tiny_shards, tmp_path / "runs")
    raw["model"]["init_from"] = str(tmp_path / "runs" / "quickstart" / "export" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model.init_from=.*not found \(train the model it points to"):
        run_pipeline(build_pipeline(raw), say=lambda m: None)
    assert not (tmp_path / "runs" / "tiny").exists()


def test_cli_missing_data_exits_2_with_a_message_not_a_traceback(tiny_shards, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from mmtl.cli import app

    raw = tiny_pipeline({**tiny_shards, "train": str(tmp_path / "absent")}, tmp_path / "runs")
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["run", str(p)])
    assert res.exit_code == 2, res.output
    assert "absent" in res.output and "Traceback" not in res.output


def test_export_refuses_a_folder_that_is_not_an_earlier_export(tmp_path):
    from mmtl.recipes.export import ExportError, check_export_target

    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "train").mkdir(parents=True)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "important.txt").write_text("keep")
    with pytest.raises(ExportError, match=r"not empty and not an earlier export .*important.txt"):
        check_export_target(keep, run_dir)
    assert (keep / "important.txt").read_text() == "keep"
    for target in (run_dir, run_dir.parent):
        with pytest.raises(ExportError, match="is the run directory or holds it"):
            check_export_target(target, run_dir)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for f in ("model.safetensors", "pipeline.yaml"):
        (earlier / f).write_text("x")
    check_export_target(earlier, run_dir)  # an earlier export is replaced
    check_export_target(tmp_path / "new", run_dir)  # a new folder is fine
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty", run_dir)


def test_a_global_batch_larger_than_the_training_set_is_warned_with_the_batch_size_that_fits(tmp_path):
    """21 pairs and the quickstart's 2 x 128 batch (what `mmtl pipelines copy quickstart` gives a small CSV)."""
    from mmtl.train.fit import batch_larger_than_data

    shards = {k: str(tmp_path / k) for k in ("train", "val", "test")}
    pipe = build_pipeline(tiny_pipeline(shards, tmp_path / "runs", train={"micro_batch_size": 128}))
    note = batch_larger_than_data(pipe, 21)
    assert note.startswith("warning: global batch 256 is larger than the 21 training samples")
    assert "train.micro_batch_size=10 (global batch 20)" in note
    acc = build_pipeline(tiny_pipeline(shards, tmp_path / "runs",
                                       train={"micro_batch_size": 8, "grad_accum_steps": 4}))
    assert "train.micro_batch_size=2 (global batch 16)" in batch_larger_than_data(acc, 21)  # 8 * 4 * 2 = 64 > 21
    assert batch_larger_than_data(pipe, 256) is None and batch_larger_than_data(pipe, 1529) is None


def test_cli_out_of_memory_is_one_error_line_with_the_usage_not_a_traceback(tiny_shards, tmp_path, monkeypatch):
    """Ray's memory monitor killing a worker (seen in the quickstart's feature extraction on a 24 GB machine
    shared with other jobs) ends `mmtl run` with exit 1 and one message, not 60 lines of traceback."""
    import yaml
    from ray.exceptions import OutOfMemoryError
    from typer.testing import CliRunner

    import mmtl.recipes
    from mmtl.cli import app
    from mmtl.runtime import out_of_memory

    ray_text = ("1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 127.0.0.1, "
                "ID: e49a) was 21.19GB used / 23.54GB limit (0.900182)\nOOM kill reason: Memory usage 24183660544B "
                "exceeded threshold\nRefer to the documentation on how to address the out of memory issue: ...")

    def oom(*args, **kwargs):
        raise OutOfMemoryError(ray_text)

    monkeypatch.setattr(mmtl.recipes, "run_pipeline", oom)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(tiny_pipeline(tiny_shards, tmp_path / "runs")))
    res = CliRunner().invoke(app, ["run", str(p)])
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())
    assert "error: Ray stopped a worker: the machine ran out of memory (21.19GB used / 23.54GB limit)" in out
    assert "run the same command again" in out and "Traceback" not in out and "Refer to the documentation" not in out
    assert out_of_memory(ValueError("Memory on the node")) is None
