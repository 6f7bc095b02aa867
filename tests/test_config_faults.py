"""Configuration, checkpoint and tracking faults (issue 18): the eight case generators in shared/cases/config,
each run as ``python case_NN_*.py OUTDIR``, plus further cases of the same kinds.

Kinds: YAML that does not mean what it says (duplicate keys, YAML 1.1 scalars, free-form dicts); settings that
cannot work on the chosen workers; user strings that become names; resume compatibility; one tracking store;
one rule for relative paths. Everything here runs without Ray except the one end-to-end run of case 22.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mmtl.config import PipelineError, build_pipeline, load_pipeline
from mmtl.recipes.config_report import config_report
from mmtl.config.workers import check_local_devices
from mmtl.train.checkpoint import CheckpointMismatchError, check_compatible, checkpoint_meta

REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [os.environ.get("MMTL_CONFIG_CASES_DIR", ""), REPO / "shared/cases/config",
               REPO.parent / "shared/cases/config", REPO.parent.parent / "shared/cases/config",
               "/work/shared/cases/config"]
CASES = next((Path(p) for p in _CANDIDATES if p and Path(p).is_dir()), None)
needs_cases = pytest.mark.skipif(CASES is None, reason="shared/cases/config not found (set MMTL_CONFIG_CASES_DIR)")


def make_case(num: str, out: Path) -> Path:
    """Run generator ``case_<num>_*.py`` into ``out``; returns ``out``."""
    (gen,) = CASES.glob(f"case_{num}_*.py")
    subprocess.run([sys.executable, str(gen), str(out)], check=True, capture_output=True, timeout=120)
    return out


def cli(*args: str):
    from mmtl.cli import app

    return CliRunner().invoke(app, list(args))


def tiny_raw(**sections) -> dict:
    from mmtl.models import tiny_two_tower_config

    raw = {"data": {"train": "/x"}, "model": tiny_two_tower_config().model_dump(mode="json"),
           "train": {"num_workers": 1, "micro_batch_size": 4, "max_steps": 4, "checkpoint_every": 2}}
    for sec, upd in sections.items():
        raw.setdefault(sec, {}).update(upd)
    return raw


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- 1. YAML that does not mean what it says -----------------------------------------------------------
@needs_cases
def test_case18_duplicate_keys_refused_with_key_path_and_lines(tmp_path):
    out = make_case("18", tmp_path / "c18")
    text = (out / "pipeline.yaml").read_text().splitlines()
    lr_lines = [i + 1 for i, line in enumerate(text) if line.startswith("  lr:")]
    steps_lines = [i + 1 for i, line in enumerate(text) if line.startswith("  max_steps:")]
    assert len(lr_lines) == 2 and len(steps_lines) == 2
    with pytest.raises(PipelineError) as e:
        load_pipeline(out / "pipeline.yaml")
    msg = str(e.value)
    assert f"train.lr on lines {lr_lines[0]}, {lr_lines[1]}" in msg
    assert f"train.max_steps on lines {steps_lines[0]}, {steps_lines[1]}" in msg
    res = cli("config", str(out / "pipeline.yaml"))
    assert res.exit_code == 2 and "train.lr on lines" in res.output
    res = cli("run", str(out / "pipeline.yaml"))
    assert res.exit_code == 2 and "train.max_steps on lines" in res.output
    assert not (out / "runs").exists()


def test_duplicate_keys_anywhere_and_in_override_values(tmp_path):
    p = write(tmp_path / "p.yaml", "data:\n  train: /x\n  extra_eval:\n    a: /a\n    a: /b\ntrain: {lr: 1}\n"
              "train: {max_steps: 3}\n")
    with pytest.raises(PipelineError) as e:
        load_pipeline(p)
    assert "data.extra_eval.a on lines 4, 5" in str(e.value) and "train on lines 6, 7" in str(e.value)
    ok = write(tmp_path / "ok.yaml", "data: {train: /x}\n")
    with pytest.raises(PipelineError, match=r"model\.text\.config\.hidden_size on lines 1, 1"):
        load_pipeline(ok, ["model.text.config={hidden_size: 8, hidden_size: 16}"])
    # a merge key (<<) is not a duplicate; the explicit key wins as YAML says
    merged = write(tmp_path / "m.yaml", "base: &b {lr: 0.1, max_steps: 3}\ndata: {train: /x}\n"
                   "train:\n  <<: *b\n  lr: 0.2\n")
    with pytest.raises(PipelineError, match="base"):  # unknown top-level key, not a duplicate
        load_pipeline(merged)


@needs_cases
def test_case19_sci_notation_in_freeform_config_is_a_float(tmp_path):
    out = make_case("19", tmp_path / "c19")
    pipe = load_pipeline(out / "pipeline.yaml")
    eps = pipe.model.text.config["layer_norm_eps"]
    assert isinstance(eps, float) and eps == 1e-12
    assert "layer_norm_eps: 1.0e-12" in config_report(pipe)
    from mmtl.models import build_model

    model = build_model(pipe.model)
    assert model.text_tower.config.layer_norm_eps == 1e-12


def test_yaml_12_scalars_and_freeform_coercion(tmp_path):
    p = write(tmp_path / "p.yaml", """
