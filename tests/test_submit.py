"""Ray Jobs submission (mmtl/jobs/submit.py).

Fast tests (no server): secrets are forwarded to the job but never printed; a bad pipeline or override
fails before any server is contacted; entrypoint quoting; token-auth headers; runtime_env merging.

End-to-end (``e2e``): a real Ray head (``ray start --head --block``) on 127.0.0.1 with free ports, a private
--temp-dir and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, owned by this test as its own process group; a tiny
pipeline is submitted through the Jobs API, followed to SUCCEEDED, found in MLflow, and the head is killed.
"""
from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, kill_leftovers, stop_group

from mmtl.config import PipelineError
from mmtl.jobs import submit as sub

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "sekrit-aws-0123456789",
    "AWS_ACCESS_KEY_ID": "AKIASEKRITKEYID42",
    "MLFLOW_TRACKING_PASSWORD": "sekrit-mlflow-pw-987",
    "HF_TOKEN": "hf_sekrit_token_555",
}
URI_PASSWORD = "uri-pw-31337"


def _project(tmp_path: Path, body: dict | None = None, name: str = "p.yaml") -> Path:
    proj = tmp_path / "proj"
    (proj / "pipelines").mkdir(parents=True, exist_ok=True)
    (proj / "pipelines" / name).write_text(yaml.safe_dump(body or {"data": {"train": "shards/train"}}))
    return proj


class _FakeClient:
    def __init__(self):
        self.calls = []

    def submit_job(self, **kw):
        self.calls.append(kw)
        return "raysubmit_fake"


@pytest.fixture
def no_server(monkeypatch):
    """Any attempt to build a jobs client fails the test."""

    def boom(*a, **k):
        raise AssertionError("a server was contacted")

    monkeypatch.setattr(sub, "_client", boom)
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", boom)


# ------------------------------------------------------------------------------------------- fast


def test_submit_forwards_secrets_but_never_prints_them(tmp_path, monkeypatch, capsys, caplog):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://bob:{URI_PASSWORD}@mlflow.example:5000")
    fake = _FakeClient()
    monkeypatch.setattr(sub, "_client", lambda address: fake)
    proj = _project(tmp_path)
    printed = []
    job = sub.submit(str(proj / "pipelines" / "p.yaml"), "http://127.0.0.1:1", ["train.lr=0.01"],
                     working_dir=str(proj), env={"MY_API_KEY": "sekrit-extra-777", "PLAIN": "visible"})
    sub.submit(str(proj / "pipelines" / "p.yaml"), "http://127.0.0.1:1", [], working_dir=str(proj),
               say=printed.append)
    assert job == "raysubmit_fake"
    out = capsys.readouterr()
    shown = out.out + out.err + caplog.text + "\n".join(printed)
    for secret in [*SECRETS.values(), URI_PASSWORD, "sekrit-extra-777"]:
        assert secret not in shown, f"secret {secret} was printed"
    assert sub.REDACTED in shown and "visible" in shown and "mlflow.example" in shown
    # ... but the job gets them
    sent = fake.calls[0]
    env = sent["runtime_env"]["env_vars"]
    for k, v in SECRETS.items():
        assert env[k] == v
    assert env["MY_API_KEY"] == "sekrit-extra-777" and env["HF_HUB_OFFLINE"] == "1"
    assert env["MLFLOW_TRACKING_URI"].endswith("@mlflow.example:5000")
    ep = sent["entrypoint"]
    assert ep.startswith("mmtl run pipelines/p.yaml train.lr=0.01")
    assert '"tracking.uri=${MLFLOW_TRACKING_URI}"' in ep and URI_PASSWORD not in ep
    assert sent["runtime_env"]["working_dir"] == str(proj.resolve())
    for ex in ("runs/", ".venv/", ".git", "mlruns/", "*.db"):
        assert ex in sent["runtime_env"]["excludes"]
    # redact() works on any runtime_env, e.g. one read back from the server
    red = sub.redact(sent["runtime_env"])
    assert all(red["env_vars"][k] == sub.REDACTED for k in SECRETS)
    assert env[next(iter(SECRETS))] == SECRETS[next(iter(SECRETS))], "redact must not modify its input"


