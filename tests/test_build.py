"""Tests of mmtl.data.build: shard layout, limits, determinism, splits, skip counts (no Ray)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmtl.data.build import ShardWriter, build_shards, prepare_image, sniff_image_format


def _img_bytes(fmt: str, color=(200, 30, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _members(tar_path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar_path) as tf:
        return tf.getmembers()


def _read_all(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard under ``out``."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.rglob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "pairs"
    (root / "sub").mkdir(parents=True)
    for i in range(7):
        d = root / ("sub" if i % 2 else "")
        (d / f"img{i}.jpg").write_bytes(_img_bytes("JPEG", (i * 30, 10, 10)))
        (d / f"img{i}.txt").write_text(f"a red square number {i}\n", encoding="utf-8")
    (root / "bmp.bmp").write_bytes(_img_bytes("BMP"))
    (root / "bmp.txt").write_text("a bitmap", encoding="utf-8")
    (root / "nocap.png").write_bytes(_img_bytes("PNG"))  # image without caption
    (root / "orphan.txt").write_text("caption without image", encoding="utf-8")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "broken.txt").write_text("broken", encoding="utf-8")
    (root / "empty.png").write_bytes(_img_bytes("PNG"))
    (root / "empty.txt").write_text("   \n", encoding="utf-8")
    return root


def test_sniff_and_prepare():
    assert sniff_image_format(_img_bytes("JPEG")) == "jpg"
    assert sniff_image_format(_img_bytes("PNG")) == "png"
    assert sniff_image_format(_img_bytes("WEBP")) == "webp"
    assert sniff_image_format(_img_bytes("GIF")) == "gif"
    assert sniff_image_format(b"hello") is None
    png = _img_bytes("PNG")
    assert prepare_image(png) == (png, "png", 8, 6, "png")  # copied, not re-encoded
    data, ext, w, h, orig = prepare_image(_img_bytes("GIF"))
    assert (ext, w, h, orig) == ("png", 8, 6, "gif") and sniff_image_format(data) == "png"
    with pytest.raises(ValueError):
        prepare_image(b"\x89PNG\r\n\x1a\n truncated")


def test_shard_writer_limits_and_layout(tmp_path: Path):
    img = _img_bytes("PNG")
    with ShardWriter(tmp_path, "s", max_samples_per_shard=3) as w:
        for i in range(7):
            w.write(f"k{i:03d}", img, "png", f"caption {i} é", {"source": f"src{i}"})
    assert [p.name for p in w.shards] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    assert w.samples == 7 and w.bytes == sum(p.stat().st_size for p in w.shards)
    names = [m.name for m in _members(tmp_path / "s-000000.tar")]
    assert names == ["k000.json", "k000.png", "k000.txt", "k001.json", "k001.png", "k001.txt",
                     "k002.json", "k002.png", "k002.txt"]
    m = _members(tmp_path / "s-000000.tar")[0]
    assert m.mtime == 0 and m.uid == 0 and m.uname == ""
    s = _read_all(tmp_path)["k001"]
    assert s["txt"].decode("utf-8") == "caption 1 é" and s["png"] == img
    meta = json.loads(s["json"])
    assert meta == {"key": "k001", "source": "src1", "width": 8, "height": 6, "caption": "caption 1 é"}
    assert not list(tmp_path.glob("*.tmp"))


def test_shard_writer_byte_limit(tmp_path: Path):
    img = bytes(_img_bytes("PNG")) + b"\0" * 20_000  # ~20 kB per sample
    with ShardWriter(tmp_path, "b", max_bytes_per_shard=60_000) as w:
        for i in range(5):
            w.write(f"k{i}", img, "png", "x", {"width": 8, "height": 6})
    assert len(w.shards) == 3
    assert all(p.stat().st_size <= 60_000 for p in w.shards)


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "a b", "x" * 81])
def test_shard_writer_bad_keys(tmp_path: Path, key: str):
    with ShardWriter(tmp_path) as w, pytest.raises(ValueError):
        w.write(key, _img_bytes("PNG"), "png", "c", {})


def test_shard_writer_rejects(tmp_path: Path):
    with ShardWriter(tmp_path) as w:
        w.write("a", _img_bytes("PNG"), "png", "c", {})
        with pytest.raises(ValueError, match="duplicate"):
            w.write("a", _img_bytes("PNG"), "png", "c", {})
        with pytest.raises(ValueError, match="image_ext"):
            w.write("b", _img_bytes("PNG"), "gif", "c", {})
    with pytest.raises(RuntimeError):
        w.write("c", _img_bytes("PNG"), "png", "c", {})


def test_build_from_folder(folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    stats = build_shards(str(folder), str(out), prefix="p", max_samples_per_shard=3, progress=False)
    assert stats["samples"] == 8 and stats["shards"] == 3
    assert stats["skipped"] == {"empty_caption": 1, "no_caption": 1, "no_image": 1, "unreadable_image": 1}
    assert stats["image_formats"] == {"bmp": 1, "jpg": 7}
    assert json.loads((out / "stats.json").read_text()) == stats
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["p-000000.tar", "p-000001.tar", "p-000002.tar"]
    assert not list(out.glob("*.tar")) and stats["splits"]["train"]["dir"] == "train"  # data.train points here
    samples = _read_all(out)
    assert all(len(k) == 9 and k.isdigit() for k in samples)
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    assert "sub/img1.jpg" in by_source and "img0.jpg" in by_source
    s = by_source["sub/img1.jpg"]
    assert set(s) == {"jpg", "json", "txt"}
    assert s["jpg"] == (folder / "sub" / "img1.jpg").read_bytes()
    assert s["txt"] == b"a red square number 1"
    meta = json.loads(s["json"])
    assert meta["caption"] == "a red square number 1" and (meta["width"], meta["height"]) == (8, 6)
    b = by_source["bmp.bmp"]
    assert "png" in b and json.loads(b["json"])["original_format"] == "bmp"


def test_build_deterministic(folder: Path, tmp_path: Path):
    kw = dict(max_samples_per_shard=2, val_fraction=0.3, test_fraction=0.2, progress=False)
    s1 = build_shards(str(folder), str(tmp_path / "a"), **kw)
    s2 = build_shards(str(folder), str(tmp_path / "b"), **kw)
    assert s1 == s2
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert files and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.tar"))
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_build_split_sizes(tmp_path: Path):
    root = tmp_path / "many"
    root.mkdir()
    png = _img_bytes("PNG")
    for i in range(200):
        (root / f"{i:03d}.png").write_bytes(png)
        (root / f"{i:03d}.txt").write_text(f"c{i}")
    out = tmp_path / "out"
    stats = build_shards(str(root), str(out), val_fraction=0.1, test_fraction=0.2, seed=3, progress=False)
    n = {k: v["samples"] for k, v in stats["splits"].items()}
    assert sum(n.values()) == 200
    assert 5 <= n["val"] <= 40 and 20 <= n["test"] <= 65 and n["train"] >= 110
    for split in ("train", "val", "test"):
        keys = set(_read_all(out / split))
        assert len(keys) == n[split]
        assert stats["splits"][split]["shards"] == [f"{split}/shard-000000.tar"]
    # adding samples does not move existing ones between splits
    for i in range(200, 230):
        (root / f"{i:03d}.png").write_bytes(png)
        (root / f"{i:03d}.txt").write_text(f"c{i}")
    out2 = tmp_path / "out2"
    build_shards(str(root), str(out2), val_fraction=0.1, test_fraction=0.2, seed=3, progress=False)
    assert set(_read_all(out / "test")) <= set(_read_all(out2 / "test"))


def _table_rows(tmp_path: Path) -> list[dict]:
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_img_bytes("PNG", (i, i, i)))
        rows.append({"path": f"imgs/{i}.png", "text": f"gray {i}", "other": i})
    (tmp_path / "abs.webp").write_bytes(_img_bytes("WEBP"))
    rows.append({"path": str(tmp_path / "abs.webp"), "text": "absolute webp", "other": 5})
    rows.append({"path": "imgs/missing.png", "text": "gone", "other": 6})
    rows.append({"path": "imgs/0.png", "text": "", "other": 7})
    return rows


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_build_from_table(tmp_path: Path, fmt: str):
    import pandas as pd

    df = pd.DataFrame(_table_rows(tmp_path))
    table = tmp_path / f"pairs.{fmt}"
    if fmt == "parquet":
        df.to_parquet(table)
    else:
        df.to_csv(table, sep="\t" if fmt == "tsv" else ",", index=False)
    out = tmp_path / "out"
    stats = build_shards(str(table), str(out), image_col="path", caption_col="text",
                         max_samples_per_shard=4, progress=False)
    assert stats["source_kind"] == fmt
    assert stats["samples"] == 6 and stats["shards"] == 2
    assert stats["skipped"] == {"empty_caption": 1, "missing_image": 1}
    samples = _read_all(out)
    assert sorted(samples) == [f"{i:09d}" for i in range(6)]
    assert samples["000000005"]["txt"] == b"absolute webp" and "webp" in samples["000000005"]
    assert samples["000000002"]["png"] == (tmp_path / "imgs" / "2.png").read_bytes()


def test_missing_column_error(tmp_path: Path):
    import pandas as pd

    table = tmp_path / "t.csv"
    pd.DataFrame(_table_rows(tmp_path)).to_csv(table, index=False)
    with pytest.raises(ValueError, match=r"column 'image' not found.*available columns: \['path', 'text', 'other'\]"):
        build_shards(str(table), str(tmp_path / "out"), progress=False)


def test_bad_source(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        build_shards(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="unsupported"):
        build_shards(str(tmp_path / "x.json"), str(tmp_path / "out"), progress=False)


def test_stale_shards_removed(folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    build_shards(str(folder), str(out), max_samples_per_shard=1, progress=False)
    assert len(list((out / "train").glob("shard-*.tar"))) == 8
    stats = build_shards(str(folder), str(out), max_samples_per_shard=100, progress=False)
    assert sorted(p.name for p in (out / "train").glob("shard-*.tar")) == ["shard-000000.tar"] and stats["shards"] == 1


def test_empty_source_is_an_error(tmp_path: Path):
    """A folder without images, or whose every item is skipped, is an error naming the source; no stats.json."""
    from mmtl.data.build import EmptySourceError

    empty = tmp_path / "captions_only"
    empty.mkdir()
    (empty / "a.txt").write_text("a caption")
    with pytest.raises(EmptySourceError, match=r"captions_only: no images .* found \(skipped: \{'no_image': 1\}\)"):
        build_shards(str(empty), str(tmp_path / "out"), progress=False)
    bad = tmp_path / "all_bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not an image")
    (bad / "x.txt").write_text("caption")
    with pytest.raises(EmptySourceError, match=r"all 1 items were skipped \(\{'unreadable_image': 1\}\)"):
        build_shards(str(bad), str(tmp_path / "out2"), progress=False)
    assert not (tmp_path / "out2" / "stats.json").exists()