data: {train: /x}
model:
  vision:
    timm_kwargs: {drop_rate: "5e-2", drop_path_rate: 1e-1, scriptable: yes}
  text:
    path: null
    config: {hidden_size: "32", layer_norm_eps: "1E-5", hidden_act: gelu, num_hidden_layers: 2}
train: {lr: 3e-4, max_steps: 1e3, seed: 012, name: 2026-11-30}
eval:
  zero_shot: {classes: [yes, no, on, off], label_field: answer}
strategy:
  fusion: {answers: [yes, no]}
""")
    pipe = load_pipeline(p)
    assert pipe.model.vision.timm_kwargs == {"drop_rate": 0.05, "drop_path_rate": 0.1, "scriptable": True}
    cfg = pipe.model.text.config
    assert cfg["hidden_size"] == 32 and isinstance(cfg["hidden_size"], int)
    assert cfg["layer_norm_eps"] == 1e-5 and cfg["hidden_act"] == "gelu"
    assert pipe.train.lr == 3e-4 and pipe.train.max_steps == 1000 and pipe.train.seed == 12
    assert pipe.train.name == "2026-11-30"  # a date is text
    assert pipe.eval.zero_shot.classes == ["yes", "no", "on", "off"]  # YAML 1.1 would make these booleans
    assert pipe.strategy.fusion.answers == ["yes", "no"]
    # a typed bool field still takes yes/no; an empty section means its defaults
    p2 = write(tmp_path / "p2.yaml", "data: {train: /x, shuffle_shards: no}\neval:\ntracking:\n")
    pipe2 = load_pipeline(p2)
    assert pipe2.data.shuffle_shards is False and pipe2.eval.sets == ["test"]
    # an override value is read the same way
    pipe3 = load_pipeline(p2, ["model.text.config={layer_norm_eps: 1e-12}", "train.lr=1e-4"])
    assert pipe3.model.text.config["layer_norm_eps"] == 1e-12 and pipe3.train.lr == 1e-4


def test_freeform_values_that_cannot_be_data_are_refused_with_path(tmp_path):
    p = write(tmp_path / "p.yaml", "data: {train: /x}\nmodel:\n  text:\n    config: {1: a}\n")
    with pytest.raises(PipelineError, match=r"model\.text\.config: key 1 is a int"):
        load_pipeline(p)
    p = write(tmp_path / "q.yaml", "data: {train: /x}\nmodel:\n  config: {vision_cfg: {x: !!binary aGk=}}\n")
    with pytest.raises(PipelineError, match=r"model\.config\.vision_cfg\.x: bytes"):
        load_pipeline(p)


def test_every_freeform_dict_is_coerced():
    from mmtl.config import FREEFORM_FIELDS

    assert set(FREEFORM_FIELDS) == {"model.config", "model.text.config", "model.vision.timm_kwargs"}


# ---- 2. settings that cannot work on the chosen workers --------------------------------------------------
@needs_cases
def test_case24_fp16_on_cpu_workers_refused_before_ray(tmp_path):
    out = make_case("24", tmp_path / "c24")
    with pytest.raises(PipelineError) as e:
        load_pipeline(out / "pipeline.yaml")
    msg = str(e.value)
    assert "train.precision=fp16" in msg and "bf16 or fp32" in msg and "train.use_gpu=true" in msg
    res = cli("run", str(out / "pipeline.yaml"))
    assert res.exit_code == 2 and "train.precision=fp16" in res.output and "--resume" not in res.output
    assert not (out / "runs").exists()
    # the same on GPU workers is accepted
    assert load_pipeline(out / "pipeline.yaml", ["train.use_gpu=true"]).train.precision == "fp16"


@needs_cases
def _tiny_model_and_batches(pipe, n: int):
    """The pipeline's model (seed 0, strategy applied for ZeRO-2) and ``n`` seeded random micro-batches of 4."""
    import torch

    from mmtl.models import build_model
    from mmtl.strategies import apply_strategy
    from mmtl.train.loop import seed_everything

    seed_everything(0)
    model = build_model(pipe.model)
    apply_strategy(model, pipe.strategy, zero_stage=2)
    g = torch.Generator().manual_seed(0)
    return model, ({"image": torch.randn(4, 3, 32, 32, generator=g), **model.tokenize(["a red box", "b", "c", "d"])}
                   for _ in range(n))


