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
