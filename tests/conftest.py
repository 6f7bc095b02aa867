"""Shared fixtures: tiny synthetic image-text shards, tiny pipelines, one local Ray instance per session."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before any Ray start: loopback only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
          "purple": (150, 30, 180), "orange": (250, 140, 0), "black": (10, 10, 10), "white": (250, 250, 250)}
SHAPES = ("square", "circle", "bar")


def synthetic_pair(i: int) -> tuple[bytes, str, dict]:
    """A 32x32 PNG of a coloured shape on grey and its caption ("a red circle"); label = colour."""
    from PIL import Image, ImageDraw

    names = list(COLORS)
    color, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    d = ImageDraw.Draw(img)
    off = i % 5
    box = (4 + off, 4 + off, 26 + off // 2, 26 + off // 2)
    {"square": d.rectangle, "circle": d.ellipse, "bar": lambda b, fill: d.rectangle((b[0], 12, b[2], 20), fill=fill)}[
        shape](box, fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), f"a {color} {shape}", {"color": color, "shape": shape}


def write_split(out: Path, n: int, start: int = 0, per_shard: int = 32, prefix: str = "s") -> Path:
    from mmtl.data.build import ShardWriter

    with ShardWriter(str(out), prefix=prefix, max_samples_per_shard=per_shard) as w:
        for i in range(start, start + n):
            data, cap, meta = synthetic_pair(i)
            w.write(f"{i:06d}", data, "png", cap, meta)
    return out


@pytest.fixture
def stats_actor_calls(monkeypatch) -> list:
    """The reject counts read tasks send to the sample-stats actor (``ray.get_actor(name).add.remote(stats)``),
    captured in order without a Ray instance."""
    import ray

    added: list[dict] = []

    class _Actor:
        class add:  # mimics actor.add.remote
            @staticmethod
            def remote(stats):
                added.append(stats)

    monkeypatch.setattr(ray, "get_actor", lambda name: _Actor)
    return added


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_shards")
    return {
        "train": str(write_split(root / "train", 192)),
        "val": str(write_split(root / "val", 24, start=1000)),
        "test": str(write_split(root / "test", 48, start=2000)),
    }


def tiny_pipeline(shards: dict, runs_root: Path, **sections) -> dict:
    """A raw pipeline dict with the tiny random-init two-tower model; ``sections`` update each section."""
    from mmtl.models import tiny_two_tower_config

    raw = {
        "data": {"train": shards["train"], "val": shards["val"], "test": shards["test"], "shuffle_buffer": 16},
        "model": tiny_two_tower_config().model_dump(mode="json"),
        "strategy": {"kind": "frozen"},
        "train": {"runs_root": str(runs_root), "name": "tiny", "num_workers": 2, "cpus_per_worker": 0.5,
                  "micro_batch_size": 8, "max_steps": 20, "checkpoint_every": 10, "lr": 0.01, "warmup_steps": 2,
                  "log_every": 1},
        "eval": {"sets": ["test"], "recall_ks": [1, 5], "batch_size": 32,
                 "zero_shot": {"label_field": "color", "templates": ["a {} shape", "{}"]}},
        "tracking": {"experiment": "tests", "model_name": "tiny-model"},
    }
    for sec, upd in sections.items():
        raw.setdefault(sec, {}).update(upd)
    return raw


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance per test module (127.0.0.1 only), stopped at the end of the module: a fresh
    instance per module keeps one module's leftovers (actor pools, detached actors) from starving the next."""
    import ray

    from mmtl.runtime import init_ray

    init_ray("local", num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (1 worker, no job execution), stopped at the end; yields its URI."""
    import socket
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "art")]
    proc = subprocess.Popen(cmd, env=env, stdout=open(root / "log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{uri}/health", proc, root / "log", "mlflow server", tries=240, interval_s=0.5)
        yield uri
    finally:
        stop_group(proc)


def wait_until_up(url: str, proc, log, what: str, tries: int, interval_s: float) -> None:
    """Poll ``url`` until it answers (a local test server started as ``proc``). Raises RuntimeError with the
    server's ``log`` when the process exits first, or after ``tries`` polls ``interval_s`` apart."""
    import time
    import urllib.request
    from pathlib import Path

    for _ in range(tries):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(Path(log).read_text())
            time.sleep(interval_s)
    raise RuntimeError(f"{what} did not start in {tries * interval_s:.0f} s")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound, then released: use it at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc, timeout_s: float = 20) -> None:
    """SIGTERM the process group of ``proc`` (a test server started with ``start_new_session=True``), SIGKILL it
    after ``timeout_s`` seconds; a group already gone is fine."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_leftovers(marker: str) -> None:
    """SIGKILL processes still running with ``marker`` (a test's private temp dir) in their command line: only
    processes the test started carry it."""
    import signal

    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(d.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture(autouse=True)
def _restore_mlflow_globals():
    """``mlflow.set_tracking_uri`` / ``set_registry_uri`` in a test (or code it calls) also set the
    ``MLFLOW_*_URI`` environment variables; put MLflow's globals and those variables back after every test so no
    test redirects a later one (or its Ray workers and subprocesses) to its temporary store."""
    from mmtl.tracking.registry import kept_mlflow_uris

    with kept_mlflow_uris():
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API server on 127.0.0.1 (``moto`` in server mode) with credentials checked: yields
    ``{"endpoint", "key", "secret", "bucket"}`` (an IAM user allowed everything, bucket ``mmtl-test`` created);
    the server is stopped at the end by its process group. Any other access key is refused."""
    import json
    import socket
    import subprocess
    import sys

    import boto3

    log = tmp_path_factory.mktemp("moto") / "log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}  # IAM set-up below, then every request is checked
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{endpoint}/moto-api/", proc, log, "moto server", tries=120, interval_s=0.25)
        boot = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="boot",
                    aws_secret_access_key="boot")
        iam = boto3.client("iam", **boot)
        iam.create_user(UserName="mmtl")
        key = iam.create_access_key(UserName="mmtl")["AccessKey"]
        iam.put_user_policy(UserName="mmtl", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        info = {"endpoint": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "bucket": "mmtl-test"}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=info["key"],
                          aws_secret_access_key=info["secret"])
        s3.create_bucket(Bucket=info["bucket"])
        yield info
    finally:
        stop_group(proc)


def s3_env(info: dict) -> dict:
    """The standard AWS environment for :func:`s3_server`'s store."""
    return {"AWS_ENDPOINT_URL": info["endpoint"], "AWS_ACCESS_KEY_ID": info["key"],
            "AWS_SECRET_ACCESS_KEY": info["secret"], "AWS_DEFAULT_REGION": "us-east-1"}


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # SmolLM2-Instruct's template


@pytest.fixture()
def chatml_tok():
    """The MiniLM package tokenizer with ChatML tokens and SmolLM2-Instruct's chat template (:data:`CHATML`)."""
    from transformers import AutoTokenizer

    from mmtl.models.two_tower import DEFAULT_TOKENIZER
    from mmtl.models.weights import resolve_weights

    tok = AutoTokenizer.from_pretrained(str(resolve_weights(DEFAULT_TOKENIZER, "model_dir")), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok
