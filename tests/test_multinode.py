"""Training on a Ray cluster of several nodes (mmtl/train/placement.py, train.placement_strategy).

Fast tests (no Ray): which nodes may host a worker, when a local runs root / tracking store is refused, the
schema field, the one-node refusal of STRICT_SPREAD.

End-to-end (``e2e``): ONE cluster per module, ``ray.cluster_utils.Cluster`` with a head (2 CPUs) and two more
nodes of 1 CPU each, all on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), private temp dirs, the dashboard on
the head for job submission; the cluster address is written to the head's temp dir, NOT to
/tmp/ray/ray_current_cluster (another Ray user on this machine must not join it). The tests run in file order:
refusal of a local runs root, a STRICT_SPREAD run submitted through ``mmtl submit``, then a STRICT_SPREAD run
that loses a worker's node mid-run (the cluster has one node less afterwards).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import free_port, kill_leftovers, tiny_pipeline
from mmtl.config import PipelineError, build_pipeline
from mmtl.train import placement as pl


def _t(**kw):
    base = dict(runs_root="/data/runs", shared_filesystem=False, placement_strategy="PACK", num_workers=2,
                cpus_per_worker=0.5, gpus_per_worker=1.0, use_gpu=False)
    return SimpleNamespace(**{**base, **kw})


def _node(nid, cpu=1.0, gpu=0.0, alive=True, ip="10.0.0.1"):
    return {"NodeID": nid, "Alive": alive, "NodeManagerAddress": ip, "Resources": {"CPU": cpu, "GPU": gpu}}


def _pipe(**kw):
    return SimpleNamespace(train=_t(**kw))


HTTP = "http://127.0.0.1:5000"


# ------------------------------------------------------------------------------------------- fast


def test_worker_hosts_and_refusals():
    head, a, b = _node("head" + "0" * 20), _node("a" * 24, ip="10.0.0.2"), _node("b" * 24, cpu=0.25, ip="10.0.0.3")
    dead = _node("d" * 24, alive=False)
    nodes = [head, a, b, dead]
    # b has too few CPUs for one worker, dead is not alive: only a may host a worker besides the driver's node
    assert pl.worker_hosts(_t(), nodes, head["NodeID"]) == [a]
    assert pl.worker_hosts(_t(cpus_per_worker=0.25), nodes, head["NodeID"]) == [a, b]
    assert pl.worker_hosts(_t(), nodes, head["NodeID"], remote_driver=True) == [head, a]
    assert pl.worker_hosts(_t(placement_strategy="STRICT_PACK"), nodes, head["NodeID"]) == [a]  # 2 x 0.5 CPU fit
    assert pl.worker_hosts(_t(placement_strategy="STRICT_PACK", cpus_per_worker=0.75), nodes, head["NodeID"]) == []
    assert pl.worker_hosts(_t(use_gpu=True), nodes, head["NodeID"]) == []  # no node has a GPU
    assert pl.worker_hosts(_t(use_gpu=True), [head, _node("g" * 24, gpu=1)], head["NodeID"])[0]["NodeID"] == "g" * 24

    errors, warnings = pl.placement_problems(_pipe(), HTTP, nodes, head["NodeID"])
    assert len(errors) == 1 and not warnings
    e = errors[0]
    assert "train.runs_root=/data/runs" in e and "10.0.0.2 (node aaaaaaaa)" in e and "may run there" in e
    assert "s3://" in e and "train.shared_filesystem=true" in e
    certain, _ = pl.placement_problems(_pipe(placement_strategy="STRICT_SPREAD"), HTTP, nodes, head["NodeID"])
    assert "will run there" in certain[0]
    # a local sqlite store is refused as well; a server is not
    errors, _ = pl.placement_problems(_pipe(), "sqlite:////data/runs/mlflow.db", nodes, head["NodeID"])
    assert len(errors) == 2 and "tracking.uri=http://HOST:5000" in errors[1]
    # shared storage: object storage or a declared shared filesystem
    for ok in (_pipe(runs_root="s3://bucket/runs"), _pipe(runs_root="gs://b/r"), _pipe(shared_filesystem=True)):
        assert pl.placement_problems(ok, HTTP, nodes, head["NodeID"]) == ([], [])
    assert pl.placement_problems(_pipe(shared_filesystem=True), "sqlite:////nfs/mlflow.db", nodes,
                                 head["NodeID"]) == ([], [])
    assert pl.placement_problems(_pipe(runs_root="file:///data/runs"), HTTP, nodes, head["NodeID"])[0]
    # one node (or other nodes too small for a worker): nothing to refuse
    assert pl.placement_problems(_pipe(), "sqlite:////x.db", [head, b], head["NodeID"]) == ([], [])
    # a Ray Client driver: every node is elsewhere
    assert pl.placement_problems(_pipe(), HTTP, [head], head["NodeID"], remote_driver=True)[0]
    # strict strategies the present nodes cannot place: a warning (an autoscaler may add nodes)
    _, w = pl.placement_problems(_pipe(placement_strategy="STRICT_SPREAD", num_workers=3, shared_filesystem=True),
                                 HTTP, nodes, head["NodeID"])
    assert len(w) == 1 and "each of the 3 workers" in w[0] and "only 2 node(s)" in w[0]


def test_placement_summary():
    ranks = [{"rank": 1, "node_id": "b" * 24, "node_ip": "10.0.0.2", "hostname": "h2", "pid": 2},
             {"rank": 0, "node_id": "a" * 24, "node_ip": "10.0.0.1", "hostname": "h1", "pid": 1}]
    s = pl.summarize(ranks, "a" * 24, start_step=4)
    assert [r["rank"] for r in s["ranks"]] == [0, 1] and s["nodes"] == 2 and s["ranks_off_driver_node"] == [1]
    assert pl.short(s) == "0=10.0.0.1/aaaaaaaa 1=10.0.0.2/bbbbbbbb" and s["start_step"] == 4


def test_schema_and_one_node_refusal(tiny_shards, tmp_path):
    from mmtl.config.workers import check_local_devices

    pipe = build_pipeline(tiny_pipeline(tiny_shards, tmp_path / "runs"))
    assert pipe.train.placement_strategy == "PACK" and pipe.train.shared_filesystem is False
    assert "placement_strategy: PACK" in pipe.to_yaml()  # what `mmtl config` prints
    with pytest.raises(PipelineError, match="train.placement_strategy"):
        build_pipeline(tiny_pipeline(tiny_shards, tmp_path / "runs", train={"placement_strategy": "spread"}))
    spread = build_pipeline(tiny_pipeline(tiny_shards, tmp_path / "runs",
                                          train={"placement_strategy": "STRICT_SPREAD"}))
    with pytest.raises(ValueError, match="STRICT_SPREAD puts each of the 2 workers on its own node.*1 node"):
        check_local_devices(spread.train, "local", num_cpus=2)
    check_local_devices(build_pipeline(tiny_pipeline(tiny_shards, tmp_path / "r", train={
        "placement_strategy": "STRICT_SPREAD", "num_workers": 1})).train, "local", num_cpus=2)


# -------------------------------------------------------------------------------------------- e2e




@pytest.fixture(scope="module")
def cluster():
    """A head (2 CPUs, dashboard on 127.0.0.1) + 2 nodes of 1 CPU, on 127.0.0.1; this process joins it as a
    driver."""
    import ray
    import ray._private.utils as ray_utils
    from ray.cluster_utils import Cluster

    from mmtl.runtime import init_ray

    temp = tempfile.mkdtemp(prefix="mmtlmn-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    saved_env = {k: os.environ.get(k) for k in ("PATH", "RAY_USAGE_STATS_ENABLED", "RAY_ADDRESS",
                                                 "RAY_memory_monitor_refresh_ms")}
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # `mmtl` for jobs
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # no Ray memory monitor: on this machine shared with other work, it killed a worker for memory the other
    # processes used, a second failure the test did not plan (the kernel's OOM killer still applies)
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    os.environ.pop("RAY_ADDRESS", None)
    write_address = ray_utils.write_ray_address
    # the address file goes to the private temp dir (where the head's job supervisor looks for it), not to
    # /tmp/ray/ray_current_cluster, where other Ray users on this machine would find and join this cluster
    ray_utils.write_ray_address = lambda address, temp_dir=None: write_address(address, temp)
    dash = free_port()
    node = dict(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=temp)
    c = None
    try:
        # the head gets 2 CPUs: after a node is lost, the 2 nodes left must hold 2 x 0.5 worker CPUs AND a whole
        # CPU for Ray Data's tasks (with 1 + 1 CPUs the restarted run waited for data forever)
        c = Cluster(initialize_head=True, head_node_args={
            **node, "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash,
            "dashboard_agent_listen_port": free_port(),  # not the default 52365: other Ray heads may use it
            "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                               "health_check_failure_threshold": 3}})
        # each node its own temp dir: nodes sharing one would share one runtime_resources folder, and a node that
        # unpacks a job's working_dir there replaces the folder the job's driver runs in
        workers = [c.add_node(**{**node, "temp_dir": f"{temp}/n{i}"}) for i in range(2)]
        c.wait_for_nodes()
        init_ray(c.address)
        yield SimpleNamespace(cluster=c, head=c.head_node, workers=workers, dashboard=f"http://127.0.0.1:{dash}")
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        ray_utils.write_ray_address = write_address
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        kill_leftovers(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _raw(tiny_shards, tmp_path, **train):
    return tiny_pipeline(
        tiny_shards, tmp_path / "runs",
        train={"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "STRICT_SPREAD",
               "shared_filesystem": True, "zero_stage": 2, "max_steps": 6, "checkpoint_every": 2, **train},
        eval={"before_training": False},
        tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "multinode", "model_name": None,
                  "log_model": False})


def _check_shards(ckpt: Path, world: int = 2) -> dict:
    """Every rank's files are in the checkpoint (ZeRO-2: one optimizer partition per rank, RNG per rank)."""
    names = {p.name for p in (ckpt / "ds").iterdir()}
    for r in range(world):
        assert (ckpt / f"rng_rank{r}.safetensors").is_file() and (ckpt / f"rng_rank{r}.json").is_file()
        assert any(n.startswith(f"zero_pp_rank_{r}_") and n.endswith("optim_states.pt") for n in names), names
    assert (ckpt / "mmtl_meta.json").is_file()
    workers = json.loads((ckpt / pl.WORKERS_FILE).read_text())
    assert [r["rank"] for r in workers["ranks"]] == list(range(world))
    return workers


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_local_runs_root_refused_before_anything_is_written(cluster, tiny_shards, tmp_path):
    from mmtl.recipes import run_pipeline
    from mmtl.train.placement import SharedStorageError

    raw = tiny_pipeline(tiny_shards, tmp_path / "runs", train={"num_workers": 2, "cpus_per_worker": 0.5})
    with pytest.raises(SharedStorageError) as err:
        run_pipeline(build_pipeline(raw), say=lambda m: None)
    msg = str(err.value)
    assert f"train.runs_root={tmp_path / 'runs'}" in msg and "2 node(s) other than the driver's" in msg
    assert "train.placement_strategy=PACK" in msg and "may run there" in msg
    assert "s3://" in msg and "train.shared_filesystem=true" in msg and "tracking" in msg
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "something was written"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_submit_strict_spread_to_the_cluster(cluster, tiny_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    from mmtl.jobs import submit as sub

    proj = tmp_path / "proj"
    (proj / "pipelines").mkdir(parents=True)
    import yaml

    (proj / "pipelines" / "mn.yaml").write_text(yaml.safe_dump(_raw(tiny_shards, tmp_path)))
    deadline = time.monotonic() + 90
    while True:  # the head's job agent comes up some seconds after the dashboard
        try:
            job = sub.submit(str(proj / "pipelines" / "mn.yaml"), cluster.dashboard, ["train.name=submitted"],
                             working_dir=str(proj), env={"MLFLOW_DISABLE_TELEMETRY": "true",
                                                         "PYTHONPATH": os.environ.get("PYTHONPATH", "")}, say=None)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(3)
    st = sub.wait(job, cluster.dashboard, timeout_s=420, poll_s=2)
    text = sub.logs(job, cluster.dashboard, follow=False, out=io.StringIO())
    assert st == "SUCCEEDED", f"job {st}\n{text[-6000:]}"
    summary = json.loads((tmp_path / "runs" / "submitted" / "summary.json").read_text())
    w = summary["workers"]
    assert summary["steps"] == 6 and w["nodes"] == 2 and w["ranks_off_driver_node"], w
    assert w["driver_node_id"] == cluster.head.node_id  # the job's driver runs on the head node
    assert "mlflow run" in text.lower() and summary["mlflow_run_id"] in text, text[-3000:]
    from mmtl.runtime import latest_checkpoint

    assert _check_shards(latest_checkpoint(Path(summary["run_dir"])))["nodes"] == 2
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert run.data.tags["mmtl.worker_nodes"] == "2" and run.data.params["train.placement_strategy"] == "STRICT_SPREAD"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_strict_spread_survives_a_lost_node_and_resumes(cluster, tiny_shards, tmp_path, monkeypatch):
    """2 workers, STRICT_SPREAD over 3 nodes: at least one rank runs off the driver's (head) node. When rank 0
    reached step 5 the node of a rank that is not on the head is removed (its raylet and workers killed); with
    max_failures=1 Ray Train restarts the group on the 2 nodes left from the last checkpoint, and the run finishes
    with every rank's shard in its checkpoints."""
    from mlflow.tracking import MlflowClient

    from mmtl.recipes import run_pipeline
    from mmtl.runtime import latest_checkpoint

    trace = tmp_path / "trace"
    monkeypatch.setenv("MMTL_STEP_TRACE", str(trace))
    raw = _raw(tiny_shards, tmp_path, max_steps=12, checkpoint_every=2, max_failures=1, name="lost-node")
    uri = raw["tracking"]["uri"]
    removed: dict = {}

    def remove_a_worker_node():
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            try:
                steps = Path(f"{trace}.rank0").read_text().split()
            except OSError:
                steps = []
            if len(steps) >= 5:
                runs = MlflowClient(uri).search_runs(
                    [MlflowClient(uri).get_experiment_by_name("multinode").experiment_id],
                    filter_string="tags.mlflow.runName = 'lost-node'")
                placed = dict(x.split("=", 1) for x in runs[0].data.tags["mmtl.workers"].split())
                for node in cluster.workers:
                    if any(v.endswith("/" + node.node_id[:8]) for v in placed.values()):
                        removed.update(node_id=node.node_id, at_step=len(steps), placed=placed)
                        cluster.cluster.remove_node(node, allow_graceful=False)
                        return
                removed["error"] = f"no rank on a non-head node: {placed}"
                return
            time.sleep(0.2)
        removed["error"] = "rank 0 never reached step 5"

    th = threading.Thread(target=remove_a_worker_node, daemon=True)
    th.start()
    summary = run_pipeline(build_pipeline(raw), say=lambda m: None)
    th.join(timeout=5)
    assert "error" not in removed and removed.get("node_id"), removed
    steps = [int(x) for x in Path(f"{trace}.rank0").read_text().split()]
    w = summary["workers"]
    start = w["start_step"]
    # the restart continued from a checkpoint (not from 0) written by ranks on two nodes, and finished
    assert summary["steps"] == 12 and 2 <= start <= removed["at_step"] and start % 2 == 0, (start, removed, steps)
    assert steps[:start] == list(range(1, start + 1)) and steps[-(12 - start):] == list(range(start + 1, 13)), steps
    assert w["nodes"] == 2 and w["ranks_off_driver_node"]
    assert removed["node_id"] not in {r["node_id"] for r in w["ranks"]}
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    assert run.data.tags[f"mmtl.workers.from_step_{start}"] != run.data.tags["mmtl.workers.from_step_0"]
    ckpt = latest_checkpoint(Path(summary["run_dir"]))
    assert _check_shards(ckpt)["start_step"] == start and (ckpt / "export" / "model.safetensors").is_file()
    resumed_from = Path(summary["run_dir"]) / "train"
    metas = [json.loads(p.read_text()) for p in resumed_from.glob("checkpoint_*/mmtl_meta.json")]
    assert metas and all(m["world_size"] == 2 for m in metas)
