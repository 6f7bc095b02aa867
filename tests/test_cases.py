"""Bad-input cases (shared/cases/gen) through the shard reader, plus similar conditions not listed.

Each generator is run as `python case_NN_*.py OUTDIR` once per session; tests assert exactly which
keys come out, the counts by reason and, where it matters, pixel values.
"""
from __future__ import annotations

import collections
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from mmtl.data import shardio, shardlist
from mmtl.data.inspect import inspect_shards
from mmtl.data.samples import CleanOptions, Reject, SampleRejected, decode_image
from mmtl.data.shardio import (EmptyDatasetError, MissingShardsError, UnsortedShardError, iter_samples,
                               iter_shard, open_shard, resolve_shards)

REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [os.environ.get("MMTL_CASES_DIR", ""), REPO / "shared/cases/gen", REPO.parent / "shared/cases/gen",
               "/work/shared/cases/gen"]
GEN_DIR = next((Path(p) for p in _CANDIDATES if p and Path(p).is_dir()), None)
needs_cases = pytest.mark.skipif(GEN_DIR is None, reason="shared/cases/gen not found (set MMTL_CASES_DIR)")
OPTS = CleanOptions()
COVERED = {"01", "03", "04", "05", "06", "07", "08", "09", "10", "11", "13", "16"}


@pytest.fixture(scope="session")
def case(tmp_path_factory):
    made: dict[str, Path] = {}

    def run(nn: str) -> Path:
        if nn not in made:
            (script,) = GEN_DIR.glob(f"case_{nn}_*.py")
            out = tmp_path_factory.mktemp(f"case{nn}")
            subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
            made[nn] = out
        return made[nn]
    return run


def read(spec, opts=OPTS):
    stats, warns = collections.Counter(), []
    samples = list(iter_samples(spec, opts, stats, warns))
    return samples, {k: v for k, v in stats.items() if v}, warns


def keys(samples):
    return [s.key for s in samples]


@needs_cases
def test_every_generator_has_a_test():
    found = {re.match(r"case_(\d+)_", p.name).group(1) for p in GEN_DIR.glob("case_*.py")}
    assert found <= COVERED, f"generators without a test: {sorted(found - COVERED)}"


@needs_cases
def test_case01_truncated_jpeg(case):
    samples, stats, warns = read(str(case("01") / "truncated_jpeg.tar"))
    assert keys(samples) == ["000000", "000002"] and stats == {"samples_ok": 2, "truncated_image": 1}
    assert samples[1].meta == {"key": "000002", "truncated": False} and samples[1].image.size == (64, 64)
    assert samples[0].uid == "truncated_jpeg/000000" and not warns


@needs_cases
def test_case03_unordered_tar_is_an_error_before_any_sample(case):
    path = str(case("03") / "unordered.tar")
    it = iter_shard(path, OPTS)
    with pytest.raises(UnsortedShardError, match=re.escape(path)):
        next(it)
    report = inspect_shards(path, OPTS)
    assert report["samples_ok"] == 0 and len(report["errors"]) == 1 and path in report["errors"][0]


@needs_cases
def test_case04_missing_members(case):
    samples, stats, _ = read(str(case("04") / "missing_member.tar"))
    assert keys(samples) == ["000000", "000003"]
    assert stats == {"samples_ok": 2, "missing_image": 1, "missing_caption": 1}


@needs_cases
def test_case05_duplicates(case):
    d = case("05")
    samples, stats, _ = read(str(d / "dup_in_shard.tar"))
    assert keys(samples) == ["000001"] and stats == {"samples_ok": 1, "duplicate_member": 1}
    samples, stats, warns = read([str(d / "dup_across_a.tar"), str(d / "dup_across_b.tar")])
    assert [s.uid for s in samples] == ["dup_across_a/000000", "dup_across_a/000001",
                                        "dup_across_b/000000", "dup_across_b/000001"]
    assert stats == {"samples_ok": 4}
    assert len(warns) == 1 and warns[0].startswith("2 sample key(s)")
    assert samples[2].caption == "shard b sample 0"


