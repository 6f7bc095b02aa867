"""Unpaired OpenMoji drawings for the self-supervised stage (issue 16, measurement 1): image-only shards of every
OpenMoji emoji that shows no test emoji of the bundled set (:mod:`mmtl.datasets.emoji`).

Source: ``openmoji@17.0.0`` (npm, CC-BY-SA-4.0), its ``data/openmoji.json`` (4,495 entries: Unicode emoji with
their skin-tone variants and OpenMoji's own extra icons) and ``color/svg/<hexcode>.svg``; each SVG is rasterised
exactly as the bundled ``openmoji_test`` split (:func:`mmtl.datasets.emoji.rasterize_svg`: ``rsvg-convert`` to
64x64 RGBA PNG, transparency kept).

Which entries are kept (:func:`select_entries`), each left-out entry counted under its reason:

* ``test_emoji``: the entry is a test emoji (code points with FE0F removed equal a test key);
* ``test_skin_tone_variant``: equal to a test emoji once FE0F and the skin-tone modifiers U+1F3FB-1F3FF are
  removed from both (e.g. ``1F44B-1F3FB`` when ``1F44B`` is a test emoji);
* ``test_gender_variant``: equal to a test emoji once, in addition, ZWJ gender signs (``200D 2640`` /
  ``200D 2642``) are dropped and a leading man / woman / person (``1F468`` / ``1F469`` / ``1F9D1``) of a ZWJ
  sequence is read as "person" (e.g. ``1F46E-200D-2642-FE0F`` "man police officer" when ``1F46E`` is a test
  emoji, or ``1F469-200D-1F33E`` "woman farmer" when ``1F9D1-200D-1F33E`` is): the same drawing but for a detail;
* ``skin_tone_variant``: a skin-tone variant of a kept emoji (not a leak: left out by default so that the
  ~1,700 recoloured copies of people drawings do not dominate the set; ``skin_tones=True`` keeps them);
* ``no_svg``: no colour SVG in the package.

A leak rule wins over train membership: an OpenMoji drawing of a *train* emoji that is a gender variant of a test
emoji is left out. Kept entries are labelled by where their base emoji is in the bundled set (``train``, ``val``,
or ``none``: an OpenMoji emoji that is in no split, e.g. its extra icons ``E000``...). Not left out: ZWJ
sequences that merely *contain* a test emoji as one component (e.g. "heart on fire" when "fire" is a test
emoji; they are other emoji).

With ``add_noto`` (e.g. ``("train",)``) the Noto images of those bundled splits are added as image-only samples
(key ``noto-<code point>``, captions not copied), and all samples are written in one seeded random order so that
every stretch of the stream (a training batch) mixes both styles; never the test split (ValueError).

Output (:func:`build_openmoji_unpaired`): ``<out>/openmoji-unpaired-*.tar`` (image-only samples: ``{key}.png`` +
``{key}.json``, no caption), ``stats.json`` (counts kept per base split, left out per reason, package version,
rsvg-convert version) and ``NOTICE``. Keys: lowercase hexcode (``1f44b``, ``e000``).
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

SKIN_TONES = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
PERSONS = frozenset({"1F468", "1F469", "1F9D1"})
GENDER_SIGNS = frozenset({"2640", "2642"})
REASONS = ("test_emoji", "test_skin_tone_variant", "test_gender_variant", "skin_tone_variant", "no_svg")

NOTICE = """\
mmtl unpaired OpenMoji drawings (mmtl datasets openmoji-unpaired)
================================================================

