import pytest
import torch

from mmtl.config import StrategyConfig, TrainConfig, build_pipeline
from mmtl.models import build_model, tiny_two_tower_config
from mmtl.strategies import apply_strategy, trainable_summary, uses_feature_cache
from mmtl.train.ds_config import deepspeed_config, lr_multiplier


@pytest.fixture(scope="module")
def model_factory():
    cfg = tiny_two_tower_config()
    return lambda: build_model(cfg)


def trainable_prefixes(model):
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_both_trains_heads_and_scale_only(model_factory):
    m = model_factory()
    s = apply_strategy(m, StrategyConfig(kind="frozen", lock="both"))
    assert trainable_prefixes(m) == {"image_head", "text_head", "logit_scale"}
    assert 0 < s["trainable_share"] < 1 and s["params_trainable"] == trainable_summary(m)["params_trainable"]
    # gradients reach only those parameters
    images = torch.randn(4, 3, 32, 32)
    tok = m.tokenize(["a", "b c", "d", "e f g"])
    loss = (m.encode_image(images) * m.encode_text(tok["input_ids"], tok["attention_mask"])).sum() * m.logit_scale.exp()
    loss.sum().backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_lit_locks_image_only_and_unlock_last_blocks(model_factory):
    m = model_factory()
    apply_strategy(m, StrategyConfig(kind="frozen", lock="image"))
    assert "text_tower" in trainable_prefixes(m) and "image_tower" not in trainable_prefixes(m)
    m = model_factory()
    apply_strategy(m, StrategyConfig(kind="frozen", lock="both", unlock_text_blocks=1))
    names = [n for n, p in m.text_tower.named_parameters() if p.requires_grad]
    assert names and all("layer.1." in n for n in names), names


def test_full_trains_everything(model_factory):
    m = model_factory()
    assert apply_strategy(m, StrategyConfig(kind="full"))["trainable_share"] == 1.0


def test_feature_cache_only_when_both_towers_frozen():
    base = {"data": {"train": "x"}}
    assert uses_feature_cache(build_pipeline(base))
    assert not uses_feature_cache(build_pipeline({**base, "strategy": {"lock": "image"}}))
    assert not uses_feature_cache(build_pipeline({**base, "strategy": {"kind": "full"}}))
    assert not uses_feature_cache(build_pipeline({"data": {"train": "x", "cache_frozen_features": False}}))


def test_deepspeed_config_fields():
    c = deepspeed_config(TrainConfig(zero_stage=3, precision="bf16", micro_batch_size=4, grad_accum_steps=2,
                                     num_workers=2, offload_optimizer=True, offload_param=True, grad_clip=0.5))
    assert c["train_batch_size"] == 16 and c["zero_optimization"]["stage"] == 3
    assert c["bf16"]["enabled"] and c["gradient_clipping"] == 0.5
    assert c["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="zero_stage=3"):
        deepspeed_config(TrainConfig(zero_stage=2, offload_param=True))


def test_warmup_cosine_schedule():
    cfg = TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)


def test_train_modes_follow_trainable_parts(model_factory):
    from mmtl.train.loop import set_train_modes

    m = model_factory()
    apply_strategy(m, StrategyConfig(kind="frozen", lock="image"))
    set_train_modes(m)
    assert not m.image_tower.training and m.text_tower.training
    assert m.image_head.training and m.head_dropout.training