def test_case23_optimizer_offload_on_cpu_trains(tmp_path):
    """The documented option works: ZeRO-Offload with mmtl's client AdamW gets zero_force_ds_cpu_optimizer=false
    and trains 3 steps on a CPU worker (one process, gloo)."""
    import torch

    from mmtl.train.ds_config import deepspeed_config
    from mmtl.train.loop import run_training, single_process_group

    out = make_case("23", tmp_path / "c23")
    pipe = load_pipeline(out / "pipeline.yaml", ["train.max_steps=3", "train.micro_batch_size=4",
                                                  "strategy.kind=full"])
    assert pipe.train.offload_optimizer and pipe.train.zero_stage == 2 and not pipe.train.use_gpu
    ds = deepspeed_config(pipe.train)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False
    model, batches = _tiny_model_and_batches(pipe, 10)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with single_process_group():
        m = run_training(pipe, model, batches, report=lambda metrics, d: None)
    assert m["steps"] == 3 and m["train/loss"] == m["train/loss"]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("train, field, hint", [
    ({"offload_optimizer": True, "zero_stage": 0}, "train.offload_optimizer=true", "train.zero_stage to 1, 2 or 3"),
    ({"offload_param": True, "zero_stage": 2}, "train.offload_param=true", "train.zero_stage=3"),
    ({"use_gpu": True, "gpus_per_worker": 0}, "train.use_gpu=true", "gpus_per_worker > 0"),
])
def test_worker_settings_refused_at_load(train, field, hint):
    with pytest.raises(PipelineError) as e:
        build_pipeline(tiny_raw(train=train))
    assert field in str(e.value) and hint in str(e.value)


def test_local_devices_checked_before_ray():
    t = build_pipeline(tiny_raw(train={"use_gpu": True, "num_workers": 2})).train
    with pytest.raises(ValueError, match="train.use_gpu=true, but the local Ray instance has no GPU"):
        check_local_devices(t, "local", num_cpus=8, gpus=0)
    with pytest.raises(ValueError, match=r"train.num_workers <= 1"):
        check_local_devices(t, "local", num_cpus=8, gpus=1)
    check_local_devices(t, "local", num_cpus=8, gpus=2)
    bf16 = build_pipeline(tiny_raw(train={"use_gpu": True, "precision": "bf16"})).train
    with pytest.raises(ValueError, match="train.precision=bf16, but this machine's GPUs have no bf16"):
        check_local_devices(bf16, "local", num_cpus=8, gpus=1, bf16=False)
    check_local_devices(bf16, "local", num_cpus=8, gpus=1, bf16=True)
    t = build_pipeline(tiny_raw(train={"num_workers": 4, "cpus_per_worker": 1.0})).train
    with pytest.raises(ValueError, match=r"= 4 CPUs, but the local Ray instance has 2: lower train.cpus_per_worker"):
        check_local_devices(t, "local", num_cpus=2)
    check_local_devices(t, "ray://somewhere:10001")  # a joined cluster is not checked


