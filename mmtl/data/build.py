"""Build WebDataset shards (img2dataset layout) from a folder of image/caption pairs or a table, or unpaired
image-only / text-only shards (``modality``) from a folder of images or a text file / table column.

:func:`build_shards` turns a folder of images with same-stem ``.txt`` captions, or a ``.csv`` / ``.tsv`` /
``.parquet`` table, into shards written by :class:`~mmtl.data.shardwriter.ShardWriter` (re-exported here),
into ``train/`` (and ``val/``, ``test/`` when asked), and writes ``stats.json``. Same input -> byte-identical
shards and stats.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

from mmtl.data.shardwriter import (IMAGE_EXTS, ShardWriter, prepare_image, remove_stale_shards,
                                   sniff_image_format)

__all__ = ["EmptySourceError", "IMAGE_EXTS", "SOURCE_IMAGE_SUFFIXES", "ShardWriter", "build_shards", "prepare_image",
           "remove_stale_shards", "sniff_image_format", "split_of"]

SOURCE_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""File suffixes (case-insensitive) that a source folder's images may have."""




class EmptySourceError(ValueError):
    """A shard source holds no usable image-caption pair; the message names the source and the skip counts."""


# ----------------------------------------------------------------------------------------------- sources


def _read_caption(path: Path) -> str:
    return path.read_text(encoding="utf-8-sig").strip()


