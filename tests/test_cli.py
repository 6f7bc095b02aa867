"""CLI: shards build (folder, CSV) -> shards inspect --json counts; config errors; --dump; --pipeline."""
import csv
import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import synthetic_pair
from mmtl.cli import app

runner = CliRunner()


def make_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        data, cap, _ = synthetic_pair(i)
        (root / f"img{i:03d}.png").write_bytes(data)
        (root / f"img{i:03d}.txt").write_text(cap)
    (root / "orphan.txt").write_text("a caption without an image")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "broken.txt").write_text("broken image")
    return root


def inspect_json(*args):
    res = runner.invoke(app, ["shards", "inspect", *args, "--json"])
    return res, json.loads(res.stdout.strip().splitlines()[-1])


def test_build_folder_then_inspect_counts(tmp_path):
    src = make_folder(tmp_path / "pairs", 12)
    res = runner.invoke(app, ["shards", "build", str(src), "--out", str(tmp_path / "out"), "--max-samples", "5"])
    assert res.exit_code == 0, res.output
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert sum(s["samples"] for s in stats["splits"].values()) == 12
    shards = sorted((tmp_path / "out").rglob("*.tar"))
    assert len(shards) == 3
    assert len(list((tmp_path / "out" / "train").glob("*.tar"))) == 3  # where data.train of a pipeline points
    res, report = inspect_json(str(tmp_path / "out" / "train"))
    assert res.exit_code == 0 and report["shards"] == 3 and report["samples_ok"] == 12
    assert report["rejected"] == {} and report["errors"] == []


def test_build_csv_with_named_columns_and_split(tmp_path):
    src = make_folder(tmp_path / "imgs", 20)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "title"])
        for i in range(20):
            w.writerow([f"imgs/img{i:03d}.png", (src / f"img{i:03d}.txt").read_text()])
        w.writerow(["imgs/missing.png", "no such file"])
    out = tmp_path / "out"
    res = runner.invoke(app, ["shards", "build", str(tmp_path / "pairs.csv"), "--out", str(out), "--image-col", "path",
                              "--caption-col", "title", "--val-fraction", "0.25"])
    assert res.exit_code == 0, res.output
    _, train = inspect_json(str(out / "train"))
    _, val = inspect_json(str(out / "val"))
    assert train["samples_ok"] + val["samples_ok"] == 20 and val["samples_ok"] > 0
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["skipped"].values()) == 1
    bad = runner.invoke(app, ["shards", "build", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "path" in bad.output  # names the missing column and those available


def test_inspect_missing_shards_is_an_error_and_dump_writes_samples(tmp_path):
    src = make_folder(tmp_path / "pairs", 4)
    out = tmp_path / "out"
    runner.invoke(app, ["shards", "build", str(src), "--out", str(out), "--prefix", "s"])
    shard = next(out.rglob("s-000000.tar"))
    res, report = inspect_json(str(shard.parent / "s-{000000..000002}.tar"))
    assert res.exit_code == 1 and report["errors"] and "000001" in report["errors"][0]
    res = runner.invoke(app, ["shards", "inspect", str(shard), "--dump", str(tmp_path / "dump")])
    assert res.exit_code == 0
    assert len(list((tmp_path / "dump").glob("*.png"))) == 4 and len(list((tmp_path / "dump").glob("*.txt"))) == 4


def test_inspect_with_pipeline_counts_truncations(tmp_path, tiny_shards):
    from mmtl.data.build import ShardWriter

    with ShardWriter(str(tmp_path / "long"), prefix="l") as w:
        data, _, _ = synthetic_pair(0)
        w.write("000000", data, "png", "short caption")
        w.write("000001", data, "png", " ".join(["word"] * 200))
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"data: {{train: {tmp_path / 'long'}}}\nmodel: {{context_length: 16}}\n")
    _, report = inspect_json(str(tmp_path / "long"), "--pipeline", str(pipe))
    assert report["samples_ok"] == 2 and report["caption_truncated"] == 1


def test_config_errors_name_the_field(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("data: {train: x, test: y}\n")
    res = runner.invoke(app, ["config", str(p), "train.zero_stage=7"])
    assert res.exit_code == 2 and "train.zero_stage" in res.output and "7" in res.output
    res = runner.invoke(app, ["config", str(p), "train.lr=0.5", "--allow-missing"])
    assert res.exit_code == 0 and "lr: 0.5" in res.output
    res = runner.invoke(app, ["config", str(p), "train.lr=0.5"])  # x and y do not exist: refused, each named
    assert res.exit_code == 2 and "lr: 0.5" in res.stdout
    assert "2 input path(s) do not exist" in res.output and "data.train" in res.output and "data.test" in res.output
    res = runner.invoke(app, ["config", str(p), "eval.sets=[test,nope]"])  # what `mmtl run` would refuse
    assert res.exit_code == 2 and "eval.sets names ['nope']" in res.output


def test_run_summary_says_whether_the_model_was_registered(capsys):
    from mmtl.cli import print_summary

    base = {"metrics": {"test/vqa/overall": 0.5}, "run_name": "r", "steps": 3, "wall_time_s": 1.0,
            "run_dir": "d", "mlflow_run_id": "id", "export_path": "e", "mlflow_ui": "ui"}
    print_summary({**base, "registered_model": {"uri": "models:/m-1", "name": "qs", "version": "2"}})
    assert "registered: qs version 2 (models:/qs/2)" in capsys.readouterr().out
    print_summary({**base, "registered_model": {"uri": "models:/m-1"}})
    assert "not registered: tracking.model_name is null" in capsys.readouterr().out
