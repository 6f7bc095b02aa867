"""Per-locale emoji captions from CLDR (``mmtl datasets emoji --locales``) and their reader
(:mod:`mmtl.data.locales`): a hand-made CLDR folder and two tiny shards, no npm."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmtl.data.locales import LocaleMix, load_locale, resolve_locales, shard_keys
from mmtl.datasets.emoji_locales import (
    emoji_code,
    key_code,
    parse_locales,
    write_locale_captions,
)

KEYS = {"train": ["1f600", "00a9", "0023-fe0f-20e3"], "test": ["2764-fe0f", "1f1ef-1f1f5"]}


def _cldr(root: Path) -> Path:
    """cldr-annotations-full / -derived-full with de, ja (RTL: he) entries; ja lacks the flag, he lacks © ."""
    base = {
        "de": {"😀": ("grinsendes Gesicht", ["Gesicht", "grinsen"]), "©": ("Copyright", ["C"]),
               "❤": ("rotes Herz", ["Herz", "rotes Herz"])},
        "ja": {"😀": ("にっこり笑う", ["笑顔"]), "©": ("著作権", []), "❤": ("赤いハート", ["ハート"])},
        "he": {"😀": ("פרצוף מחייך", ["חיוך"]), "❤": ("לב אדום", [])},
        "en": {"😀": ("grinning face", ["face"])},
    }
    derived = {"de": {"#️⃣": ("Taste: #", ["Taste"]), "🇯🇵": ("Flagge: Japan", ["Flagge"])},
               "ja": {"#️⃣": ("キーキャップ: #", [])}, "he": {"🇯🇵": ("דגל: יפן", [])}}
    for pkg, top, table in (("cldr-annotations-full", "annotations", base),
                            ("cldr-annotations-derived-full", "annotationsDerived", derived)):
        for loc, entries in table.items():
            d = root / pkg / top / loc
            d.mkdir(parents=True)
            ann = {e: {"tts": [n], "default": kws} for e, (n, kws) in entries.items()}
            (d / "annotations.json").write_text(json.dumps({top: {"identity": {"language": loc},
                                                                  "annotations": ann}}), encoding="utf-8")
    (root / "cldr-annotations-full" / "LICENSE").write_text("UNICODE LICENSE V3\ntest text", encoding="utf-8")
    return root


def _shards(root: Path) -> Path:
    from mmtl.data.build import ShardWriter
    from tests.conftest import synthetic_pair

    for split, keys in KEYS.items():
        with ShardWriter(str(root / split), prefix=f"emoji-{split}") as w:
            for i, k in enumerate(keys):
                data, _, meta = synthetic_pair(i)
                w.write(k, data, "png", f"english {k}", meta)
    (root / "NOTICE").write_text("mmtl bundled emoji dataset\n", encoding="utf-8")
    return root


def test_codes_use_four_hex_digits_and_drop_fe0f():
    assert emoji_code("©") == "00A9" and emoji_code("#️⃣") == "0023-20E3" and emoji_code("❤️") == "2764"
    assert key_code("0023-fe0f-20e3") == "0023-20E3" and key_code("1f1ef-1f1f5") == emoji_code("🇯🇵")
    with pytest.raises(ValueError, match=r"unknown locale\(s\) xx; available \(2\): de, ja"):
        parse_locales("de,xx", ["de", "ja"])
    assert parse_locales("all", ["de", "ja"]) == ["de", "ja"] and parse_locales("ja, de,ja", ["de", "ja"]) == ["ja", "de"]


def test_sidecars_per_split_count_missing_and_keep_scripts(tmp_path):
    out, cldr = _shards(tmp_path / "emoji"), _cldr(tmp_path / "cldr")
    summary = write_locale_captions(out, "all", cldr)
    assert list(summary["locales"]) == ["de", "he", "ja"]  # en is the shards' own caption
    assert summary["locales"]["de"] == {"train": {"captions": 3, "missing": 0}, "test": {"captions": 2, "missing": 0}}
    assert summary["locales"]["ja"]["test"] == {"captions": 1, "missing": 1}
    de = load_locale(out / "train", "de")
    assert de == {"1f600": "grinsendes Gesicht: Gesicht, grinsen", "00a9": "Copyright: C", "0023-fe0f-20e3": "Taste: #: Taste"}
    ja = json.loads((out / "test" / "captions.ja.json").read_text(encoding="utf-8"))
    assert ja["captions"] == {"2764-fe0f": "赤いハート: ハート"} and ja["missing"] == ["1f1ef-1f1f5"]
    he = load_locale(out / "train", "he")
    assert he["1f600"] == "פרצוף מחייך: חיוך" and "00a9" not in he  # RTL text round-trips; no English filler
    notice = (out / "NOTICE").read_text(encoding="utf-8")
    assert notice.startswith("mmtl bundled emoji dataset") and "UNICODE LICENSE V3" in notice
    write_locale_captions(out, "de", cldr)  # again: the licence is not appended twice, other locales kept
    assert (out / "NOTICE").read_text(encoding="utf-8").count("UNICODE LICENSE V3") == 1
    assert set(json.loads((out / "locales.json").read_text())["locales"]) == {"de", "he", "ja"}
    assert sorted(shard_keys(next((out / "test").glob("*.tar")))) == sorted(KEYS["test"])


def test_cli_locales_and_unknown_code(tmp_path):
    from mmtl.cli import app

    out, cldr = _shards(tmp_path / "emoji"), _cldr(tmp_path / "cldr")
    r = CliRunner().invoke(app, ["datasets", "emoji", "--out", str(out), "--locales", "de,ja", "--cldr-dir", str(cldr)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["locales"]["ja"]["train"] == {"captions": 3, "missing": 0}
    r = CliRunner().invoke(app, ["datasets", "emoji", "--out", str(out), "--locales", "de,xx", "--cldr-dir", str(cldr)])
    assert r.exit_code == 2 and "unknown locale(s) xx" in r.output and "de, he, ja" in r.output


def test_locale_mix_is_seeded_weighted_and_counts_missing(tmp_path):
    out = _shards(tmp_path / "emoji")
    write_locale_captions(out, "de,ja,he", _cldr(tmp_path / "cldr"))
    assert resolve_locales(out / "train", "all") == ["en", "de", "he", "ja"]
    with pytest.raises(ValueError, match="available: en, de, he, ja"):
        resolve_locales(out / "train", ["fr"])
    mix = LocaleMix.from_dir(out / "test", {"ja": 1.0, "he": 1.0})
    draws = [mix.caption(k, f"english {k}", epoch) for epoch in range(20) for k in KEYS["test"]]
    assert {loc for _, loc in draws} == {"ja", "he"}
    assert ("דגל: יפן", "he") in draws and all(loc == "he" for t, loc in draws if t.startswith("דגל"))
    assert mix.counts["missing:ja"] == 20 and "fallback_en" not in mix.counts  # ja lacks the flag: counted
    again = LocaleMix.from_dir(out / "test", {"ja": 1.0, "he": 1.0})
    assert [again.caption(k, f"english {k}", e) for e in range(20) for k in KEYS["test"]] == draws
    en_only = LocaleMix.from_dir(out / "test", {"en": 1.0, "de": 0.0})
    assert en_only.caption("2764-fe0f", "english", 0) == ("english", "en")
    with pytest.raises(ValueError, match="no captions for locale 'fr'.*available: en, de, he, ja"):
        LocaleMix.from_dir(out / "test", {"fr": 1.0})
    with pytest.raises(ValueError, match="weights must be >= 0"):
        LocaleMix.from_dir(out / "test", {"de": 0.0})
