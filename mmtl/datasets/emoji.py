"""The bundled real image-text dataset: emoji artwork with CLDR descriptions and keywords.

Sources (npm packages, versions pinned below):

- ``emoji-datasource-google``: 1,911 base emoji (its top-level ``emoji.json`` entries; skin-tone variations
  are nested and not used) as 64x64 RGBA PNG (Noto Emoji artwork, Apache-2.0), with Unicode name,
  category (10) and subcategory (99). Data MIT.
- ``openmoji``: the same emoji in another drawing style (colour SVG, CC-BY-SA-4.0) and, in
  ``data/openmoji.json``, the CLDR annotation (description) and keywords (``tags``) plus OpenMoji's own
  ``openmoji_tags``.

The two are joined on the code point sequence with FE0F (emoji presentation selector) removed on both sides.
Caption: ``"{description}: {kw1}, {kw2}, ..."`` (e.g. ``"pensive face: awful, bored, dejected, ..."``):
keywords are CLDR tags then OpenMoji tags, de-duplicated in order, without the one equal to the description.

Split by emoji: sorted by code point, ``numpy.random.RandomState(0).permutation``; the first 10 % are test,
the next 10 % val, the rest train. ``openmoji_test`` holds the OpenMoji drawings (rasterised to 64x64 RGBA
PNG by ``rsvg-convert``, transparency kept) of the test emoji under the same keys: train on Noto, test on
OpenMoji is a real domain-shift test. Keys are lowercase code points joined by '-' (``"1f614"``,
``"1f1ea-1f1ec"``).

Layout of :func:`bundled_dir` (``mmtl/assets/emoji``): ``{train,val,test,openmoji_test}/emoji-{split}-000000.tar``,
``stats.json``, ``NOTICE``. Per-locale captions (CLDR, ``mmtl datasets emoji --locales``) are sidecars
``{split}/captions.<locale>.json`` written next to the shards by :mod:`mmtl.datasets.emoji_locales` (not
bundled: generate them).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

from mmtl.data.shardwriter import ShardWriter, remove_stale_shards

EMOJI_DATASOURCE_VERSION = "16.0.0"
OPENMOJI_VERSION = "17.0.0"
NPM_PACKAGES = {"emoji-datasource-google": EMOJI_DATASOURCE_VERSION, "openmoji": OPENMOJI_VERSION}
SPLIT_SEED = 0
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
IMAGE_SIZE = 64
"""Pixels (width = height) of every image in the bundled shards."""
SPLITS = ("train", "val", "test", "openmoji_test")

NOTICE = """\
mmtl bundled emoji dataset (mmtl/assets/emoji)
=============================================

Built by mmtl.datasets.emoji.build_emoji_dataset from the npm packages
emoji-datasource-google@{eds} and openmoji@{om}.

