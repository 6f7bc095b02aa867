"""One tiny end-to-end run with ``data.caption_locales`` on local Ray (frozen towers, cached features): the
recipe builds the per-epoch locale arrays, trains, logs the drawn-locale counts, and evaluates."""
from __future__ import annotations

import ast
import json
import math

import pytest

from tests.conftest import tiny_pipeline, write_split


@pytest.mark.e2e
def test_caption_locales_run_end_to_end_on_cached_features(ray_local, tmp_path):
    from mmtl.config import Pipeline
    from mmtl.recipes import run_pipeline

    train = write_split(tmp_path / "train", 48, per_shard=24)
    test = write_split(tmp_path / "test", 16, start=2000)
    de = {f"{i:06d}": f"ein Bild {i}" for i in range(0, 48, 3)}  # a third of the samples have German
    (train / "captions.de.json").write_text(json.dumps({"captions": de, "missing": []}), encoding="utf-8")
    raw = tiny_pipeline({"train": str(train), "val": None, "test": str(test)}, tmp_path / "runs",
                        data={"caption_locales": {"en": 1, "de": 3}},
                        train={"num_workers": 1, "max_steps": 4, "micro_batch_size": 16},
                        eval={"zero_shot": None})
    pipe = Pipeline.model_validate(raw)
    said = []
    summary = run_pipeline(pipe, say=said.append)
    assert summary["steps"] == 4 and summary["feature_cache"] is True
    assert math.isfinite(summary["metrics"]["train/loss"])
    assert "test/text_to_image_recall_at_1" in summary["metrics"]
    line = next(m for m in said if m.startswith("caption locales over"))
    epochs = int(line.split()[3])
    counts = ast.literal_eval(line.split(": ", 1)[1])  # the dict the recipe printed
    assert counts["de"] + counts["en"] == 48 * epochs and counts["missing:de"] == 32 * epochs
    assert 0.5 * 16 * epochs < counts["de"] < 16 * epochs  # de drawn with p = 3/4 for the 16 that have it
