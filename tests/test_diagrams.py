"""The offline diagram VQA generator (`mmtl datasets diagrams`)."""
from __future__ import annotations

import random
from pathlib import Path

from mmtl.data.samples import CleanOptions
from mmtl.data.shardio import iter_samples
from mmtl.datasets.diagrams import QTYPES, build_diagrams, questions


def _read(folder: Path) -> list:
    return list(iter_samples(str(folder), CleanOptions()))


def test_build_is_deterministic_split_by_layout(tmp_path):
    a = build_diagrams(tmp_path / "a", train_images=24, test_images=8, image_size=64, seed=3)
    build_diagrams(tmp_path / "b", train_images=24, test_images=8, image_size=64, seed=3)
    for split in ("train", "test"):
        fa, fb = sorted((tmp_path / "a" / split).glob("*.tar")), sorted((tmp_path / "b" / split).glob("*.tar"))
        assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb]
    assert a["images"] == {"train": 24, "test": 8}
    train, test = _read(tmp_path / "a" / "train"), _read(tmp_path / "a" / "test")
    assert len(train) == a["samples"]["train"] and len(test) == a["samples"]["test"]
    assert {s.meta["layout"] for s in train}.isdisjoint({s.meta["layout"] for s in test})
    s = train[0]
    assert s.image.size == (64, 64) and s.caption.endswith("?")
    assert isinstance(s.meta["answers"], list) and s.meta["question_type"] in QTYPES
    assert len({x.meta["image_id"] for x in train}) == 24
    assert {x.meta["question_type"] for x in train} == set(QTYPES)
    answers = set((tmp_path / "a" / "answers.txt").read_text().split("\n")) - {""}
    assert {x.meta["answers"][0] for x in train + test} <= answers


def test_questions_answer_the_scene():
    scene = {"scene": "shapes", "objects": [
        {"cell": 0, "shape": "circle", "colour": "red", "size": "small"},
        {"cell": 2, "shape": "circle", "colour": "blue", "size": "large"},
        {"cell": 7, "shape": "square", "colour": "red", "size": "large"}]}
    seen: dict = {}
    for seed in range(40):
        for qtype, q, a in questions(scene, random.Random(seed)):
            seen[q] = a
    assert seen.get("how many circles are there?", "2") == "2"
    assert seen.get("how many red shapes are there?", "2") == "2"
    assert seen.get("how many triangles are there?", "0") == "0"
    assert seen.get("what colour is the square?", "red") == "red"
    assert seen.get("what colour is the small circle?", "red") == "red"
    assert seen.get("is the square at the top, in the middle or at the bottom?", "bottom") == "bottom"
    assert seen.get("is the blue circle on the left, in the middle or on the right?", "right") == "right"
    assert seen.get("is the red circle left of the blue circle?", "yes") == "yes"
    assert seen.get("is the blue circle left of the square?", "no") == "no"
    assert len(seen) > 8
    arrows = {"scene": "arrows", "arrows": [(0, 2)], "boxes": [
        {"cell": 0, "label": "A", "colour": "green"}, {"cell": 4, "label": "B", "colour": "red"},
        {"cell": 8, "label": "C", "colour": "blue"}]}
    qa = {q: a for _, q, a in questions(arrows, random.Random(0))}
    assert qa["how many arrows are there?"] == "1"
    assert qa["which box does the arrow from box A point to?"] == "C"