def test_resume_hint_only_when_a_resume_can_help(tmp_path):
    from ray.train import WorkerGroupError

    from mmtl.runtime import resume_can_help, training_failure

    run_dir = tmp_path / "run"
    ck = run_dir / "train" / "checkpoint_1"
    ck.mkdir(parents=True)
    (ck / "mmtl_meta.json").write_text(json.dumps({"step": 6, "world_size": 1}))
    config_err = WorkerGroupError("rank 0: ValueError", {0: ValueError("Type fp16 is not supported on your device.")})
    assert not resume_can_help(config_err)
    msg = training_failure(config_err, run_dir)
    assert "--resume" not in msg and "fix the setting" in msg

    class ActorDiedError(RuntimeError):
        pass

    crash = WorkerGroupError("rank 1 died", {1: ActorDiedError("worker process was killed")})
    assert resume_can_help(crash)
    assert "rerun with --resume to continue from the last checkpoint (step 6)" in training_failure(crash, run_dir)
    assert "starts from step 0" in training_failure(crash, tmp_path / "none")


# ---- 3. user strings that become names --------------------------------------------------------------------
@needs_cases
@pytest.mark.parametrize("fname, why", [
    ("pipeline.yaml", "it has 259 characters (at most 100)"),
    ("pipeline_glob.yaml", "it contains '*'"),
    ("pipeline_escape.yaml", "path separator"),
])
def test_case25_run_names_refused_before_anything_is_written(tmp_path, monkeypatch, fname, why):
    out = make_case("25", tmp_path / "c25")
    monkeypatch.chdir(out)
    with pytest.raises(PipelineError) as e:
        load_pipeline(out / fname)
    msg = str(e.value)
    assert "train.name=" in msg and why in msg
    suggested = re.search(r"Use for example train\.name=(\S+)", msg).group(1)
    pipe = load_pipeline(out / fname, [f"train.name={suggested}"])  # the suggestion is valid
    assert len(pipe.train.name) <= 100
    res = cli("run", fname)
    assert res.exit_code == 2 and "train.name=" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["COMMAND.txt", "data", "pipeline.yaml", "pipeline_escape.yaml",
                                                     "pipeline_glob.yaml"]
    assert not (tmp_path / "escaped").exists()


def test_run_dir_is_always_directly_under_the_runs_root(tmp_path):
    from mmtl.runtime import select_run_dir

    for bad in ("../x", "a/b", "sweep*", "x" * 101, "", "cache", ".hidden", "a b"):
        with pytest.raises(ValueError, match="cannot be a run name"):
            select_run_dir(str(tmp_path), bad, "auto")
    (tmp_path / "sweep-1[x]").mkdir()  # glob characters in other folders do not matter
    path, _ = select_run_dir(str(tmp_path), "sweep-1", "auto")
    assert path.parent == tmp_path


def test_default_run_name_from_file_is_made_safe(tmp_path):
    p = write(tmp_path / "my pipeline (v2)*.yaml", "data: {train: /x}\n")
    pipe = load_pipeline(p)
    assert pipe.train.name == "my-pipeline-v2"
    assert f"{tmp_path / 'runs' / 'my-pipeline-v2'} (new)" in config_report(pipe)


@pytest.mark.parametrize("raw, field, text", [
    ({"data": {"extra_eval": {"train": "/e"}}, "eval": {"sets": ["train"]}}, "data.extra_eval", "'train/...'"),
    ({"data": {"extra_eval": {"a/b": "/e"}}}, "data.extra_eval", "path separator"),
    ({"data": {"extra_eval": {"test": "/e"}}}, "data.extra_eval", "would hide data.test"),
    ({"eval": {"sets": ["test", "test"]}}, "eval.sets", "more than once"),
    ({"eval": {"sets": ["my set"]}}, "eval.sets", "' '"),
    ({"tracking": {"model_name": "team/model"}}, "tracking.model_name", "path separator"),
    ({"tracking": {"model_name": "m@champion"}}, "tracking.model_name", "'@'"),
    ({"tracking": {"model_name": ".."}}, "tracking.model_name", ".."),
    ({"tracking": {"experiment": " "}}, "tracking.experiment", "empty"),
    ({"tracking": {"experiment": "x" * 501}}, "tracking.experiment", "501 characters"),
    ({"tracking": {"uri": "sqlite://"}}, "tracking.uri", "in-memory"),
    ({"tracking": {"uri": "sqlite:///:memory:"}}, "tracking.uri", "in-memory"),
])
def test_names_validated_at_config_time(raw, field, text):
    base = tiny_raw()
    for sec, upd in raw.items():
        base[sec].update(upd) if sec in base else base.__setitem__(sec, upd)
    with pytest.raises(PipelineError) as e:
        build_pipeline(base)
    assert field in str(e.value) and text in str(e.value)


