"""Retrieval-augmented captioning (SmallCap) for the ``blip`` family: leave-one-out retrieval, per-sample prompts
kept out of the loss, the export round trip with the datastore, and retrieval_k = 0 unchanged (tiny random-init
model, no Ray)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml


def _pipe(k: int, train: str = "unused"):
    from mmtl.config import build_pipeline
    from mmtl.models.blip import tiny_blip_config

    model = tiny_blip_config(decoder={"image_layer": -3}, context_length=40).model_dump(mode="json")
    return build_pipeline({"data": {"train": train}, "model": model, "strategy": {
        "kind": "frozen", "lock": "both", "caption": {"retrieval_k": k, "num_beams": 2, "max_new_tokens": 5}}})


class _Set(SimpleNamespace):
    """The CaptionSet fields retrieval reads."""

    def __len__(self) -> int:
        return len(self.captions)


def _train_set(n: int = 6) -> _Set:
    rng = np.random.default_rng(0)
    words = ("one", "two", "three", "four", "five", "six")[:n]
    return _Set(pixels=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), image_ids=None,
                uids=[f"s/{i}" for i in range(n)], captions=[f"caption number {w}" for w in words])


def test_top_k_leave_one_out_never_returns_the_query():
    from mmtl.models.caption_retrieval import top_k_neighbours

    keys = F.normalize(torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    groups = ["a", "b", "c", "d", "e", "f", "f"]  # samples 5 and 6 are one image (two captions)
    plain = top_k_neighbours(keys, keys, 1)[:, 0]
    assert plain.tolist() == list(range(7))  # without leave-one-out every image finds itself first
    loo = top_k_neighbours(keys, keys, 3, leave_out=groups, key_groups=groups)
    assert loo.shape == (7, 3)
    for i, row in enumerate(loo.tolist()):
        assert all(groups[j] != groups[i] for j in row)  # neither itself nor another sample of its image
        sims = (keys[i] @ keys.t()).tolist()
        others = sorted((j for j in range(7) if groups[j] != groups[i]), key=lambda j: -sims[j])
        assert row == others[:3]  # the most similar others, nearest first
    with pytest.raises(ValueError, match="k <= 6"):
        top_k_neighbours(keys, keys, 7, leave_out=groups, key_groups=groups)


def test_training_prompts_leave_each_image_out():
    from mmtl.eval.caption_eval import build_retriever, training_prompts

    pipe = _pipe(2)
    train = _train_set()
    r = build_retriever(pipe, train)
    assert r.features.shape[0] == 6 and torch.allclose(r.features.norm(dim=-1), torch.ones(6))
    prompts = training_prompts(r, train)
    for cap, p in zip(train.captions, prompts):
        assert p.startswith("similar: ") and p.endswith(". caption:") and cap not in p
        assert p.count("caption number") == 2
    # inference from the same images: each image's nearest caption is its own (no leave-one-out there)
    from mmtl.eval.captioning import normalized_images

    own = r.prompts_for_images(normalized_images(train.pixels, *_mean_std(pipe)))
    assert [p.split(". ")[0].removeprefix("similar: ") for p in own] == train.captions
    with pytest.raises(ValueError, match="retrieval_k=6 needs more than k"):
        build_retriever(_pipe(6), train)


def _mean_std(pipe):
    from mmtl.models.two_tower import vision_mean_std

    return vision_mean_std(pipe.model.vision)


def test_prompt_tokens_are_not_in_the_loss():
    from mmtl.models import build_model
    from mmtl.models.blip import tiny_blip_config

    torch.manual_seed(0)
    m = build_model(tiny_blip_config(context_length=40))
    x = torch.randn(3, 3, 32, 32)
    caps, prompts = ["red circle", "blue square", "a green bar"], ["similar: a b. c", "d", "similar: e f g h"]
    tok = m.tokenize(caps, prompts)
    ids, mask, plen = tok["input_ids"], tok["attention_mask"], tok["prompt_len"]
    assert plen.tolist() == [1 + len(m.tokenizer.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    with torch.no_grad():
        logits = m(x, ids, mask)[:, :-1]
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        for b in range(3):
            target[b, : plen[b] - 1] = -100  # targets: caption tokens and [SEP] only
        n_caption = [len(m.tokenizer.tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in caps]
        assert (target != -100).sum(1).tolist() == n_caption
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        assert float(m.caption_loss(x, ids, mask, prompt_len=plen)) == pytest.approx(float(want), rel=1e-5)
        # without prompt_len the prompt words would be targets: a different (larger-count) loss
        assert float(m.caption_loss(x, ids, mask)) != pytest.approx(float(want), rel=1e-3)
    # a per-sample prompt equal for all is exactly the fixed model.decoder.prompt
    fixed = build_model(tiny_blip_config(context_length=40, decoder={"prompt": "a picture of"}))
    same = fixed.tokenize(caps)
    per = m.tokenize(caps, ["a picture of"] * 3)
    assert torch.equal(same["input_ids"], per["input_ids"]) and torch.equal(same["attention_mask"],
                                                                            per["attention_mask"])
    assert per["prompt_len"].tolist() == [fixed.prompt_length()] * 3
    # too long: the prompt is cut, never the caption
    short = build_model(tiny_blip_config(context_length=8)).tokenize(["red circle"], ["w " * 20])
    assert short["prompt_truncated"] == 1 and short["prompt_len"].tolist() == [8 - 3]


def _export(d: Path, model, pipe) -> Path:
    """An export folder as the runner writes it (:func:`mmtl.train.checkpoint.write_export`)."""
    from mmtl.train.checkpoint import write_export

    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return write_export(d, sd, yaml.safe_dump(pipe.model_dump(mode="json")))


def test_export_round_trip_with_the_datastore(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from mmtl.cli import app
    from mmtl.eval.caption_eval import build_retriever
    from mmtl.eval.captioning import normalized_images
    from mmtl.models import build_model
    from mmtl.models.caption_retrieval import DATASTORE_FILE, TOWER_FILE
    from mmtl.tracking.registry import load_exported

    pipe = _pipe(2)
    torch.manual_seed(0)
    m = build_model(pipe.model)
    train = _train_set()
    m.retriever = build_retriever(pipe, train)
    x = normalized_images(train.pixels[:3], *_mean_std(pipe))
    in_run = m.generate(x, num_beams=2, max_new_tokens=5)
    export = _export(tmp_path, m, pipe)
    with pytest.raises(FileNotFoundError, match=f"{DATASTORE_FILE} is missing.*retrieval_k=2"):
        load_exported(export)
    saved = m.retriever.save(export)
    assert [p.name for p in saved] == [DATASTORE_FILE, TOWER_FILE]
    loaded, _ = load_exported(export)
    assert loaded.retriever.captions == train.captions and torch.equal(loaded.retriever.features, m.retriever.features)
    assert loaded.generate(x, num_beams=2, max_new_tokens=5) == in_run
    # mmtl generate on the export: the same text as in-run for the same image (greedy: beams 1)
    greedy = m.generate(x[:1], num_beams=1, max_new_tokens=5)
    img = tmp_path / "x.png"
    Image.fromarray(train.pixels[0]).save(img)
    r = CliRunner().invoke(app, ["generate", str(export), "--image", str(img), "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().split("\t")[1] == greedy[0]
    # a datastore smaller than k: a clear error naming the file and the setting
    (export / "pipeline.yaml").write_text(yaml.safe_dump(_pipe(7).model_dump(mode="json")))
    with pytest.raises(ValueError, match=f"{DATASTORE_FILE} holds 6 captions, fewer than.*retrieval_k=7"):
        load_exported(export)


def test_retrieval_off_is_unchanged(tmp_path):
    from mmtl.models import build_model
    from mmtl.tracking.registry import load_exported

    pipe = _pipe(0)
    assert pipe.strategy.caption.retrieval_k == 0
    torch.manual_seed(0)
    m = build_model(pipe.model)
    loaded, _ = load_exported(_export(tmp_path, m, pipe))  # no datastore files needed
    assert loaded.retriever is None
    x = torch.randn(2, 3, 32, 32)
    tok = m.tokenize(["red circle", "blue"])
    assert set(tok) == {"input_ids", "attention_mask"}  # the training arrays of retrieval_k 0 are as before
    assert loaded.generate(x, num_beams=2, max_new_tokens=4) == m.generate(x, num_beams=2, max_new_tokens=4)
    from mmtl.config import build_pipeline

    with pytest.raises(ValueError, match="needs a \\{captions\\} field"):
        build_pipeline({**pipe.model_dump(mode="json"), "strategy": {
            "kind": "frozen", "caption": {"retrieval_k": 2, "retrieval_prompt": "similar:"}}})
