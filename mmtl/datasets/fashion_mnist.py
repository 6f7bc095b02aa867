"""Import Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; MIT licence) from its IDX files into WebDataset shards.

Source: a folder with the four IDX files, gzipped or raw, under their original names
(``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
``t10k-labels-idx1-ubyte[.gz]``; a ``.`` in place of the last ``-`` as some mirrors spell it is also found).
Debian/Ubuntu ship them in the ``dataset-fashion-mnist`` package at :data:`DEFAULT_SOURCE`.

IDX format (LeCun's MNIST page): a big-endian header ``0x00 0x00 <type> <ndim>`` (images: magic 2051 =
``0x00000803``, unsigned bytes, 3 dims; labels: magic 2049 = ``0x00000801``, 1 dim), then ``ndim`` big-endian
uint32 sizes, then the row-major data. Gzip is detected by content, not by file name.

Output layout: ``<out>/train/fashion-mnist-train-NNNNNN.tar``, ``<out>/test/fashion-mnist-test-NNNNNN.tar``,
``<out>/classes.txt`` (the 10 class names in label order, one a line: ``mmtl eval --classes``),
``<out>/templates.txt`` (``a photo of a {}.``) and ``<out>/stats.json``. Each sample: ``{key}.png`` (the
28x28 image, 8-bit grayscale PNG, unchanged pixels), ``{key}.txt`` (caption ``"a photo of a {class name}"``),
``{key}.json`` (``label`` index, ``category`` class name, ``index`` in the source file, ``split``). Keys are
the zero-padded index in the source file, so a sample points back at its IDX record.

Subsets: ``shots_per_class`` keeps that many train images of each class, drawn with
``numpy.random.default_rng(seed)`` per class (the test split is never subsampled this way); ``limit`` then
keeps the first ``limit`` samples (in source order) of every split. Same inputs -> byte-identical shards.
"""
from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mmtl.data.shardwriter import ShardWriter, remove_stale_shards

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files."""

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
"""Class names in label order (index = label), as in the dataset's README."""

CAPTION = "a photo of a {}"
TEMPLATES = ("a photo of a {}.",)
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049

_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IdxError(ValueError):
    """An IDX file is malformed or does not match its partner file."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or raw, detected by content) into an array of its declared type and shape.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IdxError: bad magic, unknown type code, or data shorter/longer than the header says.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise IdxError(f"{path}: corrupt gzip: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxError(f"{path}: not an IDX file (starts {raw[:4]!r}; expected 00 00 <type> <ndim>)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise IdxError(f"{path}: unknown IDX type code 0x{code:02x}")
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise IdxError(f"{path}: header cut short ({ndim} dims declared)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dt = _IDX_DTYPES[code]
    need = int(np.prod(dims)) * dt.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != need:
        raise IdxError(f"{path}: header says {dims} x {dt.itemsize} bytes = {need} data bytes, file has {body}")
    return np.frombuffer(raw, dtype=dt, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path: str | Path, arr: np.ndarray, compress: Optional[bool] = None) -> Path:
    """Write ``arr`` (uint8) as an IDX file; gzip it when ``compress`` (default: name ends in ``.gz``)."""
    path = Path(path)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    data = head + arr.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def find_idx(src: Path, stem: str) -> Path:
    """The file for ``stem`` in ``src``: ``stem``, ``stem.gz``, or the ``-idx``->``.idx`` spellings.

    Raises FileNotFoundError naming every name tried.
    """
    dotted = stem.replace("-idx", ".idx")
    tried = [stem, stem + ".gz", dotted, dotted + ".gz"]
    for name in tried:
        if (src / name).is_file():
            return src / name
    raise FileNotFoundError(f"no {stem}[.gz] in {src} (tried {', '.join(tried)}); on Debian/Ubuntu "
                            f"`apt-get install dataset-fashion-mnist` installs them in {DEFAULT_SOURCE}")


def load_split(src: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, H, W) uint8, labels (N,) int64)`` of ``split`` ("train" or "test") from ``src``.

    Raises FileNotFoundError / IdxError (wrong magic, count mismatch, label out of range).
    """
    src = Path(src)
    img_path, lab_path = (find_idx(src, s) for s in SPLIT_FILES[split])
    images, labels = read_idx(img_path), read_idx(lab_path)
    for p, arr, magic, ndim in ((img_path, images, IMAGE_MAGIC, 3), (lab_path, labels, LABEL_MAGIC, 1)):
        if arr.dtype != np.uint8 or arr.ndim != ndim:
            raise IdxError(f"{p}: expected magic {magic} (unsigned bytes, {ndim} dims), got {arr.dtype} "
                           f"with shape {arr.shape}")
    if len(images) != len(labels):
        raise IdxError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise IdxError(f"{lab_path}: label {int(labels.max())} out of range 0..{len(CLASSES) - 1}")
    return images, labels.astype(np.int64)


