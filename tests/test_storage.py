"""Runs roots on object storage (mmtl/storage.py, mmtl/runtime.py) against a real S3 API server on 127.0.0.1
(moto, :func:`conftest.s3_server`): the preflight's three bad inputs, and picking / resuming a run from the store."""
from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import s3_env


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    for k, v in s3_env(s3_server).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MMTL_STAGING_DIR", str(tmp_path / "staging"))
    return s3_server


def test_preflight_writes_and_deletes_a_probe(s3):
    from mmtl import storage

    root = f"s3://{s3['bucket']}/preflight-ok"
    storage.preflight(root)
    assert storage.list_files(root) == {}  # the probe is gone


def test_preflight_missing_bucket(s3):
    from mmtl.storage import StorageError, preflight

    with pytest.raises(StorageError) as e:
        preflight("s3://no-such-bucket-here/runs")
    msg = str(e.value)
    assert msg.startswith("train.runs_root=s3://no-such-bucket-here/runs: ")
    assert "bucket 'no-such-bucket-here' does not exist" in msg and s3["endpoint"] in msg


def test_preflight_wrong_credentials_never_prints_them(s3, monkeypatch):
    from mmtl.storage import StorageError, preflight

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    with pytest.raises(StorageError) as e:
        preflight(f"s3://{s3['bucket']}/runs")
    msg = str(e.value)
    assert "refused the credentials" in msg and "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in msg
    assert "not-the-secret-123" not in msg and s3["secret"] not in msg


def test_preflight_unreachable_endpoint_is_quick(s3, monkeypatch):
    from mmtl.storage import StorageError, preflight

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    with pytest.raises(StorageError) as e:
        preflight(f"s3://{s3['bucket']}/runs", "train.runs_root")
    assert time.perf_counter() - t0 < 15
    assert "cannot reach the endpoint" in str(e.value) and "AWS_ENDPOINT_URL" in str(e.value)


def test_run_pipeline_refuses_a_bad_bucket_before_anything(s3, tiny_shards, tmp_path):
    """The preflight runs before a run folder, an MLflow run or Ray exist."""
    import ray

    from conftest import tiny_pipeline
    from mmtl.config import build_pipeline
    from mmtl.recipes import run_pipeline
    from mmtl.storage import StorageError

    raw = tiny_pipeline(tiny_shards, "s3://no-such-bucket-here/runs",
                        tracking={"uri": f"sqlite:///{tmp_path / 'm.db'}"})
    was_up = ray.is_initialized()
    with pytest.raises(StorageError, match="train.runs_root=s3://no-such-bucket-here/runs"):
        run_pipeline(build_pipeline(raw), say=lambda m: None)
    assert not (tmp_path / "staging").exists() and not (tmp_path / "m.db").exists()
    assert ray.is_initialized() == was_up


def _put(root: str, rel: str, obj) -> None:
    from mmtl import storage

    storage.write_bytes(storage.join(root, rel), obj if isinstance(obj, bytes) else json.dumps(obj).encode())


