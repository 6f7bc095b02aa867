"""`mmtl retrain`: manifest diff, replay choice, lock, warm start (fast), and the whole cycle on a local Ray
instance with a real `mlflow server` (e2e: three tiny trainings)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_pipeline, write_split
from mmtl.config import apply_overrides, build_pipeline
from mmtl.jobs import retrain as rt


def _entry(name, sha, size=10):
    return {"name": name, "size": size, "sha256": sha}


# ---------------------------------------------------------------- manifest diff and replay

def test_diff_manifest_by_content():
    prev = {"shards": [_entry("/d/a.tar", "aa"), _entry("/d/b.tar", "bb")]}
    cur = [_entry("/d/a.tar", "aa"), _entry("/e/b-renamed.tar", "bb"), _entry("/d/c.tar", "cc"),
           _entry("/d/d.tar", "dd")]
    new, known = rt.diff_manifest(cur, prev)
    assert [e["name"] for e in new] == ["/d/c.tar", "/d/d.tar"]
    assert [e["name"] for e in known] == ["/d/a.tar", "/e/b-renamed.tar"]  # a rename is not new data
    new, known = rt.diff_manifest([_entry("/d/a.tar", "a2")], prev)  # rewritten in place: new
    assert len(new) == 1 and known == []
    new, known = rt.diff_manifest([_entry("/d/a.tar", "aa", size=11)], prev)
    assert len(new) == 1
    new, known = rt.diff_manifest(cur, None)
    assert new == cur and known == []


def test_describe_shards_hashes_and_cache(tmp_path):
    import hashlib

    d = write_split(tmp_path / "train", 40, per_shard=16)
    shards = sorted(str(p) for p in d.glob("*.tar"))
    cache = tmp_path / "m" / "hashes.json"
    out = rt.describe_shards(shards, cache)
    assert [e["name"] for e in out] == shards and len(shards) == 3
    assert out[0]["sha256"] == hashlib.sha256(Path(shards[0]).read_bytes()).hexdigest()
    assert out[0]["size"] == os.path.getsize(shards[0])
    cached = json.loads(cache.read_text())
    assert set(cached) == set(shards)
    # a cached hash is used while size+mtime match, recomputed when the file changes
    cached[shards[1]]["sha256"] = "fake"
    cache.write_text(json.dumps(cached))
    assert rt.describe_shards(shards, cache)[1]["sha256"] == "fake"
    with open(shards[1], "ab") as f:
        f.write(b"\0" * 512)
    again = rt.describe_shards(shards, cache)[1]
    assert again["sha256"] == hashlib.sha256(Path(shards[1]).read_bytes()).hexdigest() != "fake"


def test_choose_replay_deterministic_share():
    known = [_entry(f"/d/{i}.tar", f"{i:02x}" * 8) for i in range(10)]
    new = [_entry("/d/n.tar", "ff")]
    a = rt.choose_replay(known, new, 0.25, seed=0)
    assert len(a) == 3 and a == rt.choose_replay(known, new, 0.25, seed=0)  # ceil(2.5), same inputs same pick
    assert [e["name"] for e in a] == sorted((e["name"] for e in a), key=lambda n: int(Path(n).stem))  # list order
    assert len(rt.choose_replay(known, new, 0.0)) == 1  # at least one old shard
    assert len(rt.choose_replay(known[:1], new, 0.01)) == 1
    assert rt.choose_replay(known, new, 1.0) == known
    assert len(rt.choose_replay(known, new, 0.3)) == 3
    assert rt.choose_replay([], new, 0.5) == []
    picks = {tuple(e["name"] for e in rt.choose_replay(known, [_entry("/n", f"{j:x}")], 0.2)) for j in range(12)}
    assert len(picks) > 1  # different new data -> (usually) different replayed shards


def test_decide():
    assert rt.decide(0.5, None, 1.0) == "promoted"  # no champion yet
    assert rt.decide(0.5, 0.5, 0.0) == "promoted"  # ties promote at margin 0
    assert rt.decide(0.5, 0.5, 0.01) == "kept"
    assert rt.decide(0.2, 0.5, -1.0) == "promoted"
    assert rt.decide(0.9, 0.5, 1.0) == "kept"


# ---------------------------------------------------------------- lock

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(path: Path, **kw) -> None:
    body = {"pid": os.getpid(), "hostname": socket.gethostname(), "created_at": time.time(), "token": "other"}
    body.update(kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))


def test_lock_exclusive_and_release(tmp_path):
    path = tmp_path / "retrain.lock"
    a = rt.RetrainLock(path, ttl_s=3600)
    assert a.acquire()
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["hostname"] == socket.gethostname() and info["token"]
    b = rt.RetrainLock(path, ttl_s=3600)
    assert not b.acquire()  # live: our own pid, fresh
    assert b.holder["pid"] == os.getpid() and "_raw" not in b.holder
    b.release()  # not the owner: leaves the lock alone
    assert path.exists()
    a.release()
    assert not path.exists()
    assert b.acquire()
    b.release()


def test_live_lock_refused_stale_locks_broken(tmp_path):
    path = tmp_path / "retrain.lock"
    _write_lock(path)  # this (live) process, fresh
    lk = rt.RetrainLock(path, ttl_s=3600)
    assert not lk.acquire() and lk.broken is None
    _write_lock(path, pid=_dead_pid())  # dead pid on this host
    assert lk.acquire() and "is gone" in lk.broken
    assert json.loads(path.read_text())["token"] == lk.token
    lk.release()
    _write_lock(path, hostname="elsewhere", pid=1)  # another host: pid not checked, live until the TTL
    lk = rt.RetrainLock(path, ttl_s=3600)
    assert not lk.acquire()
    old = time.time() - 7200
    os.utime(path, (old, old))
    assert lk.acquire() and "lock_ttl_s" in lk.broken
    lk.release()
    path.write_text("{half-writ")  # unreadable and young: being written, live
    lk = rt.RetrainLock(path, ttl_s=3600)
    assert not lk.acquire()
    os.utime(path, (time.time() - 120,) * 2)
    assert lk.acquire() and "unreadable" in lk.broken
    lk.release()
    _write_lock(path)  # a reused pid: alive, but another process start time
    data = json.loads(path.read_text())
    data["proc_start"] = "1"
    path.write_text(json.dumps(data))
    assert rt.stale_reason(rt.read_lock(path), 3600) is not None


def test_lock_heartbeat_keeps_it_fresh(tmp_path):
    path = tmp_path / "retrain.lock"
    lk = rt.RetrainLock(path, ttl_s=0.4, heartbeat_s=0.05)
    assert lk.acquire()
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 0.3  # touched again
    other = rt.RetrainLock(path, ttl_s=0.4)
    assert not other.acquire()
    lk.release()
    assert not path.exists()


def test_retrain_returns_locked_before_any_work(tmp_path, tiny_shards):
    raw = tiny_pipeline(tiny_shards, tmp_path / "runs", tracking={"uri": "http://127.0.0.1:9", "model_name": "m"})
    pipe = build_pipeline(raw)
    _write_lock(tmp_path / "runs" / "retrain" / "retrain.lock")
    msgs = []
    out = rt.retrain(pipe, say=msgs.append)
    assert out["action"] == "locked" and rt.exit_code(out) == rt.EXIT_LOCKED == 3
    assert out["lock"]["pid"] == os.getpid() and "another retrain" in msgs[0]
    assert rt.exit_code({"action": "nothing_new"}) == 0


def test_retrain_config_section_and_checks(tmp_path, tiny_shards):
    raw = tiny_pipeline(tiny_shards, tmp_path / "runs")
    pipe = build_pipeline(apply_overrides(raw, ["retrain.margin=0.02", "retrain.replay_fraction=0.5"]))
    assert pipe.retrain.margin == 0.02 and pipe.retrain.replay_fraction == 0.5
    assert pipe.retrain.metric == "test/image_to_text_recall_at_1" and pipe.retrain.warm_start is True
    assert pipe.retrain.lock_ttl_s == 6 * 3600 and pipe.retrain.manifest_dir is None
    assert build_pipeline(tiny_pipeline(tiny_shards, tmp_path)).retrain is None
    from mmtl.config import PipelineError

    with pytest.raises(PipelineError, match="retrain.replay_fraction"):
        build_pipeline(apply_overrides(tiny_pipeline(tiny_shards, tmp_path), ["retrain.replay_fraction=2"]))
    with pytest.raises(ValueError, match="tracking.model_name"):
        rt.retrain(build_pipeline(tiny_pipeline(tiny_shards, tmp_path, tracking={"model_name": None})))
    with pytest.raises(ValueError, match="retrain.metric='nope/x'"):
        rt.retrain(build_pipeline(apply_overrides(tiny_pipeline(tiny_shards, tmp_path), ["retrain.metric=nope/x"])))


# ---------------------------------------------------------------- warm start hook

def test_build_model_init_from(tmp_path):
    import torch
    from safetensors.torch import save_file

    from mmtl.models import WeightsError, build_model, tiny_two_tower_config

    torch.manual_seed(0)
    base = build_model(tiny_two_tower_config())
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    heads_only = dict(sd, **{"image_head.weight": sd["image_head.weight"] + 1, "logit_bias": torch.zeros(1)})
    save_file(heads_only, str(tmp_path / "heads.safetensors"))
    torch.manual_seed(0)
    m = build_model(tiny_two_tower_config(init_from=str(tmp_path / "heads.safetensors")))
    assert torch.equal(m.image_head.weight, heads_only["image_head.weight"])
    # towers unchanged -> same fingerprints (the frozen-feature cache stays valid)
    assert m.fingerprint("image") == base.fingerprint("image") and m.fingerprint("text") == base.fingerprint("text")
    tower_key = next(k for k in sd if k.startswith("image_tower.") and sd[k].is_floating_point())
    changed = dict(sd, **{tower_key: sd[tower_key] + 0.5})
    changed.pop("text_head.weight")  # partial: loaded where names and shapes match
    changed["image_head.weight"] = torch.zeros(3, 3)  # shape mismatch: skipped
    (tmp_path / "exp").mkdir()
    save_file(changed, str(tmp_path / "exp" / "model.safetensors"))
    torch.manual_seed(0)
    m2 = build_model(tiny_two_tower_config(init_from=str(tmp_path / "exp")))  # a folder with model.safetensors
    assert torch.equal(m2.state_dict()[tower_key], changed[tower_key])
    assert torch.equal(m2.image_head.weight, base.image_head.weight)
    assert m2.fingerprint("image") != base.fingerprint("image") and m2.fingerprint("text") == base.fingerprint("text")
    save_file({"nothing.like.this": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="none of its 1 tensors matches"):
        build_model(tiny_two_tower_config(init_from=str(tmp_path / "other.safetensors")))
    with pytest.raises(WeightsError, match="model.init_from=.*not found"):
        build_model(tiny_two_tower_config(init_from=str(tmp_path / "missing.safetensors")))


# ---------------------------------------------------------------- the whole cycle

def _alias(client, name, alias):
    return str(client.get_model_version_by_alias(name, alias).version)


@pytest.mark.e2e
def test_retrain_cycle(ray_local, tiny_shards, tmp_path, mlflow_server):
    """First retrain trains from scratch and becomes champion; no new data -> nothing_new (manifest read from
    MLflow, the local copy deleted); a new shard with margin=+1 -> trained, warm-started, kept; another with
    margin=-1 -> promoted."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    train = tmp_path / "train"
    write_split(train, 64, prefix="a")  # a-000000.tar, a-000001.tar
    name = "retrain-tiny"

    def pipe(margin):
        raw = tiny_pipeline({**tiny_shards, "train": str(train)}, tmp_path / "runs",
                            train={"num_workers": 1, "max_steps": 6, "checkpoint_every": 6, "log_every": 3},
                            eval={"before_training": False}, tracking={"uri": mlflow_server, "model_name": name})
        raw["retrain"] = {"margin": margin}
        return build_pipeline(raw)

    client = MlflowClient(mlflow_server)
    mdir = tmp_path / "runs" / "retrain"
    msgs = []
    first = rt.retrain(pipe(0.0), say=msgs.append)
    assert first["action"] == "retrained" and first["decision"] == "promoted" and first["champion"] is None
    v1 = first["challenger"]["version"]
    assert _alias(client, name, "champion") == v1 == _alias(client, name, "challenger")
    assert first["init_from"] is None and first["replay_shards"] == [] and len(first["new_shards"]) == 2
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.tags["retrain.decision"] == "promoted" and run.data.tags["mmtl.retrain"] == "done"
    assert run.data.metrics["retrain/challenger"] == first["challenger"]["score"]
    assert "retrain/champion" not in run.data.metrics and run.data.metrics["retrain/margin"] == 0.0
    local = json.loads((mdir / "manifest.json").read_text())
    art = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="retrain/manifest.json",
                                              dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server)
    assert json.loads(Path(art).read_text()) == local
    assert sorted(Path(e["name"]).name for e in local["shards"]) == ["a-000000.tar", "a-000001.tar"]
    assert not (mdir / "retrain.lock").exists()

    (mdir / "manifest.json").unlink()  # the MLflow copy alone must do
    second = rt.retrain(pipe(0.0), say=msgs.append)
    assert second["action"] == "nothing_new" and rt.exit_code(second) == 0
    assert second["last_mlflow_run_id"] == first["mlflow_run_id"]
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    write_split(train, 32, start=300, prefix="b")
    kept = rt.retrain(pipe(1.0), say=msgs.append)
    assert kept["action"] == "retrained" and kept["decision"] == "kept", kept
    v2 = kept["challenger"]["version"]
    assert v2 != v1 and _alias(client, name, "champion") == v1 and _alias(client, name, "challenger") == v2
    assert [Path(n).name for n in kept["new_shards"]] == ["b-000000.tar"] and len(kept["replay_shards"]) == 1
    assert kept["champion"]["version"] == v1
    assert kept["champion"]["score"] == pytest.approx(first["challenger"]["score"])  # same model, same eval
    assert kept["init_from"] and Path(kept["init_from"]).is_file() and f"-v{v1}." in kept["init_from"]
    run = client.get_run(kept["mlflow_run_id"])
    assert run.data.params["model.init_from"] == kept["init_from"]
    import yaml

    used = yaml.safe_load((Path(kept["run_dir"]) / "pipeline.yaml").read_text())
    trained_on = sorted(Path(p).name for p in used["data"]["train"])
    assert trained_on == sorted(["b-000000.tar"] + [Path(p).name for p in kept["replay_shards"]])
    assert run.data.tags["retrain.decision"] == "kept" and run.data.tags["retrain.champion_version"] == v1
    assert run.data.metrics["retrain/champion"] == kept["champion"]["score"]
    assert client.get_model_version(name, v2).tags["retrain.decision"] == "kept"
    assert len(json.loads((mdir / "manifest.json").read_text())["shards"]) == 3  # kept: b is known now

    write_split(train, 32, start=400, prefix="c")
    promoted = rt.retrain(pipe(-1.0), say=msgs.append)
    assert promoted["decision"] == "promoted", promoted
    v3 = promoted["challenger"]["version"]
    assert _alias(client, name, "champion") == v3 == _alias(client, name, "challenger")
    assert promoted["champion"]["version"] == v1 and f"-v{v1}." in promoted["init_from"]
    assert [Path(n).name for n in promoted["new_shards"]] == ["c-000000.tar"]
    assert len(promoted["replay_shards"]) == 1  # ceil(0.25 * 3)
    assert client.get_run(promoted["mlflow_run_id"]).data.tags["retrain.decision"] == "promoted"
    assert any("-> promoted" in m for m in msgs) and any("-> kept" in m for m in msgs)
    # the promoted export (warm-started: its pipeline.yaml names init_from) loads as a plain model
    from mmtl.tracking.registry import load_exported

    load_exported(Path(promoted["run_dir"]) / "export")