def test_metric_and_param_keys_made_legal():
    from mmtl.tracking.mlflow_utils import MAX_KEY_CHARS, metric_name

    assert metric_name("test/acc@1") == "test/acc_at_1"
    assert metric_name("a//b/../c/") == "a/b/__/c"
    assert metric_name("/abs") == "abs"
    long = metric_name("model.text.config." + "k" * 400)
    assert len(long) == MAX_KEY_CHARS and long != metric_name("model.text.config." + "k" * 401)
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    for k in ("a//b/../c/", "x:y z", "é/ü", "model.config." + "v" * 300):
        _validate_metric_name(metric_name(k))
        _validate_param_name(metric_name(k))


# ---- 4. resume compatibility -----------------------------------------------------------------------------
def _fake_checkpoint(run_dir: Path, meta: dict) -> None:
    ck = run_dir / "train" / "checkpoint_000001"
    ck.mkdir(parents=True)
    (ck / "mmtl_meta.json").write_text(json.dumps(meta))


@needs_cases
def test_case27_resume_with_other_zero_stage_refused_before_training(tmp_path, monkeypatch):
    out = make_case("27", tmp_path / "c27")
    monkeypatch.chdir(out)
    pipe = load_pipeline(out / "pipeline.yaml")
    _fake_checkpoint(out / "runs" / "gen27", checkpoint_meta(pipe, 4, 1))
    res = cli("run", "pipeline.yaml", "--resume", "train.zero_stage=3", "train.max_steps=6")
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert "train.zero_stage: checkpoint 2, this run 3" in text and "set train.zero_stage=2" in text
    assert "--resume" not in text.split("error:")[-1]
    import ray

    assert not ray.is_initialized()
    assert not (out / "runs" / "gen27" / "run.json").exists()  # no MLflow run was started
    # the world-size refusal reads the same way
    res = cli("run", "pipeline.yaml", "--resume", "train.num_workers=2", "train.max_steps=6")
    assert res.exit_code == 1 and "set train.num_workers=1" in " ".join(res.output.split())


def test_resume_settings_compared_field_by_field():
    pipe = build_pipeline(tiny_raw())
    meta = checkpoint_meta(pipe, 2, 1)
    assert meta["settings"]["train.precision"] == "fp32" and meta["settings"]["model.family"] == "two_tower"
    assert check_compatible(meta, 1, 2, pipe) == []
    assert check_compatible(json.loads(json.dumps(meta)), 1, 2, pipe) == []  # as read back from mmtl_meta.json
    from mmtl.models import tiny_open_clip_config

    oc = build_pipeline(tiny_raw(model=tiny_open_clip_config().model_dump()))  # python tuples in model.config
    assert check_compatible(json.loads(json.dumps(checkpoint_meta(oc, 2, 1))), 1, 2, oc) == []
    for over, field, value in [({"train": {"precision": "bf16"}}, "train.precision", "fp32"),
                               ({"strategy": {"kind": "full"}}, "strategy.kind", "frozen"),
                               ({"train": {"optimizer": "sgd"}}, "train.optimizer", "adamw"),
                               ({"model": {"embed_dim": 32}}, "model.embed_dim", "16"),
                               ({"train": {"loss": "siglip"}}, "train.loss", "clip")]:
        other = build_pipeline(tiny_raw(**over))
        with pytest.raises(CheckpointMismatchError) as e:
            check_compatible(meta, 1, other.train.zero_stage, other)
        assert f"set {field}={value}" in str(e.value)
    # optimizer settings a resume restores from the checkpoint: allowed, but said not to apply
    other = build_pipeline(tiny_raw(train={"lr": 3e-4, "weight_decay": 0.5}))
    notes = check_compatible(json.loads(json.dumps(meta)), 1, 2, other)
    assert len(notes) == 1 and "train.lr=0.0003 (checkpoint: 0.001)" in notes[0] and "NOT used" in notes[0]
    assert "train.weight_decay=0.5" in notes[0]
    assert check_compatible(meta, 1, 2, build_pipeline(tiny_raw(train={"warmup_steps": 5}))) == []  # schedule shape
    # several at once are all named
    other = build_pipeline(tiny_raw(train={"precision": "bf16", "zero_stage": 3}))
    with pytest.raises(CheckpointMismatchError, match=r"set train.zero_stage=2 train.precision=fp32"):
        check_compatible(meta, 1, 3, other)
    # max_steps below the checkpoint's step; another batch layout is a note
    with pytest.raises(CheckpointMismatchError, match="set train.max_steps=2 or more"):
        check_compatible(meta, 1, 2, build_pipeline(tiny_raw(train={"max_steps": 1})))
    notes = check_compatible(meta, 1, 2, build_pipeline(tiny_raw(train={"micro_batch_size": 8})))
    assert notes and "train.micro_batch_size=8 (checkpoint: 4)" in notes[0]
    # a checkpoint from before these fields were recorded: only world size and stage are compared
    bf16 = build_pipeline(tiny_raw(train={"precision": "bf16"}))
    assert check_compatible({"step": 2, "world_size": 1, "zero_stage": 2}, 1, 2, bf16) == []
    with pytest.raises(CheckpointMismatchError, match="train.zero_stage"):
        check_compatible({"step": 2, "world_size": 1, "zero_stage": 2}, 1, 3)


