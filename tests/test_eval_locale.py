"""``mmtl eval --task retrieval --locale``: per-locale recall@K on a hand-made set with a colour stub model
(image -> one-hot of its colour, text -> one-hot of its first colour word), so every number is known."""
from __future__ import annotations

import json

import pytest
from test_eval_cli import _write, stub  # noqa: F401  (fixture)

from mmtl.eval import runner
from mmtl.eval.args import EvalError


def _sidecar(folder, locale, captions):
    (folder / f"captions.{locale}.json").write_text(json.dumps({"locale": locale, "captions": captions,
                                                               "missing": []}, ensure_ascii=False), encoding="utf-8")


def test_per_locale_recall_and_means(stub, tmp_path):  # noqa: F811
    data = _write(tmp_path / "d", [("red", "red", "a"), ("green", "green", "a"), ("blue", "blue", "a")])
    _sidecar(tmp_path / "d", "de", {"0000": "rot red", "0001": "grün blue", "0002": "blau green"})
    _sidecar(tmp_path / "d", "ar", {"0000": "أحمر red"})  # one caption: two samples missing, not English-filled
    r = runner.run_eval("stub", "retrieval", data, ks=[1], out_dir=str(tmp_path / "out"), log_to_mlflow=False,
                        locale="all")
    m = r["metrics"]
    assert m["retrieval/en/text_to_image_recall_at_1"] == 1.0 and m["retrieval/en/num_samples"] == 3
    assert m["retrieval/de/text_to_image_recall_at_1"] == pytest.approx(1 / 3)
    assert m["retrieval/de/image_to_text_recall_at_1"] == pytest.approx(1 / 3)
    assert m["retrieval/ar/num_samples"] == 1 and r["locales"]["ar"]["missing"] == 2
    assert m["retrieval/mean_non_en/text_to_image_recall_at_1"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["retrieval/mean/text_to_image_recall_at_1"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert m["retrieval/text_to_image_recall_at_1"] == 1.0  # the plain English metrics are still there
    assert list(r["locales"]) == ["en", "ar", "de"]
    r = runner.run_eval("stub", "retrieval", data, ks=[1], log_to_mlflow=False, locale="de")
    assert list(r["locales"]) == ["de"] and "retrieval/mean/text_to_image_recall_at_1" in r["metrics"]
    with pytest.raises(EvalError, match="unknown locale.*fr.*available: en, ar, de"):
        runner.run_eval("stub", "retrieval", data, ks=[1], log_to_mlflow=False, locale="fr")
    with pytest.raises(EvalError, match="--locale .* applies to --task retrieval only"):
        runner.run_eval("stub", "zero-shot", data, log_to_mlflow=False, locale="de")
