"""Tests of the bundled emoji dataset (mmtl/assets/emoji) and its builder."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmtl.datasets import emoji
from mmtl.datasets.emoji import SPLITS, bundled_dir, make_caption, norm_code, split_keys

CATEGORIES = {"Activities", "Animals & Nature", "Component", "Flags", "Food & Drink", "Objects", "People & Body",
              "Smileys & Emotion", "Symbols", "Travel & Places"}


def _samples(split: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted((bundled_dir() / split).glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def stats() -> dict:
    return json.loads((bundled_dir() / "stats.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bundle() -> dict[str, dict[str, dict[str, bytes]]]:
    return {split: _samples(split) for split in SPLITS}


def test_bundle_files_exist(stats):
    root = bundled_dir()
    assert (root / "NOTICE").is_file() and "CC BY-SA 4.0" in (root / "NOTICE").read_text()
    for split in SPLITS:
        assert (root / split / f"emoji-{split}-000000.tar").is_file()
        for rel in stats["splits"][split]["shards"]:
            assert (root / rel).is_file()
    assert stats["packages"] == emoji.NPM_PACKAGES


def test_counts_match_stats(stats, bundle):
    for split in SPLITS:
        assert len(bundle[split]) == stats["splits"][split]["samples"]
    n = sum(len(bundle[s]) for s in ("train", "val", "test"))
    assert n == 1911
    assert len(bundle["test"]) == len(bundle["val"]) == round(n * 0.1)
    assert not set(bundle["train"]) & set(bundle["test"]) and not set(bundle["train"]) & set(bundle["val"])


def test_samples_well_formed(bundle):
    for split in SPLITS:
        for key, s in bundle[split].items():
            assert set(s) == {"png", "json", "txt"}
            assert "." not in key and key == key.lower()
            caption = s["txt"].decode("utf-8")
            meta = json.loads(s["json"])
            assert caption and caption == meta["caption"]
            assert caption.startswith(meta["description"])
            if meta["keywords"]:
                assert caption == f"{meta['description']}: {', '.join(meta['keywords'])}"
            assert meta["key"] == key and meta["code_point"].lower() == key
            assert meta["category"] in CATEGORIES and meta["subcategory"] and meta["name"]
            assert meta["source"] and meta["licence"]
            assert meta["style"] == ("openmoji" if split == "openmoji_test" else "noto")


def test_caption_format_known_example(bundle):
    s = next(bundle[sp]["1f614"] for sp in ("train", "val", "test") if "1f614" in bundle[sp])
    assert s["txt"].decode().startswith("pensive face: awful, bored, dejected")
    assert json.loads(s["json"])["category"] == "Smileys & Emotion"
    n_with_kw = sum(": " in s["txt"].decode() for s in bundle["train"].values())
    assert n_with_kw >= 0.95 * len(bundle["train"])


def test_all_categories_in_train(bundle, stats):
    cats = {json.loads(s["json"])["category"] for s in bundle["train"].values()}
    assert cats == CATEGORIES
    assert set(stats["categories"]["train"]) == CATEGORIES


def test_openmoji_test_mirrors_test(bundle):
    assert set(bundle["openmoji_test"]) == set(bundle["test"])
    for key in list(bundle["test"])[:20]:
        a = Image.open(io.BytesIO(bundle["test"][key]["png"]))
        b = Image.open(io.BytesIO(bundle["openmoji_test"][key]["png"]))
        assert a.size == b.size == (64, 64) and b.mode == "RGBA"
        assert bundle["test"][key]["png"] != bundle["openmoji_test"][key]["png"]
        assert bundle["test"][key]["txt"] == bundle["openmoji_test"][key]["txt"]


def test_helpers():
    assert norm_code("2764-fe0f") == "2764" and norm_code("1f1ea-1F1EC") == "1F1EA-1F1EC"
    assert norm_code("0034-FE0F-20E3") == "0034-20E3"
    cap, kws = make_caption("pensive face", ["awful", "bored", " pensive face", "Awful", "", "sad"])
    assert cap == "pensive face: awful, bored, sad" and kws == ["awful", "bored", "sad"]
    assert make_caption("fountain", ["fountain"]) == ("fountain", [])
    keys = [f"{i:x}" for i in range(100)]
    s = split_keys(keys)
    assert s == split_keys(keys) and sorted(s) == sorted(keys)
    assert [list(s.values()).count(x) for x in ("train", "val", "test")] == [80, 10, 10]
    with pytest.raises(ValueError):
        emoji.bundled_split("nope")


def _npm_dir(tmp_path_factory) -> Path:
    if os.environ.get("MMTL_EMOJI_NPM_DIR"):
        return Path(os.environ["MMTL_EMOJI_NPM_DIR"])
    if shutil.which("npm") is None:
        pytest.skip("npm not on PATH")
    try:
        return emoji.npm_install(tmp_path_factory.mktemp("npm"))
    except RuntimeError as e:
        pytest.skip(f"cannot npm install the emoji packages: {e}")


def test_rebuild_is_byte_identical(tmp_path_factory):
    """Rebuilding from the pinned npm packages reproduces the bundle byte for byte (~20 s with npm install).

    Set MMTL_EMOJI_NPM_DIR to a folder with node_modules to skip the install.
    """
    if shutil.which("rsvg-convert") is None:
        pytest.skip("rsvg-convert not installed (apt-get install librsvg2-bin)")
    npm_dir = _npm_dir(tmp_path_factory)
    out = tmp_path_factory.mktemp("emoji")
    stats = emoji.build_emoji_dataset(str(out), str(npm_dir), progress=False)
    bundled = json.loads((bundled_dir() / "stats.json").read_text())
    if stats["rsvg_convert"] != bundled["rsvg_convert"]:
        pytest.skip(f"{stats['rsvg_convert']} differs from the bundle's {bundled['rsvg_convert']}")
    assert stats == bundled
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(bundled_dir()).as_posix() for p in bundled_dir().rglob("*") if p.is_file())
    for rel in files:
        got, want = (out / rel).read_bytes(), (bundled_dir() / rel).read_bytes()
        if rel == "NOTICE":  # the bundle's NOTICE also carries the CLDR licence that `--locales` appends
            from mmtl.datasets.emoji_locales import CLDR_NOTICE, CLDR_VERSION

            cldr_head = CLDR_NOTICE.format(v=CLDR_VERSION, licence="").split("reproduced below.")[0]
            assert want.startswith(got) and want[len(got):].decode().startswith(cldr_head), rel
            continue
        assert got == want, rel