@needs_cases
def test_case06_truncated_tars(case):
    d = case("06")
    samples, stats, warns = read(str(d / "truncated_mid_member.tar"))
    assert keys(samples) == ["000000", "000001"] and stats == {"samples_ok": 2, "truncated_shard": 1}
    assert len(warns) == 1 and "cut short" in warns[0] and "'000002'" in warns[0]
    samples, stats, _ = read(str(d / "missing_eof_blocks.tar"))
    assert keys(samples) == ["000000", "000001", "000002"] and stats == {"samples_ok": 3}
    assert [s.caption for s in samples] == ["caption 0", "caption 1", "caption 2"]


@needs_cases
def test_case07_gap_in_brace_pattern(case, monkeypatch):
    d = case("07") / "shards"
    pattern = (d / "PATTERN.txt").read_text().strip()
    monkeypatch.setattr(shardio, "open_shard", lambda url: pytest.fail("read before resolving"))
    with pytest.raises(MissingShardsError) as e:
        iter_samples(pattern, OPTS)  # raised by the call itself, before any iteration
    assert e.value.missing == [str(d / "000002.tar")] and str(d / "000002.tar") in str(e.value)
    with pytest.raises(MissingShardsError) as e:
        resolve_shards(str(d / "{000000..000005}.tar"))
    assert e.value.missing == [str(d / f"00000{i}.tar") for i in (2, 4, 5)]
    assert inspect_shards(pattern, OPTS)["errors"] == [str(e2) for e2 in [MissingShardsError([str(d / "000002.tar")])]]


@needs_cases
def test_case08_empty_captions(case):
    samples, stats, _ = read(str(case("08") / "empty_caption.tar"))
    assert keys(samples) == ["000003"] and stats == {"samples_ok": 1, "empty_caption": 3}
    assert samples[0].caption == "a dog running on a beach"