def test_pipeline_tracking_uri_wins_over_forwarded_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    fake = _FakeClient()
    monkeypatch.setattr(sub, "_client", lambda address: fake)
    proj = _project(tmp_path, {"data": {"train": "x"}, "tracking": {"uri": "sqlite:///x.db"}})
    sub.submit(str(proj / "pipelines" / "p.yaml"), None, [], working_dir=str(proj), say=None)
    assert "tracking.uri" not in fake.calls[0]["entrypoint"]


def test_bad_pipeline_fails_before_contacting_a_server(tmp_path, no_server):
    proj = _project(tmp_path, {"data": {"train": "x"}, "train": {"lr": -1}})
    p = str(proj / "pipelines" / "p.yaml")
    with pytest.raises(PipelineError, match=r"train\.lr"):
        sub.submit(p, "http://127.0.0.1:1", [], working_dir=str(proj), say=None)
    with pytest.raises(PipelineError, match=r"train\.no_such_field"):
        sub.submit(p, "http://127.0.0.1:1", ["train.lr=0.1", "train.no_such_field=3"], working_dir=str(proj),
                   say=None)
    with pytest.raises(PipelineError, match="not found"):
        sub.submit(str(proj / "pipelines" / "missing.yaml"), None, [], working_dir=str(proj), say=None)
    with pytest.raises(PipelineError, match="a.b.c=value"):
        sub.submit(p, None, ["train.lr"], working_dir=str(proj), say=None)
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text(yaml.safe_dump({"data": {"train": "x"}}))
    with pytest.raises(ValueError, match="not inside working_dir"):
        sub.submit(str(outside), None, [], working_dir=str(proj), say=None)
    with pytest.raises(FileNotFoundError, match="runtime_env"):
        sub.submit(p, None, ["train.lr=0.1"], working_dir=str(proj), runtime_env_file=str(tmp_path / "nope.yaml"),
                   say=None)


def test_entrypoint_is_shell_quoted():
    ov = ['eval.zero_shot.templates=["a photo of {}", "{}; rm -rf /"]', "train.name=it's", "data.train=$HOME/x"]
    ep = sub.build_entrypoint("pipelines/my pipe.yaml", ov)
    assert shlex.split(ep) == ["mmtl", "run", "pipelines/my pipe.yaml", *ov]


