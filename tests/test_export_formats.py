"""Exports in the formats of the tools users already have (issue 20): open_clip's own folder format
(``open_clip_model.safetensors`` + ``open_clip_config.json``, loaded by ``open_clip.create_model_and_transforms``)
and the LoRA adapter folder as a real PEFT adapter (``peft.PeftModel.from_pretrained``). Tiny random-init models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmtl.config import build_pipeline
from mmtl.models import build_model, tiny_open_clip_config, tiny_two_tower_config
from mmtl.models.exported import write_native_formats
from mmtl.models.open_clip_export import OpenClipFormatError, open_clip_blocker, open_clip_state_dict
from mmtl.models.open_clip_family import to_open_clip_state_dict
from mmtl.recipes.export import ExportError, export_run
from mmtl.runtime import seed_everything
from mmtl.strategies import apply_strategy
from mmtl.strategies.lora_adapters import save_adapters
from mmtl.tracking.registry import load_exported

open_clip = pytest.importorskip("open_clip")
peft = pytest.importorskip("peft")

TEXTS = ["a red circle", "two blue bars on grey", "x", "a long caption " * 8]
LORA = {"kind": "lora", "lora": {"r": 4, "alpha": 8.0}}


def _pipe(model: dict, strategy: dict):
    return build_pipeline({"data": {"train": "unused"}, "model": model, "strategy": strategy,
                           "train": {"num_workers": 1, "zero_stage": 2, "max_steps": 4}})


def _pil_images(n: int = 3, size: int = 40) -> list[Image.Image]:
    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(size, size + 7, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def _write_export(d: Path, model, pipe) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "pipeline.yaml").write_text(pipe.to_yaml())
    return d


def _mmtl_embeddings(model, images, texts):
    """What `mmtl eval` computes: the model's eval transform on decoded RGB images, encode_image / encode_text."""
    tf = model.image_transform(train=False)
    x = torch.stack([tf(im) for im in images])
    tok = model.tokenize(texts)
    with torch.no_grad():
        return x, model.encode_image(x), model.encode_text(tok["input_ids"], tok["attention_mask"])


def _assert_open_clip_matches(oc_model, preprocess, tokenizer, mm_model, images, texts):
    x, img, txt = _mmtl_embeddings(mm_model, images, texts)
    x_oc = torch.stack([preprocess(im) for im in images])
    torch.testing.assert_close(x_oc, x, atol=1e-6, rtol=0)  # same preprocessing
    ids = tokenizer(texts)
    assert ids.shape[1] == mm_model.context_length
    torch.testing.assert_close(ids, mm_model.tokenize(texts)["input_ids"])  # same token ids
    oc_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(oc_model.encode_image(x_oc, normalize=True), img, atol=1e-5, rtol=0)
        torch.testing.assert_close(oc_model.encode_text(ids, normalize=True), txt, atol=1e-5, rtol=0)
    assert oc_model.logit_scale.ndim == 0
    torch.testing.assert_close(oc_model.logit_scale.exp().reshape(1), mm_model.scale())


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("oc_cfg")
    (d / "mmtl-tiny-formats.json").write_text(json.dumps(tiny_open_clip_config().config))
    open_clip.add_model_config(d / "mmtl-tiny-formats.json")
    return "mmtl-tiny-formats"


@pytest.mark.parametrize("spec", ["config", "arch"])
def test_open_clip_format_loads_in_open_clip_with_the_same_embeddings(spec, tiny_arch, tmp_path):
    cfg = tiny_open_clip_config() if spec == "config" else tiny_open_clip_config(config=None, arch=tiny_arch)
    pipe = _pipe(cfg.model_dump(mode="json"), {"kind": "full"})
    torch.manual_seed(0)
    m = build_model(pipe.model)
    with torch.no_grad():
        m.logit_scale.fill_(2.5)
    export = _write_export(tmp_path / "export", m, pipe)
    assert write_native_formats(export) == ["open_clip_model.safetensors", "open_clip_config.json"]
    conf = json.loads((export / "open_clip_config.json").read_text())
    assert set(conf["model_cfg"]) >= {"embed_dim", "vision_cfg", "text_cfg"} and conf["preprocess_cfg"]["size"] == 32
    from safetensors.torch import load_file

    sd = load_file(str(export / "open_clip_model.safetensors"))
    assert sd["logit_scale"].shape == () and "visual.conv1.weight" in sd and "token_embedding.weight" in sd
    assert not any(k.startswith(("image_tower.", "text_tower.")) for k in sd)
    mm, _ = load_exported(export)  # the model `mmtl eval EXPORT` uses
    images = _pil_images()
    # 1) the folder, strictly (open_clip's create_model loads the checkpoint with strict=True)
    oc, _, pre = open_clip.create_model_and_transforms(f"local-dir:{export}")
    _assert_open_clip_matches(oc, pre, open_clip.get_tokenizer(f"local-dir:{export}"), mm, images, TEXTS)
    # 2) architecture name + pretrained=FILE (a config-only model is registered under a name first)
    name = tiny_arch
    if spec == "config":
        (tmp_path / "cfgs").mkdir()
        (tmp_path / "cfgs" / "mmtl-tiny-formats-b.json").write_text(json.dumps(conf["model_cfg"]))
        open_clip.add_model_config(tmp_path / "cfgs" / "mmtl-tiny-formats-b.json")
        name = "mmtl-tiny-formats-b"
    oc2, _, pre2 = open_clip.create_model_and_transforms(name, pretrained=str(export / "open_clip_model.safetensors"))
    _assert_open_clip_matches(oc2, pre2, open_clip.get_tokenizer(name), mm, images, TEXTS)


