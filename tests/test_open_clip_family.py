"""open_clip and hf (transformers CLIP / SigLIP) families: tiny random-init models, the MultimodalModel
interface, tokenizers, export round trips to the libraries' own keys, loading from local weights, fingerprints,
strategies and one training step. No weights are downloaded (no CLIP weights ship offline)."""
from __future__ import annotations

import json
import pickle
import time

import pytest
import torch
from PIL import Image

from mmtl.config import ModelConfig, StrategyConfig
from mmtl.models import (WeightsError, build_image_transform, build_model, build_tokenizer, tiny_hf_clip_config,
                         tiny_open_clip_config)
from mmtl.models.hf_keys import to_hf_state_dict
from mmtl.models.open_clip_family import to_open_clip_state_dict

open_clip = pytest.importorskip("open_clip")

TEXTS = ["a red circle", "hello world! a much longer caption, with many many words so that it gets cut off",
         "!~", ""]
TINY_OC = tiny_open_clip_config().config


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def oc_model():
    torch.manual_seed(0)
    return build_model(tiny_open_clip_config())


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return build_model(tiny_hf_clip_config())


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    """The tiny config registered as an open_clip built-in name, to exercise the ``arch`` path."""
    d = tmp_path_factory.mktemp("oc_cfg")
    (d / "mmtl-tiny-test.json").write_text(json.dumps(TINY_OC))
    open_clip.add_model_config(d / "mmtl-tiny-test.json")
    return "mmtl-tiny-test"


# ---- open_clip ----------------------------------------------------------------------------------------
def test_open_clip_build_is_fast_and_shapes(oc_model):
    t0 = time.process_time()  # CPU time: robust to a loaded machine
    build_model(tiny_open_clip_config())
    build_model(tiny_hf_clip_config())
    assert time.process_time() - t0 < 4.0
    m = oc_model
    assert isinstance(m.image_head, torch.nn.Identity) and isinstance(m.text_head, torch.nn.Identity)
    assert m.logit_scale.shape == (1,) and m.embed_dim == 16
    assert abs(float(m.logit_scale.detach()) - tiny_open_clip_config().init_logit_scale) < 1e-6
    tok = m.tokenize(TEXTS)
    assert tok["input_ids"].shape == (4, 16) and tok["input_ids"].dtype == torch.long
    assert tok["attention_mask"].dtype == torch.long
    with torch.no_grad():
        img, txt = m(_images(), **tok)
    assert img.shape == (4, 16) and txt.shape == (4, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert m.scale().shape == (1,)
    assert all(p.ndim > 0 for p in m.state_dict().values())  # DeepSpeed cannot broadcast 0-dim tensors


def test_open_clip_tokenizer_matches_simple_tokenizer(oc_model):
    tok = oc_model.tokenize(TEXTS)
    ref = open_clip.tokenizer.SimpleTokenizer(context_length=16)(TEXTS)
    assert torch.equal(tok["input_ids"], ref)
    # "!" is BPE id 0 like padding: the mask comes from lengths, not from ids != 0
    assert tok["attention_mask"][2].sum() == 4 and tok["input_ids"][2, 1] == 0
    assert tok["attention_mask"][1].sum() == 16 and tok["input_ids"][1, -1] == 49407  # eot kept when cut
    assert oc_model.count_tokens(TEXTS[1]) > 16 and oc_model.count_tokens("") == 2
    with pytest.raises(TypeError):
        oc_model.tokenize("one string")
    cfg = tiny_open_clip_config()
    shipped = pickle.loads(pickle.dumps(build_tokenizer(cfg)))
    assert len(pickle.dumps(build_tokenizer(cfg))) < 1000  # pickles as its context length only
    assert torch.equal(shipped(TEXTS)["input_ids"], tok["input_ids"])


def test_open_clip_text_trimming_and_short_context_are_exact(oc_model):
    tok = oc_model.tokenize(TEXTS[:1] + TEXTS[2:])  # all short: trimmed to 4 tokens
    with torch.no_grad():
        trimmed = oc_model.text_features(tok["input_ids"], tok["attention_mask"])
        full = oc_model.text_tower(tok["input_ids"])
    assert torch.allclose(trimmed, full, atol=1e-5)
    short = build_model(tiny_open_clip_config(context_length=8))  # <= the arch's 16 is allowed
    assert short.tokenize(["x"])["input_ids"].shape == (1, 8)


def test_open_clip_export_round_trip(oc_model, tiny_arch):
    mapped = to_open_clip_state_dict(oc_model.state_dict())
    assert "visual.conv1.weight" in mapped and "token_embedding.weight" in mapped and mapped["logit_scale"].ndim == 0
    ref = open_clip.create_model(tiny_arch, pretrained=None)  # default: 0-dim logit_scale
    ref.load_state_dict(mapped, strict=True)
    ref.eval()
    images, tok = _images(), oc_model.tokenize(TEXTS)
    with torch.no_grad():
        img, txt = oc_model(images, **tok)
        assert torch.allclose(img, ref.encode_image(images, normalize=True), atol=1e-5)
        assert torch.allclose(txt, ref.encode_text(tok["input_ids"], normalize=True), atol=1e-5)
    assert torch.allclose(ref.logit_scale.exp(), oc_model.scale())
    ns = to_open_clip_state_dict(oc_model.state_dict(), nonscalar_logit_scale=True)
    assert ns["logit_scale"].shape == (1,)
    with pytest.raises(ValueError, match="unexpected key"):
        to_open_clip_state_dict({"foo.weight": torch.zeros(1)})


def test_open_clip_loads_weights_files(tmp_path, tiny_arch):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = open_clip.create_model(tiny_arch, pretrained=None).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "oc.pt")
    m = build_model(ModelConfig(family="open_clip", arch=tiny_arch, weights=str(tmp_path / "oc.pt"), embed_dim=16,
                                image_size=32, context_length=16))
    assert abs(float(m.logit_scale.detach()) - float(ref.logit_scale.detach())) < 1e-6
    images, tok = _images(), m.tokenize(TEXTS)
    with torch.no_grad():
        img, txt = m(images, **tok)
        assert torch.allclose(img, ref.encode_image(images, normalize=True), atol=1e-5)
        assert torch.allclose(txt, ref.encode_text(tok["input_ids"], normalize=True), atol=1e-5)
    # an mmtl export (safetensors, image_tower.* keys) loads as weights too, fingerprints are stable
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "export.safetensors"))
    cfg = tiny_open_clip_config(weights=str(tmp_path / "export.safetensors"))
    m2, m3 = build_model(cfg), build_model(cfg)
    with torch.no_grad():
        assert torch.allclose(m2(images, **tok)[0], img, atol=1e-6)
    assert m2.fingerprint("image") == m3.fingerprint("image") != m.fingerprint("image")
    bad = dict(ref.state_dict())
    bad.pop("ln_final.weight")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="missing.*ln_final.weight"):
        build_model(tiny_open_clip_config(weights=str(tmp_path / "bad.pt")))


