"""The leak rule of the unpaired OpenMoji set (mmtl.datasets.openmoji_unpaired): no drawing of a test emoji or of
its skin-tone / gender variants reaches the self-supervised stage. Synthetic entries: no npm, no rsvg-convert."""
from __future__ import annotations

import pytest

from mmtl.datasets.openmoji_unpaired import build_openmoji_unpaired, select_entries, strip_gender, strip_skin_tones

TEST_KEYS = ["1f44b", "1f46e", "1f9d1-200d-1f33e", "2764-fe0f"]  # waving hand, police officer, farmer, red heart
SPLIT_OF = {"1f600": "train", "1f622": "val", "1f468-200d-1f33e": "train"}


def _e(hexcode: str, skintone="") -> dict:
    return {"hexcode": hexcode.upper(), "skintone": skintone}


def test_strip_rules():
    assert strip_skin_tones("1f44b-1f3fb") == "1F44B"
    assert strip_skin_tones("2764-FE0F") == "2764"
    assert strip_gender("1F46E-1F3FD-200D-2642-FE0F") == "1F46E"
    assert strip_gender("1F469-200D-1F33E") == strip_gender("1F9D1-200D-1F33E") == "P-200D-1F33E"
    assert strip_gender("1F468") == "1F468"  # a lone "man" is not a ZWJ sequence: not read as "person"


def test_select_entries_reasons_and_labels():
    entries = [
        _e("1F44B"),                         # test emoji
        _e("2764"),                          # test emoji (FE0F dropped on the test side)
        _e("1F44B-1F3FB", 1),                # skin tone of a test emoji
        _e("1F46E-200D-2640-FE0F"),          # woman police officer: gender variant of a test emoji
        _e("1F46E-1F3FF-200D-2642-FE0F", 5),  # man police officer, dark skin tone
        _e("1F468-200D-1F33E"),              # man farmer: a train emoji, but a gender variant of a test one
        _e("1F600"),                         # train emoji: kept
        _e("1F622"),                         # val emoji: kept
        _e("1F600-1F3FB", 1),                # skin-tone copy of a kept emoji: left out by default (not a leak)
        _e("E000"),                          # OpenMoji extra, in no split: kept
        _e("2764-200D-1F525"),               # heart on fire: contains a test emoji but is another emoji: kept
        {"hexcode": "1F680", "has_svg": False},
    ]
    kept, left = select_entries(entries, TEST_KEYS, SPLIT_OF)
    assert [(e["hexcode"], e["split"]) for e in kept] == [
        ("1F600", "train"), ("1F622", "val"), ("E000", "none"), ("2764-200D-1F525", "none")]
    assert dict(left) == {"test_emoji": 2, "test_skin_tone_variant": 1, "test_gender_variant": 3,
                          "skin_tone_variant": 1, "no_svg": 1}
    kept_all, left_all = select_entries(entries, TEST_KEYS, SPLIT_OF, skin_tones=True)
    assert "1F600-1F3FB" in [e["hexcode"] for e in kept_all] and "skin_tone_variant" not in left_all
    assert left_all["test_skin_tone_variant"] == 1  # leaks stay out whatever skin_tones says


def test_noto_test_images_are_never_added(tmp_path):
    with pytest.raises(ValueError, match="never test"):
        build_openmoji_unpaired(tmp_path / "out", tmp_path, add_noto=("train", "test"))
    assert not (tmp_path / "out").exists()
