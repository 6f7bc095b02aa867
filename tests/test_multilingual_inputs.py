"""Bad and unusual multilingual input (issue 15): right-to-left and CJK captions round-trip unchanged through
``mmtl shards build`` and the shard reader, shards whose captions mix languages train with per-locale sidecars
covering only some samples, tokenizer truncation is counted per locale (streamed and cached-feature training),
and length-sorted text encoding returns the rows of unsorted encoding. Tiny random-init model, no weights."""
from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmtl.config import Pipeline
from mmtl.models import build_model, build_tokenizer, tiny_two_tower_config
from tests.conftest import synthetic_pair, tiny_pipeline

# NFC text in many scripts, incl. the invisible characters that carry meaning: U+200F (right-to-left mark),
# U+200C (zero-width non-joiner, Persian), U+200D (zero-width joiner, emoji sequences), combining marks
# (Hebrew niqqud, Arabic harakat, Thai vowels, Devanagari), half-width katakana (changed by NFKC, not NFC).
MIXED = [
    "שָׁלוֹם עוֹלָם\u200f: לב אדום",
    "مرحبًا بالعالم: قلب أحمر",
    "می\u200cخواهم: قلب قرمز",
    "赤いハート: ﾊｰﾄ, 愛",
    "红心: 爱, 心",
    "빨간 하트: 사랑",
    "หัวใจสีแดง: รัก",
    "लाल दिल: प्यार",
    "κόκκινη καρδιά: αγάπη",
    "family 👨\u200d👩\u200d👧: a red heart",
]


