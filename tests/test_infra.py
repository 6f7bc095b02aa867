"""Static checks of the deployment files under cluster/ and infra/ (no cluster, no network, < 1 s each).

They parse every YAML document and the Dockerfile and check what breaks a deployment silently: one image
everywhere (the Dockerfile's tag = project version), entrypoints that run `mmtl run` / `mmtl retrain` on a
pipeline that exists and validates with the given overrides, GPU limits that fit the requested workers,
valid cron schedules, an MLflow server on Postgres + S3 whose URL the Ray pods use, secrets only by
reference, and a runtime_env with the env vars mmtl/jobs/submit.py expects.
"""
from __future__ import annotations

import re
import shlex
import socket
import tomllib
from pathlib import Path

import pytest
import yaml

from mmtl.config import load_pipeline
from mmtl.jobs import submit as sub

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DIRS = (ROOT / "cluster", ROOT / "infra")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ghcr.io/mmtl-dev/mmtl:{VERSION}"
OTHER_IMAGES = {"postgres"}  # repositories allowed besides the mmtl image (Postgres for MLflow)


# ------------------------------------------------------------------------------------------ helpers


def yaml_files() -> list[Path]:
    return sorted(p for d in DEPLOY_DIRS for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in yaml_files() for d in docs(p)]


def k8s(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in all_docs() if d.get("kind") == kind]


def walk(node, key: str):
    """Every value stored under ``key`` anywhere in a nested structure."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def pod_specs(node) -> list[dict]:
    """Pod specs (dicts with ``containers``) anywhere inside ``node``."""
    out = []
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            out.append(node)
        for v in node.values():
            out.extend(pod_specs(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(pod_specs(v))
    return out


def dockerfile() -> str:
    return (ROOT / "infra" / "Dockerfile").read_text()


def docker_workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", dockerfile(), re.M)[-1]


def docker_arg(name: str) -> str:
    m = re.search(rf"^ARG\s+{name}=(\S+)", dockerfile(), re.M)
    assert m, f"infra/Dockerfile has no ARG {name}=..."
    return m.group(1)


def quantity(v) -> float:
    """Kubernetes CPU / count quantity -> float ("500m" -> 0.5)."""
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def mlflow_service_url() -> str:
    (path, svc), = [(p, d) for p, d in k8s("Service") if d["metadata"]["name"] == "mlflow"]
    port = svc["spec"]["ports"][0]["port"]
    return f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port}"


def entrypoints() -> list[tuple[str, list[str], str, dict]]:
    """(where, argv, working dir, the object that runs it) for every RayJob, RayCronJob and CronJob."""
    out = []
    for p, d in k8s("RayJob"):
        out.append((f"{p.name}:{d['metadata']['name']}", shlex.split(d["spec"]["entrypoint"]), docker_workdir(),
                    d["spec"]))
    for p, d in k8s("RayCronJob"):
        spec = d["spec"]["jobTemplate"]
        out.append((f"{p.name}:{d['metadata']['name']}", shlex.split(spec["entrypoint"]), docker_workdir(), spec))
    for p, d in k8s("CronJob"):
        pod = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        argv = list(c.get("command") or []) + list(c.get("args") or [])
        if len(argv) == 3 and argv[:2] in (["sh", "-c"], ["bash", "-c"], ["/bin/sh", "-c"]):
            argv = shlex.split(argv[2])
        out.append((f"{p.name}:{d['metadata']['name']}", argv, c.get("workingDir") or docker_workdir(), pod))
    return out


def repo_path(image_path: str, workdir: str) -> Path:
    """A path inside the image (absolute, or relative to ``workdir``) -> the same file in this checkout."""
    image_root = docker_workdir().rstrip("/") + "/"
    full = image_path if image_path.startswith("/") else f"{workdir.rstrip('/')}/{image_path}"
    assert full.startswith(image_root), f"{image_path} is outside the image's project dir {image_root}"
    return ROOT / full[len(image_root):]


CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
CRON_NAMES = [{}, {}, {}, {m: i + 1 for i, m in enumerate(
    "jan feb mar apr may jun jul aug sep oct nov dec".split())},
    {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}]


def cron_ok(expr: str) -> bool:
    """A standard 5-field cron expression (numbers, names, *, lists, ranges, steps)."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for f, (lo, hi), names in zip(fields, CRON_RANGES, CRON_NAMES):
        for part in f.split(","):
            rng, _, step = part.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                return False
            if rng == "*":
                continue
            ends = rng.split("-")
            if len(ends) > 2:
                return False
            for e in ends:
                v = names.get(e.lower()) if e.lower() in names else (int(e) if e.isdigit() else None)
                if v is None or not lo <= v <= hi:
                    return False
    return True