def test_worker_refuses_a_checkpoint_with_another_trainable_set(tmp_path):
    """The trainable set recorded by a real DeepSpeed checkpoint is checked before loading it (one process)."""
    import shutil


    from mmtl.train.loop import run_training, single_process_group

    def train(strategy, resume_dir=None, keep=None):
        pipe = build_pipeline(tiny_raw(strategy=strategy, train={"max_steps": 2, "lr": 0.01}))
        model, batches = _tiny_model_and_batches(pipe, 4)

        def report(metrics, d):
            if d is not None and keep is not None:
                shutil.copytree(d, keep, dirs_exist_ok=True)

        with single_process_group():
            run_training(pipe, model, batches, resume_dir=resume_dir, report=report)

    train({"kind": "frozen"}, keep=tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "mmtl_meta.json").read_text())
    assert meta["trainable"]["tensors"] > 0 and meta["settings"]["strategy.kind"] == "frozen"
    with pytest.raises(CheckpointMismatchError, match="this run trains"):
        train({"kind": "frozen", "lock": "image"}, resume_dir=tmp_path / "ck")


# ---- 5. one tracking store ---------------------------------------------------------------------------------
@needs_cases
def test_case22_relative_sqlite_uri_is_one_absolute_store(tmp_path, monkeypatch):
    out = make_case("22", tmp_path / "c22")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pipe = load_pipeline(out / "pipeline.yaml")
    assert pipe.tracking.uri == f"sqlite:///{out}/mlflow.db"
    report = config_report(pipe)
    assert "tracking store:" in report and f"sqlite:///{out}/mlflow.db (tracking.uri)" in report


