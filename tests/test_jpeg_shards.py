"""JPEG copies of shards for the draft-decoding measurement, and draft decoding on the bundled (PNG) emoji: a no-op,
so the quickstart's pixels do not depend on ``data.jpeg_draft``."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from mmtl.bench.jpeg_shards import convert_tree
from mmtl.data.samples import decode_image

EMOJI_TRAIN = Path(__file__).resolve().parents[1] / "mmtl" / "assets" / "emoji" / "train"


def _images(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile() and not m.name.endswith((".txt", ".json"))}


def test_draft_is_a_no_op_on_the_bundled_png_emoji():
    imgs = _images(next(EMOJI_TRAIN.glob("*.tar")))
    assert len(imgs) == 1529 and all(n.endswith(".png") for n in imgs)
    for data in imgs.values():
        full = decode_image(data, 10**8)
        # the smallest target a model could ask for: any JPEG of this size would be drafted
        drafted = decode_image(data, 10**8, draft_px=8)
        assert full.size == drafted.size and np.array_equal(np.asarray(full), np.asarray(drafted))


def test_convert_tree_writes_large_jpegs_and_keeps_the_other_members(tmp_path):
    src = tmp_path / "src" / "train"
    src.mkdir(parents=True)
    with tarfile.open(src / "s-000000.tar", "w") as t:
        for key, colour in (("a", (255, 0, 0, 255)), ("b", (0, 0, 255, 0))):  # b: fully transparent -> white
            buf = io.BytesIO()
            Image.new("RGBA", (72, 72), colour).save(buf, format="PNG")
            for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    assert convert_tree(tmp_path / "src", tmp_path / "out", size=256, quality=90) == {"train": 2}
    with tarfile.open(tmp_path / "out" / "train" / "s-000000.tar") as t:
        names = t.getnames()
        assert names == ["a.jpg", "a.txt", "b.jpg", "b.txt"]
        assert t.extractfile("b.txt").read() == b"caption b"
        a_bytes, b_bytes = (t.extractfile(n).read() for n in ("a.jpg", "b.jpg"))
    a, b = Image.open(io.BytesIO(a_bytes)), Image.open(io.BytesIO(b_bytes))
    assert a.format == "JPEG" and a.size == (256, 256) and a.mode == "RGB"
    assert np.abs(np.asarray(a, np.float32) - [255, 0, 0]).max() < 8
    assert np.asarray(b).min() > 247  # transparent composited on white, as training decodes it
    assert decode_image(a_bytes, 10**8, draft_px=64).size == (64, 64)  # drafted at 1/4 DCT scale


def test_draft_distance_on_large_jpegs(tmp_path):
    import yaml

    from mmtl.bench.draft_check import draft_distance
    from mmtl.models import tiny_two_tower_config

    src = tmp_path / "src" / "train"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with tarfile.open(src / "s-000000.tar", "w") as t:
        for k in range(4):
            buf = io.BytesIO()
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth picture once upscaled
            Image.fromarray(small).resize((72, 72), Image.BICUBIC).save(buf, format="PNG")
            info = tarfile.TarInfo(f"k{k}.png")
            info.size = len(buf.getvalue())
            t.addfile(info, io.BytesIO(buf.getvalue()))
    convert_tree(tmp_path / "src", tmp_path / "out", size=256)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"data": {"train": str(src)},
                                    "model": tiny_two_tower_config(image_size=32).model_dump(mode="json")}))
    r = draft_distance(str(tmp_path / "out" / "train" / "s-000000.tar"), str(pipe), image_size=32, n=4)
    assert r["images"] == 4 and r["draft_px"] == 48 and r["decoded_size"] == {"full": [256, 256], "draft": [64, 64]}
    assert r["pixel_mean_abs_diff"]["draft_vs_full"] < r["pixel_mean_abs_diff"]["two_augmentations"]
    assert 0.99 < r["feature_cosine_mean"]["draft_vs_full"] <= 1.0 + 1e-6
