"""``strategy.kind: lora`` on the three tiny model families (random init, CPU, a few seconds each)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn


from mmtl.config import StrategyConfig, build_pipeline
from mmtl.models import build_model, tiny_hf_clip_config, tiny_open_clip_config, tiny_two_tower_config
from mmtl.strategies import apply_strategy
from mmtl.strategies.lora import has_lora
from mmtl.strategies.lora_adapters import (adapter_state_dict, load_adapter, merge_lora, merged_state_dict,
                                           save_adapter)

FAMILIES = {"two_tower": tiny_two_tower_config, "open_clip": tiny_open_clip_config, "hf": tiny_hf_clip_config}
LORA = StrategyConfig(kind="lora", lora={"r": 4, "alpha": 8.0})


def fresh(family: str, seed: int = 0) -> nn.Module:
    """The same random-init base model every call (seeded build), in eval mode."""
    torch.manual_seed(seed)
    return build_model(FAMILIES[family]()).eval()


def inputs(model) -> dict:
    g = torch.Generator().manual_seed(1)
    tok = model.tokenize(["a red circle", "two blue bars on grey", "x", "a yellow square"])
    return {"images": torch.randn(4, 3, 32, 32, generator=g), **tok}


def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(**batch)


def assert_close(a, b, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def expected_trainable(model) -> set[str]:
    return {n for n, _ in model.named_parameters()
            if "lora_" in n or n.startswith(("image_head.", "text_head.")) or n == "logit_scale"}


def perturb(model) -> None:
    g = torch.Generator().manual_seed(2)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainable_set_init_identity_and_grads(family):
    base = fresh(family)
    m = fresh(family)
    batch = inputs(m)
    summary = apply_strategy(m, LORA)
    names = trainable(m)
    assert names == expected_trainable(m)
    for tower in ("image_tower.", "text_tower."):
        assert any(n.startswith(tower) and "lora_" in n for n in names), tower
    assert 0 < summary["trainable_share"] < 0.05
    # B = 0 at init: the adapted model computes exactly the base model
    assert_close(outputs(m, batch), outputs(base, batch), atol=0)
    # the towers are still called as before
    assert m.image_tower is not None and m.image_features(batch["images"]).shape[0] == 4
    img, txt = m(**batch)
    loss = (img @ txt.T * m.scale()).logsumexp(dim=1).sum() + (img * txt).sum()
    loss.backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert any(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_save_and_reload(family, tmp_path):
    m = fresh(family)
    batch = inputs(m)
    base_out = outputs(m, batch)
    apply_strategy(m, LORA)
    perturb(m)
    adapted = outputs(m, batch)
    assert (adapted[0] - base_out[0]).abs().max() > 1e-3  # the adapters do something
    peft_sd = {k: v.clone() for k, v in m.state_dict().items()}

    # adapters alone: not empty, only lora_ keys, reload into a fresh base model -> same outputs
    d = save_adapter(m, tmp_path / "adapter")
    assert set(adapter_state_dict(m)) and all("lora_" in k for k in adapter_state_dict(m))
    conf = json.loads((d / "adapter_config.json").read_text())  # PEFT's LoraConfig
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
    mine = json.loads((d / "mmtl_adapter.json").read_text())  # mmtl's record beside it
    assert mine["r"] == 4 and mine["alpha"] == 8.0 and set(mine["towers"]) == {"image", "text"}
    assert all(mine["towers"][t]["modules"] for t in ("image", "text"))
    reloaded = load_adapter(fresh(family), d)
    assert_close(outputs(reloaded, batch), adapted)
    assert trainable(reloaded) == expected_trainable(reloaded)

    # merge: same outputs, no PEFT layers, base key names, strict load into a model built without PEFT
    merge_lora(m)
    assert not has_lora(m)
    assert_close(outputs(m, batch), adapted)
    plain = fresh(family, seed=123)
    assert set(plain.state_dict()) == set(m.state_dict())
    plain.load_state_dict(m.state_dict(), strict=True)
    assert_close(outputs(plain, batch), adapted)

    # the same from a PEFT-keyed state dict (what the DeepSpeed export consolidates)
    torch.manual_seed(0)
    merged = merged_state_dict(FAMILIES[family](), LORA, peft_sd)
    plain2 = fresh(family, seed=321)
    plain2.load_state_dict(merged, strict=True)
    assert_close(outputs(plain2, batch), adapted)


def test_zero3_refuses_multihead_attention_targets():
    m = fresh("open_clip")
    cfg = StrategyConfig(kind="lora", lora={"image_targets": ["attn", "c_fc"]})
    with pytest.raises(ValueError, match=r"LoRA on nn.MultiheadAttention .* ZeRO-3.*use MLP targets"):
        apply_strategy(m, cfg, zero_stage=3)
    assert not has_lora(m)  # refused before anything was injected
    # defaults leave attn out under ZeRO-3 and keep it below
    apply_strategy(m, StrategyConfig(kind="lora"), zero_stage=3)
    assert not any(isinstance(mod, nn.MultiheadAttention) and hasattr(mod, "lora_A") for mod in m.modules())
    assert not any(".attn." in n for n in trainable(m)) and any(".c_fc.lora_A" in n for n in trainable(m))
    m2 = fresh("open_clip")
    apply_strategy(m2, StrategyConfig(kind="lora"), zero_stage=2)
    assert any(n.endswith("attn.lora_A.default.weight") for n in trainable(m2))


def test_bad_targets_and_single_tower():
    m = fresh("two_tower")
    with pytest.raises(ValueError, match=r"strategy.lora.image_targets: target 'nope' matches no module"):
        apply_strategy(m, StrategyConfig(kind="lora", lora={"image_targets": ["nope"]}))
    with pytest.raises(ValueError, match=r"grouped/depthwise"):
        apply_strategy(m, StrategyConfig(kind="lora", lora={"image_targets": ["conv_dw"]}))
    with pytest.raises(ValueError, match=r"strategy.lora.towers is empty"):
        apply_strategy(m, StrategyConfig(kind="lora", lora={"towers": []}))
    apply_strategy(m, StrategyConfig(kind="lora", lora={"towers": ["text"], "text_targets": ["query", "value"]}))
    names = trainable(m)
    assert not any(n.startswith("image_tower.") for n in names)
    lora_mods = {n.split(".lora_")[0] for n in names if "lora_" in n}
    assert lora_mods == {f"text_tower.encoder.layer.{i}.attention.self.{k}" for i in (0, 1) for k in ("query", "value")}
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_strategy(m, StrategyConfig(kind="lora"))
    oc = fresh("open_clip")
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        apply_strategy(oc, StrategyConfig(kind="lora", lora={"image_targets": ["out_proj"]}))



@pytest.fixture
def process_group():
    """A gloo process group of world size 1 on loopback for DeepSpeed in this process."""
    from mmtl.train.loop import single_process_group

    with single_process_group():
        yield


def test_deepspeed_zero2_step_trains_lora(process_group, tmp_path):
    from mmtl.strategies.lora_adapters import save_adapters
    from mmtl.train.loop import build_engine
    from mmtl.train.step import train_step

    pipe = build_pipeline({
        "data": {"train": "unused"},
        "model": tiny_two_tower_config().model_dump(mode="json"),
        "strategy": LORA.model_dump(mode="json"),
        "train": {"num_workers": 1, "zero_stage": 2, "micro_batch_size": 4, "max_steps": 2, "lr": 0.05,
                  "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0},
    })
    m = fresh("two_tower")
    apply_strategy(m, pipe.strategy, zero_stage=pipe.train.zero_stage)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    engine = build_engine(pipe, m, zero_stage=2)  # ZeRO-2 itself (one rank alone would run stage 0)
    batch = inputs(m)
    batch = {"image": batch["images"], "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    losses = [train_step(engine, [batch]) for _ in range(2)]
    assert all(loss is not None and torch.isfinite(torch.tensor(loss)) for loss in losses)
    after = dict(engine.module.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert changed <= expected_trainable(m)
    d = save_adapters(engine.module, tmp_path / "adapter", zero_stage=2)
    assert d is not None and (d / "adapter_model.safetensors").stat().st_size > 0