@pytest.fixture
def no_network(monkeypatch):
    """Fail any connection attempt to a host other than loopback."""
    real = socket.socket.connect

    def guarded(self, addr):
        host = addr[0] if isinstance(addr, tuple) else addr
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
            raise AssertionError(f"test tried to contact {addr}")
        return real(self, addr)

    monkeypatch.setattr(socket.socket, "connect", guarded)


# -------------------------------------------------------------------------------------------- tests


def test_every_deployment_file_parses():
    files = yaml_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    for need in ("cluster/local.yaml", "cluster/aws-autoscaler.yaml", "cluster/runtime_env.yaml",
                 "infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml", "infra/kuberay/raycronjob.yaml",
                 "infra/kuberay/cronjob.yaml", "infra/mlflow/mlflow.yaml", "infra/mlflow/postgres.yaml"):
        assert need in names, f"missing {need}"
    for p in files:
        assert docs(p), f"{p} has no YAML document"
        for d in docs(p):
            assert isinstance(d, dict), f"{p}: a document is not a mapping"
            if "apiVersion" in d:
                assert d.get("kind") and d.get("metadata", {}).get("name"), f"{p}: k8s object without kind/name"
    assert (ROOT / "infra" / "Dockerfile").is_file()


def test_one_image_everywhere_matching_the_dockerfile():
    df = dockerfile()
    assert re.search(r"^FROM\s+nvidia/cuda:\S+", df, re.M), "the image must start from a CUDA base"
    assert f'dev.mmtl.image="{IMAGE}"' in df
    assert f'org.opencontainers.image.version="{VERSION}"' in df
    assert f"-t {IMAGE}" in df, "the documented docker build command must tag the project version"
    seen = {}
    for p, d in all_docs():
        for img in walk(d, "image"):
            if isinstance(img, str):
                seen.setdefault(img, set()).add(p.relative_to(ROOT).as_posix())
    assert IMAGE in seen
    for img, where in seen.items():
        repo = img.rsplit(":", 1)[0]
        assert img == IMAGE or repo in OTHER_IMAGES, f"{img} in {sorted(where)}: use {IMAGE}"
    for f in ("cluster/local.yaml", "cluster/aws-autoscaler.yaml", "infra/kuberay/raycluster.yaml",
              "infra/kuberay/rayjob.yaml", "infra/kuberay/raycronjob.yaml", "infra/kuberay/cronjob.yaml",
              "infra/mlflow/mlflow.yaml"):
        assert f in seen[IMAGE], f"{f} does not run {IMAGE}"


def test_ray_version_matches_the_image_pin():
    import ray

    pinned = docker_arg("RAY_VERSION")
    assert pinned == ray.__version__, "the image pins another Ray than the one the project is tested with"
    versions = list(walk([d for _, d in all_docs()], "rayVersion"))
    assert versions and all(v == pinned for v in versions), versions


def test_entrypoints_run_existing_pipelines_that_validate():
    eps = entrypoints()
    assert {argv[1] for _, argv, _, _ in eps} >= {"run", "retrain"}
    url = mlflow_service_url()
    for where, argv, workdir, _ in eps:
        assert argv[:2] in (["mmtl", "run"], ["mmtl", "retrain"]), f"{where}: {argv[:2]}"
        pipeline, overrides = argv[2], argv[3:]
        local = repo_path(pipeline, workdir)
        assert local.parent.name == "pipelines" and local.is_file(), f"{where}: {pipeline} not in pipelines/"
        pipe = load_pipeline(local, overrides)  # raises PipelineError naming the bad override
        assert pipe.tracking.uri == url, f"{where}: tracking.uri must be the in-cluster MLflow ({url})"
        assert pipe.train.runs_root == "/mnt/runs", f"{where}: runs_root must be the shared volume"
        assert pipe.train.use_gpu, f"{where}: the cluster entrypoints train on GPUs"


