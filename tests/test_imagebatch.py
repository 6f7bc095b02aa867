"""The streaming ingest's batched image normalisation and one-call tokenization with truncation flags."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mmtl.data import stream
from mmtl.data.imagebatch import ImageBatcher, split_normalize
from mmtl.models import build_image_transform, build_tokenizer, tiny_two_tower_config

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("train", [True, False])
def test_batched_normalisation_is_bitwise_equal_to_the_per_image_transform(train):
    tf = build_image_transform(tiny_two_tower_config(image_size=24), train)
    imgs = _images(9)
    torch.manual_seed(3)  # RandomResizedCrop draws from torch's RNG: same draws in the same order
    want = torch.stack([tf(im) for im in imgs]).numpy()
    torch.manual_seed(3)
    b = ImageBatcher(tf)
    assert b.geometry is not None  # the fast path is taken for mmtl's own transform
    for im in imgs:
        b.add(im)
    got = b.flush()
    assert got.shape == (9, 3, 24, 24) and got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
    assert np.array_equal(got, want)
    assert len(b) == 0
    with pytest.raises(ValueError, match="empty batch"):
        b.flush()


@pytest.mark.parametrize("train", [True, False])
def test_open_clip_transforms_take_the_batched_path_with_equal_values(train):
    import open_clip

    tf = open_clip.image_transform(20, is_train=train, mean=MEAN, std=STD)  # MaybeConvertMode + MaybeToTensor
    assert split_normalize(tf) is not None
    torch.manual_seed(5)
    want = torch.stack([tf(im) for im in _images(4)]).numpy()
    torch.manual_seed(5)
    b = ImageBatcher(tf)
    for im in _images(4):
        b.add(im)
    assert np.array_equal(b.flush(), want)


def test_other_transforms_and_odd_geometry_outputs_fall_back_to_per_image():
    plain = T.Compose([T.Resize((8, 8)), T.ToTensor()])  # no Normalize: not split
    assert split_normalize(plain) is None and split_normalize(lambda im: im) is None
    assert split_normalize(T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,))])) is None  # not 3 channels

    class ScaledToTensor(T.ToTensor):  # a subclass with its own conversion is not assumed equal
        def __call__(self, pic):
            return super().__call__(pic) * 2

    assert split_normalize(T.Compose([ScaledToTensor(), T.Normalize(MEAN, STD)])) is None
    b = ImageBatcher(plain)
    for im in _images(3):
        b.add(im)
    assert np.array_equal(b.flush(), torch.stack([plain(im) for im in _images(3)]).numpy())
    # geometry without a fixed size: one image is converted per image with the same values...
    varying = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    b = ImageBatcher(varying)
    b.add(_images(1)[0])
    assert np.array_equal(b.flush()[0], varying(_images(1)[0]).numpy())
    # ...and images of different sizes fail to stack exactly as the per-image path would
    for im in _images(2):
        b.add(im)
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        b.flush()


def test_tokenize_flagged_matches_tokenize_and_count():
    tok = build_tokenizer(tiny_two_tower_config())
    texts = ["a red circle", "word " * 100, "x", "a blue square and a green bar " * 3, "y " * (tok.context_length - 2),
             "y " * (tok.context_length - 1)]
    enc, cut = tok.tokenize_flagged(texts)
    ref = tok(texts)
    assert torch.equal(enc["input_ids"], ref["input_ids"]) and torch.equal(enc["attention_mask"], ref["attention_mask"])
    assert cut == [tok.count(t) > tok.context_length for t in texts]
    assert cut == [False, True, False, True, False, True]  # L-2 words + [CLS]/[SEP] fit exactly; one more does not

    class NoFlags:  # a tokenizer without the one-call method: counted per text
        def __call__(self, ts):
            return tok(ts)

        def count(self, t):
            return tok.count(t)

    enc2, cut2 = stream.tokenize_flagged(NoFlags(), texts, tok.context_length)
    assert torch.equal(enc2["input_ids"], ref["input_ids"]) and cut2 == cut


def test_shard_batches_counts_truncated_captions_from_the_batch(tmp_path, stats_actor_calls):
    from mmtl.config import build_pipeline
    from mmtl.data.build import ShardWriter

    long_caption = "a very long caption " * 20
    caps = [long_caption if i % 3 == 0 else f"a short caption {i}" for i in range(10)]
    with ShardWriter(str(tmp_path), prefix="t", max_samples_per_shard=100) as w:
        for i, cap in enumerate(caps):
            buf = io.BytesIO()
            _images(1, seed=i)[0].save(buf, format="PNG")
            w.write(f"{i:04d}", buf.getvalue(), "png", cap, {})
    model = tiny_two_tower_config(image_size=16).model_dump(mode="json")
    pipe = build_pipeline({"data": {"train": str(tmp_path)}, "model": model})
    opts = dataclasses.replace(stream.clean_options(pipe, count_tokens=True), count_tokens=None)  # as the dataset
    items = {"shard": [str(w.shards[0])], "epoch": [0], "shard_id": ["t0"]}
    batches = list(stream._shard_batches(items, opts, 0, 0, "stats", pipe.model.model_dump_json(), False, 4))
    assert [len(b["image"]) for b in batches] == [4, 4, 2]
    assert stats_actor_calls == [{"samples_ok": 10, "caption_truncated": 4}]
    stats_actor_calls.clear()  # a shard without long captions reports no caption_truncated key, as before
    with ShardWriter(str(tmp_path / "short"), prefix="u", max_samples_per_shard=100) as w2:
        for i in range(3):
            buf = io.BytesIO()
            _images(1, seed=i)[0].save(buf, format="PNG")
            w2.write(f"{i:04d}", buf.getvalue(), "png", f"short {i}", {})
    items = {"shard": [str(w2.shards[0])], "epoch": [0], "shard_id": ["u0"]}
    assert len(list(stream._shard_batches(items, opts, 0, 0, "stats", pipe.model.model_dump_json(), False, 4))) == 1
    assert stats_actor_calls == [{"samples_ok": 3}]
    tf, tok = build_image_transform(pipe.model, False), build_tokenizer(pipe.model)
    want = torch.stack([tf(_images(1, seed=i)[0]) for i in range(10)]).numpy()
    assert np.array_equal(np.concatenate([b["image"] for b in batches]), want)
    assert np.array_equal(np.concatenate([b["input_ids"] for b in batches]), tok(caps)["input_ids"].numpy())
