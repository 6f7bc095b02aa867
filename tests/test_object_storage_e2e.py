"""One end-to-end run with everything on a real S3 API server on 127.0.0.1 (moto, :func:`conftest.s3_server`):
shards read from the bucket, ``train.runs_root=s3://...`` (Ray Train's checkpoints, mmtl's run files and the
export in the bucket), a worker killed and the run resumed from the checkpoint in the bucket, and an MLflow
server whose artifact store is the bucket (the registered model loads back from it)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import s3_env, stop_group, tiny_pipeline, wait_until_up

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def s3_ray(s3_server, tmp_path_factory):
    """The AWS env of the moto server set before a local Ray starts (workers upload checkpoints with it), an
    MLflow server storing artifacts in the bucket (``--artifacts-destination``); yields the MLflow URI."""
    import ray

    from mmtl.runtime import init_ray

    root = tmp_path_factory.mktemp("s3e2e")
    env = {**s3_env(s3_server), "MMTL_STAGING_DIR": str(root / "staging")}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{s3_server['bucket']}/mlflow"]
    proc = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                                      "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint"]},
                            stdout=open(root / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{uri}/health", proc, root / "mlflow.log", "mlflow server", tries=240, interval_s=0.5)
        init_ray("local", num_cpus=2)
        yield uri
    finally:
        ray.shutdown()
        stop_group(proc)
        mp.undo()


def _objects(info: dict, prefix: str) -> dict[str, int]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=info["endpoint"], region_name="us-east-1", aws_access_key_id=info["key"],
                      aws_secret_access_key=info["secret"])
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=info["bucket"], Prefix=prefix):
        out.update({o["Key"][len(prefix):]: o["Size"] for o in page.get("Contents", [])})
    return out


def _bodies(info: dict, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (directory markers included) with its bytes."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=info["endpoint"], region_name="us-east-1", aws_access_key_id=info["key"],
                      aws_secret_access_key=info["secret"])
    return {k: s3.get_object(Bucket=info["bucket"], Key=prefix + k)["Body"].read() for k in _objects(info, prefix)}


def test_s3_run_kill_resume_export_and_mlflow(s3_server, s3_ray, tiny_shards, tmp_path, monkeypatch):
    """ZeRO-2, 2 workers, shards in the bucket: a worker is SIGKILLed at step 13 with max_failures=0, so the run
    fails (checkpoint at step 10 in the bucket); a new driver (its staging folder gone) reruns it: the run is
    found in the bucket and resumed from step 10 in the same MLflow run, to 16 steps. Checkpoints (both
    ranks), the export, summary.json and the run files are in the bucket; the registered model's artifacts are
    in the bucket and load back equal to the export; `mmtl eval` / `mmtl export` read the run's URI."""
    import shutil

    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from mmtl import storage
    from mmtl.config import build_pipeline
    from mmtl.eval.resolve import resolve_model
    from mmtl.recipes import run_pipeline

    bucket = s3_server["bucket"]
    shards = {}
    for split, local in tiny_shards.items():  # the shards live in the bucket only
        for f in sorted(Path(local).glob("*.tar")):
            storage.write_bytes(f"s3://{bucket}/shards/{split}/{f.name}", f.read_bytes())
        shards[split] = f"s3://{bucket}/shards/{split}"
    trace = tmp_path / "trace"
    monkeypatch.setenv("MMTL_STEP_TRACE", str(trace))
    monkeypatch.setenv("MMTL_KILL_AT", f"13:1:{tmp_path / 'killed'}")
    # the server offers downloads by presigned URL, which moto refuses when it checks credentials (its
    # presigned-URL auth fails with a KeyError): download through the server instead
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    root = f"s3://{bucket}/runs"
    raw = tiny_pipeline(shards, root, train={"max_steps": 16, "max_failures": 0, "zero_stage": 2},
                        eval={"before_training": False}, tracking={"uri": s3_ray, "model_name": "tiny-s3"})
    with pytest.raises(RuntimeError, match=r"rerun with --resume .*\(step 10\)"):
        run_pipeline(build_pipeline(raw), say=lambda m: None)
    assert (tmp_path / "killed").exists(), "the fault was not injected"
    first = json.loads(storage.read_bytes(f"{root}/tiny/run.json"))  # in the bucket before training
    shutil.rmtree(Path(os.environ["MMTL_STAGING_DIR"]))  # a new driver: nothing local
    monkeypatch.delenv("MMTL_KILL_AT")
    said = []
    summary = run_pipeline(build_pipeline(raw), say=said.append)

    assert any("resuming" in m and "from step 10" in m for m in said), said
    assert summary["mlflow_run_id"] == first["mlflow_run_id"]
    steps0 = [int(x) for x in Path(f"{trace}.rank0").read_text().split()]
    assert steps0.count(10) == 1 and steps0.count(11) == 2 and steps0[-1] == 16, steps0  # resumed at 11
    assert summary["run_uri"] == f"{root}/tiny" and summary["steps"] == 16
    objs = _objects(s3_server, "runs/tiny/")
    ckpts = sorted({k.split("/")[1] for k in objs if k.startswith("train/checkpoint_") and k.count("/") >= 2})
    assert len(ckpts) >= 2, sorted(objs)
    for c in ckpts:  # every checkpoint holds both ranks' DeepSpeed and RNG files
        files = [k for k in objs if k.startswith(f"train/{c}/")]
        assert f"train/{c}/mmtl_meta.json" in files and f"train/{c}/rng_rank1.json" in files
        assert any("zero_pp_rank_0" in k for k in files) and any("zero_pp_rank_1" in k for k in files), files
    metas = [json.loads(storage.read_bytes(f"{root}/tiny/train/{c}/mmtl_meta.json"))["step"] for c in ckpts]
    assert 10 in metas and 16 in metas
    assert "train/checkpoint_manager_snapshot.json" in objs
    for f in ("pipeline.yaml", "run.json", "summary.json", "export/model.safetensors", "export/pipeline.yaml"):
        assert f in objs, (f, sorted(objs))
    assert not any(k.startswith(".mmtl") or "/.mmtl" in k for k in objs)
    for k, body in _bodies(s3_server, "runs/tiny/").items():  # nothing in the bucket (Ray's files included)
        assert s3_server["secret"].encode() not in body and s3_server["key"].encode() not in body, k  # has a key
    in_store = json.loads(storage.read_bytes(f"{root}/tiny/summary.json"))
    assert in_store == summary and in_store["status"] == "finished"
    exported = load_file(summary["export_path"])
    assert objs["export/model.safetensors"] == Path(summary["export_path"]).stat().st_size

    client = MlflowClient(s3_ray)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    art = _objects(s3_server, "mlflow/")
    assert any(k.endswith("summary.json") and summary["mlflow_run_id"] in k for k in art), sorted(art)[:20]
    assert any(k.endswith("model.safetensors") for k in art), sorted(art)[:20]
    version = summary["registered_model"]["version"]
    model, _, _ = resolve_model(f"models:/tiny-s3/{version}", tracking_uri=s3_ray)  # downloaded from the bucket
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in exported.items() if k in loaded) and len(loaded) > 0

    # a new driver (its staging copy gone) reads the run from the bucket: `mmtl eval URI` finds its export,
    # `mmtl export URI` writes one from the checkpoint downloaded whole, and a rerun is not a resume
    from typer.testing import CliRunner

    from mmtl.cli import app
    from mmtl.eval.resolve import resolve_export
    from mmtl.runtime import select_run_dir

    shutil.rmtree(Path(os.environ["MMTL_STAGING_DIR"]))
    res = resolve_export(f"{root}/tiny")
    assert res.kind == "run_dir" and res.mlflow_run_id == summary["mlflow_run_id"]
    assert load_file(str(res.export_dir / "model.safetensors")).keys() == exported.keys()
    out = tmp_path / "exported"
    cli = CliRunner().invoke(app, ["export", f"{root}/tiny", "--out", str(out), "--json"])
    assert cli.exit_code == 0, cli.output
    info = json.loads(cli.stdout)
    assert info["step"] == 16 and (Path(info["checkpoint"]) / "ds").is_dir()
    again = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in exported.items())
    run_dir, resuming = select_run_dir(root, "tiny", "auto")
    assert run_dir.name == "tiny-2" and not resuming
