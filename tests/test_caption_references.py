"""Caption references that COCO-style scoring mishandles (the shape of shared/cases/new-features case 46, built
here): several references of one image stored as several samples, references empty after tokenisation, an empty
generated caption, and a one-image set where CIDEr-D is undefined."""
from __future__ import annotations

import pytest

from mmtl.eval.captioning import caption_metrics, group_references

A_REFS = ["a red square on a white background", "a red box in the middle of a white image",
          "one red square centred on white", "a small red square", "red square, white background"]


def _shards(tmp_path):
    from conftest import synthetic_pair

    from mmtl.data.build import ShardWriter

    a, _, _ = synthetic_pair(0)
    with ShardWriter(str(tmp_path / "caps"), prefix="test") as w:
        for i, ref in enumerate(A_REFS):  # one image, 5 references: 5 samples; a0, a1 without image_id
            w.write(f"a{i}", a, "png", ref, {"image_id": "img_a"} if i >= 2 else {})
        for key, (n, ref) in {"b0": (1, "..."), "c0": (2, " - ! "), "d0": (3, "an orange circle on white")}.items():
            w.write(key, synthetic_pair(n)[0], "png", ref, {"image_id": f"img_{key[0]}"})
    return str(tmp_path / "caps")


def test_references_grouped_by_image_and_empty_ones_counted(tmp_path):
    from mmtl.data.captions import load_caption_set
    from mmtl.eval.caption_eval import by_image

    cs = load_caption_set(_shards(tmp_path), lambda im: im, len, 64)
    assert len(cs) == 8
    g, refs = by_image(cs)
    # a0/a1 have no image_id: grouped by identical pixels; then a2..a4 carry image_id "img_a" (another id)
    assert g.keys == ["a0", "a2", "b0", "c0", "d0"] and refs[0] == A_REFS[:2] and refs[1] == A_REFS[2:]
    assert g.image_ids[1:] == ["img_a", "img_b", "img_c", "img_d"] and g.image_ids[0].startswith("sha1:")
    hyp = [A_REFS[0], A_REFS[2], "a blue circle", "a green square", ""]
    m = caption_metrics(refs, hyp)
    assert m["captioning/num_samples"] == 3 and m["captioning/unscored"] == 2
    assert m["captioning/empty_reference"] == 2 and m["captioning/empty_prediction"] == 1
    assert m["captioning/exact_match"] == pytest.approx(2 / 3)  # a hit on any reference counts
    assert 0 < m["captioning/bleu4"] < 1 and m["captioning/cider_d"] is not None and 0 < m["captioning/cider_d"] < 10
    # the same images, one reference per sample (what scoring did before): 8 entries, the empty refs scored
    flat = caption_metrics(cs.captions, [A_REFS[0]] * 5 + ["a blue circle", "a green square", ""])
    assert flat["captioning/num_samples"] == 6 and flat["captioning/empty_reference"] == 2


def test_one_image_exact_match_bleu_one_and_cider_undefined():
    m = caption_metrics([[A_REFS[0]]], [A_REFS[0]])
    assert m["captioning/bleu4"] == pytest.approx(1.0, abs=1e-6) and m["captioning/exact_match"] == 1.0
    assert m["captioning/cider_d"] is None and "at least 2 images" in m["captioning/cider_d_undefined"]
    empty = caption_metrics([A_REFS[0]], [""])  # scored as empty, no crash
    assert empty["captioning/bleu4"] == 0.0 and empty["captioning/empty_prediction"] == 1
    none = caption_metrics(["...", " - "], ["a", "b"])
    assert none["captioning/bleu4"] is None and none["captioning/unscored"] == 2
    long = ["face with tears of joy", "smiling cat with heart eyes"]
    two = caption_metrics(long, long)
    assert two["captioning/cider_d"] == pytest.approx(10.0, abs=1e-6)  # defined again from 2 images
    assert group_references(["x", "y", "x"], ["r1", "r2", "r3"]) == ([0, 1], [["r1", "r3"], ["r2"]])