def select_indices(labels: np.ndarray, shots_per_class: Optional[int], limit: Optional[int],
                   seed: int) -> np.ndarray:
    """Sorted source indices kept: ``shots_per_class`` per class (seeded draw, per class in label order;
    a class with fewer keeps all), then the first ``limit`` of those."""
    idx = np.arange(len(labels))
    if shots_per_class is not None:
        if shots_per_class < 1:
            raise ValueError(f"shots_per_class must be >= 1, got {shots_per_class}")
        rng = np.random.default_rng(seed)
        keep = []
        for c in range(len(CLASSES)):
            members = idx[labels == c]
            k = min(shots_per_class, len(members))
            keep.append(np.sort(rng.choice(members, size=k, replace=False)) if k else members[:0])
        idx = np.sort(np.concatenate(keep))
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        idx = idx[:limit]
    return idx


def png_bytes(img: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a (H, W) uint8 array (deterministic bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="PNG")  # 2-D uint8: mode "L"
    return buf.getvalue()


def import_fashion_mnist(src: str | Path = DEFAULT_SOURCE, out: str | Path = "data/fashion-mnist", *,
                         splits: Sequence[str] = ("train", "test"), limit: Optional[int] = None,
                         shots_per_class: Optional[int] = None, seed: int = 0,
                         max_samples_per_shard: int = 5_000, progress: bool = False) -> dict:
    """Write Fashion-MNIST shards under ``out`` (see the module docstring) and return the stats.

    Args:
        src: folder with the IDX files (gz or raw).
        out: output folder; ``<out>/<split>/`` gets the shards (stale shards of an earlier, larger import
            are removed).
        splits: any of "train", "test".
        limit: at most this many samples per split (first in source order, after ``shots_per_class``).
        shots_per_class: few-shot train set: this many train images per class (seeded; test untouched).
        seed: seed of the few-shot draw.
        max_samples_per_shard: shard size.
        progress: tqdm progress bar.

    Returns ``{"source", "out", "classes", "splits": {split: {"dir", "samples", "shards", "bytes",
    "source_samples", "per_class": {name: n}}}, "samples", "limit", "shots_per_class", "seed"}``
    (also written to ``<out>/stats.json``).

    Raises:
        FileNotFoundError: ``src`` or an IDX file is missing (the message names the Debian package).
        IdxError: malformed IDX data.
        ValueError: unknown split, bad ``limit`` / ``shots_per_class``.
    """
    from tqdm import tqdm

    src, out = Path(src).expanduser(), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST source folder {src} not found; on Debian/Ubuntu "
                                f"`apt-get install dataset-fashion-mnist` installs the IDX files in {DEFAULT_SOURCE}")
    bad = [s for s in splits if s not in SPLIT_FILES]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {list(SPLIT_FILES)}, got {list(splits)}")
    loaded = {s: load_split(src, s) for s in splits}  # validate everything before writing anything
    stats_splits = {}
    for split, (images, labels) in loaded.items():
        idx = select_indices(labels, shots_per_class if split == "train" else None, limit, seed)
        width = max(5, len(str(max(len(labels) - 1, 0))))
        prefix = f"fashion-mnist-{split}"
        per_class: Counter = Counter()
        with ShardWriter(out / split, prefix, max_samples_per_shard=max_samples_per_shard) as w:
            for i in tqdm(idx.tolist(), disable=not progress, unit="img", desc=f"fashion-mnist {split}"):
                y = int(labels[i])
                name = CLASSES[y]
                img = images[i]
                w.write(f"{i:0{width}d}", png_bytes(img), "png", CAPTION.format(name),
                        {"label": y, "category": name, "index": i, "split": split,
                         "source": f"{SPLIT_FILES[split][0]}#{i}", "width": int(img.shape[1]),
                         "height": int(img.shape[0])})
                per_class[name] += 1
        remove_stale_shards(out / split, prefix, w.shards)
        stats_splits[split] = {"dir": split, "samples": w.samples, "bytes": w.bytes,
                               "shards": [p.relative_to(out).as_posix() for p in w.shards],
                               "source_samples": int(len(labels)),
                               "per_class": {c: per_class.get(c, 0) for c in CLASSES}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(c + "\n" for c in CLASSES), encoding="utf-8")
    (out / "templates.txt").write_text("".join(t + "\n" for t in TEMPLATES), encoding="utf-8")
    stats = {"source": str(src.resolve()), "out": str(out), "classes": list(CLASSES), "splits": stats_splits,
             "samples": sum(s["samples"] for s in stats_splits.values()), "limit": limit,
             "shots_per_class": shots_per_class, "seed": seed}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return stats
