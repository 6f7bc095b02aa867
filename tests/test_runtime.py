import json
import os
import subprocess
import sys

from mmtl.runtime import select_run_dir


def test_importing_mmtl_keeps_ray_on_loopback():
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once at import: mmtl sets it before anything imports ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    code = ("import mmtl.tracking.mlflow_utils as m; m.system_info(); "
            "import ray._private.ray_constants as c; print(c.ENABLE_RAY_CLUSTER)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


def test_select_run_dir_resumes_unfinished_and_numbers_new(tmp_path):
    path, resuming = select_run_dir(str(tmp_path), "job", "auto")
    assert path == tmp_path / "job" and not resuming
    ck = tmp_path / "job" / "train" / "checkpoint_1"
    ck.mkdir(parents=True)
    (ck / "mmtl_meta.json").write_text(json.dumps({"step": 5, "world_size": 2}))
    assert select_run_dir(str(tmp_path), "job", "auto") == (tmp_path / "job", True)
    assert select_run_dir(str(tmp_path), "job", "never") == (tmp_path / "job-2", False)
    (tmp_path / "job" / "summary.json").write_text(json.dumps({"status": "finished"}))
    assert select_run_dir(str(tmp_path), "job", "auto") == (tmp_path / "job-2", False)
    import pytest

    with pytest.raises(FileNotFoundError, match="nothing|no unfinished"):
        select_run_dir(str(tmp_path), "job", "auto", must_resume=True)


def test_latest_checkpoint_is_the_one_ray_resumes(tmp_path):
    from mmtl.runtime import latest_checkpoint

    train = tmp_path / "train"
    for name, step in [("checkpoint_a", 100), ("checkpoint_b", 200), ("checkpoint_c", 300)]:
        (train / name).mkdir(parents=True)
        if name != "checkpoint_c":  # c: a folder without meta (an interrupted write)
            (train / name / "mmtl_meta.json").write_text(json.dumps({"step": step}))
    assert latest_checkpoint(tmp_path) == train / "checkpoint_b"  # no snapshot: highest step with meta
    snap = train / "checkpoint_manager_snapshot.json"
    snap.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_a"}}))
    assert latest_checkpoint(tmp_path) == train / "checkpoint_a"  # b was written but never registered
    for bad in ('{"latest_checkpoint_result": null}', "not json", json.dumps(
            {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_c"}})):
        snap.write_text(bad)
        assert latest_checkpoint(tmp_path) == train / "checkpoint_b"
    assert latest_checkpoint(tmp_path / "nothing") is None