def test_tracking_uri_forms_resolve_to_absolute(tmp_path, monkeypatch):
    from mmtl.tracking.mlflow_utils import absolute_tracking_uri, resolve_tracking_uri

    b = tmp_path
    assert absolute_tracking_uri("sqlite:///m.db", b) == f"sqlite:///{b}/m.db"
    assert absolute_tracking_uri("sqlite:///./x/../m.db?timeout=5", b) == f"sqlite:///{b}/m.db?timeout=5"
    assert absolute_tracking_uri("sqlite:////abs/m.db", b) == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("file:mlruns", b) == (b / "mlruns").as_uri()
    assert absolute_tracking_uri("file:./mlruns", b) == (b / "mlruns").as_uri()
    assert absolute_tracking_uri("file:///abs/mlruns", b) == "file:///abs/mlruns"
    assert absolute_tracking_uri("mlruns", b) == (b / "mlruns").as_uri()
    assert absolute_tracking_uri("http://127.0.0.1:5000", b) == "http://127.0.0.1:5000"
    assert absolute_tracking_uri("postgresql://u@h/db", b) == "postgresql://u@h/db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None, "/r") == f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite://")
    with pytest.raises(ValueError, match=r"\$MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None, "/r")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, str(tmp_path / "r")) == f"sqlite:///{tmp_path}/r/mlflow.db"
    assert not list(tmp_path.glob("*.db"))  # resolving writes nothing


@needs_cases
def test_case31_eval_models_uri_uses_the_given_store(tmp_path, monkeypatch):
    """A model registered in OUT/runs/mlflow.db is found from another directory with --tracking-uri, the eval
    run is logged to that store, and no ./mlflow.db appears."""
    from mlflow.tracking import MlflowClient

    from mmtl.models import build_model
    from mmtl.tracking import mlflow_utils as mlu
    from mmtl.tracking.registry import log_exported_model
    from mmtl.train.checkpoint import write_export

    out = make_case("31", tmp_path / "c31")
    monkeypatch.chdir(out)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pipe = load_pipeline(out / "pipeline.yaml")
    uri = mlu.tracking_uri(pipe.tracking.uri, pipe.train.runs_root)
    assert uri == f"sqlite:///{out}/runs/mlflow.db"
    model = build_model(pipe.model)
    export = write_export(out / "runs" / "gen31", model.state_dict(), pipe.to_yaml())
    rid = mlu.start_run(uri, pipe.tracking.experiment, pipe.train.runs_root, "gen31", pipe.model_dump(mode="json"),
                        pipe.to_yaml())
    reg = log_exported_model(uri, rid, export, pipe.tracking.model_name)
    assert reg["name"] == "gen31-model" and reg["version"] == "1"
    elsewhere = out / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # a fresh process, as from the shell: MLflow's process-wide default store is not the one registered above
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "mmtl.cli", "eval", "models:/gen31-model/1", "--task", "retrieval",
                           "--data", "../data/test", "--tracking-uri", f"sqlite:///{out}/runs/mlflow.db", "--json",
                           "--ks", "1,5"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["num_samples"] == 16 and report["mlflow"]["logged"]
    assert report["mlflow"]["tracking_uri"] == uri
    assert not list(elsewhere.glob("mlflow.db")) and not (out / "mlflow.db").exists()
    # runs:/ and zero-shot (which also looks for a learned prompt in the run) from the environment variable
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/runs/mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "mmtl.cli", "eval", f"runs:/{rid}/model", "--task", "zero-shot",
                           "--label-field", "color", "--data", "../data/test", "--json", "--no-mlflow"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["num_samples"] == 16
    assert not list(elsewhere.glob("*.db"))
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("gen2").experiment_id])
    assert {r.info.run_id for r in runs} >= {rid, report["mlflow"]["eval_run_id"]}
    # a relative --tracking-uri means the current directory; a store that is not there is refused, not created
    res = cli("eval", "models:/gen31-model/1", "--task", "retrieval", "--data", "../data/test",
              "--tracking-uri", "sqlite:///../runs/mlflow.db", "--json", "--no-mlflow")
    assert res.exit_code == 0, res.output
    res = cli("eval", "models:/gen31-model/1", "--task", "retrieval", "--data", "../data/test",
              "--tracking-uri", "sqlite:///mlflow.db")
    assert res.exit_code != 0 and "does not exist" in " ".join(res.output.split())
    assert not list(elsewhere.glob("*.db"))


# ---- 7. one rule for relative paths -------------------------------------------------------------------------
def test_relative_paths_one_rule_and_runs_root_alias(tmp_path, monkeypatch):
    proj = tmp_path / "checkout"
    p = write(proj / "pipelines" / "coop.yaml", """
data: {train: data/train, cache_dir: runs/cache}
model: {init_from: runs/quickstart/export/model.safetensors}
tracking: {uri: "sqlite:///runs/other.db"}
retrain: {manifest_dir: state/retrain}
""")
    monkeypatch.chdir(tmp_path)  # not the checkout
    pipe = load_pipeline(p)
    assert pipe.train.runs_root == str(proj / "runs")
    assert pipe.data.train == str(proj / "data/train")
    assert pipe.model.init_from == str(proj / "runs/quickstart/export/model.safetensors")
    assert pipe.data.cache_dir == str(proj / "runs/cache")
    assert pipe.retrain.manifest_dir == str(proj / "state/retrain")
    assert pipe.tracking.uri == f"sqlite:///{proj}/runs/other.db"
    # a path into the runs root follows train.runs_root
    other = tmp_path / "elsewhere-runs"
    pipe = load_pipeline(p, [f"train.runs_root={other}"])
    assert pipe.model.init_from == str(other / "quickstart/export/model.safetensors")
    assert pipe.data.cache_dir == str(other / "cache") and pipe.data.train == str(proj / "data/train")
    # an absolute path given explicitly is a location, never moved: reuse a model from the default runs root
    explicit = proj / "runs/quickstart/export/model.safetensors"
    pipe = load_pipeline(p, [f"train.runs_root={other}", f"model.init_from={explicit}"])
    assert pipe.model.init_from == str(explicit) and pipe.data.cache_dir == str(other / "cache")
    # ~ is the home folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_pipeline(p, ["data.train=~/shards"]).data.train == str(tmp_path / "home/shards")
    # $VAR is expanded; an unset one is an error naming the field, not a folder called "$DATA"
    monkeypatch.setenv("MMTL_TEST_DATA", str(tmp_path / "d"))
    assert load_pipeline(p, ["data.train=$MMTL_TEST_DATA/train"]).data.train == str(tmp_path / "d/train")
    monkeypatch.delenv("MMTL_TEST_DATA")
    with pytest.raises(PipelineError, match=r"data.train='\$\{MMTL_TEST_DATA\}/train': environment variable "
                                            "MMTL_TEST_DATA is not set"):
        load_pipeline(p, ["data.train=${MMTL_TEST_DATA}/train"])