def _folder_items(root: Path, skipped: Counter, modality: str = "pair") -> list[tuple[str, Path, Optional[str]]]:
    """(relative source path, image path, caption or None) for each image with a same-stem .txt; with
    ``modality="image"`` for every image (no caption read: ``""``)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in SOURCE_IMAGE_SUFFIXES]
    if modality == "image":
        return [(p.relative_to(root).as_posix(), p, "") for p in images]
    stems = {p.with_suffix("") for p in images}
    for p in files:
        if p.suffix.lower() == ".txt" and p.with_suffix("") not in stems:
            skipped["no_image"] += 1
    items = []
    for p in images:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            skipped["no_caption"] += 1
            continue
        items.append((p.relative_to(root).as_posix(), p, None))
    return items


def _table_items(path: Path, image_col: str, caption_col: Optional[str]) -> list[tuple[str, Path, Optional[str]]]:
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    for col in (image_col, caption_col):
        if col is not None and col not in df.columns:
            raise ValueError(f"column {col!r} not found in {path}; available columns: {list(map(str, df.columns))}")
    items = []
    caps = df[caption_col].tolist() if caption_col is not None else [""] * len(df)
    for img, cap in zip(df[image_col].tolist(), caps):
        img = "" if img is None or (isinstance(img, float) and img != img) else str(img)
        cap = "" if cap is None or (isinstance(cap, float) and cap != cap) else str(cap)
        p = Path(img) if os.path.isabs(img) else path.parent / img
        items.append((img, p, cap.strip()))
    return items


def _text_items(path: Path, text_col: str) -> list[tuple[str, Optional[Path], str]]:
    """Text-only items: one per line of a ``.txt`` file (blank lines skipped, counted later as empty), or one
    per row of the ``text_col`` column of a table. The source id is ``<file name>:<line or row number>``."""
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        return [(f"{path.name}:{i + 1}", None, ln.strip()) for i, ln in enumerate(lines)]
    import pandas as pd

    suffix = path.suffix.lower()
    df = (pd.read_parquet(path) if suffix == ".parquet"
          else pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False))
    if text_col not in df.columns:
        raise ValueError(f"column {text_col!r} not found in {path}; available columns: {list(map(str, df.columns))}")
    return [(f"{path.name}:{i + 1}", None, "" if v is None or (isinstance(v, float) and v != v) else str(v).strip())
            for i, v in enumerate(df[text_col].tolist())]


def split_of(source: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """'train', 'val' or 'test' from a seeded SHA-256 hash of ``source`` (stable across runs and machines)."""
    h = hashlib.sha256(f"{seed}\0{source}".encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _iter_samples(items, skipped: Counter, modality: str = "pair"
                  ) -> Iterator[tuple[int, str, Optional[bytes], Optional[str], int, int, str, Optional[str]]]:
    for idx, (source, path, caption) in enumerate(items):
        if modality == "text":
            if not caption:
                skipped["empty_text"] += 1
                continue
            yield idx, source, None, None, 0, 0, "", caption
            continue
        if caption is None:
            try:
                caption = _read_caption(path.with_suffix(".txt"))
            except (OSError, UnicodeDecodeError):
                skipped["bad_caption"] += 1
                continue
        if not caption and modality == "pair":
            skipped["empty_caption"] += 1
            continue
        if not source or not path.is_file():
            skipped["missing_image"] += 1
            continue
        try:
            data, ext, w, h, orig = prepare_image(path.read_bytes())
        except (OSError, ValueError):
            skipped["unreadable_image"] += 1
            continue
        yield idx, source, data, ext, w, h, orig, (None if modality == "image" else caption)


def build_shards(src: str, out_dir: str, *, image_col: str = "image", caption_col: str = "caption",
                 prefix: str = "shard", max_samples_per_shard: int = 10_000, max_bytes_per_shard: int = 1 << 30,
                 val_fraction: float = 0.0, test_fraction: float = 0.0, seed: int = 0,
                 progress: bool = True, modality: str = "pair") -> dict:
    """Build WebDataset shards from a folder or a table and write ``out_dir/stats.json``.

    Args:
        src: a folder (images found recursively, each paired with the same-stem ``.txt`` caption; sorted by
            path), or a ``.csv``/``.tsv``/``.parquet`` table with an image-path column (relative to the
            table's folder, or absolute) and a caption column (rows kept in table order).
        out_dir: output folder. The shards go into ``out_dir/train`` (what ``data.train`` of a pipeline points
            at), and with ``val_fraction`` / ``test_fraction`` > 0 also ``out_dir/val`` and ``out_dir/test``.
            Stale ``{prefix}-NNNNNN.tar`` files left there by an earlier, larger build are removed.
        image_col, caption_col: table column names.
        prefix, max_samples_per_shard, max_bytes_per_shard: see :class:`ShardWriter`.
        val_fraction, test_fraction: fractions in [0, 1) of samples (by seeded hash of the source path, so a
            sample keeps its split when others are added) sent to val / test.
        seed: seed of the split hash.
        progress: show a tqdm progress bar.
        modality: ``"pair"`` (image-text pairs, above), ``"image"`` (unpaired images: every image of the folder
            or table, no caption needed or written) or ``"text"`` (unpaired texts: ``src`` is a ``.txt`` file,
            one text per line, or a table whose ``caption_col`` column holds the texts; no image).

    Keys are the zero-padded index (9 digits) of the item in the sorted folder listing / table row order,
    so a key points back at its source even when earlier items were skipped. Skipped items are counted by
    reason: ``no_caption``, ``no_image`` (folder: a caption without an image), ``empty_caption``,
    ``bad_caption`` (unreadable/non-UTF-8 .txt), ``missing_image``, ``unreadable_image``, ``empty_text``
    (text-only). Unpaired builds count ``duplicates`` (samples whose image bytes / text repeat an earlier one)
    and add a ``warnings`` line when every sample is a copy of one.

    Returns the stats dict (also written as JSON): ``source``, ``source_kind``, ``splits`` (per split:
    ``dir``, ``samples``, ``shards`` (paths relative to out_dir), ``bytes``), ``samples``, ``shards``,
    ``bytes`` (totals), ``skipped``, ``image_formats`` (original formats), ``seed`` and the fractions.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: unsupported ``src`` type, missing column (naming the available ones), bad fractions.
        EmptySourceError: no usable image-caption pair in ``src`` (nothing found, or every item skipped; the
            message gives the skip counts). No ``stats.json`` is written then.
    """
    from tqdm import tqdm

    src_path = Path(src).expanduser().resolve()
    out = Path(out_dir)
    if not src_path.exists():
        raise FileNotFoundError(f"source not found: {src}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("need 0 <= val_fraction, test_fraction and their sum < 1; "
                         f"got val_fraction={val_fraction}, test_fraction={test_fraction}")
    from mmtl.data.samples import MODALITIES

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    skipped: Counter = Counter()
    if modality == "text":
        if src_path.is_dir() or src_path.suffix.lower() not in (".txt", ".csv", ".tsv", ".parquet"):
            raise ValueError(f"unsupported source {src} for text-only shards: expected a .txt file (one text per "
                             "line) or a .csv, .tsv or .parquet table (texts in --caption-col)")
        kind = src_path.suffix.lower()[1:]
        items = _text_items(src_path, caption_col)
    elif src_path.is_dir():
        kind = "folder"
        items = _folder_items(src_path, skipped, modality)
    elif src_path.suffix.lower() in (".csv", ".tsv", ".parquet"):
        kind = src_path.suffix.lower()[1:]
        items = _table_items(src_path, image_col, None if modality == "image" else caption_col)
    else:
        raise ValueError(f"unsupported source {src}: expected a folder or a .csv, .tsv or .parquet file")

    if not items:
        what = (f"no images ({', '.join(SOURCE_IMAGE_SUFFIXES)}) with a same-stem .txt caption"
                if kind == "folder" else "no rows")
        raise EmptySourceError(f"{src}: {what} found" + (f" (skipped: {dict(skipped)})" if skipped else ""))
    split = val_fraction > 0 or test_fraction > 0
    names = ("train", "val", "test") if split else ("train",)
    dirs = {n: out / n for n in names}
    writers = {n: ShardWriter(dirs[n], prefix, max_samples_per_shard=max_samples_per_shard,
                              max_bytes_per_shard=max_bytes_per_shard) for n in names}
    width = max(9, len(str(max(len(items) - 1, 0))))
    formats: Counter = Counter()
    seen: set = set()
    duplicates = 0
    try:
        bar = tqdm(_iter_samples(items, skipped, modality), total=len(items), disable=not progress, unit="sample",
                   desc=f"shards {out}")
        for idx, source, data, ext, w, h, orig, caption in bar:
            name = split_of(source, seed, val_fraction, test_fraction) if split else "train"
            meta = {"source": source} if data is None else {"source": source, "width": w, "height": h}
            if data is not None and orig != ext:
                meta["original_format"] = orig
            if modality != "pair":
                digest = hashlib.sha256(data if data is not None else caption.encode("utf-8")).digest()
                duplicates += digest in seen
                seen.add(digest)
            writers[name].write(f"{idx:0{width}d}", data, ext, caption, meta)
            if data is not None:
                formats[orig] += 1
    finally:
        for wr in writers.values():
            wr.close()

    for n, wr in writers.items():
        remove_stale_shards(dirs[n], prefix, wr.shards)
    splits = {}
    for n, wr in writers.items():
        splits[n] = {"dir": n, "samples": wr.samples, "bytes": wr.bytes,
                     "shards": [p.relative_to(out).as_posix() for p in wr.shards]}
    stats = {
        "source": str(src_path), "source_kind": kind, "splits": splits,
        "samples": sum(s["samples"] for s in splits.values()),
        "shards": sum(len(s["shards"]) for s in splits.values()),
        "bytes": sum(s["bytes"] for s in splits.values()),
        "skipped": dict(sorted(skipped.items())), "image_formats": dict(sorted(formats.items())),
        "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction, "modality": modality,
    }
    if modality != "pair":
        stats["duplicates"] = duplicates
        if stats["samples"] > 1 and len(seen) == 1:
            stats["warnings"] = [f"all {stats['samples']} samples are copies of one {modality}: a self-supervised "
                                 "stage learns nothing from them"]
    if stats["samples"] == 0:
        raise EmptySourceError(f"{src}: no sample written: all {len(items)} items were skipped "
                               f"({dict(sorted(skipped.items()))})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return stats
