"""Model-family registry: built-ins, lookups, capabilities per family (real values on tiny random-init models),
and a toy family registered at runtime that build_model / build_tokenizer / build_image_transform dispatch to."""
from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
import torch
from PIL import Image
from torch import nn

from mmtl.config import ModelConfig, VisionTowerConfig
from mmtl.models import (MultimodalModel, build_image_transform, build_model, build_tokenizer, tiny_hf_clip_config,
                         tiny_open_clip_config, tiny_two_tower_config)
from mmtl.models.family import (POINTWISE_AND_LINEAR, ContextTextEncoding, ExportFormat, LoraDefaults, ModelFamily,
                                TokenFeatures, capability, supports)
from mmtl.models.registry import (family_names, family_of, find_family, get_family, register_family,
                                  unregister_family)

BUILTIN = ("two_tower", "open_clip", "hf", "blip", "llava")
LAYER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_siglip_config() -> ModelConfig:
    return tiny_hf_clip_config(config=dict(model_type="siglip", text_config=dict(LAYER, max_position_embeddings=16),
                                           vision_config=dict(LAYER, image_size=32, patch_size=8)), embed_dim=32)


CONFIGS = {"two_tower": tiny_two_tower_config, "open_clip": tiny_open_clip_config, "hf": tiny_hf_clip_config,
           "siglip": tiny_siglip_config}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    out = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        out[name] = build_model(make()).eval()
    return out


# ---- registry ---------------------------------------------------------------------------------------------
def test_builtin_families_registered_and_match_the_config_literal():
    assert family_names()[:len(BUILTIN)] == BUILTIN
    for name in BUILTIN:
        fam = get_family(name)
        assert fam.name == name and isinstance(fam, ModelFamily)
    # ModelConfig.family's Literal lists exactly the built-in families (config.py cannot import models/)
    assert set(get_args(ModelConfig.model_fields["family"].annotation)) == set(BUILTIN)


def test_unknown_family_error_lists_known_families():
    with pytest.raises(ValueError, match=re.escape("model.family='nope' is unknown (two_tower, open_clip, hf, blip, llava)")):
        get_family("nope")
    cfg = tiny_two_tower_config().model_copy(update={"family": "nope"})  # model_copy does not validate
    for call in (lambda: build_model(cfg), lambda: build_tokenizer(cfg), lambda: build_image_transform(cfg, False)):
        with pytest.raises(ValueError, match="is unknown"):
            call()


def test_family_of_built_models(models):
    assert [family_of(models[n]).name for n in ("two_tower", "open_clip", "hf", "siglip")] == \
        ["two_tower", "open_clip", "hf", "hf"]
    assert find_family(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="no .cfg.family"):
        family_of(nn.Linear(2, 2))


def test_register_rejects_duplicates_and_non_families():
    with pytest.raises(ValueError, match="already registered"):
        register_family(get_family("hf"))
    with pytest.raises(TypeError, match="not a model family"):
        register_family(object())


# ---- capabilities -----------------------------------------------------------------------------------------
def test_capability_table():
    have = {n: {c.__name__ for c in (TokenFeatures, LoraDefaults, ContextTextEncoding, ExportFormat)
                if supports(get_family(n), c)} for n in BUILTIN}
    assert have == {"two_tower": {"TokenFeatures", "LoraDefaults", "ContextTextEncoding", "ExportFormat"},
                    "open_clip": {"TokenFeatures", "LoraDefaults", "ExportFormat"},
                    "hf": {"TokenFeatures", "LoraDefaults", "ContextTextEncoding", "ExportFormat"},
                    "blip": {"LoraDefaults", "ExportFormat"}, "llava": {"LoraDefaults", "ExportFormat"}}
    from mmtl.models.family import TextGeneration

    assert [n for n in BUILTIN if supports(get_family(n), TextGeneration)] == ["blip", "llava"]
    assert capability(get_family("open_clip"), ContextTextEncoding) is None
    assert capability(None, TokenFeatures) is None


def _layers(fmt: str, names: tuple[str, ...], n: int = 2) -> list[str]:
    return [fmt.format(i=i, n=name) for i in range(n) for name in names]


