"""Per-locale captions for the bundled emoji shards, from Unicode CLDR annotations (``mmtl datasets emoji
--locales de,fr,ja,...|all``).

Sources: the npm packages ``cldr-annotations-full`` and ``cldr-annotations-derived-full`` (version pinned
below; ``annotations/<locale>/annotations.json`` and ``annotationsDerived/<locale>/annotations.json``), keyed
by the emoji string with fields ``tts`` (the name, a one-item list) and ``default`` (keywords). An entry of
the base package wins over a derived one. Joined to the shards' sample keys by code points written as
4-digit uppercase hex joined by ``-`` with FE0F dropped (``"©"`` -> ``"00A9"``, keycap ``"#️⃣"`` ->
``"0023-20E3"``; :func:`emoji_code`, the same normal form as :func:`mmtl.datasets.emoji.norm_code`).

Caption: the same format as the English one, ``"{tts}: {kw1}, {kw2}, ..."`` (:func:`make_caption`).

Output (sidecars, the shards are not rebuilt): for each split folder of the dataset (``train``, ``val``,
``test``, ``openmoji_test``), ``captions.<locale>.json`` = ``{"locale", "source", "captions": {sample key:
caption}, "missing": [sample keys]}`` for the keys found in that split's shards, so the emoji split is the
bundled one by construction. An emoji without a CLDR name in a locale is listed in ``missing`` and counted,
never filled with English. ``locales.json`` at the top sums captions and missing per locale and split.
``en`` is not a CLDR sidecar: English is the shards' own caption. Reading: :mod:`mmtl.data.locales`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from mmtl.data.locales import ENGLISH, SIDECAR, shard_keys
from mmtl.datasets.emoji import SPLITS, make_caption

CLDR_VERSION = "48.2.0"
CLDR_PACKAGES = {"cldr-annotations-full": "annotations", "cldr-annotations-derived-full": "annotationsDerived"}
CLDR_NOTICE = """
Per-locale captions (<split>/captions.<locale>.json), from the npm packages
cldr-annotations-full@{v} and cldr-annotations-derived-full@{v}:
  Unicode CLDR data, Copyright (c) 2004-present Unicode, Inc., Unicode License v3
  (https://www.unicode.org/license.txt), reproduced below.

{licence}
"""


def emoji_code(emoji: str) -> str:
    """Emoji string -> ``"1F468-200D-1F469"``: each code point as at least 4 uppercase hex digits, FE0F dropped."""
    return "-".join(f"{ord(c):04X}" for c in emoji if ord(c) != 0xFE0F)


def key_code(key: str) -> str:
    """Sample key (``"0023-fe0f-20e3"``) -> the :func:`emoji_code` normal form (``"0023-20E3"``)."""
    return "-".join(p for p in key.upper().split("-") if p and p != "FE0F")


def npm_pack_cldr(dest: str | Path) -> Path:
    """``npm pack`` the two pinned CLDR packages into ``dest`` and unpack them; returns ``dest``.

    Raises:
        RuntimeError: npm missing or failing (no registry access).
    """
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH; install Node.js/npm or pass --cldr-dir")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [npm, "pack", "--pack-destination", str(dest), *[f"{p}@{CLDR_VERSION}" for p in CLDR_PACKAGES]]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    for name in CLDR_PACKAGES:
        with tarfile.open(dest / f"{name}-{CLDR_VERSION}.tgz") as tf:
            tf.extractall(dest / "tmp", filter="data")
        (dest / "tmp" / "package").rename(dest / name)
    return dest


def _package_dir(cldr_dir: Path, name: str) -> Path:
    for cand in (cldr_dir / name, cldr_dir / f"{name}-{CLDR_VERSION}", cldr_dir / "node_modules" / name):
        if (cand / CLDR_PACKAGES[name]).is_dir():
            return cand
    raise FileNotFoundError(f"{cldr_dir}: no unpacked {name} (expected {name}/{CLDR_PACKAGES[name]}/<locale>/)")


def available_locales(cldr_dir: str | Path) -> list[str]:
    """Locale codes of the base package (sorted), without ``en`` (English is the shards' own caption)."""
    base = _package_dir(Path(cldr_dir), "cldr-annotations-full") / "annotations"
    return sorted(p.name for p in base.iterdir() if (p / "annotations.json").is_file() and p.name != ENGLISH)


def parse_locales(spec: str, available: list[str]) -> list[str]:
    """``"de,fr,ja"`` or ``"all"`` -> locale list. Raises ValueError naming the unknown codes and the available ones."""
    if spec.strip() == "all":
        return list(available)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in available]
    if unknown or not wanted:
        raise ValueError(f"unknown locale(s) {', '.join(unknown) or '(none given)'}; available ({len(available)}): "
                         f"{', '.join(available)}")
    return list(dict.fromkeys(wanted))


def locale_annotations(cldr_dir: str | Path, locale: str) -> dict[str, tuple[str, list[str]]]:
    """``{emoji_code: (name, keywords)}`` of one locale: base entries, then derived ones for codes not yet seen.
    Entries without a ``tts`` name are skipped (keywords alone are not a caption)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for name, top in CLDR_PACKAGES.items():
        f = _package_dir(Path(cldr_dir), name) / top / locale / "annotations.json"
        if not f.is_file():
            continue
        for emoji, v in json.loads(f.read_text(encoding="utf-8"))[top].get("annotations", {}).items():
            tts = [t for t in v.get("tts", []) if t.strip()]
            if tts:
                out.setdefault(emoji_code(emoji), (tts[0].strip(), list(v.get("default", []))))
    return out


def write_locale_captions(out_dir: str | Path, locales: str, cldr_dir: str | Path | None = None) -> dict:
    """Write ``<split>/captions.<locale>.json`` for every split folder of ``out_dir`` and ``locales.json``
    (module docstring); append the CLDR licence to ``NOTICE``. Returns the ``locales.json`` dict.

    Args:
        out_dir: a built emoji dataset (``train/``, ``val/``, ``test/``, ``openmoji_test/`` shards).
        locales: ``"de,fr,ja"`` or ``"all"``.
        cldr_dir: a folder with the two packages unpacked (as ``npm pack`` + untar, or ``node_modules``);
            None: ``npm pack`` them into a temporary folder (needs the npm registry).
    Raises:
        ValueError: unknown locale code (the message lists the available ones).
        FileNotFoundError: no split shards in ``out_dir`` or the packages missing in ``cldr_dir``.
    """
    if cldr_dir is None:
        with tempfile.TemporaryDirectory(prefix="mmtl-cldr-") as tmp:
            return write_locale_captions(out_dir, locales, npm_pack_cldr(tmp))
    out, cldr = Path(out_dir), Path(cldr_dir)
    chosen = parse_locales(locales, available_locales(cldr))
    splits = {s: sorted({k for t in sorted((out / s).glob("*.tar")) for k in shard_keys(t)})
              for s in SPLITS if (out / s).is_dir()}
    if not any(splits.values()):
        raise FileNotFoundError(f"{out}: no shards in {', '.join(SPLITS)}")
    source = " + ".join(f"{p}@{CLDR_VERSION}" for p in CLDR_PACKAGES)
    summary: dict = {"source": source, "caption_format": "{tts}: {keyword}, {keyword}, ...", "locales": {}}
    for loc in chosen:
        ann = locale_annotations(cldr, loc)
        summary["locales"][loc] = {}
        for split, keys in splits.items():
            caps, missing = {}, []
            for k in keys:
                hit = ann.get(key_code(k))
                if hit is None:
                    missing.append(k)
                else:
                    caps[k] = make_caption(*hit)[0]
            body = {"locale": loc, "source": source, "captions": caps, "missing": missing}
            (out / split / SIDECAR.format(locale=loc)).write_text(
                json.dumps(body, ensure_ascii=False, indent=0, sort_keys=True) + "\n", encoding="utf-8")
            summary["locales"][loc][split] = {"captions": len(caps), "missing": len(missing)}
    old = json.loads((out / "locales.json").read_text(encoding="utf-8")) if (out / "locales.json").is_file() else {}
    summary["locales"] = dict(sorted({**old.get("locales", {}), **summary["locales"]}.items()))
    (out / "locales.json").write_text(json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    notice = out / "NOTICE"
    text = notice.read_text(encoding="utf-8") if notice.is_file() else ""
    if "cldr-annotations-full@" not in text:
        licence = (_package_dir(cldr, "cldr-annotations-full") / "LICENSE").read_text(encoding="utf-8")
        notice.write_text(text + CLDR_NOTICE.format(v=CLDR_VERSION, licence=licence.strip()), encoding="utf-8")
    return summary
