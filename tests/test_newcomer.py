"""A newcomer's path (issue 22): errors that say what to do, `mmtl pipelines list/copy`, `mmtl config` refusing
missing inputs, `mmtl eval` choosing its task from the data before loading a model, and the job commands'
`--dashboard` / cluster hints. No Ray, no training: each test takes well under a few seconds."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mmtl.cli import app
from mmtl.config import PipelineError, load_pipeline

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---- errors ---------------------------------------------------------------------------------------------------
def test_unknown_keys_get_a_did_you_mean_and_the_file(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("data: {train: /x}\ntrain: {lrr: 0.1}\n")
    with pytest.raises(PipelineError) as e:
        load_pipeline(p, ["model.vision.weigths=x", "tain.lr=1"])
    msg = str(e.value)
    assert msg.startswith(f"{p}: invalid pipeline")
    assert "train.lrr: unknown key (did you mean train.lr?)" in msg
    assert "model.vision.weigths: unknown key (did you mean model.vision.weights?)" in msg
    assert "tain: unknown key (did you mean train or retrain?)" in msg
    with pytest.raises(PipelineError, match=r"known keys of eval: sets, recall_ks"):  # nothing close: the list
        load_pipeline(p, ["train.lr=1", "train.lrr=null", "eval.zzzzzz=1"])


def test_a_yaml_list_with_an_override_is_one_error_line(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    res = cli("config", p, "train.lr=1")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "list.yaml: pipeline must be a mapping of sections" in res.output.replace("\n", " ")


def test_inspect_of_a_file_that_is_not_a_tar_fails_once(tmp_path):
    bad = tmp_path / "x.tar"
    bad.write_text("not a tar")
    res = cli("shards", "inspect", bad)
    assert res.exit_code == 1
    assert "no usable sample in 1 shard(s): rejected {'corrupt_shard': 1}" in res.output
    assert res.output.count("is not a tar file") == 1


def test_a_value_after_a_flag_is_explained(tmp_path):
    res = cli("shards", "inspect", tmp_path, "--json", "true")
    assert res.exit_code == 2 and "--json is a flag and takes no value" in res.output
    p = tmp_path / "p.yaml"
    p.write_text("data: {train: /x}\n")
    res = cli("config", p, "--allow-missing", "true")
    assert res.exit_code == 2 and "flags such as --json or --resume take no value" in res.output


def test_config_and_run_refuse_missing_inputs_before_anything_starts(tmp_path, tiny_shards):
    p = tmp_path / "p.yaml"
    p.write_text(f"data: {{train: {tiny_shards['train']}, test: missing/test}}\nmodel: {{weights: w.safetensors}}\n"
                 f"train: {{runs_root: {tmp_path / 'runs'}}}\n")
    res = cli("config", p)
    assert res.exit_code == 2 and "# resolved paths" in res.stdout  # printed first, then refused
    err = res.output.replace("\n", " ")
    assert "2 input path(s) do not exist" in err and f"{tmp_path / 'missing' / 'test'}" in err
    assert f"model.weights: {tmp_path / 'w.safetensors'} does not exist" in err
    assert cli("config", p, "--allow-missing").exit_code == 0
    res = cli("config", p, "model.weights=null", f"data.test={tiny_shards['test']}",
              "model.vision.weights=package:no-such-weights-dist")
    assert res.exit_code == 2 and "package:no-such-weights-dist: distribution not installed" in res.output
    res = cli("run", p, f"data.test={tiny_shards['test']}")
    assert res.exit_code == 2 and "model.weights" in res.output and not (tmp_path / "runs").exists()
    res = cli("run", p, "--resume", "--fresh")
    assert res.exit_code == 2 and "contradict" in res.output


def test_config_and_pipelines_list_name_unconverted_weights_with_the_command(tmp_path, monkeypatch):
    """emoji-llava reads weights:smollm2: on a machine that has not run `mmtl weights get smollm2`, `mmtl config`
    refuses it with the command (it used to pass, and `pipelines list` said "runs as is")."""
    from mmtl.models.fetch import MANIFEST

    monkeypatch.setenv("MMTL_WEIGHTS_CACHE", str(tmp_path / "cache"))
    res = cli("config", REPO / "pipelines" / "emoji-llava.yaml")
    err = " ".join(res.output.split())
    assert res.exit_code == 2 and "model.text.path: weights:smollm2 has not been fetched" in err
    assert "run `mmtl weights get smollm2` once" in err
    rows = {r["name"]: r for r in json.loads(cli("pipelines", "list", "--json").stdout)}
    assert rows["emoji-llava"]["needs"] == ["model.text.path"]
    (tmp_path / "cache" / "smollm2").mkdir(parents=True)
    (tmp_path / "cache" / "smollm2" / MANIFEST).write_text("{}")  # what `mmtl weights get` leaves
    assert cli("config", REPO / "pipelines" / "emoji-llava.yaml").exit_code == 0


def test_run_fresh_never_resumes(tmp_path, tiny_shards, monkeypatch):
    import mmtl.recipes

    seen = {}

    def fake_run(pipe, must_resume=False, **kw):
        seen.update(resume=pipe.train.resume, must_resume=must_resume)
        raise ValueError("stop here")

    monkeypatch.setattr(mmtl.recipes, "run_pipeline", fake_run)
    p = tmp_path / "p.yaml"
    p.write_text(f"data: {{train: {tiny_shards['train']}}}\neval: {{sets: []}}\n")
    assert cli("run", p, "--fresh").exit_code == 1 and seen == {"resume": "never", "must_resume": False}
    assert cli("run", p).exit_code == 1 and seen == {"resume": "auto", "must_resume": False}  # plain: resumes
    assert cli("run", p, "--resume").exit_code == 1 and seen == {"resume": "auto", "must_resume": True}


# ---- pipelines list / copy ------------------------------------------------------------------------------------
def test_pipelines_list_says_what_each_needs():
    res = cli("pipelines", "list", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {p.stem for p in (REPO / "pipelines").glob("*.yaml")}
    q = rows["quickstart"]
    assert (q["family"], q["strategy"], q["gpu"], q["weights"]) == ("two_tower", "frozen", "no", "packaged")
    assert q["needs"] == []  # runs as is on the bundled emoji data
    lora = rows["product-search-lora"]
    assert lora["strategy"] == "lora" and {"data.train", "model.weights"} <= set(lora["needs"])
    assert rows["radiology-retrieval"]["gpu"] == "yes"  # bf16


def test_pipelines_copy_is_standalone_and_keeps_comments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards" / "train").mkdir(parents=True)
    dest = tmp_path / "elsewhere" / "mine.yaml"
    res = cli("pipelines", "copy", "quickstart", dest, "data.train=shards/train", "train.max_steps=7",
              "eval.sets=[test]")
    assert res.exit_code == 0, res.output
    text = dest.read_text()
    assert text.startswith("# Quickstart:") and "# regularises the heads" in text  # comments kept
    assert "  max_steps: 7\n" in text and "  sets: [test]\n" in text
    orig, copy = load_pipeline(REPO / "pipelines" / "quickstart.yaml"), load_pipeline(dest)
    assert copy.data.train == str(tmp_path / "shards" / "train")  # an override path: from the current directory
    assert copy.data.test == orig.data.test and copy.data.extra_eval == orig.data.extra_eval  # same files
    assert Path(copy.data.test).is_absolute() and copy.train.runs_root == str(dest.parent / "runs")
    assert f"data.test: {orig.data.test}" in res.output and "still to set" in res.output  # shards/train is empty
    res = cli("pipelines", "copy", "quickstart", dest)
    assert res.exit_code == 2 and "--force" in res.output
    res = cli("pipelines", "copy", "quickstar", tmp_path / "x.yaml")
    assert res.exit_code == 2 and "quickstart" in res.output and not (tmp_path / "x.yaml").exists()
    res = cli("pipelines", "copy", "quickstart", tmp_path / "y.yaml", "train.lrr=1")
    assert res.exit_code == 2 and "did you mean train.lr" in res.output and not (tmp_path / "y.yaml").exists()


def test_a_hand_copied_pipeline_is_pointed_at_the_bundled_data(tmp_path):
    (tmp_path / "q.yaml").write_text((REPO / "pipelines" / "quickstart.yaml").read_text())
    res = cli("config", tmp_path / "q.yaml")
    assert res.exit_code == 2
    assert f"the bundled data is at {REPO / 'mmtl' / 'assets' / 'emoji' / 'train'}" in res.output
    assert "mmtl pipelines copy NAME DEST" in res.output


def test_pipelines_copy_keeps_run_outputs_relative(tmp_path):
    res = cli("pipelines", "copy", "emoji-coop", tmp_path)
    assert res.exit_code == 0, res.output
    raw = yaml.safe_load((tmp_path / "emoji-coop.yaml").read_text())
    assert raw["model"]["init_from"] == "runs/quickstart/export/model.safetensors"  # the copy's own runs root
    assert raw["data"]["train"] == str(REPO / "mmtl" / "assets" / "emoji" / "train")
    assert "model.init_from" in res.output  # still to provide: a quickstart run next to the copy


# ---- eval picks its task from the data ------------------------------------------------------------------------
def test_eval_task_from_the_data_before_the_model_loads(tiny_shards, monkeypatch):
    from mmtl.eval import runner as eval_runner
    from mmtl.eval.args import EvalError
    from mmtl.eval.autotask import choose_task

    said = []
    assert choose_task(None, tiny_shards["test"], "category", said.append) == "retrieval"
    assert "no 'category' label" in said[-1] and "color" in said[-1]
    assert choose_task(None, tiny_shards["test"], "color", said.append) == "zero-shot"
    assert choose_task("retrieval", tiny_shards["test"], "color") == "retrieval"

    def no_model(*a):
        raise AssertionError("the model must not be resolved before the task is checked")

    monkeypatch.setattr(eval_runner, "_resolve", no_model)
    with pytest.raises(EvalError, match=r"--task zero-shot needs a class label .* use --task retrieval"):
        eval_runner.run_eval("some/run", "zero-shot", tiny_shards["test"])


# ---- cluster commands -----------------------------------------------------------------------------------------
def test_submit_warns_when_results_would_be_lost(tmp_path, tiny_shards):
    from mmtl.jobs.submit import temporary_outputs

    p = tmp_path / "p.yaml"
    p.write_text(f"data: {{train: {tiny_shards['train']}}}\n")
    warnings = temporary_outputs(load_pipeline(p), str(tmp_path))
    assert len(warnings) == 2 and "train.runs_root=/mnt/runs" in warnings[0] and "tracking.uri" in warnings[1]
    keep = load_pipeline(p, ["train.runs_root=/mnt/runs", "tracking.uri=http://mlflow:5000"])
    assert temporary_outputs(keep, str(tmp_path)) == []
    assert temporary_outputs(load_pipeline(p, ["train.runs_root=/mnt/runs"]), str(tmp_path)) == []  # sqlite there


def test_job_commands_say_how_to_point_at_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = cli("status", "raysubmit_x", "--dashboard", f"http://127.0.0.1:{port}")
    out = res.output.replace("\n", " ")
    assert res.exit_code == 1 and "cannot reach" in out and "--dashboard http://HEAD:8265" in out
    assert "RAY_ADDRESS" in out
    res = cli("status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}")  # old spelling: works, with a note
    assert res.exit_code == 1 and "now --dashboard" in res.output.replace("\n", " ")