def test_open_clip_custom_text_layout_round_trip():
    cfg = tiny_open_clip_config(config={**TINY_OC, "custom_text": True})
    m = build_model(cfg)
    mapped = to_open_clip_state_dict(m.state_dict())
    assert "text.token_embedding.weight" in mapped
    ref = open_clip.model.CustomTextCLIP(**TINY_OC).eval()
    ref.load_state_dict(mapped, strict=True)
    tok = m.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.allclose(m.encode_text(**tok), ref.encode_text(tok["input_ids"], normalize=True), atol=1e-5)
    from mmtl.strategies.frozen import tower_blocks

    assert len(tower_blocks(m.text_tower)) == 2 and len(m.tower_blocks("text")) == 2


def test_open_clip_fingerprints_transform_and_validation(oc_model):
    torch.manual_seed(0)
    same = build_model(tiny_open_clip_config())
    assert same.fingerprint("image") == oc_model.fingerprint("image")
    assert same.fingerprint("text") == oc_model.fingerprint("text")
    wider = {**TINY_OC, "vision_cfg": {**TINY_OC["vision_cfg"], "width": 64}}
    torch.manual_seed(0)
    other = build_model(tiny_open_clip_config(config=wider))
    assert other.fingerprint("image") != oc_model.fingerprint("image")
    assert len({oc_model.fingerprint("image"), oc_model.fingerprint("text")}) == 2
    tf = pickle.loads(pickle.dumps(oc_model.image_transform(train=False)))
    x = tf(Image.new("RGB", (48, 40), (200, 10, 10)))
    assert x.shape == (3, 32, 32)
    assert torch.allclose(build_image_transform(tiny_open_clip_config(), False)(Image.new("RGB", (48, 40))),
                          tf(Image.new("RGB", (48, 40))))
    assert oc_model.image_transform(train=True)(Image.new("RGB", (48, 40))).shape == (3, 32, 32)
    for bad, match in ((tiny_open_clip_config(embed_dim=32), "embed_dim: 16"),
                       (tiny_open_clip_config(image_size=64), "image_size: 32"),
                       (tiny_open_clip_config(context_length=17), "context length 16"),
                       (tiny_open_clip_config(arch="ViT-B-16"), "exactly one"),
                       (tiny_open_clip_config(config=None, arch="no-such-arch"), "not an open_clip model"),
                       (tiny_open_clip_config(config=None, arch="ViT-B-16-SigLIP", embed_dim=768, image_size=224,
                                              context_length=64), "tokenizer_path"),
                       (tiny_open_clip_config(weights="/nonexistent.pt"), "does not exist")):
        with pytest.raises(ValueError, match=match):
            build_model(bad)


