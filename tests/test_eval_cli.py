"""`mmtl eval` (mmtl.eval.runner.run_eval) and MODEL resolution (mmtl.eval.resolve).

Fast tests: hand-made solid-colour sets through run_eval with a stub colour model (exact expected metrics),
the tiny random two-tower export (metrics equal to the training-time evaluator's), resolve_model on a run
directory / export folder / every bad form, MLflow logging into a local sqlite store. e2e: the Ray Data path
(same numbers as in-process) and a real `mlflow server` on 127.0.0.1 with a registered model and an alias.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtl.eval import runner
from mmtl.eval.resolve import ModelSpecError, ResolvedModel, resolve_export, resolve_model

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
LEGAL = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. /")


# ----------------------------------------------------------------------------------------- helpers


def _solid_png(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _write(folder: Path, rows) -> str:
    """rows: (image colour, caption, category)."""
    from mmtl.data.build import ShardWriter

    with ShardWriter(folder, "hand", max_samples_per_shard=3) as w:  # several shards on purpose
        for i, (color, caption, cat) in enumerate(rows):
            w.write(f"{i:04d}", _solid_png(RGB[color]), "png", caption, {"category": cat})
    return str(folder)


class ColorStub(torch.nn.Module):
    """Image -> its mean RGB (a one-hot for the solid colours); text -> the one-hot of the first colour word."""

    WORDS = ("red", "green", "blue")

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.eye(3))

    def image_transform(self, train: bool):
        return lambda im: torch.tensor(np.asarray(im.convert("RGB"), dtype=np.float32).mean((0, 1)) / 255.0)

    def encode_image(self, x):
        return x @ self.w

    def tokenize(self, texts):
        ids = [[next((i for i, w in enumerate(self.WORDS) if w in t.split()), 3)] for t in texts]
        t = torch.tensor(ids)
        return {"input_ids": t, "attention_mask": torch.ones_like(t)}

    def encode_text(self, input_ids, attention_mask):
        table = torch.cat([torch.eye(3), torch.full((1, 3), 3 ** -0.5)])
        return table[input_ids[:, 0]] @ self.w


@pytest.fixture
def stub(monkeypatch, tmp_path):
    from conftest import tiny_pipeline

    from mmtl.config import build_pipeline

    pipe = build_pipeline(tiny_pipeline({"train": "x", "val": None, "test": "x"}, tmp_path / "runs",
                                        eval={"zero_shot": None}))
    res = ResolvedModel("stub", "export", tmp_path)
    monkeypatch.setattr(runner, "_resolve", lambda spec, uri: res)
    monkeypatch.setattr(runner, "_load_model", lambda r: (ColorStub(), pipe))
    return pipe


def _tiny_export(root: Path, shards: dict) -> Path:
    from conftest import tiny_pipeline

    from mmtl.config import build_pipeline
    from mmtl.models import build_model
    from mmtl.train.checkpoint import write_export

    torch.manual_seed(0)
    pipe = build_pipeline(tiny_pipeline(shards, root / "runs"))
    model = build_model(pipe.model)
    return write_export(root, model.state_dict(), pipe.to_yaml())


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_shards) -> Path:
    return _tiny_export(tmp_path_factory.mktemp("tiny_export"), tiny_shards)


# ----------------------------------------------------------------------------------------- hand-made sets


def test_zero_shot_hand_made_example(stub, tmp_path):
    data = _write(tmp_path / "zs", [("red", "x", "red"), ("red", "x", "red"), ("green", "x", "green"),
                                   ("blue", "x", "blue"), ("blue", "x", "green"), ("green", "x", "blue"),
                                   ("red", "x", None), ("red", "x", "purple")])
    classes = tmp_path / "classes.txt"
    classes.write_text("# colours\nred\ngreen\n\nblue\n")
    r = runner.run_eval("stub", "zero-shot", data, classes=str(classes), templates="a {} thing",
                          out_dir=str(tmp_path / "out"), log_to_mlflow=True)
    m = r["metrics"]
    assert m["zero_shot/acc1"] == pytest.approx(4 / 6)
    assert m["zero_shot/mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["zero_shot/chance"] == pytest.approx(1 / 3)
    assert m["zero_shot/num_samples"] == 6 and m["zero_shot/num_classes"] == 3
    assert "zero_shot/acc5" not in m  # fewer than 5 classes
    assert r["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 1, 1]]
    assert r["skipped"] == {"no_label": 1, "unknown_class": 1}
    assert r["classes"] == ["red", "green", "blue"] and r["classes_from"] == "argument"
    assert r["num_samples"] == 8 and r["embedding"] == "local"
    assert r["mlflow"] == {"logged": False, "reason": "the model has no MLflow run (plain export folder)"}
    assert all(set(k) <= LEGAL for k in m)
    out = tmp_path / "out"
    rows = (out / "zero_shot_per_class.csv").read_text().splitlines()
    assert rows[0].startswith("index,class,support,predicted,correct,recall,precision")
    assert rows[2].split(",")[:7] == ["1", "green", "2", "2", "1", "0.5", "0.5"]
    assert rows[2].split(",")[7:] == ["blue", "1"]
    from PIL import Image

    assert Image.open(out / "zero_shot_confusion.png").size[0] > 100
    assert json.loads((out / "eval.json").read_text())["metrics"] == m
    # comma list and class order from the data; int labels as class indices
    r2 = runner.run_eval("stub", "zero-shot", data, classes="blue, green ,red", templates="{}",
                           log_to_mlflow=False)
    assert r2["metrics"]["zero_shot/acc1"] == pytest.approx(4 / 6) and r2["files"] == {} and r2["out_dir"] is None
    r3 = runner.run_eval("stub", "zero-shot", data, templates="{}", log_to_mlflow=False)
    assert r3["classes"] == ["blue", "green", "purple", "red"] and r3["classes_from"] == "data"


def test_zero_shot_pil_fallback(stub, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    data = _write(tmp_path / "zs", [("red", "x", "red"), ("green", "x", "green"), ("blue", "x", "red")])
    r = runner.run_eval("stub", "zero-shot", data, classes="red,green,blue", templates="{}",
                          out_dir=str(tmp_path / "o"), log_to_mlflow=False)
    from PIL import Image

    assert r["metrics"]["zero_shot/acc1"] == pytest.approx(2 / 3)
    assert Image.open(tmp_path / "o" / "zero_shot_confusion.png").format == "PNG"


def test_retrieval_hand_made_example(stub, tmp_path):
    data = _write(tmp_path / "rt", [("red", "a red thing", "red"), ("green", "a green thing", "green"),
                                   ("blue", "a blue thing", "blue"), ("blue", "a red thing", "blue")])
    r = runner.run_eval("stub", "retrieval", data, ks=(1, 2, 10), out_dir=str(tmp_path / "out"),
                          log_to_mlflow=False)
    assert r["metrics"] == {
        "retrieval/image_to_text_recall_at_1": 0.75, "retrieval/image_to_text_recall_at_2": 1.0,
        "retrieval/text_to_image_recall_at_1": 0.75, "retrieval/text_to_image_recall_at_2": 1.0,
        "retrieval/num_samples": 4.0}
    assert r["ks"] == [1, 2] and r["ks_skipped"] == [10]
    ex = r["examples"]
    assert [e["query"] for e in ex] == [0, 1, 2, 3] and all(len(e["top"]) == 4 for e in ex)
    assert ex[3]["caption"] == "a red thing" and ex[3]["top"][0]["key"] == "0000" and ex[3]["top"][0]["true"] is False
    from PIL import Image

    im = Image.open(tmp_path / "out" / "retrieval_examples.png")
    assert im.format == "PNG" and im.size[1] > 4 * 96
    assert r["mlflow"]["logged"] is False and "disabled" in r["mlflow"]["reason"]


def test_chunked_ranks_match_recall_at_k():
    from mmtl.eval.metrics import ranks, recall_at_k

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    b[:150] = a[:150] + 0.5 * b[:150]
    assert recall_at_k(a, b, (1, 5, 10), chunk=7) == recall_at_k(a, b, (1, 5, 10))
    r = ranks(a, b, chunk=7)
    assert torch.equal(r, ranks(a, b, chunk=1000))


def test_bad_arguments(stub, tmp_path):
    data = _write(tmp_path / "d", [("red", "a red thing", "red"), ("blue", "a blue thing", "blue")])
    with pytest.raises(runner.EvalError, match="task must be one of"):
        runner.run_eval("stub", "zeroshot", data)
    with pytest.raises(runner.EvalError, match="at least 2"):
        runner.run_eval("stub", "zero-shot", data, classes="red")
    with pytest.raises(runner.EvalError, match="duplicate"):
        runner.run_eval("stub", "zero-shot", data, classes="red,red,blue")
    with pytest.raises(runner.EvalError, match="classes file"):
        runner.run_eval("stub", "zero-shot", data, classes=str(tmp_path / "nope.txt"))
    with pytest.raises(runner.EvalError, match="neither a file nor a template"):
        runner.run_eval("stub", "zero-shot", data, classes="red,blue", templates="a photo")
    with pytest.raises(runner.EvalError, match="not a valid format string"):
        runner.run_eval("stub", "zero-shot", data, classes="red,blue", templates="a {} {x}")
    bad = tmp_path / "t.txt"
    bad.write_text("a {} photo\nno placeholder\n")
    with pytest.raises(runner.EvalError, match="no placeholder"):
        runner.run_eval("stub", "zero-shot", data, classes="red,blue", templates=str(bad))
    with pytest.raises(runner.EvalError, match="names one of"):
        runner.run_eval("stub", "zero-shot", data, classes="cat,dog", templates="{}", log_to_mlflow=False)
    with pytest.raises(runner.EvalError, match="positive"):
        runner.run_eval("stub", "retrieval", data, ks=(0,))
    from mmtl.data.shardlist import ShardError

    with pytest.raises(ShardError):
        runner.run_eval("stub", "retrieval", str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------- tiny real model


def test_tiny_model_matches_training_evaluator(tiny_export, tiny_shards, tmp_path):
    from mmtl.data.stream import clean_options
    from mmtl.eval.evaluate import embed_shards, evaluate_sets
    from mmtl.tracking.registry import load_exported

    model, pipe = load_exported(tiny_export)
    expected = evaluate_sets(model, pipe, {"test": embed_shards(model, tiny_shards["test"], clean_options(pipe))})
    z = runner.run_eval(str(tiny_export), "zero-shot", tiny_shards["test"], label_field="color",
                          out_dir=str(tmp_path / "z"), log_to_mlflow=False, use_ray=False)
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert z["metrics"][f"zero_shot/{k}"] == pytest.approx(expected[f"test/zero_shot_{k}"], abs=1e-6)
    assert z["templates"] == ["a {} shape", "{}"] and len(z["classes"]) == 8
    r = runner.run_eval(str(tiny_export), "retrieval", tiny_shards["test"], ks=(1, 5), batch_size=7,
                          out_dir=str(tmp_path / "r"), log_to_mlflow=False, use_ray=False)
    for k in ("image_to_text_recall_at_1", "text_to_image_recall_at_5"):
        assert r["metrics"][f"retrieval/{k}"] == pytest.approx(expected[f"test/{k}"], abs=1e-6)
    assert r["num_samples"] == 48 and r["data_stats"]["samples_ok"] == 48
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"retrieval_examples.png", "eval.json"}


# ----------------------------------------------------------------------------------------- resolution


def _run_dir(tmp_path: Path, export: Path, run_id=None, uri=None, summary=True) -> Path:
    import shutil

    rd = tmp_path / "runs" / "tiny-001"
    shutil.copytree(export, rd / "export")
    if summary:
        (rd / "summary.json").write_text(json.dumps({"export_path": str(rd / "export" / "model.safetensors")}))
    if run_id:
        (rd / "run.json").write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri}))
    return rd


def test_resolve_model_run_dir_and_export_dir(tiny_export, tmp_path):
    model, pipe, d = resolve_model(str(tiny_export))
    assert d == tiny_export and pipe.model.embed_dim == 16 and hasattr(model, "encode_image")
    rd = _run_dir(tmp_path, tiny_export, run_id="abc", uri="sqlite:///x.db")
    res = resolve_export(str(rd))
    assert res.kind == "run_dir" and res.export_dir == rd / "export" and res.mlflow_run_id == "abc"
    assert res.tracking_uri == "sqlite:///x.db" and res.temporary is None
    assert resolve_export(str(rd / "export")).mlflow_run_id == "abc"  # export inside a run dir: same run
    assert resolve_export(str(rd / "export" / "model.safetensors")).kind == "export"
    _, _, d2 = resolve_model(str(rd))
    assert d2 == rd / "export"
    # a moved run dir whose summary.json points at the old place still finds its own export/
    (rd / "summary.json").write_text(json.dumps({"export_path": "/gone/export/model.safetensors"}))
    assert resolve_export(str(rd)).export_dir == rd / "export"
    # a downloaded MLflow model folder
    mdir = tmp_path / "mlmodel"
    (mdir / "artifacts").mkdir(parents=True)
    (mdir / "MLmodel").write_text("flavors: {}\n")
    for f in ("model.safetensors", "pipeline.yaml"):
        (mdir / "artifacts" / f).write_bytes((tiny_export / f).read_bytes())
    assert resolve_export(str(mdir)).export_dir == mdir / "artifacts"


@pytest.mark.parametrize("spec, match", [
    ("", "empty model"),
    ("/no/such/dir", "not found"),
    ("runs:/abc", "expected runs:/<run_id>/model"),
    ("runs:/abc/", "expected runs:/<run_id>/model"),
    ("models:/tiny", "models:/<name>@<alias>"),
    ("models:/tiny/v1", "models:/<name>@<alias>"),
    ("models:/tiny@a/b", "models:/<name>@<alias>"),
    ("ftp://host/model", "unsupported model URI"),  # (s3:// run folders resolve: tests/test_storage.py)
])
def test_resolve_bad_forms(spec, match):
    with pytest.raises(ModelSpecError, match=match):
        resolve_export(spec)


def test_resolve_bad_folders(tiny_export, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="not a model"):
        resolve_export(str(tmp_path / "empty"))
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.safetensors").write_bytes((tiny_export / "model.safetensors").read_bytes())
    with pytest.raises(ModelSpecError, match="lacks pipeline.yaml"):
        resolve_export(str(half))
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelSpecError, match="is a file"):
        resolve_export(str(f))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text(json.dumps({"mlflow_run_id": "x", "tracking_uri": "y"}))
    with pytest.raises(ModelSpecError, match="has not finished"):
        resolve_export(str(unfinished))
    (unfinished / "export").mkdir()
    with pytest.raises(ModelSpecError, match="lacks model.safetensors, pipeline.yaml"):
        resolve_export(str(unfinished))
    mdir = tmp_path / "foreign"
    mdir.mkdir()
    (mdir / "MLmodel").write_text("flavors: {}\n")
    with pytest.raises(ModelSpecError, match="not a model logged by mmtl"):
        resolve_export(str(mdir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ModelSpecError, match="--tracking-uri"):
        resolve_export("models:/tiny@champion")
    with pytest.raises(ModelSpecError) as e:
        runner.run_eval(str(tmp_path / "empty"), "retrieval", str(tmp_path))
    assert "expected" in str(e.value)


# ----------------------------------------------------------------------------------------- MLflow (local store)


def _mlflow_run(uri: str, artifacts: Path) -> str:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.create_experiment("eval-tests", artifact_location=artifacts.as_uri())
    return c.create_run(exp, run_name="train").info.run_id


def test_run_dir_eval_logs_a_nested_mlflow_run(tiny_export, tiny_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = _mlflow_run(uri, tmp_path / "art")
    rd = _run_dir(tmp_path, tiny_export, run_id=parent, uri=uri)
    r = runner.run_eval(str(rd), "zero-shot", tiny_shards["val"], label_field="color", use_ray=False)
    assert r["mlflow"]["logged"] is True and r["mlflow"]["parent_run_id"] == parent
    assert r["out_dir"] is None and r["files"] == {}
    c = MlflowClient(uri)
    run = c.get_run(r["mlflow"]["eval_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["task"] == "zero-shot" and run.data.params["label_field"] == "color"
    assert run.data.metrics["zero_shot/acc1"] == pytest.approx(r["metrics"]["zero_shot/acc1"])
    assert run.data.metrics["data/samples_ok"] == 24
    names = {a.path for a in c.list_artifacts(run.info.run_id, "eval")}
    assert names == {"eval/zero_shot_per_class.csv", "eval/zero_shot_confusion.png", "eval/eval.json"}
    assert c.get_run(parent).data.metrics == {}  # the training run is untouched
    # a broken store does not lose the computed metrics
    (rd / "run.json").write_text(json.dumps({"mlflow_run_id": "0" * 32, "tracking_uri": uri}))
    r2 = runner.run_eval(str(rd), "retrieval", tiny_shards["val"], ks=(1,), use_ray=False)
    assert r2["mlflow"]["logged"] is False and "logging failed" in r2["mlflow"]["reason"]
    assert "retrieval/image_to_text_recall_at_1" in r2["metrics"]


# ----------------------------------------------------------------------------------------- e2e


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_ray_path_matches_local(ray_local, tiny_export, tiny_shards, tmp_path):
    kw = dict(ks=(1, 5, 10), log_to_mlflow=False, batch_size=16)
    local = runner.run_eval(str(tiny_export), "retrieval", tiny_shards["test"], use_ray=False, **kw)
    viaray = runner.run_eval(str(tiny_export), "retrieval", tiny_shards["test"], use_ray=True,
                               out_dir=str(tmp_path / "r"), **kw)
    assert viaray["embedding"] == "ray" and viaray["num_samples"] == local["num_samples"] == 48
    for k, v in local["metrics"].items():
        assert viaray["metrics"][k] == pytest.approx(v, abs=1e-5), k
    assert [e["key"] for e in viaray["examples"]] == [e["key"] for e in local["examples"]]
    assert viaray["data_stats"] == local["data_stats"]
    # zero-shot, Ray chosen automatically above the (lowered) threshold
    z = runner.run_eval(str(tiny_export), "zero-shot", tiny_shards["test"], label_field="color",
                          ray_threshold=10, log_to_mlflow=False)
    zl = runner.run_eval(str(tiny_export), "zero-shot", tiny_shards["test"], label_field="color", use_ray=False,
                           log_to_mlflow=False)
    assert z["embedding"] == "ray" and zl["embedding"] == "local"
    assert z["confusion_matrix"] == zl["confusion_matrix"] and z["metrics"] == pytest.approx(zl["metrics"])


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_registered_model_alias_through_mlflow_server(mlflow_server, tiny_export, tiny_shards, tmp_path,
                                                      monkeypatch):
    from mlflow.tracking import MlflowClient

    from mmtl.tracking.registry import log_exported_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = MlflowClient(mlflow_server)
    exp = c.create_experiment("eval-e2e")
    parent = c.create_run(exp, run_name="train").info.run_id
    reg = log_exported_model(mlflow_server, parent, tiny_export, "tiny")
    c.set_terminated(parent)
    c.set_registered_model_alias("tiny", "champion", reg["version"])

    r = runner.run_eval("models:/tiny@champion", "retrieval", tiny_shards["test"], ks=(1, 5),
                          out_dir=str(tmp_path / "out"), tracking_uri=mlflow_server, use_ray=False)
    json.dumps(r)  # the --json output
    local = runner.run_eval(str(tiny_export), "retrieval", tiny_shards["test"], ks=(1, 5), log_to_mlflow=False,
                              use_ray=False)
    assert r["metrics"] == pytest.approx(local["metrics"])
    assert r["model"]["registered"] == {"name": "tiny", "version": reg["version"], "alias": "champion"}
    assert r["model"]["mlflow_run_id"] == parent and not Path(r["model"]["export_dir"]).exists()  # temp removed
    assert r["mlflow"]["logged"] is True and r["mlflow"]["parent_run_id"] == parent
    run = c.get_run(r["mlflow"]["eval_run_id"])
    assert run.data.metrics["retrieval/image_to_text_recall_at_1"] == pytest.approx(
        r["metrics"]["retrieval/image_to_text_recall_at_1"])
    assert run.data.tags["mmtl.eval.model"] == "models:/tiny@champion"
    assert {a.path for a in c.list_artifacts(run.info.run_id, "eval")} == {
        "eval/retrieval_examples.png", "eval/eval.json"}
    assert (tmp_path / "out" / "retrieval_examples.png").is_file()

    # the same model by version and by run URI, tracking URI from the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    before = set(Path(tempfile.gettempdir()).glob("mmtl-model-*"))
    _, pipe, d = resolve_model(f"models:/tiny/{reg['version']}")
    assert pipe.model.embed_dim == 16 and d is None  # loaded, and the download is gone
    assert set(Path(tempfile.gettempdir()).glob("mmtl-model-*")) == before
    res = resolve_export(f"runs:/{parent}/model")
    assert res.mlflow_run_id == parent and (res.export_dir / "model.safetensors").is_file()
    res.cleanup()
    assert not res.export_dir.exists()
    for bad, match in [("models:/tiny@nope", "cannot resolve"), ("models:/nope/1", "cannot resolve"),
                       (f"runs:/{'f' * 32}/model", "cannot resolve")]:
        with pytest.raises(ModelSpecError, match=match):
            resolve_export(bad)