@needs_cases
def test_case09_long_captions_counted(case):
    path = str(case("09") / "long_caption.tar")
    opts = CleanOptions(context_length=77, count_tokens=lambda s: len(s.encode("utf-8")) // 4 + 2)
    samples, stats, _ = read(path, opts)
    assert keys(samples) == ["000000", "000001", "000002", "000003"]
    assert [s.caption_truncated for s in samples] == [True, True, True, False]
    assert stats == {"samples_ok": 4, "caption_truncated": 3}
    assert len(samples[0].caption.split()) == 400 and samples[1].caption.startswith("https://example.com/xxx")
    assert samples[2].caption.endswith("\U0001F327\ufe0f")  # emoji + variation selector kept
    _, stats, _ = read(path)  # no tokenizer: nothing counted
    assert stats == {"samples_ok": 4}


@needs_cases
def test_case10_non_utf8_captions(case):
    samples, stats, _ = read(str(case("10") / "non_utf8.tar"))
    assert [s.caption for s in samples] == ["the dog\u2019s ball on the grass", "a caf\u00e9 terrace at night",
                                            "a red kite in the sky", "a plain utf-8 caption \u2713"]
    assert stats == {"samples_ok": 4}


def _ref():
    ref = Image.new("RGB", (32, 32), (200, 30, 30))
    ImageDraw.Draw(ref).ellipse((8, 8, 24, 24), fill=(30, 30, 200))
    return ref


@needs_cases
def test_case11_every_mode_becomes_8bit_rgb(case):
    path = case("11") / "image_modes.tar"
    samples, stats, _ = read(str(path))
    assert stats == {"samples_ok": 9} and keys(samples) == [f"{i:06d}" for i in range(9)]
    img = {s.key[-1]: s.image for s in samples}
    arr = {k: np.asarray(v).astype(int) for k, v in img.items()}
    for k, v in img.items():
        assert v.mode == "RGB" and arr[k].dtype == int and np.asarray(v).dtype == np.uint8
    ref = np.asarray(_ref()).astype(int)
    # CMYK jpeg (no chroma subsampling): reference colours within JPEG tolerance
    assert np.abs(arr["0"] - ref).mean() < 6
    assert np.abs(arr["0"][2, 2] - (200, 30, 30)).max() <= 12 and np.abs(arr["0"][16, 16] - (30, 30, 200)).max() <= 12
    with tarfile.open(path) as tf:
        member = {n: tf.extractfile(n).read() for n in ("000002.png", "000008.jpg")}
    assert (arr["8"] == np.asarray(Image.open(io.BytesIO(member["000008.jpg"])))).all()  # RGB: untouched
    assert np.abs(arr["8"] - ref).mean() < 15  # (4:2:0 subsampling blurs the disc edge)
    gray = np.asarray(_ref().convert("L")).astype(int)
    assert (arr["1"][..., 0] == arr["1"][..., 2]).all() and np.abs(arr["1"][..., 0] - gray).mean() < 3
    pal = Image.open(io.BytesIO(member["000002.png"]))  # P + tRNS: transparent -> white, others -> palette
    idx = np.asarray(pal)
    colours = np.array(pal.getpalette()[:768]).reshape(-1, 3)
    want = np.where((idx == pal.info["transparency"])[..., None], 255, colours[idx])
    assert (arr["2"] == want).all() and (arr["2"] == 255).all(axis=-1).any()
    assert tuple(arr["3"][0, 0]) == (255, 255, 255) and tuple(arr["3"][16, 16]) == (255, 0, 0)  # RGBA
    assert (arr["4"] == gray[..., None]).all()  # LA, opaque
    col = np.linspace(0, 65535, 32).astype(np.uint16)  # 16-bit: scaled, 65535 -> 255
    assert arr["5"][0, 0].tolist() == [0, 0, 0] and arr["5"][0, 31].tolist() == [255, 255, 255]
    assert np.abs(arr["5"][0, :, 0] - col / 257.0).max() <= 0.5 + 1e-9 and len(set(arr["5"][0, :, 0])) == 32
    bilevel = np.asarray(_ref().convert("1")).astype(int) * 255
    assert (arr["6"] == bilevel[..., None]).all()
    assert img["7"].size == (1, 1) and tuple(arr["7"][0, 0]) == (0, 255, 0)


@needs_cases
def test_case13_bomb_rejected_from_header(case, monkeypatch):
    d = case("13")
    samples, stats, _ = read(str(d / "bomb.tar"))
    assert keys(samples) == ["000001"] and stats == {"samples_ok": 1, "too_many_pixels": 1}
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("bomb pixels decoded"))
    with pytest.raises(SampleRejected) as e:
        decode_image((d / "bomb.png").read_bytes(), 10**9)
    assert e.value.reason == Reject.TOO_MANY_PIXELS


@needs_cases
def test_case16_empty_shards_skipped_with_warning(case):
    d = case("16") / "empty"
    samples, stats, warns = read(str(d))
    assert keys(samples) == ["000000", "000001"] and stats == {"samples_ok": 2, "empty_shard": 2}
    assert len(warns) == 2 and "no_members.tar" in warns[0] and "zero_bytes.tar" in warns[1]


# ================================================================ similar, unlisted conditions