def test_open_clip_format_refuses_what_open_clip_cannot_express(tmp_path):
    pipe = _pipe(tiny_two_tower_config().model_dump(mode="json"), {"kind": "full"})
    torch.manual_seed(0)
    export = _write_export(tmp_path / "tt", build_model(pipe.model), pipe)
    assert write_native_formats(export) == []  # the default export of another family: mmtl's files only
    assert not (export / "open_clip_config.json").exists()
    with pytest.raises(OpenClipFormatError, match="model.family='two_tower'.*timm image model"):
        write_native_formats(export, require="open_clip")
    assert "fusion model" in open_clip_blocker("open_clip", "cross_attention")
    assert open_clip_blocker("open_clip", "lora") is None
    oc_sd = {"image_tower.proj": torch.zeros(2, 2), "logit_scale": torch.zeros(1),
             "image_head.weight": torch.zeros(2, 2)}
    with pytest.raises(OpenClipFormatError, match=r"projection heads \['image_head.weight'\]"):
        open_clip_state_dict(oc_sd)


def _lora_run(tmp_path: Path, model_cfg: dict):
    """A LoRA run directory with one checkpoint holding ``adapter/`` (as training writes it), and the adapted
    model (trained-looking: random lora_B, a changed logit scale)."""
    pipe = _pipe(model_cfg, LORA)
    seed_everything(pipe.train.seed)
    base = build_model(pipe.model)
    seed_everything(pipe.train.seed)
    m = build_model(pipe.model)
    apply_strategy(m, pipe.strategy, zero_stage=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n or n.startswith(("image_head.", "text_head.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        m.logit_scale.fill_(3.0)
    run = tmp_path / "run"
    ckpt = run / "train" / "checkpoint_000004"
    ckpt.mkdir(parents=True)
    (ckpt / "mmtl_meta.json").write_text(json.dumps({"step": 4}))
    (run / "pipeline.yaml").write_text(pipe.to_yaml())
    save_adapters(m, ckpt / "adapter", zero_stage=2, model_cfg=pipe.model)
    return run, ckpt / "adapter", m.eval(), base.eval(), pipe


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_lora_open_clip_run_adapter_is_a_peft_adapter_and_exports_to_open_clip(tmp_path):
    run, adapter, adapted, base, pipe = _lora_run(tmp_path, tiny_open_clip_config().model_dump(mode="json"))
    images, tok = _images(), adapted.tokenize(TEXTS)
    with torch.no_grad():
        want_img, want_txt = adapted(images, tok["input_ids"], tok["attention_mask"])
        base_img, _ = base(images, tok["input_ids"], tok["attention_mask"])
    assert (want_img - base_img).abs().max() > 1e-3  # the adapter changes the outputs

    # the folder: PEFT's own config and key names, mmtl's state beside it
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["lora_dropout"] == 0.0
    assert "visual\\.transformer\\.resblocks\\.0\\.mlp\\.c_fc" in conf["target_modules"]
    assert conf["base_model_name_or_path"].startswith("open_clip CLIP model")
    from safetensors.torch import load_file

    keys = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert "base_model.model.visual.transformer.resblocks.0.attn.lora_A.weight" in keys
    assert "base_model.model.transformer.resblocks.1.mlp.c_fc.lora_B.weight" in keys
    assert not any(".default." in k or "image_tower" in k for k in keys)
    mine = json.loads((adapter / "mmtl_adapter.json").read_text())
    assert mine["format"] == "mmtl-lora" and mine["version"] == 2 and set(mine["towers"]) == {"image", "text"}
    assert set(mine["base_fingerprints"]) == {"image", "text"}
    assert set(load_file(str(adapter / "mmtl_extra.safetensors"))) == {"logit_scale"}  # Identity heads

    # PEFT on the documented base (open_clip's CLIP with the base weights) = the adapted model
    oc_base = open_clip.model.CLIP(**tiny_open_clip_config().config).eval()
    oc_base.load_state_dict(to_open_clip_state_dict(base.state_dict()), strict=True)
    pm = peft.PeftModel.from_pretrained(oc_base, str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm.encode_image(images, normalize=True), want_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(pm.encode_text(tok["input_ids"], normalize=True), want_txt, atol=1e-5, rtol=0)
        merged_by_peft = pm.merge_and_unload()  # PEFT's own merge (nn.MultiheadAttention included)
        torch.testing.assert_close(merged_by_peft.encode_image(images, normalize=True), want_img, atol=1e-5, rtol=0)

    # mmtl export --merge --format open_clip: merged, and open_clip loads the folder to the same outputs
    out = tmp_path / "merged"
    info = export_run(run, out, merge=True, fmt="open_clip")
    assert info["merged"] and info["formats"] == ["open_clip_model.safetensors", "open_clip_config.json"]
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(images, normalize=True), want_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(oc.encode_text(tok["input_ids"], normalize=True), want_txt, atol=1e-5, rtol=0)
    torch.testing.assert_close(oc.logit_scale.reshape(1), adapted.logit_scale.detach())
    # the unmerged adapter has no open_clip form: refused with the reason
    with pytest.raises(ExportError, match="--no-merge writes the LoRA adapter alone"):
        export_run(run, tmp_path / "unmerged", merge=False, fmt="open_clip")
    info = export_run(run, tmp_path / "unmerged", merge=False)
    assert (tmp_path / "unmerged" / "adapter" / "mmtl_adapter.json").exists() and info["formats"] == []


def test_lora_two_tower_adapter_loads_with_peft_on_the_mmtl_model(tmp_path):
    run, adapter, adapted, base, pipe = _lora_run(tmp_path, tiny_two_tower_config().model_dump(mode="json"))
    images, tok = _images(), adapted.tokenize(TEXTS)
    with torch.no_grad():
        want = adapted(images, tok["input_ids"], tok["attention_mask"])
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["base_model_name_or_path"].startswith("mmtl MultimodalModel")
    # documented base: build_model(pipe.model) with mmtl_extra.safetensors (the trained heads) loaded
    from safetensors.torch import load_file

    extra = load_file(str(adapter / "mmtl_extra.safetensors"))
    assert any(k.startswith("image_head.") for k in extra) and "logit_scale" in extra
    base.load_state_dict(extra, strict=False)
    with torch.no_grad():
        heads_only = base(images, tok["input_ids"], tok["attention_mask"])
    assert (heads_only[0] - want[0]).abs().max() > 1e-3  # the LoRA weights matter beyond the heads
    pm = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        got = pm(images, tok["input_ids"], tok["attention_mask"])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the merged export gives the same outputs; open_clip cannot express this run
    info = export_run(run, tmp_path / "merged", merge=True)
    assert info["formats"] == []
    merged, _ = load_exported(tmp_path / "merged")
    with torch.no_grad():
        for a, b in zip(merged(images, tok["input_ids"], tok["attention_mask"]), want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ExportError, match="cannot be expressed in open_clip's format: model.family='two_tower'"):
        export_run(run, tmp_path / "oc", merge=True, fmt="open_clip")


def test_old_adapter_folders_still_load(tmp_path):
    """Folders written before the PEFT format (adapter_config.json with format mmtl-lora, mmtl key names,
    trainable.safetensors) still merge; a foreign PEFT adapter is refused with a clear error."""
    from safetensors.torch import save_file

    from mmtl.strategies.lora_adapters import adapter_meta, adapter_state_dict, load_adapter, merged_from_adapter

    run, adapter, adapted, base, pipe = _lora_run(tmp_path, tiny_two_tower_config().model_dump(mode="json"))
    old = tmp_path / "old"
    old.mkdir()
    meta = {k: v for k, v in adapter_meta(adapted).items() if k not in ("peft_base", "base_fingerprints")}
    save_file(adapter_state_dict(adapted), str(old / "adapter_model.safetensors"), metadata={"format": "mmtl-lora"})
    (old / "adapter_config.json").write_text(json.dumps({**meta, "version": 1}))
    (adapter / "mmtl_extra.safetensors").rename(old / "trainable.safetensors")
    images, tok = _images(), adapted.tokenize(TEXTS)
    model, _, diff = merged_from_adapter(pipe, old)
    with torch.no_grad():
        for a, b in zip(model(images, tok["input_ids"], tok["attention_mask"]),
                        adapted(images, tok["input_ids"], tok["attention_mask"])):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    (old / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(ValueError, match="not an mmtl LoRA adapter.*PeftModel.from_pretrained"):
        load_adapter(build_model(pipe.model), old)


def test_lora_hf_adapter_loads_with_peft_on_transformers_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from mmtl.models import tiny_hf_clip_config
    from mmtl.models.hf_keys import to_hf_state_dict

    run, adapter, adapted, base, pipe = _lora_run(tmp_path, tiny_hf_clip_config().model_dump(mode="json"))
    images, tok = _images(), adapted.tokenize(TEXTS)
    with torch.no_grad():
        want_img, want_txt = adapted(images, tok["input_ids"], tok["attention_mask"])
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"].startswith("transformers CLIPModel")
    # documented base: the transformers CLIPModel with the base weights (here: the tiny random init's)
    vc, tc = base.image_tower.vision_model.config, base.text_tower.text_model.config
    hf = CLIPModel(CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=16)).eval()
    hf.load_state_dict(to_hf_state_dict(base.state_dict()), strict=True)
    pm = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        img = pm.get_image_features(pixel_values=images)
        txt = pm.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    torch.testing.assert_close(torch.nn.functional.normalize(img, dim=-1), want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.nn.functional.normalize(txt, dim=-1), want_txt, atol=1e-5, rtol=0)
