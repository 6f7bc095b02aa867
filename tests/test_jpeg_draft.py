"""JPEG draft decoding (data.jpeg_draft): on by default (1.5), off with null or 0; when on, large JPEGs of the
training stream decode at a reduced DCT scale that keeps the shorter side >= jpeg_draft * image_size; other
formats, small JPEGs, evaluation and frozen-feature options decode in full."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mmtl.bench.ingest import synthetic_image
from mmtl.config import build_pipeline
from mmtl.data.samples import CleanOptions, decode_image
from mmtl.data.stream import clean_options, draft_px
from mmtl.models import tiny_two_tower_config


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_draft_decodes_to_the_smallest_scale_that_keeps_the_target():
    data, _ = synthetic_image(0, 224)
    assert decode_image(data, 10**8).size == (224, 224)
    assert decode_image(data, 10**8, draft_px=96).size == (112, 112)  # 1/2 (1/4 = 56 < 96)
    assert decode_image(data, 10**8, draft_px=50).size == (56, 56)  # 1/4
    assert decode_image(data, 10**8, draft_px=150).size == (224, 224)  # < 2x the target: full decode
    img = decode_image(_jpeg(640, 360), 10**8, draft_px=64)  # aspect kept, shorter side >= target
    assert img.size == (160, 90) and img.mode == "RGB"
    full = np.asarray(decode_image(data, 10**8).resize((112, 112), Image.BILINEAR), np.float32)
    small = np.asarray(decode_image(data, 10**8, draft_px=96), np.float32)
    assert np.abs(full - small).mean() < 8  # the same picture, not the same pixels


def test_other_formats_decode_in_full():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((224, 224, 3), np.uint8)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 10**8, draft_px=32).size == (224, 224)


def test_setting_is_on_by_default_and_train_stream_only(tmp_path):
    model = tiny_two_tower_config(image_size=64).model_dump(mode="json")
    pipe = build_pipeline({"data": {"train": str(tmp_path)}, "model": model})
    assert pipe.data.jpeg_draft == 1.5 and draft_px(pipe) == 96  # ceil(1.5 * 64)
    assert CleanOptions().draft_px is None
    assert clean_options(pipe).draft_px is None  # evaluation / frozen features / index building: full decodes
    for off in (0, None):
        assert draft_px(build_pipeline({"data": {"train": str(tmp_path), "jpeg_draft": off}, "model": model})) is None
    two = build_pipeline({"data": {"train": str(tmp_path), "jpeg_draft": 2}, "model": model})
    assert draft_px(two) == 128 and clean_options(two).draft_px is None