def test_open_clip_unlock_blocks_with_frozen_strategy(oc_model):
    from mmtl.strategies import apply_strategy
    from mmtl.strategies.frozen import tower_blocks

    torch.manual_seed(0)
    m = build_model(tiny_open_clip_config())
    assert len(tower_blocks(m.image_tower)) == 2 and len(tower_blocks(m.text_tower)) == 2
    apply_strategy(m, StrategyConfig(kind="frozen", lock="both", unlock_image_blocks=1))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "logit_scale" in trainable
    assert any(n.startswith("image_tower.transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith(("image_tower.transformer.resblocks.0.", "text_tower.")) for n in trainable)


@pytest.mark.parametrize("make", [tiny_open_clip_config, tiny_hf_clip_config])
def test_one_training_step_reduces_loss(make):
    from mmtl.train.losses import clip_loss

    torch.manual_seed(0)
    m = build_model(make())
    for p in m.parameters():
        p.requires_grad_(True)
    m.train()
    images = _images(8)
    tok = m.tokenize([f"a photo of thing number {i}" for i in range(8)])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

    def loss_now():
        img, txt = m(images, **tok)
        return clip_loss(img, txt, m.scale())

    before = loss_now()
    opt.zero_grad()
    before.backward()
    assert m.logit_scale.grad is not None and m.logit_scale.grad.shape == (1,)
    opt.step()
    with torch.no_grad():
        after = loss_now()
    assert float(after) < float(before.detach())


# ---- hf ----------------------------------------------------------------------------------------------
def test_hf_clip_shapes_tokenizer_and_transform(hf_model):
    m = hf_model
    assert m.model_type == "clip" and m.logit_scale.shape == (1,) and isinstance(m.image_head, torch.nn.Identity)
    tok = m.tokenize(TEXTS)
    assert tok["input_ids"].shape == (4, 16) and tok["input_ids"][0, 0] == 101  # MiniLM [CLS]
    with torch.no_grad():
        img, txt = m(_images(), **tok)
    assert img.shape == (4, 16) and txt.shape == (4, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert m.count_tokens(TEXTS[1]) > 16
    assert all(p.ndim > 0 for p in m.state_dict().values())  # DeepSpeed cannot broadcast 0-dim tensors
    with torch.no_grad():  # trimming to the longest sequence is exact (causal mask, eos pooling)
        short = tok["input_ids"][[0, 3]], tok["attention_mask"][[0, 3]]
        assert torch.allclose(m.text_features(*short), m.text_tower(*short), atol=1e-5)
    tf = pickle.loads(pickle.dumps(build_image_transform(tiny_hf_clip_config(), train=True)))
    assert tf(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert torch.equal(build_tokenizer(tiny_hf_clip_config())(TEXTS)["input_ids"], tok["input_ids"])
    assert len(m.tower_blocks("image")) == 2
    from mmtl.strategies.frozen import tower_blocks

    assert len(tower_blocks(m.image_tower)) == 2 and len(tower_blocks(m.text_tower)) == 2


def test_hf_clip_export_round_trip_and_local_dir(hf_model, tmp_path):
    import transformers

    m = hf_model
    mapped = to_hf_state_dict(m.state_dict())
    assert mapped["logit_scale"].ndim == 0 and "visual_projection.weight" in mapped
    ref = transformers.CLIPModel(transformers.CLIPConfig(**{k: v for k, v in _hf_conf_dict(m).items()}))
    ref.load_state_dict(mapped, strict=True)
    ref.eval()
    ref.save_pretrained(tmp_path / "clip")
    m.tokenizer.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = build_model(ModelConfig(family="hf", weights=str(tmp_path / "clip"), embed_dim=16, image_size=32,
                                     context_length=16))
    images, tok = _images(), m.tokenize(TEXTS)
    assert torch.equal(loaded.tokenize(TEXTS)["input_ids"], tok["input_ids"])
    with torch.no_grad():
        a, b = m(images, **tok), loaded(images, **tok)
        assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)
        feats = ref.get_image_features(pixel_values=images)
        feats = getattr(feats, "pooler_output", feats)
        assert torch.allclose(a[0], torch.nn.functional.normalize(feats, dim=-1), atol=1e-5)
    assert torch.allclose(loaded.logit_scale, m.logit_scale)
    assert loaded.fingerprint("image") != m.fingerprint("image")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                           "image_std": [0.5] * 3}))
    cfg = ModelConfig(family="hf", weights=str(tmp_path / "clip"), embed_dim=16, image_size=32, context_length=16)
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    assert torch.allclose(build_image_transform(cfg, False)(white), torch.ones(3, 32, 32))


