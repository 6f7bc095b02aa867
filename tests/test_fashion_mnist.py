"""Fashion-MNIST IDX importer: tiny hand-written IDX files (gz and raw), and the real files when installed
(Debian's ``dataset-fashion-mnist`` in /usr/share/datasets/fashion-mnist; skipped otherwise)."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest

from mmtl.datasets import fashion_mnist as fm


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    """IDX written by hand: big-endian magic (2051 images / 2049 labels), big-endian dims, data."""
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _fake_source(root: Path, n_train: int = 40, n_test: int = 12, gz: bool = True) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256  # a per-sample marker pixel
        labels = (np.arange(n) * 7 + (split == "test")) % 10
        img_name, lab_name = fm.SPLIT_FILES[split]
        for name, data in ((img_name, _idx_bytes(images, 2051)), (lab_name, _idx_bytes(labels, 2049))):
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        np.save(root / f"{split}_images.npy", images)
        np.save(root / f"{split}_labels.npy", labels)
    return root


def _read(folder: Path):
    from mmtl.data.samples import CleanOptions
    from mmtl.data.shardio import iter_samples

    return list(iter_samples(str(folder), CleanOptions()))


def _raw_png(shard: Path, key: str) -> bytes:
    import tarfile

    with tarfile.open(shard) as t:
        return t.extractfile(f"{key}.png").read()


@pytest.mark.parametrize("gz", [True, False])
def test_import_tiny_idx(tmp_path, gz):
    from PIL import Image

    src = _fake_source(tmp_path / "src", gz=gz)
    stats = fm.import_fashion_mnist(src, tmp_path / "out")
    images, labels = np.load(src / "train_images.npy"), np.load(src / "train_labels.npy")
    assert stats["splits"]["train"]["samples"] == 40 and stats["splits"]["test"]["samples"] == 12
    assert stats["samples"] == 52 and stats["classes"] == list(fm.CLASSES)
    assert sum(stats["splits"]["train"]["per_class"].values()) == 40
    samples = _read(tmp_path / "out" / "train")
    assert [s.key for s in samples] == [f"{i:05d}" for i in range(40)]
    s = samples[13]
    y = int(labels[13])
    assert s.caption == f"a photo of a {fm.CLASSES[y]}"
    assert s.meta["label"] == y and s.meta["category"] == fm.CLASSES[y] and s.meta["index"] == 13
    assert s.meta["split"] == "train" and (s.meta["width"], s.meta["height"]) == (28, 28)
    shard = tmp_path / "out" / "train" / "fashion-mnist-train-000000.tar"
    png = Image.open(io.BytesIO(_raw_png(shard, "00013")))
    assert png.format == "PNG" and png.mode == "L" and png.size == (28, 28)
    assert np.array_equal(np.asarray(png), images[13])  # pixels unchanged
    assert (tmp_path / "out" / "classes.txt").read_text().splitlines() == list(fm.CLASSES)
    assert "{}" in (tmp_path / "out" / "templates.txt").read_text()
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["samples"] == 52
    test = _read(tmp_path / "out" / "test")
    assert test[0].meta["label"] == 1 and test[0].meta["split"] == "test"


def test_limit_shots_and_determinism(tmp_path):
    src = _fake_source(tmp_path / "src", n_train=200, n_test=30)
    a = fm.import_fashion_mnist(src, tmp_path / "a", shots_per_class=3, seed=5, limit=25, max_samples_per_shard=10)
    fm.import_fashion_mnist(src, tmp_path / "b", shots_per_class=3, seed=5, limit=25, max_samples_per_shard=10)
    assert a["splits"]["train"]["samples"] == 25  # 3 shots x 10 classes, then the first 25
    for split in ("train", "test"):
        for sa, sb in zip(sorted((tmp_path / "a" / split).glob("*.tar")), sorted((tmp_path / "b" / split).glob("*.tar"))):
            assert sa.read_bytes() == sb.read_bytes()
    assert len(a["splits"]["train"]["shards"]) == 3 and a["splits"]["test"]["samples"] == 25  # test only limited
    full = fm.import_fashion_mnist(src, tmp_path / "c", shots_per_class=3, seed=5)
    assert set(full["splits"]["train"]["per_class"].values()) == {3} and full["splits"]["train"]["samples"] == 30
    assert full["splits"]["test"]["samples"] == 30
    fm.import_fashion_mnist(src, tmp_path / "d", shots_per_class=3, seed=6)
    keys = lambda d: [s.key for s in _read(tmp_path / d / "train")]  # noqa: E731
    assert keys("c") != keys("d") and keys("c") == sorted(keys("c"))
    # a smaller re-import into the same folder removes the stale shards
    fm.import_fashion_mnist(src, tmp_path / "a", splits=("train",), limit=5, max_samples_per_shard=10)
    assert len(list((tmp_path / "a" / "train").glob("*.tar"))) == 1


def test_select_indices():
    labels = np.array([0, 1, 0, 1, 0, 2])
    assert fm.select_indices(labels, None, None, 0).tolist() == [0, 1, 2, 3, 4, 5]
    assert fm.select_indices(labels, None, 2, 0).tolist() == [0, 1]
    got = fm.select_indices(labels, 2, None, 0)
    assert len(got) == 5 and 5 in got and np.array_equal(got, fm.select_indices(labels, 2, None, 0))
    with pytest.raises(ValueError):
        fm.select_indices(labels, 0, None, 0)


def test_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("x.idx", "x.idx.gz"):
        fm.write_idx(tmp_path / name, arr)
        assert np.array_equal(fm.read_idx(tmp_path / name), arr)
    assert (tmp_path / "x.idx.gz").read_bytes()[:2] == b"\x1f\x8b"
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(fm.IdxError, match="not an IDX"):
        fm.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((3, 2, 2)), 2051)[:-1])
    with pytest.raises(fm.IdxError, match="data bytes"):
        fm.read_idx(tmp_path / "short")
    src = _fake_source(tmp_path / "src")
    (src / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(39), 2049)))
    with pytest.raises(fm.IdxError, match="40 images but"):
        fm.import_fashion_mnist(src, tmp_path / "out")
    (src / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.full(40, 12), 2049)))
    with pytest.raises(fm.IdxError, match="out of range"):
        fm.import_fashion_mnist(src, tmp_path / "out")
    (src / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fm.import_fashion_mnist(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before validation passed
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fm.import_fashion_mnist(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ValueError, match="splits"):
        fm.import_fashion_mnist(src, tmp_path / "out", splits=("val",))


REAL = Path(fm.DEFAULT_SOURCE)


@pytest.mark.skipif(not (REAL / "t10k-labels-idx1-ubyte.gz").exists() and not (REAL / "t10k-labels-idx1-ubyte").exists(),
                    reason=f"real Fashion-MNIST not installed in {REAL} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(tmp_path):
    images, labels = fm.load_split(REAL, "test")
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    train_labels = fm.read_idx(fm.find_idx(REAL, "train-labels-idx1-ubyte"))
    assert train_labels.shape == (60_000,) and np.bincount(train_labels).tolist() == [6000] * 10
    stats = fm.import_fashion_mnist(REAL, tmp_path / "fm", shots_per_class=2, limit=50, seed=0)
    assert stats["splits"]["train"]["samples"] == 20 and stats["splits"]["test"]["samples"] == 50
    assert stats["splits"]["train"]["source_samples"] == 60_000 and stats["splits"]["test"]["source_samples"] == 10_000
    s = _read(tmp_path / "fm" / "test")[0]
    assert s.key == "00000" and s.meta["category"] == "Ankle boot" and s.caption == "a photo of a Ankle boot"