def test_select_run_dir_resumes_from_the_store(s3, tmp_path):
    """An unfinished run in the bucket is resumed in a staging folder with its files pulled; its checkpoint is
    the one Ray's snapshot registers (mirrored without ds/); a finished run is never resumed."""
    from mmtl import runtime, storage

    root = f"s3://{s3['bucket']}/select"
    _put(root, "job/run.json", {"mlflow_run_id": "abc"})
    _put(root, "job/pipeline.yaml", b"train: {}\n")
    for step in (5, 10):
        _put(root, f"job/train/checkpoint_00000{step // 5}/mmtl_meta.json", {"step": step})
        _put(root, f"job/train/checkpoint_00000{step // 5}/ds/mp_rank_00_model_states.pt", b"x" * 10)
    _put(root, "job/train/checkpoint_manager_snapshot.json",
         {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000001"}})
    run_dir, resuming = runtime.select_run_dir(root, "job", "auto")
    assert resuming and run_dir == tmp_path / "staging" / "s3" / s3["bucket"] / "select" / "job"
    assert runtime.run_uri(run_dir) == f"{root}/job"
    assert json.loads((run_dir / "run.json").read_text()) == {"mlflow_run_id": "abc"}
    ckpt = runtime.latest_checkpoint(run_dir)  # the registered one, not the highest step
    assert ckpt == run_dir / "train" / "checkpoint_000001"
    assert json.loads((ckpt / "mmtl_meta.json").read_text()) == {"step": 5} and not (ckpt / "ds").exists()
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished"}))
    assert runtime.push_run(run_dir) == ["summary.json"]  # only what changed; never train/ or the marker
    assert set(storage.list_files(f"{root}/job")) == {
        "run.json", "pipeline.yaml", "summary.json", "train/checkpoint_manager_snapshot.json",
        *(f"train/checkpoint_00000{i}/{f}" for i in (1, 2) for f in ("mmtl_meta.json", "ds/mp_rank_00_model_states.pt"))}
    new_dir, resuming = runtime.select_run_dir(root, "job", "auto")
    assert not resuming and new_dir.name == "job-2"
    with pytest.raises(FileNotFoundError, match=f"under {root}"):
        runtime.select_run_dir(root, "job", "auto", must_resume=True)


def test_object_lock_conditional_writes(s3):
    """Two triggers: one gets the lock (If-None-Match), the other sees its owner; a lock not refreshed for
    lock_ttl_s is broken by exactly one of two breakers (conditional delete), and an owner whose lock was taken
    over does not delete the new one."""
    from mmtl import storage
    from mmtl.jobs.object_lock import ObjectLock

    uri = f"s3://{s3['bucket']}/locks/retrain.lock"
    a, b = ObjectLock(uri, ttl_s=60), ObjectLock(uri, ttl_s=60)
    assert a.acquire() and not b.acquire()
    assert b.holder["token"] == json.loads(storage.read_bytes(uri))["token"] and b.holder["pid"] > 0
    a.release()
    assert storage.read_bytes(uri) is None and b.acquire()
    b._stop.set()  # b's heartbeat stops: its lock goes stale after ttl 1 s (by the store's clock)
    time.sleep(2.5)
    c, d = ObjectLock(uri, ttl_s=1), ObjectLock(uri, ttl_s=1)
    took = [c.acquire(), d.acquire()]
    assert took == [True, False] and c.broken and "lock_ttl_s=1" in c.broken
    assert d.holder["token"] == json.loads(storage.read_bytes(uri))["token"]
    b.release()  # b's ETag is stale: c's lock stays
    assert json.loads(storage.read_bytes(uri))["token"] == d.holder["token"]
    c.release()
    assert storage.read_bytes(uri) is None


def test_object_lock_refuses_other_stores():
    from mmtl.jobs.object_lock import ObjectLock

    with pytest.raises(ValueError, match="retrain.manifest_dir"):
        ObjectLock("gs://bucket/retrain/retrain.lock", ttl_s=60)


def test_submit_keeps_a_bucket_runs_root_and_asks_for_a_tracking_server(tmp_path, tiny_shards, monkeypatch):
    """A runs root in a bucket outlives the job (no warning for it, even from inside the working_dir); the
    default sqlite MLflow store cannot live there: a warning names tracking.uri. The job gets the AWS env, and
    what submit prints shows no secret."""
    from mmtl.config import load_pipeline
    from mmtl.jobs.runtime_env import build_runtime_env, redact
    from mmtl.jobs.submit import temporary_outputs

    monkeypatch.chdir(tmp_path)
    p = tmp_path / "p.yaml"
    p.write_text(f"data: {{train: {tiny_shards['train']}}}\ntrain: {{runs_root: 's3://bkt/runs'}}\n")
    warnings = temporary_outputs(load_pipeline(p), str(tmp_path))
    assert len(warnings) == 1 and "s3://bkt/runs" in warnings[0] and "tracking.uri=" in warnings[0]
    assert temporary_outputs(load_pipeline(p, ["tracking.uri=http://mlflow:5000"]), str(tmp_path)) == []
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "AWS_DEFAULT_REGION": "eu-west-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rt = build_runtime_env(str(tmp_path))
    assert all(rt["env_vars"][k] == v for k, v in env.items())
    shown = str(redact(rt))
    assert "s3cr3t-value" not in shown and "AKIAEXAMPLE" not in shown and "http://127.0.0.1:9000" in shown


def test_init_from_a_run_in_the_bucket(s3):
    """`model.init_from` written inside the pipeline's runs root moves with a runs root override into the bucket
    (a URI, not a mangled path), and a run folder there is read from its export/model.safetensors."""
    from pathlib import Path

    from mmtl import storage
    from mmtl.config import load_pipeline
    from mmtl.models import WeightsError, _init_file

    root = f"s3://{s3['bucket']}/init"
    pipe = load_pipeline(Path(__file__).parents[1] / "pipelines" / "emoji-coop.yaml", [f"train.runs_root={root}"])
    assert pipe.model.init_from == f"{root}/quickstart/export/model.safetensors"
    storage.write_bytes(f"{root}/quickstart/export/model.safetensors", b"weights")
    for spec in (pipe.model.init_from, f"{root}/quickstart"):
        p = _init_file(spec)
        assert p.read_bytes() == b"weights" and p.is_relative_to(storage.staging_root(root))
    with pytest.raises(WeightsError, match="no such object"):
        _init_file(f"{root}/missing")


def test_retrain_on_a_bucket_uses_the_object_lock(s3, tiny_shards):
    """`mmtl retrain` with a runs root in the bucket: its manifest and lock live in <runs_root>/retrain there
    (the hash cache in staging); a held lock object stops the trigger before any work."""
    from conftest import tiny_pipeline
    from mmtl import storage
    from mmtl.config import build_pipeline
    from mmtl.jobs import retrain as rt
    from mmtl.jobs.object_lock import ObjectLock

    root = f"s3://{s3['bucket']}/retrain-root"
    pipe = build_pipeline(tiny_pipeline(tiny_shards, root, tracking={"uri": "http://127.0.0.1:9", "model_name": "m"}))
    local, store = rt.manifest_location(pipe)
    assert store == f"{root}/retrain" and local == storage.staging_root(store)
    held = ObjectLock(f"{store}/retrain.lock", ttl_s=60)
    assert held.acquire()
    try:
        msgs = []
        out = rt.retrain(pipe, say=msgs.append)
        assert out["action"] == "locked" and rt.exit_code(out) == 3
        assert out["lock"]["token"] == json.loads(storage.read_bytes(f"{store}/retrain.lock"))["token"]
        assert f"{store}/retrain.lock" in msgs[0]
    finally:
        held.release()