def _build(tmp_path: Path) -> Path:
    """``mmtl shards build`` from a CSV of the MIXED titles (one shard, keys 000000000..)."""
    from mmtl.cli import app

    (tmp_path / "img").mkdir()
    with open(tmp_path / "products.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "title"])
        for i, title in enumerate(MIXED):
            (tmp_path / "img" / f"{i}.png").write_bytes(synthetic_pair(i)[0])
            w.writerow([f"img/{i}.png", title])
    r = CliRunner().invoke(app, ["shards", "build", str(tmp_path / "products.csv"), "--out", str(tmp_path / "out"),
                                 "--image-col", "image", "--caption-col", "title"])
    assert r.exit_code == 0, r.output
    return tmp_path / "out" / "train"


def _sidecar(split: Path, locale: str, captions: dict[str, str]) -> None:
    (split / f"captions.{locale}.json").write_text(json.dumps({"locale": locale, "captions": captions,
                                                               "missing": []}, ensure_ascii=False), encoding="utf-8")


def test_rtl_and_cjk_captions_round_trip_through_shards(tmp_path):
    from mmtl.data.samples import CleanOptions
    from mmtl.data.shardio import iter_shard

    split = _build(tmp_path)
    (shard,) = sorted(split.glob("*.tar"))
    got = {s.key: s.caption for s in iter_shard(str(shard), CleanOptions())}
    assert got == {f"{i:09d}": t for i, t in enumerate(MIXED)}  # code point for code point, marks included


def test_mixed_language_shards_draw_partial_sidecars_and_count_truncation_per_locale(tmp_path, stats_actor_calls):
    """Shard captions in ten scripts (locale ``en`` = whatever the shard holds) plus a German sidecar for
    three samples, one of them too long for the context: every streamed row is the sample's own caption or
    its German one, and truncated drawn captions are counted under their locale."""
    from mmtl.data import stream

    split = _build(tmp_path)
    de = {"000000000": "rotes Herz",
          "000000004": "ein sehr langes rotes Herz mit vielen vielen Woertern die nicht passen",
          "000000007": "Herz"}
    _sidecar(split, "de", de)
    raw = tiny_pipeline({"train": str(split), "val": str(split), "test": str(split)}, tmp_path / "runs",
                        data={"caption_locales": {"en": 1, "de": 3}})
    raw["model"]["context_length"] = 12
    pipe = Pipeline.model_validate(raw)
    tok = build_tokenizer(pipe.model)
    assert tok.count(de["000000004"]) > 12 and tok.count(de["000000000"]) <= 12
    added = stats_actor_calls
    (shard,) = sorted(split.glob("*.tar"))
    opts = dataclasses.replace(stream.clean_options(pipe, count_tokens=True), count_tokens=None)  # as the dataset
    counts: Counter = Counter()
    for epoch in range(6):
        items = {"shard": [str(shard)], "epoch": [epoch], "shard_id": ["s0"]}
        (batch,) = stream._shard_batches(items, opts, 0, 0, "stats", pipe.model.model_dump_json(),
                                         True, 64, mix={"en": 1.0, "de": 3.0})
        rows = [tuple(r) for r in batch["input_ids"].tolist()]
        for i, row in enumerate(rows):
            key = f"{i:09d}"
            own = tuple(tok([MIXED[i]])["input_ids"][0].tolist())
            german = tuple(tok([de[key]])["input_ids"][0].tolist()) if key in de else None
            assert row in (own, german), (epoch, key)
            counts["de" if row == german else "en"] += 1
        stats = added[-1]
        n_long = sum(r == tuple(tok([de["000000004"]])["input_ids"][0].tolist()) for r in rows)
        assert stats.get("caption_truncated:de", 0) == n_long
        assert stats["caption_locale:de"] + stats["caption_locale:en"] == len(MIXED)
        assert stats["caption_locale:missing:de"] == len(MIXED) - len(de)
    assert counts["de"] > 0 and counts["en"] > 6 * (len(MIXED) - len(de)) - 1  # no German: own caption always


def test_cached_training_counts_truncated_captions_per_locale(tmp_path):
    from mmtl.data.locale_features import encode_texts, locale_training_arrays

    split = _build(tmp_path)
    keys = [f"{i:09d}" for i in range(len(MIXED))]
    _sidecar(split, "de", {keys[0]: "rotes Herz", keys[1]: " ".join(["Herz"] * 40), keys[2]: " ".join(["rot"] * 40)})
    _sidecar(split, "ja", {k: "赤いハート" for k in keys})
    cfg = tiny_two_tower_config()
    cfg.context_length = 16
    model = build_model(cfg)
    english = encode_texts(model, MIXED)
    image = np.zeros((len(keys), 3), np.float32)
    _, counts = locale_training_arrays(model, [f"s/{k}" for k in keys], image, english, split,
                                       {"en": 1, "de": 1, "ja": 1}, seed=0, epochs=2, cache_dir=tmp_path / "c")
    assert counts["truncated:de"] == 2 and counts["truncated:ja"] == 0
    assert counts["missing:de"] == 2 * (len(keys) - 3)


def test_length_sorted_encoding_keeps_row_order():
    import torch

    from mmtl.data.locale_features import encode_by_length

    torch.manual_seed(0)
    model = build_model(tiny_two_tower_config()).eval()
    texts = ["a", "a red circle on a grey background with more words", "b c", "red", "x y z w v u t s r q p"]
    with torch.inference_mode():
        one_by_one = torch.cat([model.encode_text(**model.tokenize([t])) for t in texts])
    sorted_rows = encode_by_length(model.tokenize, model.encode_text, texts, batch_size=2)
    assert sorted_rows.shape == one_by_one.shape
    torch.testing.assert_close(sorted_rows, one_by_one, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sorted_rows[0], sorted_rows[1])  # rows differ, so a permutation would fail


@pytest.mark.parametrize("spec", ["xx", "de,zz"])
def test_unknown_caption_locale_in_a_pipeline_lists_the_available_ones(tmp_path, spec):
    from mmtl.data.locales import caption_mix

    split = _build(tmp_path)
    _sidecar(split, "de", {"000000000": "rotes Herz"})
    with pytest.raises(ValueError, match=r"unknown locale\(s\) .*available: en, de"):
        caption_mix({k: 1 for k in spec.split(",")}, split)