def test_quickstart_then_coop_from_another_directory_agree(tmp_path, monkeypatch):
    """The issue's example: from outside the checkout, quickstart writes CHECKOUT/runs/quickstart and
    emoji-coop reads CHECKOUT/runs/quickstart/export."""
    monkeypatch.chdir(tmp_path)
    quick = load_pipeline(REPO / "pipelines" / "quickstart.yaml")
    coop = load_pipeline(REPO / "pipelines" / "emoji-coop.yaml")
    assert quick.train.runs_root == str(REPO / "runs")
    assert coop.model.init_from == str(Path(quick.train.runs_root) / "quickstart/export/model.safetensors")


def test_mmtl_config_prints_every_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = cli("config", str(REPO / "pipelines" / "emoji-coop.yaml"), "--allow-missing")  # init_from: a quickstart run
    assert res.exit_code == 0, res.output
    paths = res.stdout.partition("# resolved paths")[2]
    assert yaml.safe_load(res.stdout)["train"]["runs_root"] == str(REPO / "runs")  # still valid YAML
    for key in ("data.train:", "data.test:", "model.init_from:", "train.runs_root:", "run folder:", "data.cache_dir:",
                "tracking store:", "artifacts:"):
        assert key in paths, key
    assert f"sqlite:///{REPO}/runs/mlflow.db (default under train.runs_root)" in paths
    assert not (tmp_path / "runs").exists() and not list(tmp_path.iterdir())  # config writes nothing


@needs_cases
@pytest.mark.e2e
def test_case22_run_finishes_and_is_found_in_the_one_store(tmp_path, monkeypatch, ray_local):
    """End to end (Ray): `tracking.uri: sqlite:///mlflow.db` run from another directory trains, checkpoints and
    logs from the worker into OUT/mlflow.db; the run is FINISHED there with the worker's step metrics; no
    mlflow.db appears in the current directory."""
    from mlflow.tracking import MlflowClient

    from mmtl.recipes import run_pipeline

    out = make_case("22", tmp_path / "c22")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pipe = load_pipeline(out / "pipeline.yaml", ["train.max_steps=2", "train.checkpoint_every=1",
                                                  "tracking.log_model=false"])
    summary = run_pipeline(pipe, say=lambda m: None)
    uri = f"sqlite:///{out}/mlflow.db"
    assert summary["mlflow_tracking_uri"] == uri and summary["steps"] == 2
    assert summary["run_dir"] == str(out / "runs" / "gen22")
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics  # logged by the rank-0 worker
    assert not list(elsewhere.iterdir()) and not (out / "runs" / "mlflow.db").exists()


def test_exports_of_older_runs_still_validate():
    """Names and worker rules are checked when a pipeline is loaded for a run, not by the schema itself: a
    pipeline.yaml written by an older mmtl (a run name with a space, offload ignored at ZeRO-0) still loads for
    evaluation."""
    from mmtl.config import Pipeline

    raw = tiny_raw(train={"name": "my run", "offload_optimizer": True, "zero_stage": 0},
                   tracking={"model_name": "team model"})
    pipe = Pipeline.model_validate(raw)
    assert pipe.train.name == "my run"
    with pytest.raises(PipelineError) as e:
        build_pipeline(raw)
    for text in ("train.name='my run'", "tracking.model_name='team model'", "train.offload_optimizer=true"):
        assert text in str(e.value)