Images in train/, val/, test/ (Noto Emoji artwork, via emoji-datasource-google):
  Copyright Google Inc., licensed under the Apache License, Version 2.0
  (https://github.com/googlefonts/noto-emoji). The emoji-datasource data (names,
  categories, subcategories) is Copyright (c) 2013 Cal Henderson, MIT licence
  (https://github.com/iamcal/emoji-data).

Images in openmoji_test/ (rasterised from OpenMoji colour SVGs):
  OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0
  (https://creativecommons.org/licenses/by-sa/4.0/). Attribution: "All emojis
  designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0"
  (https://openmoji.org). The per-emoji author is stored in each sample's json
  ("author"). These rasterised images are an adaptation and are shared under the
  same licence (CC BY-SA 4.0).

Captions (descriptions and keywords) come from the Unicode CLDR annotations as
distributed in openmoji's data/openmoji.json, plus OpenMoji's own tags:
  Unicode CLDR data, Copyright (c) 1991-present Unicode, Inc., Unicode License v3
  (https://www.unicode.org/license.txt); OpenMoji data CC BY-SA 4.0.
"""


def bundled_dir() -> Path:
    """Folder of the bundled emoji shards inside the installed package (``mmtl/assets/emoji``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "emoji"


def bundled_split(split: str) -> Path:
    """Folder of one bundled split ('train', 'val', 'test' or 'openmoji_test'); ``ValueError`` otherwise."""
    if split not in SPLITS:
        raise ValueError(f"unknown emoji split {split!r}; expected one of {SPLITS}")
    return bundled_dir() / split


def norm_code(code: str) -> str:
    """Normalise a code point sequence: uppercase hex, '-' joined, FE0F removed (``"2764-fe0f"`` -> ``"2764"``)."""
    return "-".join(p for p in code.strip().upper().split("-") if p and p != "FE0F")


def make_caption(description: str, keywords: list[str]) -> tuple[str, list[str]]:
    """``("{description}: kw1, kw2, ...", kept keywords)``: stripped, de-duplicated (case-insensitive) in order,
    without keywords equal to the description; just the description when none remain."""
    desc = description.strip()
    seen = {desc.casefold()}
    kept = []
    for kw in keywords:
        kw = kw.strip()
        if kw and kw.casefold() not in seen:
            seen.add(kw.casefold())
            kept.append(kw)
    return (f"{desc}: {', '.join(kept)}" if kept else desc), kept


def _split_tags(s: Optional[str]) -> list[str]:
    return [t for t in (s or "").split(",")]


def npm_install(dest: str | Path) -> Path:
    """``npm install`` the pinned packages into ``dest`` (``--prefix``); return its ``node_modules`` folder.

    Raises ``RuntimeError`` when npm is not on PATH or the install fails (no registry access).
    """
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH; install Node.js/npm or pass npm_dir")
    specs = [f"{name}@{ver}" for name, ver in NPM_PACKAGES.items()]
    cmd = [npm, "install", "--prefix", str(dest), "--no-audit", "--no-fund", "--ignore-scripts", *specs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return Path(dest) / "node_modules"


def _node_modules(npm_dir: str | Path) -> Path:
    d = Path(npm_dir)
    for cand in (d / "node_modules", d):
        if (cand / "emoji-datasource-google" / "emoji.json").is_file() and (cand / "openmoji" / "data").is_dir():
            return cand
    raise FileNotFoundError(f"{npm_dir}: no node_modules with emoji-datasource-google and openmoji")


def _package_version(nm: Path, name: str) -> str:
    version = json.loads((nm / name / "package.json").read_text(encoding="utf-8"))["version"]
    if version != NPM_PACKAGES[name]:
        warnings.warn(f"{name} is {version}, mmtl pins {NPM_PACKAGES[name]}: output will differ from the bundle")
    return version


def load_records(npm_dir: str | Path) -> list[dict]:
    """Joined base-emoji records sorted by code point (see module docstring).

    Each record: ``key``, ``code_point`` (emoji-datasource ``unified``), ``name``, ``category``,
    ``subcategory``, ``description``, ``keywords``, ``caption``, ``png`` (Path of the 64x64 Noto PNG),
    ``svg`` (Path of the OpenMoji colour SVG), ``openmoji_hexcode``, ``author``. Emoji with no Google image,
    no OpenMoji entry or no SVG are left out (none are with the pinned versions).
    """
    nm = _node_modules(npm_dir)
    eds = nm / "emoji-datasource-google"
    om_dir = nm / "openmoji"
    openmoji = {}
    for o in json.loads((om_dir / "data" / "openmoji.json").read_text(encoding="utf-8")):
        openmoji.setdefault(norm_code(o["hexcode"]), o)
    records = []
    for e in json.loads((eds / "emoji.json").read_text(encoding="utf-8")):
        o = openmoji.get(norm_code(e["unified"]))
        png = eds / "img" / "google" / "64" / e["image"]
        if o is None or not e.get("has_img_google") or not png.is_file():
            continue
        svg = om_dir / "color" / "svg" / f"{o['hexcode']}.svg"
        if not svg.is_file():
            continue
        caption, kws = make_caption(o["annotation"], _split_tags(o.get("tags")) + _split_tags(o.get("openmoji_tags")))
        records.append({
            "key": e["unified"].lower(), "code_point": e["unified"], "name": e["name"], "category": e["category"],
            "subcategory": e["subcategory"], "description": o["annotation"].strip(), "keywords": kws,
            "caption": caption, "png": png, "svg": svg, "openmoji_hexcode": o["hexcode"],
            "author": o.get("openmoji_author") or "",
        })
    records.sort(key=lambda r: tuple(int(p, 16) for p in r["code_point"].split("-")))
    return records


def split_keys(keys: list[str], seed: int = SPLIT_SEED) -> dict[str, str]:
    """Map each key (in the given, sorted order) to 'train', 'val' or 'test' (80/10/10, seeded permutation)."""
    import numpy as np

    n = len(keys)
    n_test, n_val = round(n * TEST_FRACTION), round(n * VAL_FRACTION)
    perm = np.random.RandomState(seed).permutation(n)
    out = {}
    for rank, i in enumerate(perm):
        out[keys[i]] = "test" if rank < n_test else ("val" if rank < n_test + n_val else "train")
    return out


def rasterize_svg(svg: str | Path, size: int = IMAGE_SIZE) -> bytes:
    """PNG bytes (``size`` x ``size`` pixels, RGBA, transparent background) of an SVG via ``rsvg-convert``.

    Raises ``RuntimeError`` when ``rsvg-convert`` is missing (Debian: ``apt-get install librsvg2-bin``)
    or fails.
    """
    exe = shutil.which("rsvg-convert")
    if exe is None:
        raise RuntimeError("rsvg-convert not found: apt-get install -y librsvg2-bin")
    r = subprocess.run([exe, "-w", str(size), "-h", str(size), "-f", "png", str(svg)], capture_output=True)
    if r.returncode != 0 or not r.stdout:
        raise RuntimeError(f"rsvg-convert failed on {svg}: {r.stderr.decode(errors='replace')[-500:]}")
    return r.stdout


def _rsvg_version() -> str:
    r = subprocess.run(["rsvg-convert", "--version"], capture_output=True, text=True)
    return r.stdout.strip()


def build_emoji_dataset(out_dir: str, npm_dir: Optional[str] = None, progress: bool = True) -> dict:
    """Build the emoji shards (see module docstring) into ``out_dir`` and return the stats dict.

    Args:
        out_dir: output folder (the bundle lives in :func:`bundled_dir`); gets ``{split}/emoji-{split}-*.tar``,
            ``stats.json`` and ``NOTICE``. Stale shards of an earlier build are removed.
        npm_dir: a folder holding (or being) ``node_modules`` with the two packages; when None the pinned
            versions are ``npm install``-ed into a temporary folder (needs npm and registry access).
        progress: show tqdm progress bars.

    Returns the stats written to ``stats.json``: per split ``samples``, ``bytes``, ``shards``, ``style``;
    ``categories`` per split; package versions; ``rsvg_convert`` version; split seed and fractions.
    The same npm packages and rsvg-convert version give byte-identical output.

    Raises:
        RuntimeError: npm or rsvg-convert missing or failing.
        FileNotFoundError: ``npm_dir`` lacks the packages.
    """
    if npm_dir is None:
        with tempfile.TemporaryDirectory(prefix="mmtl-emoji-npm-") as tmp:
            return build_emoji_dataset(out_dir, str(npm_install(tmp)), progress)
    from tqdm import tqdm

    nm = _node_modules(npm_dir)
    versions = {name: _package_version(nm, name) for name in NPM_PACKAGES}
    records = load_records(nm)
    split = split_keys([r["key"] for r in records])
    out = Path(out_dir)
    stats_splits: dict = {}
    categories: dict = {}
    for name in SPLITS:
        style = "openmoji" if name == "openmoji_test" else "noto"
        base = "test" if name == "openmoji_test" else name
        chosen = [r for r in records if split[r["key"]] == base]
        prefix = f"emoji-{name}"
        with ShardWriter(out / name, prefix) as w:
            for r in tqdm(chosen, disable=not progress, desc=f"emoji {name}", unit="img"):
                meta = {k: r[k] for k in ("code_point", "name", "category", "subcategory", "description", "keywords")}
                meta["split"] = name
                meta["style"] = style
                meta["width"] = meta["height"] = IMAGE_SIZE
                if style == "noto":
                    data = r["png"].read_bytes()
                    rel = r["png"].relative_to(nm / "emoji-datasource-google").as_posix()
                    meta["source"] = f"emoji-datasource-google@{versions['emoji-datasource-google']}:{rel}"
                    meta["licence"] = "Apache-2.0 (Noto Emoji image); MIT (emoji-datasource data)"
                else:
                    data = rasterize_svg(r["svg"])
                    rel = r["svg"].relative_to(nm / "openmoji").as_posix()
                    meta["source"] = f"openmoji@{versions['openmoji']}:{rel}"
                    meta["licence"] = "CC-BY-SA-4.0 (OpenMoji, https://openmoji.org)"
                    meta["author"] = r["author"]
                meta["text_licence"] = "Unicode-3.0 (CLDR annotations); CC-BY-SA-4.0 (OpenMoji tags)"
                w.write(r["key"], data, "png", r["caption"], meta)
        remove_stale_shards(out / name, prefix, w.shards)
        stats_splits[name] = {"dir": name, "samples": w.samples, "bytes": w.bytes, "style": style,
                              "shards": [p.relative_to(out).as_posix() for p in w.shards]}
        categories[name] = dict(sorted(Counter(r["category"] for r in chosen).items()))
    stats = {
        "dataset": "emoji", "packages": versions, "rsvg_convert": _rsvg_version(),
        "image_size": IMAGE_SIZE, "split_seed": SPLIT_SEED, "val_fraction": VAL_FRACTION,
        "test_fraction": TEST_FRACTION, "caption_format": "{description}: {keyword}, {keyword}, ...",
        "splits": stats_splits, "categories": categories,
        "samples": sum(s["samples"] for s in stats_splits.values()),
        "bytes": sum(s["bytes"] for s in stats_splits.values()),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    (out / "NOTICE").write_text(NOTICE.format(eds=versions["emoji-datasource-google"], om=versions["openmoji"]),
                                encoding="utf-8")
    return stats