def _hf_conf_dict(m) -> dict:
    """The CLIPConfig kwargs the tiny model was built from (with the tokenizer-filled text ids)."""
    from mmtl.models.hf_clip import hf_config_from_dict
    from mmtl.models.offline import transformers_offline

    return hf_config_from_dict(transformers_offline(), m.cfg, m.tokenizer).to_dict()


def test_hf_siglip_config_and_export():
    import transformers

    layer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    cfg = tiny_hf_clip_config(config=dict(model_type="siglip", text_config=dict(layer, max_position_embeddings=16),
                                          vision_config=dict(layer, image_size=32, patch_size=8)), embed_dim=32)
    m = build_model(cfg)
    assert m.model_type == "siglip" and m.embed_dim == 32
    tok = m.tokenize(TEXTS)
    with torch.no_grad():
        img, txt = m(_images(), **tok)
    assert img.shape == (4, 32) and txt.shape == (4, 32)
    sd = dict(m.state_dict(), logit_bias=torch.full((1,), -10.0))  # the SigLIP loss's bias, as the step saves it
    mapped = to_hf_state_dict(sd)
    assert mapped["logit_scale"].shape == (1,) and mapped["logit_bias"].shape == (1,)
    from mmtl.models.hf_clip import hf_config_from_dict
    from mmtl.models.offline import transformers_offline

    ref = transformers.SiglipModel(hf_config_from_dict(transformers_offline(), cfg, m.tokenizer)).eval()
    ref.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        out = ref.get_text_features(input_ids=tok["input_ids"])
        out = getattr(out, "pooler_output", out)
        assert torch.allclose(txt, torch.nn.functional.normalize(out, dim=-1), atol=1e-5)


def test_hf_validation_errors(tmp_path):
    for bad, match in ((tiny_hf_clip_config(embed_dim=8), "embed_dim: 16"),
                       (tiny_hf_clip_config(image_size=64), "image_size: 32"),
                       (tiny_hf_clip_config(context_length=32), "max_position_embeddings"),
                       (tiny_hf_clip_config(weights=str(tmp_path)), "exactly one"),
                       (tiny_hf_clip_config(config=None), "exactly one"),
                       (tiny_hf_clip_config(config={"model_type": "blip"}), "not supported"),
                       (tiny_hf_clip_config(config={**tiny_hf_clip_config().config,
                                                    "text_config": {"vocab_size": 100, "hidden_size": 32,
                                                                    "num_hidden_layers": 1,
                                                                    "num_attention_heads": 2,
                                                                    "intermediate_size": 64,
                                                                    "max_position_embeddings": 16}}),
                        "vocab_size 100")):
        with pytest.raises(ValueError, match=match):
            build_model(bad)