def test_runtime_env_merge_order(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    f = tmp_path / "rt.yaml"
    f.write_text(yaml.safe_dump({"env_vars": {"A": 1, "HF_HUB_OFFLINE": "1"}, "excludes": ["data/"],
                                 "pip": ["pkg-a"]}))
    rt = sub.build_runtime_env(str(tmp_path), str(f), env={"A": "2"}, pip=["pkg-b", "pkg-a"])
    assert rt["env_vars"]["A"] == "2" and rt["env_vars"]["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "AWS_SECRET_ACCESS_KEY" not in rt["env_vars"]
    assert rt["excludes"][0] == "data/" and "runs/" in rt["excludes"]
    assert rt["pip"] == ["pkg-a", "pkg-b"]
    # the project's own file is used when no file is given; the built-in default when the project has none
    repo = Path(__file__).resolve().parents[1]
    assert sub.build_runtime_env(str(repo))["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert sub.build_runtime_env(str(tmp_path))["env_vars"]["HF_HUB_OFFLINE"] == "1"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        sub.build_runtime_env(str(tmp_path), str(bad))


def test_auth_headers(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    assert sub.auth_headers("http://127.0.0.1:8265") == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("file-token\n")
    assert sub.auth_headers("http://127.0.0.1:8265") == {"Authorization": "Bearer file-token"}
    assert sub.auth_headers("http://localhost:8265") == {"Authorization": "Bearer file-token"}
    assert sub.auth_headers("http://head.example:8265") == {}, "a local token must not go to a remote host"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert sub.auth_headers("https://head.example") == {"Authorization": "Bearer env-token"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert sub.auth_headers("http://127.0.0.1:8265") == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    with pytest.raises(RuntimeError, match="no Ray auth token"):
        sub.auth_headers("http://127.0.0.1:8265")


def test_resolve_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert sub.resolve_address(None) == sub.DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not a jobs API address
    assert sub.resolve_address(None) == sub.DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265/")
    assert sub.resolve_address(None) == "http://10.0.0.5:8265"
    assert sub.resolve_address("127.0.0.1:8266") == "http://127.0.0.1:8266"



def test_unreachable_address_raises_connection_error():
    with pytest.raises(ConnectionError, match="cannot reach"):
        sub.status("raysubmit_x", f"http://127.0.0.1:{free_port()}")


# -------------------------------------------------------------------------------------------- e2e


def _head_env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every Ray socket on 127.0.0.1
        RAY_USAGE_STATS_ENABLED="0",  # no usage reporting from this head
        MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `mmtl` for the job
    )
    return env



@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with free ports and a private temp dir; yields the jobs API address."""
    tmp = tempfile.mkdtemp(prefix="mmtlray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ports = {k: free_port() for k in ("port", "dashboard-port", "ray-client-server-port",
                                       "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                       "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
                                       "object-manager-port")}
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin if ray_bin.exists() else shutil.which("ray")), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}", "--num-cpus=2",
           "--num-gpus=0", "--include-dashboard=true", *[f"--{k}={v}" for k, v in ports.items()]]
    log = open(Path(tmp) / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=_head_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{(Path(tmp) / 'head.log').read_text()[-3000:]}")
            try:
                sub._client(address)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head not up after 180 s:\n{(Path(tmp) / 'head.log').read_text()[-3000:]}")
                time.sleep(2)
        yield address
    finally:
        stop_group(proc, timeout_s=30)
        kill_leftovers(tmp)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_submit_tiny_pipeline_to_a_real_head(ray_head, tiny_shards, tmp_path):
    from conftest import tiny_pipeline
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = tiny_pipeline(tiny_shards, tmp_path / "runs",
                        train={"num_workers": 1, "max_steps": 20, "checkpoint_every": 2, "cpus_per_worker": 0.5},
                        eval={"before_training": False},
                        tracking={"uri": uri, "experiment": "submit-e2e", "model_name": None, "log_model": False})
    proj = _project(tmp_path, raw, name="tiny.yaml")
    job = sub.submit(str(proj / "pipelines" / "tiny.yaml"), ray_head, ["train.max_steps=4"],
                     working_dir=str(proj), env={"MLFLOW_DISABLE_TELEMETRY": "true"}, say=None)
    assert job.startswith("raysubmit_")

    followed = io.StringIO()
    t = threading.Thread(target=sub.logs, args=(job, ray_head, True, followed), daemon=True)
    t.start()
    t.join(timeout=480)
    if t.is_alive():
        sub.stop(job, ray_head)
        pytest.fail(f"job {job} did not finish in 8 min; last logs:\n{followed.getvalue()[-4000:]}")
    st = sub.wait(job, ray_head, timeout_s=60)
    text = sub.logs(job, ray_head, follow=False, out=io.StringIO())
    if st != "SUCCEEDED":
        info = sub.job_info(job, ray_head)
        pytest.fail(f"job {st}: {info['message']}\n--- logs ---\n{text[-6000:]}")
    assert sub.status(job, ray_head) == "SUCCEEDED"
    assert "mmtl step 4/4" in text, text[-3000:]  # the worker's "[mmtl] step" line as the console shows it
    assert "mmtl step 4/4" in followed.getvalue(), "follow mode missed the step progress"
    assert "step 5/" not in text, "the override train.max_steps=4 did not reach the job"

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("submit-e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["train.num_workers"] == "1"
    assert run.info.run_id in text, "the job log names its MLflow run"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert losses and max(m.step for m in losses) <= 4

    from mmtl import cli

    names = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    if "status" in names:  # wired by the CLI owner
        from typer.testing import CliRunner

        res = CliRunner().invoke(cli.app, ["status", job, "--dashboard", ray_head])
        assert res.exit_code == 0 and "SUCCEEDED" in res.output, res.output

    info = sub.job_info(job, ray_head)
    assert info["entrypoint"].startswith("mmtl run pipelines/tiny.yaml") and info["status"] == "SUCCEEDED"
    assert sub.stop(job, ray_head) is False  # already finished


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_stop_a_running_job(ray_head):
    client = sub._client(ray_head)
    job = client.submit_job(entrypoint="sleep 120")
    deadline = time.monotonic() + 60
    while sub.status(job, ray_head) == "PENDING" and time.monotonic() < deadline:
        time.sleep(1)
    assert sub.stop(job, ray_head) is True
    assert sub.wait(job, ray_head, timeout_s=60, poll_s=1) == "STOPPED"
    with pytest.raises(RuntimeError):
        sub.status("raysubmit_does_not_exist", ray_head)
