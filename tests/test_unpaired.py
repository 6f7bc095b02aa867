"""Unpaired shards: image-only and text-only builds, the robust reader with reject counts, the paired-recipe
error, and the all-duplicate warning."""
from __future__ import annotations

import collections
import json

import pytest
from conftest import synthetic_pair


def _image_folder(root, n=5):
    root.mkdir()
    for i in range(n):
        (root / f"img{i}.png").write_bytes(synthetic_pair(i)[0])
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def test_image_only_folder_build_and_read(tmp_path):
    from mmtl.data.build import build_shards
    from mmtl.data.samples import CleanOptions
    from mmtl.data.shardio import iter_samples, shard_modality

    stats = build_shards(str(_image_folder(tmp_path / "imgs")), str(tmp_path / "out"), modality="image",
                         progress=False)
    assert stats["samples"] == 5 and stats["skipped"] == {"unreadable_image": 1}
    assert stats["modality"] == "image" and stats["duplicates"] == 0 and "warnings" not in stats
    shard = str(tmp_path / "out" / "train" / "shard-000000.tar")  # no split fractions: OUT/train
    assert shard_modality(shard) == "image"
    stats_r: collections.Counter = collections.Counter()
    samples = list(iter_samples(shard, CleanOptions(modality="image"), stats_r))
    assert len(samples) == 5 and all(s.image.size == (32, 32) and s.caption == "" for s in samples)
    assert stats_r["samples_ok"] == 5
    # the same shard read as pairs: every sample is rejected as missing_caption (counted, not crashed)
    stats_p: collections.Counter = collections.Counter()
    assert list(iter_samples(shard, CleanOptions(), stats_p)) == []
    assert stats_p["missing_caption"] == 5


def test_text_only_from_txt_and_csv(tmp_path):
    from mmtl.data.build import build_shards
    from mmtl.data.samples import CleanOptions
    from mmtl.data.shardio import iter_samples, shard_modality

    src = tmp_path / "reports.txt"
    src.write_text("no acute disease.\n\nheart size normal. lungs clear.\nok\n", encoding="utf-8")
    stats = build_shards(str(src), str(tmp_path / "t"), modality="text", progress=False)
    assert stats["samples"] == 3 and stats["skipped"] == {"empty_text": 1}
    shard = str(tmp_path / "t" / "train" / "shard-000000.tar")
    assert shard_modality(shard) == "text"
    # fewer than 3 tokens (besides [CLS]/[SEP]) is too short for the masking: counted as too_few_tokens
    count = {"no acute disease.": 6, "heart size normal. lungs clear.": 9, "ok": 3}
    st: collections.Counter = collections.Counter()
    opts = CleanOptions(modality="text", min_text_tokens=3, count_tokens=lambda t: count[t])
    got = [s.caption for s in iter_samples(shard, opts, st)]
    assert got == ["no acute disease.", "heart size normal. lungs clear."] and all(
        s.image is None for s in iter_samples(shard, CleanOptions(modality="text")))
    assert st["too_few_tokens"] == 1 and st["samples_ok"] == 2

    csv = tmp_path / "t.csv"
    csv.write_text("id,findings\n1,a b c\n2,a b c\n3,a b c\n", encoding="utf-8")
    dup = build_shards(str(csv), str(tmp_path / "c"), modality="text", caption_col="findings", progress=False)
    assert dup["samples"] == 3 and dup["duplicates"] == 2 and "copies of one text" in dup["warnings"][0]
    with pytest.raises(ValueError, match="column 'text' not found"):
        build_shards(str(csv), str(tmp_path / "x"), modality="text", caption_col="text", progress=False)


def test_image_only_shard_to_paired_recipe_is_an_error(tmp_path):
    from conftest import tiny_pipeline, write_split

    from mmtl.config import Pipeline
    from mmtl.data.build import build_shards
    from mmtl.data.shardio import UnpairedShardError
    from mmtl.recipes import recipe_for
    from mmtl.recipes.runner import check_inputs_exist

    build_shards(str(_image_folder(tmp_path / "imgs")), str(tmp_path / "img"), modality="image", progress=False)
    paired = str(write_split(tmp_path / "pairs", 8))
    raw = tiny_pipeline({"train": str(tmp_path / "img" / "train"), "val": None, "test": paired}, tmp_path / "runs")
    pipe = Pipeline.model_validate(raw)
    with pytest.raises(UnpairedShardError) as err:
        check_inputs_exist(pipe, {"test": paired}, recipe_for("frozen"))
    msg = str(err.value)
    assert str(tmp_path / "img" / "train" / "shard-000000.tar") in msg and "'contrastive'" in msg and "image-only" in msg
    # the paired shards pass
    check_inputs_exist(pipe.model_copy(update={"data": pipe.data.model_copy(update={"train": paired})}),
                       {"test": paired}, recipe_for("frozen"))


def test_cli_build_text_only(tmp_path):
    from typer.testing import CliRunner

    from mmtl.cli import app

    src = tmp_path / "texts.txt"
    src.write_text("one text\nanother text\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["shards", "build", str(src), "--out", str(tmp_path / "o"), "--modality", "text"])
    assert res.exit_code == 0, res.output
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["samples"] == 2 and stats["modality"] == "text"