def img_bytes(fmt="JPEG", colour=(10, 20, 30), size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def tar_bytes(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pairs(n, prefix=""):
    return [m for i in range(n) for m in ((f"{prefix}{i:06d}.jpg", img_bytes()), (f"{prefix}{i:06d}.txt", b"cap %d" % i))]


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_pickles_are_never_read(tmp_path, monkeypatch):
    import pickle
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    evil = b"cos\nsystem\n(S'touch pwned'\ntR."
    p = write(tmp_path / "p.tar", tar_bytes([("0.jpg", img_bytes()), ("0.pyd", evil), ("0.pth", evil),
                                             ("0.pickle", evil), ("0.txt", b"ok")]))
    samples, stats, _ = read(p)
    assert keys(samples) == ["0"] and stats == {"samples_ok": 1} and not (tmp_path / "pwned").exists()


def test_mixed_formats_names_and_tar_flavours(tmp_path):
    long_dir = "d" * 120 + "/"
    members = [("./a.JPG", img_bytes()), ("./a.TXT", b"upper"), ("b.png", img_bytes("PNG")), ("b.txt", b"png"),
               (f"{long_dir}c.webp", img_bytes("WEBP")), (f"{long_dir}c.caption", b"webp"),
               ("d.jpeg", img_bytes("PNG")), ("d.text", b"png named jpeg"), ("README", b"x"), (".hidden.jpg", b"")]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        samples, stats, _ = read(write(tmp_path / f"f{fmt}.tar", tar_bytes(members, fmt)))
        assert keys(samples) == ["a", "b", long_dir + "c", "d"] and stats == {"samples_ok": 4}
        assert [s.caption for s in samples] == ["upper", "png", "webp", "png named jpeg"]


def test_gzip_shard(tmp_path):
    import gzip
    p = write(tmp_path / "g.tar.gz", gzip.compress(tar_bytes(pairs(3))))
    assert keys(read(str(tmp_path))[0]) == ["000000", "000001", "000002"] and resolve_shards(str(tmp_path)) == [p]


def _header_offset(data: bytes, name: str) -> int:
    return data.index(name.encode()) // 512 * 512


def test_cut_inside_a_header(tmp_path):
    data = tar_bytes(pairs(4))
    at = _header_offset(data, "000002.txt") + 200  # name readable: the cut sample is 000002
    samples, stats, warns = read(write(tmp_path / "a.tar", data[:at]))
    assert keys(samples) == ["000000", "000001"] and stats == {"samples_ok": 2, "truncated_shard": 1}
    at = _header_offset(data, "000003.jpg") + 300  # cut while starting 000003: 000002 is complete
    samples, stats, _ = read(write(tmp_path / "b.tar", data[:at]))
    assert keys(samples) == ["000000", "000001", "000002"] and stats == {"samples_ok": 3, "truncated_shard": 1}
    at = _header_offset(data, "000003.jpg") + 40  # name unknown: the sample in progress is dropped
    samples, stats, _ = read(write(tmp_path / "c.tar", data[:at]))
    assert keys(samples) == ["000000", "000001"] and stats == {"samples_ok": 2, "truncated_shard": 1}


def test_corrupt_header_and_not_a_tar(tmp_path):
    data = bytearray(tar_bytes(pairs(3)))
    at = _header_offset(bytes(data), "000001.txt")
    data[at:at + 512] = b"garbage!" * 64
    samples, stats, warns = read(write(tmp_path / "c.tar", bytes(data)))
    assert keys(samples) == ["000000"] and stats == {"samples_ok": 1, "truncated_shard": 1}
    assert "invalid tar header" in warns[0]
    samples, stats, warns = read(write(tmp_path / "page.tar", b"<html>" + b"x" * 2000))
    assert samples == [] and stats == {"corrupt_shard": 1} and "not a tar" in warns[0]
    samples, stats, warns = read(write(tmp_path / "dirs.tar", tar_bytes([("README", b"hi")])))
    assert stats == {"empty_shard": 1} and "no sample members" in warns[0]


def test_key_revisited_later_is_unsorted(tmp_path):
    p = write(tmp_path / "u.tar", tar_bytes([("a.jpg", img_bytes()), ("a.txt", b"x"), ("b.jpg", img_bytes()),
                                             ("b.txt", b"y"), ("a.json", b"{}")]))
    with pytest.raises(UnsortedShardError, match="'a.json'"):
        read(p)


def test_same_stem_in_two_folders_keeps_uids_unique(tmp_path):
    a = write(tmp_path / "x/000000.tar", tar_bytes(pairs(1)))
    b = write(tmp_path / "y/000000.tar", tar_bytes(pairs(1)))
    samples, _, warns = read([a, b])
    assert [s.uid for s in samples] == ["000000~0/000000", "000000~1/000000"] and len(warns) == 1


def test_resolve_local_forms(tmp_path):
    paths = [write(tmp_path / f"s-{i:02d}.tar", tar_bytes(pairs(1))) for i in range(3)]
    assert resolve_shards(str(tmp_path)) == paths
    assert resolve_shards(str(tmp_path / "s-*.tar")) == paths
    assert resolve_shards(str(tmp_path / "s-{00..02}.tar")) == paths
    assert resolve_shards([paths[2], paths[0], paths[2]]) == [paths[2], paths[0]]
    assert resolve_shards("file://" + paths[1]) == ["file://" + paths[1]]
    assert keys(read("file://" + paths[1])[0]) == ["000000"]
    (tmp_path / "empty").mkdir()
    for spec in (str(tmp_path / "empty"), str(tmp_path / "nope-*.tar"), [], ""):
        with pytest.raises(EmptyDatasetError):
            resolve_shards(spec)
    with pytest.raises(MissingShardsError, match="matched nothing"):
        resolve_shards([paths[0], str(tmp_path / "nope-*.tar")])
    with pytest.raises(MissingShardsError):
        open_shard(str(tmp_path / "gone.tar"))


@pytest.fixture
def fake_s3(tmp_path, monkeypatch):
    """s3://bucket/... served from tmp_path/bucket through pyarrow (no network)."""
    from pyarrow.fs import LocalFileSystem, SubTreeFileSystem
    fs = SubTreeFileSystem(str(tmp_path), LocalFileSystem())
    calls = []

    def from_uri(uri):
        calls.append(uri)
        assert uri.startswith("s3://")
        return fs, uri[len("s3://"):].split("?")[0]
    monkeypatch.setattr(shardlist, "filesystem", from_uri)
    return tmp_path, calls


def test_remote_uris_resolve_and_read(fake_s3):
    root, calls = fake_s3
    for i in (0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 19):
        write(root / f"bucket/sh/{i:06d}.tar", tar_bytes(pairs(1)))
    with pytest.raises(MissingShardsError) as e:
        resolve_shards("s3://bucket/sh/{000000..000019}.tar")  # >= 16 in one folder: one listing
    assert e.value.missing == ["s3://bucket/sh/000004.tar", "s3://bucket/sh/000017.tar"]
    assert resolve_shards("s3://bucket/sh/00001[0-2].tar") == [f"s3://bucket/sh/{i:06d}.tar" for i in (10, 11, 12)]
    assert len(resolve_shards("s3://bucket/sh")) == 18
    calls.clear()
    samples, stats, _ = read(["s3://bucket/sh/000000.tar", "s3://bucket/sh/000001.tar"])
    assert [s.uid for s in samples] == ["000000/000000", "000001/000000"] and stats == {"samples_ok": 2}
    assert calls[0] == "s3://bucket/sh/000000.tar" and len(calls) == 3  # 1 resolve (cached) + 2 opens


def test_inspect_report_and_dump(tmp_path):
    good = write(tmp_path / "shards/a.tar", tar_bytes(pairs(2) + [("000009.jpg", b""), ("000009.txt", b"z")]))
    bad = write(tmp_path / "shards/b.tar", tar_bytes([("1.jpg", img_bytes()), ("2.jpg", img_bytes()), ("1.txt", b"q")]))
    report = inspect_shards(str(tmp_path / "shards"), OPTS, dump_dir=str(tmp_path / "dump"))
    json.dumps(report)
    assert (report["shards"], report["samples_ok"], report["rejected"]) == (2, 2, {"empty_image": 1})
    assert len(report["errors"]) == 1 and bad in report["errors"][0] and "error" in report["per_shard"][bad]
    assert report["per_shard"][good] == {"samples_ok": 2, "rejected": {"empty_image": 1}, "caption_truncated": 0}
    assert report["rejected_examples"][0]["key"] == "000009"
    assert sorted(os.listdir(tmp_path / "dump")) == ["a__000000.png", "a__000000.txt", "a__000001.png", "a__000001.txt"]
    assert (tmp_path / "dump/a__000001.txt").read_text() == "cap 1"
    assert Image.open(tmp_path / "dump/a__000000.png").convert("RGB").getpixel((0, 0)) == \
        decode_image(img_bytes(), 10**6).getpixel((0, 0))
    assert inspect_shards(str(tmp_path / "missing-{0..1}.tar"), OPTS)["errors"][0].startswith("2 shard(s) missing")
