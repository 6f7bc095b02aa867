"""Multilingual training pieces on the tiny random-init two-tower model: the text tower prefix (e5's
"query: "), per-(sample, epoch) locale captions in the streamed batches and in the cached-feature arrays."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmtl.config import Pipeline
from mmtl.models import build_model, build_tokenizer, tiny_two_tower_config
from tests.conftest import synthetic_pair, tiny_pipeline, write_split


def _sidecar(split: Path, locale: str, captions: dict[str, str]) -> None:
    (split / f"captions.{locale}.json").write_text(json.dumps({"locale": locale, "captions": captions,
                                                               "missing": []}, ensure_ascii=False), encoding="utf-8")


def test_text_prefix_is_prepended_everywhere_and_in_the_fingerprint():
    plain, pre = tiny_two_tower_config(), tiny_two_tower_config()
    pre.text.prefix = "query: "
    t0, t1 = build_tokenizer(plain), build_tokenizer(pre)
    assert t1(["a red circle"])["input_ids"].tolist() == t0(["query: a red circle"])["input_ids"].tolist()
    assert t1.count("a red circle") == t0.count("query: a red circle") == t0.count("a red circle") + 2  # "query", ":"
    import torch

    torch.manual_seed(0)
    m0 = build_model(plain)
    torch.manual_seed(0)  # same random init: only the prefix differs
    m1 = build_model(pre)
    assert m0.fingerprint("text") != m1.fingerprint("text") and m0.fingerprint("image") == m1.fingerprint("image")


@pytest.fixture()
def shards(tmp_path):
    train = write_split(tmp_path / "train", 12, per_shard=6)
    _sidecar(train, "de", {f"{i:06d}": f"deutsch {i}" for i in range(0, 12, 2)})  # odd keys: no German
    _sidecar(train, "ja", {f"{i:06d}": f"日本語 {i}" for i in range(12)})
    return {"train": str(train), "val": str(train), "test": str(train)}


def test_streamed_batches_draw_a_locale_caption_per_sample_and_epoch(shards, tmp_path):
    from mmtl.data.stream import _shard_batches, clean_options

    pipe = Pipeline.model_validate(tiny_pipeline(shards, tmp_path, data={"caption_locales": {"de": 1, "ja": 1}}))
    tok = build_tokenizer(pipe.model)
    opts = clean_options(pipe)
    shard = sorted(Path(shards["train"]).glob("*.tar"))[0]
    drawn = []
    for epoch in (0, 1):
        items = {"shard": [str(shard)], "epoch": [epoch], "shard_id": ["s0"]}
        (batch,) = _shard_batches(items, opts, 0, 0, None, pipe.model.model_dump_json(), True, 64,
                                  mix={"de": 1.0, "ja": 1.0})
        drawn.append(batch["input_ids"].tolist())
    de = {tuple(tok([f"deutsch {i}"])["input_ids"][0].tolist()): i for i in range(6)}
    ja = {tuple(tok([f"日本語 {i}"])["input_ids"][0].tolist()): i for i in range(6)}
    for ids in drawn:  # every row is sample i's German or Japanese caption, German only for even keys
        got = [("de", de[tuple(r)]) if tuple(r) in de else ("ja", ja[tuple(r)]) for r in ids]
        assert [i for _, i in got] == list(range(6)) and all(i % 2 == 0 for loc, i in got if loc == "de")
    assert drawn[0] != drawn[1]  # a new draw per epoch (seeded: the same again for the same epoch)
    items = {"shard": [str(shard)], "epoch": [0], "shard_id": ["s0"]}
    (again,) = _shard_batches(items, opts, 0, 0, None, pipe.model.model_dump_json(), True, 64, mix={"de": 1, "ja": 1})
    assert again["input_ids"].tolist() == drawn[0]


def test_cached_feature_arrays_follow_the_draw(shards, tmp_path):
    from mmtl.data.locale_features import encode_texts, locale_training_arrays

    model = build_model(tiny_two_tower_config())
    n = 12
    uids = [f"s-000000/{i:06d}" for i in range(n)]
    image = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    english = encode_texts(model, [synthetic_pair(i)[1] for i in range(n)])
    arrays, counts = locale_training_arrays(model, uids, image, english, shards["train"], {"en": 1, "de": 2},
                                            seed=0, epochs=4, cache_dir=tmp_path / "cache")
    img, txt = arrays["image_feat"], arrays["text_feat"]
    assert img.shape == (4 * n, 3) and txt.shape == (4 * n, english.shape[1])
    np.testing.assert_array_equal(img[np.arange(4 * n)], np.tile(image, (4, 1)))
    de = encode_texts(model, [f"deutsch {i}" for i in range(0, n, 2)])
    for r in range(4 * n):
        i = r % n
        row = txt[np.array([r])][0]
        if i % 2:  # no German caption: English, counted as missing
            np.testing.assert_allclose(row, english[i], rtol=1e-5, atol=1e-6)
        else:
            assert np.allclose(row, english[i], atol=1e-6) or np.allclose(row, de[i // 2], atol=1e-5)
    assert counts["missing:de"] == 4 * n // 2 and counts["en"] + counts["de"] == 4 * n
    assert counts["de"] > 0 and (tmp_path / "cache" / "locales").is_dir()
    again, _ = locale_training_arrays(model, uids, image, english, shards["train"], {"en": 1, "de": 2},
                                      seed=0, epochs=4, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again["text_feat"].rows, txt.rows)
    with pytest.raises(ValueError, match="no captions for locale 'fr'"):
        locale_training_arrays(model, uids, image, english, shards["train"], {"fr": 1}, 0, 1, tmp_path / "c")


def test_tokenizer_of_converted_weights_resolves_in_the_cache(tmp_path, monkeypatch):
    from mmtl.models import fetch
    from mmtl.models.two_tower import _tokenizer_dir
    from mmtl.models.weights import WeightsError

    monkeypatch.setenv("MMTL_WEIGHTS_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="mmtl weights get multilingual-e5-small"):
        _tokenizer_dir("weights:multilingual-e5-small")
    folder = tmp_path / "multilingual-e5-small"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / fetch.MANIFEST).write_text("{}")
    assert _tokenizer_dir("weights:multilingual-e5-small") == folder
