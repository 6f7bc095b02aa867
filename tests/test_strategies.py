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


def test_frozen_batchnorm_stays_in_eval_mode_under_lora_and_unlocking():
    """A BatchNorm whose affine params are frozen keeps its running statistics (eval mode); a trainable one
    (full fine-tuning, unlocked block) re-estimates them."""
    import torch

    from mmtl.models import build_model
    from mmtl.models.two_tower import tiny_two_tower_config
    from mmtl.train.loop import set_train_modes

    bn = torch.nn.modules.batchnorm._BatchNorm
    m = build_model(tiny_two_tower_config())
    apply_strategy(m, StrategyConfig(kind="lora"))
    set_train_modes(m)
    norms = [x for x in m.image_tower.modules() if isinstance(x, bn)]
    assert norms and not any(x.training for x in norms) and m.image_tower.training
    m = build_model(tiny_two_tower_config())
    apply_strategy(m, StrategyConfig(kind="frozen", unlock_image_blocks=1))
    set_train_modes(m)
    last = [x for x in m.image_tower.blocks[-1].modules() if isinstance(x, bn)]
    first = [x for x in m.image_tower.blocks[0].modules() if isinstance(x, bn)]
    assert last and all(x.training for x in last) and not any(x.training for x in first)
    m = build_model(tiny_two_tower_config())
    apply_strategy(m, StrategyConfig(kind="full"))
    set_train_modes(m)
    assert all(x.training for x in m.image_tower.modules() if isinstance(x, bn))


def test_tower_lr_groups_and_memory_estimate():
    import torch

    from mmtl.config import TrainConfig
    from mmtl.models import build_model
    from mmtl.models.two_tower import tiny_two_tower_config
    from mmtl.train.ds_config import build_optimizer
    from mmtl.train.memory import model_state_bytes

    m = build_model(tiny_two_tower_config())
    apply_strategy(m, StrategyConfig(kind="full"))
    opt = build_optimizer(TrainConfig(lr=1e-3, tower_lr=1e-5), m.named_parameters())
    tower = {id(p) for n, p in m.named_parameters() if "_tower." in n}
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        assert g["lr"] == (1e-5 if ids <= tower else 1e-3) and (ids <= tower or not ids & tower)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    assert {g["lr"] for g in build_optimizer(TrainConfig(lr=1e-3), m.parameters()).param_groups} == {1e-3}
    # ZeRO paper accounting: fp32 AdamW, 2 workers, 1000 params of which 100 trainable
    est = model_state_bytes(1000, 100, TrainConfig(num_workers=2, zero_stage=0, precision="fp32"))
    assert est == {"params": 4000, "grads": 400, "optimizer": 800, "total": 5200}
    est = model_state_bytes(1000, 100, TrainConfig(num_workers=2, zero_stage=3, precision="bf16"))
    assert est == {"params": 1000, "grads": 100, "optimizer": 600, "total": 1700}
    assert torch.isfinite(torch.tensor(float(est["total"])))