def test_lora_default_targets_per_family(models):
    """The resolved defaults equal the module names the pre-registry code chose (listed by hand)."""
    from mmtl.strategies.lora import default_targets

    tt = models["two_tower"]  # timm test_efficientnet: no nn.Linear (num_classes=0), 1x1 pointwise convs
    assert default_targets(tt, "image") == (
        ["blocks.1.0.conv_pwl", "blocks.2.0.conv_pwl", "blocks.3.0.conv_pw", "blocks.3.0.conv_pwl",
         "blocks.4.0.conv_pw", "blocks.4.0.conv_pwl"], "default(two_tower): conv_pw,conv_pwl,<nn.Linear>")
    assert default_targets(tt, "text", zero_stage=3) == (
        _layers("encoder.layer.{i}.attention.{n}", ("self.query", "self.key", "self.value", "output.dense")),
        "default(two_tower): query,key,value,attention.output.dense")
    oc = models["open_clip"]
    for which in ("image", "text"):
        assert default_targets(oc, which) == (
            _layers("transformer.resblocks.{i}.{n}", ("attn", "mlp.c_fc", "mlp.c_proj")),
            "default(open_clip): c_fc,c_proj,attn")
        assert default_targets(oc, which, zero_stage=3) == (  # nn.MultiheadAttention is left out under ZeRO-3
            _layers("transformer.resblocks.{i}.{n}", ("mlp.c_fc", "mlp.c_proj")), "default(open_clip): c_fc,c_proj")
    for name in ("hf", "siglip"):  # module order in transformers' attention: k, v, q, out
        for which, prefix in (("image", "vision_model"), ("text", "text_model")):
            assert default_targets(models[name], which) == (
                _layers(prefix + ".encoder.layers.{i}.self_attn.{n}", ("k_proj", "v_proj", "q_proj", "out_proj")),
                "default(hf): q_proj,k_proj,v_proj,out_proj")
    # the raw candidate groups the families return
    assert get_family("two_tower").lora_default_targets(tt, "image") == ((POINTWISE_AND_LINEAR,),)
    assert get_family("open_clip").lora_default_targets(oc, "text", 3) == (("c_fc", "c_proj"), (POINTWISE_AND_LINEAR,))
    assert get_family("hf").lora_default_targets(models["hf"], "text") == (("q_proj", "k_proj", "v_proj", "out_proj"),)


def test_token_dims_and_trimming_rule(models):
    assert models["two_tower"].token_dims() == (256, 32)
    assert models["two_tower"].token_dims(-2) == (64, 32)  # test_efficientnet stages: ..., 48, 64, final 256
    assert models["two_tower"].token_dims(-3) == (48, 32)
    assert models["open_clip"].token_dims() == (32, 32) and models["open_clip"].token_dims(-2) == (32, 32)
    assert models["hf"].token_dims() == (32, 32)
    from mmtl.models.tokens import text_tokens_trimmable

    assert {n: text_tokens_trimmable(m) for n, m in models.items()} == \
        {"two_tower": True, "open_clip": False, "hf": True, "siglip": False}


def test_coop_capability_present_and_absent(models):
    from mmtl.prompting.coop import family_of as coop_family

    assert coop_family(models["two_tower"]) == "two_tower" and coop_family(models["hf"]) == "hf"
    with pytest.raises(NotImplementedError, match=re.escape("for model family 'open_clip': supported are two_tower "
                                                            "and hf CLIP")):
        coop_family(models["open_clip"])
    with pytest.raises(NotImplementedError, match="for model family hf siglip: supported"):
        coop_family(models["siglip"])
    assert get_family("hf").context_text_encoder(models["siglip"]) is None
    for name in ("two_tower", "hf"):  # the embeddings of real ids give exactly the tower's text features
        m = models[name]
        enc = get_family(name).context_text_encoder(m)
        tok = m.tokenize(["a red circle", "green"])
        with torch.no_grad():
            got = enc.features(enc.token_embedding(tok["input_ids"]), tok["attention_mask"])
            want = m.text_features(tok["input_ids"], tok["attention_mask"])
        assert got.shape == want.shape == (2, m.text_dim) and torch.allclose(got, want, atol=1e-5)


def test_export_architecture_config_per_family():
    from mmtl.tracking.registry import architecture_config

    vision = VisionTowerConfig(timm_name="test_efficientnet", weights="w.pth")
    tt = architecture_config(tiny_two_tower_config(init_from="x.safetensors", vision=vision))
    assert tt.vision.weights is None and tt.init_from is None and tt.text.tokenizer_path
    oc = architecture_config(tiny_open_clip_config(weights="oc.safetensors"))
    assert oc.weights is None and oc.config is not None
    hf = tiny_hf_clip_config().model_copy(update={"weights": "/some/clip-dir"})
    assert architecture_config(hf).weights == "/some/clip-dir"  # the dir also holds config + tokenizer