Rasterised (rsvg-convert, 64x64 RGBA PNG) from the colour SVGs of the npm package openmoji@{om}.
OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0
(https://creativecommons.org/licenses/by-sa/4.0/). Attribution: "All emojis designed by OpenMoji - the
open-source emoji and icon project. License: CC BY-SA 4.0" (https://openmoji.org). The per-emoji author is
stored in each sample's json ("author"). These rasterised images are an adaptation and are shared under the
same licence (CC BY-SA 4.0).
"""


def _parts(code: str) -> list[str]:
    return [p for p in code.strip().upper().split("-") if p and p != "FE0F"]


def strip_skin_tones(code: str) -> str:
    """Code points, '-' joined and uppercase, without FE0F and the skin-tone modifiers U+1F3FB-1F3FF
    (``"1f44b-1f3fb"`` -> ``"1F44B"``)."""
    return "-".join(p for p in _parts(code) if p not in SKIN_TONES)


def strip_gender(code: str) -> str:
    """:func:`strip_skin_tones`, then ZWJ gender signs removed (``200D 2640``, ``200D 2642``) and a leading man /
    woman / person (1F468 / 1F469 / 1F9D1) of a ZWJ sequence written ``P``: ``"1F46E-200D-2642-FE0F"`` ->
    ``"1F46E"``, ``"1F469-200D-1F33E"`` -> ``"P-200D-1F33E"``."""
    parts = strip_skin_tones(code).split("-")
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] == "200D" and i + 1 < len(parts) and parts[i + 1] in GENDER_SIGNS:
            i += 2
            continue
        out.append(parts[i])
        i += 1
    if len(out) > 1 and out[0] in PERSONS and out[1] == "200D":
        out[0] = "P"
    return "-".join(out)


def select_entries(entries: Iterable[dict], test_keys: Iterable[str], split_of: Optional[dict[str, str]] = None,
                   skin_tones: bool = False) -> tuple[list[dict], Counter]:
    """Choose the OpenMoji entries that show no test emoji (module docstring).

    Args:
        entries: ``data/openmoji.json`` entries (``hexcode`` needed; ``skintone`` / ``skintone_base_hexcode``
            used when present; an entry with ``has_svg`` False is counted as ``no_svg``).
        test_keys: code points of the test emoji (any case, with or without FE0F).
        split_of: ``{normalised code (FE0F removed): "train" | "val"}`` of the other bundled emoji, to label the
            kept entries (``split`` field: that split, or ``"none"``).
        skin_tones: keep skin-tone variants of kept emoji (default: left out, counted as ``skin_tone_variant``).

    Returns ``(kept entries, each a copy with "split" added, in input order; Counter of left-out reasons)``.
    """
    test = list(test_keys)
    exact = {"-".join(_parts(k)) for k in test}
    tones = {strip_skin_tones(k) for k in test}
    gender = {strip_gender(k) for k in test}
    split_of = {"-".join(_parts(k)): v for k, v in (split_of or {}).items()}
    kept, left = [], Counter()
    for e in entries:
        code = e["hexcode"]
        if "-".join(_parts(code)) in exact:
            reason = "test_emoji"
        elif strip_skin_tones(code) in tones:
            reason = "test_skin_tone_variant"
        elif strip_gender(code) in gender:
            reason = "test_gender_variant"
        elif not skin_tones and (e.get("skintone") or set(_parts(code)) & SKIN_TONES):
            reason = "skin_tone_variant"
        elif e.get("has_svg") is False:
            reason = "no_svg"
        else:
            kept.append({**e, "split": split_of.get("-".join(_parts(code)), "none")})
            continue
        left[reason] += 1
    return kept, left


def shard_keys(split_dir: str | Path) -> list[str]:
    """Sample keys (code points, e.g. ``"1f614"``) of the shards in one bundled split folder.

    Raises:
        FileNotFoundError: the folder has no ``*.tar`` shard.
    """
    shards = sorted(Path(split_dir).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{split_dir}: no .tar shards")
    keys = set()
    for s in shards:
        with tarfile.open(s) as tf:
            keys.update(m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile())
    return sorted(keys)


def _shard_images(split_dir: Path) -> list[tuple[str, bytes]]:
    """``(key, png bytes)`` of every sample of a bundled split's shards, in tar order."""
    out = []
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            out += [(m.name[:-4], tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".png")]
    return out


def build_openmoji_unpaired(out_dir: str | Path, npm_dir: Optional[str | Path] = None,
                            emoji_dir: Optional[str | Path] = None, skin_tones: bool = False,
                            progress: bool = True, add_noto: tuple[str, ...] = (), seed: int = 0) -> dict:
    """Write the unpaired OpenMoji image shards (module docstring) to ``out_dir`` and return the stats.

    Args:
        out_dir: output folder (``openmoji-unpaired-*.tar``, ``stats.json``, ``NOTICE``; stale shards removed).
        npm_dir: a folder holding (or being) ``node_modules`` with ``openmoji``; None: ``npm install`` the pinned
            packages into a temporary folder (needs npm and registry access).
        emoji_dir: the emoji data set whose ``test`` split must not be seen (default: the bundled one); its
            ``train`` / ``val`` keys label the kept entries.
        skin_tones: keep skin-tone variants of kept emoji.
        progress: tqdm progress bar.
        add_noto: bundled splits (``"train"``, ``"val"``) whose Noto images are added (module docstring).
        seed: seed of the sample order when ``add_noto`` is given (else: openmoji.json order).

    Returns the stats written to ``stats.json``: ``samples``, ``kept_by_split``, ``left_out`` (per reason),
    ``openmoji_entries``, ``test_emoji``, package version, ``rsvg_convert`` version, ``image_size``.

    Raises:
        RuntimeError: npm or rsvg-convert missing or failing. FileNotFoundError: no openmoji package / shards.
        ValueError: ``add_noto`` names a split other than train / val.
    """
    bad = sorted(set(add_noto) - {"train", "val"})
    if bad:
        raise ValueError(f"add_noto={bad}: only the train and val Noto images may be added (never test)")
    import tempfile

    from mmtl.data.shardwriter import ShardWriter, remove_stale_shards
    from mmtl.datasets import emoji as em

    if npm_dir is None:
        with tempfile.TemporaryDirectory(prefix="mmtl-openmoji-npm-") as tmp:
            return build_openmoji_unpaired(out_dir, em.npm_install(tmp), emoji_dir, skin_tones, progress, add_noto,
                                           seed)
    from tqdm import tqdm

    nm = Path(npm_dir)
    nm = nm / "node_modules" if (nm / "node_modules" / "openmoji").is_dir() else nm
    om = nm / "openmoji"
    if not (om / "data" / "openmoji.json").is_file():
        raise FileNotFoundError(f"{npm_dir}: no openmoji package (node_modules/openmoji/data/openmoji.json)")
    version = json.loads((om / "package.json").read_text(encoding="utf-8"))["version"]
    root = Path(emoji_dir) if emoji_dir else em.bundled_dir()
    test_keys = shard_keys(root / "test")
    split_of = {k: s for s in ("train", "val") for k in shard_keys(root / s)}
    entries = json.loads((om / "data" / "openmoji.json").read_text(encoding="utf-8"))
    for e in entries:
        e["has_svg"] = (om / "color" / "svg" / f"{e['hexcode']}.svg").is_file()
    kept, left = select_entries(entries, test_keys, split_of, skin_tones)
    noto = [(split, key, data) for split in add_noto for key, data in _shard_images(root / split)]
    order = [("openmoji", e) for e in kept] + [("noto", n) for n in noto]
    if noto:
        import random

        random.Random(seed).shuffle(order)
    out = Path(out_dir)
    prefix = "openmoji-unpaired"
    with ShardWriter(out, prefix) as w:
        for kind, e in tqdm(order, disable=not progress, desc="openmoji unpaired", unit="img"):
            if kind == "noto":
                split, key, data = e
                w.write(f"noto-{key}", data, "png", None, {"split": split, "style": "noto",
                                                            "source": f"{root.name}/{split}/{key}.png"})
                continue
            svg = om / "color" / "svg" / f"{e['hexcode']}.svg"
            meta = {"hexcode": e["hexcode"], "annotation": e.get("annotation", ""), "group": e.get("group", ""),
                    "split": e["split"], "style": "openmoji", "width": em.IMAGE_SIZE, "height": em.IMAGE_SIZE,
                    "source": f"openmoji@{version}:color/svg/{svg.name}",
                    "licence": "CC-BY-SA-4.0 (OpenMoji, https://openmoji.org)", "author": e.get("openmoji_author") or ""}
            w.write(e["hexcode"].lower(), em.rasterize_svg(svg), "png", None, meta)
    remove_stale_shards(out, prefix, w.shards)
    stats = {
        "dataset": "openmoji-unpaired", "packages": {"openmoji": version}, "rsvg_convert": em._rsvg_version(),
        "image_size": em.IMAGE_SIZE, "openmoji_entries": len(entries), "test_emoji": len(test_keys),
        "emoji_dir": str(root), "skin_tones": skin_tones, "samples": w.samples, "bytes": w.bytes,
        "kept_by_split": dict(sorted(Counter(e["split"] for e in kept).items())),
        "noto_added": {split: sum(1 for n in noto if n[0] == split) for split in add_noto}, "seed": seed,
        "left_out": {r: left.get(r, 0) for r in REASONS},
        "shards": [p.relative_to(out).as_posix() for p in w.shards],
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "NOTICE").write_text(NOTICE.format(om=version), encoding="utf-8")
    return stats