def _gpu(container) -> float:
    return quantity(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_gpu_resources_fit_the_requested_workers():
    for where, argv, workdir, spec in entrypoints():
        pipe = load_pipeline(repo_path(argv[2], workdir), argv[3:])
        need_gpus = pipe.train.num_workers * pipe.train.gpus_per_worker
        if "rayClusterSpec" in spec:
            rc = spec["rayClusterSpec"]
            assert rc["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: head must not train"
            have = 0.0
            for g in rc["workerGroupSpecs"]:
                c = g["template"]["spec"]["containers"][0]
                gpus = _gpu(c)
                assert gpus >= 1, f"{where}: worker group {g['groupName']} has no nvidia.com/gpu limit"
                assert quantity(c["resources"]["limits"]["cpu"]) >= pipe.train.cpus_per_worker * (
                    gpus / pipe.train.gpus_per_worker), f"{where}: not enough CPUs per worker pod"
                assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
                have += gpus * g["maxReplicas"]
                tol = g["template"]["spec"].get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" for t in tol), f"{where}: GPU taint not tolerated"
            assert have >= need_gpus, f"{where}: {need_gpus} GPUs requested, worker groups offer {have}"
        else:  # a plain CronJob: one pod runs a single-node Ray
            c = spec["containers"][0]
            assert _gpu(c) >= need_gpus, f"{where}: pod has {_gpu(c)} GPUs, the run needs {need_gpus}"
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", f"{where}: single-node Ray must stay on loopback"
    (_, rc), = k8s("RayCluster")
    groups = rc["spec"]["workerGroupSpecs"]
    assert any(_gpu(g["template"]["spec"]["containers"][0]) >= 1 for g in groups)


def test_pods_mount_the_shared_runs_volume_and_use_the_in_cluster_mlflow():
    claims = {d["metadata"]["name"] for _, d in k8s("PersistentVolumeClaim")}
    url = mlflow_service_url()
    for p, d in all_docs():
        if d.get("kind") not in ("RayCluster", "RayJob", "RayCronJob", "CronJob"):
            continue
        for pod in pod_specs(d):
            if pod is d.get("spec", {}).get("submitterPodTemplate", {}).get("spec"):
                continue
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                if c["name"] == "ray-job-submitter":
                    continue
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert "/mnt/runs" in mounts, f"{p.name}/{c['name']}: /mnt/runs not mounted"
                claim = vols[mounts["/mnt/runs"]]["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{p.name}: PVC {claim} is not defined under infra/"
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("MLFLOW_TRACKING_URI") == url, f"{p.name}/{c['name']}: MLFLOW_TRACKING_URI"
    for _, d in k8s("PersistentVolumeClaim"):
        if d["metadata"]["name"] == "mmtl-runs":
            assert d["spec"]["accessModes"] == ["ReadWriteMany"]


def test_cron_schedules_are_valid_five_field():
    assert cron_ok("0 3 * * 1") and cron_ok("*/15 0-6,22 1 jan-mar mon-fri")
    assert not cron_ok("0 3 * *") and not cron_ok("61 * * * *") and not cron_ok("@daily") and not cron_ok("0 0 0 * *")
    schedules = [d["spec"]["schedule"] for _, d in k8s("RayCronJob") + k8s("CronJob")]
    assert len(schedules) >= 2
    for s in schedules:
        assert cron_ok(s), f"invalid cron schedule {s!r}"
    (_, rcj), = k8s("RayCronJob")
    assert "jobTemplate" in rcj["spec"] and "entrypoint" in rcj["spec"]["jobTemplate"]
    text = (ROOT / "infra" / "kuberay" / "raycronjob.yaml").read_text()
    assert "feature gate" in text and "RayCronJob=true" in text and "cronjob.yaml" in text


def test_mlflow_server_uses_postgres_and_s3_and_secret_refs():
    (_, dep), = [(p, d) for p, d in k8s("Deployment") if d["metadata"]["name"] == "mlflow"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    argv = list(c.get("command") or []) + list(c.get("args") or [])
    assert argv[:2] == ["mlflow", "server"], argv
    opts = {}
    for a in argv[2:]:
        k, _, v = a.partition("=")
        opts[k] = v
    env = {e["name"]: e for e in c.get("env", [])}
    backend = opts.get("--backend-store-uri") or env.get("MLFLOW_BACKEND_STORE_URI", {}).get("value", "")
    assert re.match(r"postgresql(\+\w+)?://", backend), f"backend store {backend!r} is not Postgres"
    artifacts = opts.get("--artifacts-destination") or opts.get("--default-artifact-root", "")
    assert artifacts.startswith("s3://"), f"artifact root {artifacts!r} is not S3"
    assert opts.get("--host") == "0.0.0.0" and opts.get("--port") == "5000"
    # $(VAR) references resolve to env entries defined earlier (Kubernetes expands only those)
    names = [e["name"] for e in c["env"]]
    for i, e in enumerate(c["env"]):
        for ref in re.findall(r"\$\((\w+)\)", str(e.get("value", ""))):
            assert ref in names[:i], f"{e['name']} uses $({ref}) before it is defined"
    # the URI's host is the Postgres Service, and Postgres reads its credentials from the same Secret
    pg_host = re.search(r"@([^:/]+)", backend).group(1)
    assert pg_host.split(".")[0] in {d["metadata"]["name"] for _, d in k8s("Service")}
    (_, pg), = k8s("StatefulSet")
    pg_env = {e["name"]: e for e in pg["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == \
        env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
    (_, svc), = [(p, d) for p, d in k8s("Service") if d["metadata"]["name"] == "mlflow"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] in [pt["containerPort"] for pt in c["ports"]]


def test_secrets_only_by_reference():
    assert not k8s("Secret"), "no Secret objects (with values) in the repository; see infra/mlflow/README.md"
    for p, d in all_docs():
        for env_list in walk(d, "env"):
            if not isinstance(env_list, list):
                continue
            for e in env_list:
                if sub.SECRET_NAME.search(e["name"]) or e["name"] in sub.SECRET_ENV:
                    assert "valueFrom" in e and "value" not in e, f"{p.name}: {e['name']} must come from a Secret"
    rt = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    for k in rt.get("env_vars", {}):
        assert not sub.SECRET_NAME.search(k), f"runtime_env.yaml must not hold secrets ({k})"
    readme = (ROOT / "infra" / "mlflow" / "README.md").read_text()
    for _, d in all_docs():
        for ref in walk(d, "secretKeyRef"):
            assert f"create secret generic {ref['name']}" in readme, f"README does not create Secret {ref['name']}"


def test_runtime_env_has_what_submit_expects():
    from ray.runtime_env import RuntimeEnv

    rt = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert set(rt) <= RuntimeEnv.known_fields, f"unknown runtime_env fields: {set(rt) - RuntimeEnv.known_fields}"
    RuntimeEnv(**rt)  # Ray's own validation
    assert "working_dir" not in rt, "mmtl submit sets working_dir itself"
    env = rt["env_vars"]
    for k, v in sub.REQUIRED_ENV_VARS.items():
        assert env.get(k) == v, f"runtime_env.yaml env_vars.{k} should be {v!r}"
    assert all(isinstance(v, str) for v in env.values()), "env var values must be strings"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env, "single-node setting; breaks multi-node clusters"
    for ex in ("runs/", ".venv/", ".git", "mlruns/", "*.db"):
        assert ex in rt["excludes"]
    assert sub.DEFAULT_RUNTIME_ENV["env_vars"] == sub.REQUIRED_ENV_VARS


def test_cluster_launcher_configs_pass_rays_schema(no_network):
    from ray.autoscaler._private.util import prepare_config, validate_config

    for name in ("local.yaml", "aws-autoscaler.yaml"):
        cfg = yaml.safe_load((ROOT / "cluster" / name).read_text())
        assert cfg["docker"]["image"] == IMAGE
        validate_config(prepare_config(cfg))
    aws = yaml.safe_load((ROOT / "cluster" / "aws-autoscaler.yaml").read_text())
    types = aws["available_node_types"]
    assert types[aws["head_node_type"]]["resources"].get("CPU") == 0
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] > 0 for n, t in types.items()
               if n != aws["head_node_type"])
    for cfg_name in ("local.yaml", "aws-autoscaler.yaml"):
        head = " ".join(yaml.safe_load((ROOT / "cluster" / cfg_name).read_text())["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head, f"{cfg_name}: keep the jobs API off the network"
    local = " ".join(yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())["head_start_ray_commands"])
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in local and "--node-ip-address=127.0.0.1" in local
    readme = (ROOT / "cluster" / "README.md").read_text()
    assert "GCP" in readme and "Azure" in readme