# ---- a family added at runtime ----------------------------------------------------------------------------
class ToyTokenize:
    """Bytes of the text (+1), right-padded with 0 to ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, texts):
        ids = torch.zeros(len(texts), self.n, dtype=torch.long)
        for i, t in enumerate(texts):
            b = [c + 1 for c in t.encode()[: self.n]]
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    def count(self, text: str) -> int:
        return len(text.encode())


class ToyTransform:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = torch.tensor(list(img.resize((self.size, self.size)).getdata()), dtype=torch.float32)
        return x.t().reshape(3, self.size, self.size) / 255.0


class ToyModel(MultimodalModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(image_dim=4, text_dim=4, embed_dim=cfg.embed_dim, init_logit_scale=0.0,
                         max_logit_scale=100.0, image_size=cfg.image_size, context_length=cfg.context_length)
        self.cfg = cfg.model_copy(deep=True)
        self.image_tower = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
        self.text_tower = nn.EmbeddingBag(257, 4, padding_idx=0)
        self.tokenizer = ToyTokenize(cfg.context_length)

    def image_features(self, images):
        return self.image_tower(images)

    def text_features(self, input_ids, attention_mask):
        return self.text_tower(input_ids)

    def tokenize(self, texts):
        return self.tokenizer(texts)


class ToyFamily:
    """Only the required part of the protocol: no capability."""

    name = "toy"

    def build(self, cfg):
        return ToyModel(cfg).eval()

    def tokenizer(self, cfg):
        return ToyTokenize(cfg.context_length)

    def image_transform(self, cfg, train):
        return ToyTransform(cfg.image_size)


@pytest.fixture
def toy():
    fam = register_family(ToyFamily())
    yield fam
    unregister_family("toy")
    assert "toy" not in family_names()


def test_runtime_family_dispatch(toy, tmp_path):
    # ModelConfig.family is a Literal of the built-ins: a runtime family's config is built without validation
    cfg = tiny_two_tower_config(embed_dim=8, image_size=8, context_length=6).model_copy(update={"family": "toy"})
    assert family_names()[-1] == "toy" and get_family("toy") is toy
    m = build_model(cfg)
    assert isinstance(m, ToyModel) and family_of(m) is toy
    tok = build_tokenizer(cfg)(["ab", ""])
    assert tok["input_ids"].tolist() == [[98, 99, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    img = build_image_transform(cfg, train=False)(Image.new("RGB", (20, 10), (255, 0, 0)))
    assert img.shape == (3, 8, 8) and torch.allclose(img[0], torch.ones(8, 8)) and float(img[1:].abs().sum()) == 0
    with torch.no_grad():
        e_img, e_txt = m(img[None], **tok)
    assert e_img.shape == (1, 8) and e_txt.shape == (2, 8)
    # capabilities it lacks give the same errors as any family without them
    with pytest.raises(ValueError, match="model family 'toy' has no token features"):
        m.token_dims()
    from mmtl.strategies.lora import default_targets

    with pytest.raises(ValueError, match=r"no default LoRA targets .*family toy"):
        default_targets(m, "image")
    from mmtl.prompting.coop import family_of as coop_family

    with pytest.raises(NotImplementedError, match="for model family 'toy'"):
        coop_family(m)
    from mmtl.tracking.registry import architecture_config

    arch = architecture_config(cfg.model_copy(update={"init_from": str(tmp_path / "m.safetensors")}))
    assert arch.init_from is None and arch.family == "toy"  # no ExportFormat: only init_from is dropped


# ---- no family-name comparisons outside the family modules -------------------------------------------------
def test_no_family_name_comparisons_outside_family_modules():
    root = Path(__file__).resolve().parents[1] / "mmtl"
    allowed = {"models/registry.py", "models/family.py", "models/two_tower.py", "models/open_clip_family.py",
               "models/hf_clip.py", "models/open_clip_export.py", "models/blip.py", "models/llava.py"}
    pat = re.compile(r"family\s*[!=]=|[!=]=\s*[\"'](hf|open_clip|two_tower)[\"']")
    hits = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if str(p.relative_to(root)) not in allowed
            for i, line in enumerate(p.read_text().splitlines(), 1) if pat.search(line)]
    assert hits == []
