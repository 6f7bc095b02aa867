"""The llava family (image tokens -> projector -> causal LLM) on a tiny random-init Llama: shapes, what the loss
counts, decoding, the chat-template split, the missing-weights error, and the two LLaVA stages end to end."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from mmtl.models import build_model
from mmtl.models.llava import LlavaTokenize, chat_parts, tiny_llava_config
from mmtl.models.registry import get_family
from mmtl.models.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(tiny_llava_config())


def test_shapes_tokens_and_family_tokenizer(tiny):
    tok = tiny.tokenize(["a red heart", "x " * 40])
    assert tok["input_ids"].shape == (2, 24)
    post = len(tiny.post_ids)
    n_caption = len(tiny.tok("a red heart", add_special_tokens=False)["input_ids"])
    assert tok["attention_mask"][0].sum() == post + n_caption + 1  # post prompt + caption + eos
    assert tok["input_ids"][0, post + n_caption] == tiny.eos_id
    assert tok["attention_mask"][1].sum() == 24 and tok["input_ids"][1, 23] == tiny.eos_id  # truncated, eos kept
    assert tiny.count_tokens("x " * 40) > 24
    fam = torch.equal(get_family("llava").tokenizer(tiny_llava_config())(["a red heart"])["input_ids"],
                      tiny.tokenize(["a red heart"])["input_ids"])
    assert fam
    x = torch.randn(2, 3, 32, 32)
    assert tiny.image_tokens(x).shape == (2, 4, 48) and tiny.image_embeds(x).shape == (2, 4, 32)
    with pytest.raises(ValueError, match="no room for a caption"):
        LlavaTokenize(tiny.tok, tiny.post_ids, tiny.eos_id, tiny.pad_id, len(tiny.post_ids) + 1)


def test_loss_counts_only_caption_tokens_and_decreases():
    torch.manual_seed(0)
    m = build_model(tiny_llava_config())
    x = torch.randn(2, 3, 32, 32)
    tok = m.tokenize(["a red heart", "a blue circle with dots"])
    # the same loss by hand from full logits: targets are the caption tokens + eos, nothing of the prompt/image
    emb = m.llm.get_input_embeddings()
    img = m.image_embeds(x)
    p, n = m.pre_ids.shape[0], img.shape[1]
    seq = torch.cat([emb(m.pre_ids).expand(2, -1, -1), img, emb(tok["input_ids"])], 1)
    mask = torch.cat([torch.ones(2, p + n, dtype=torch.long), tok["attention_mask"]], 1)
    logits = m.llm(inputs_embeds=seq, attention_mask=mask).logits[:, p + n - 1:-1]
    target = tok["input_ids"].masked_fill(tok["attention_mask"] == 0, -100)
    target[:, : len(m.post_ids)] = -100
    expect = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    got = m.caption_loss(x, tok["input_ids"], tok["attention_mask"])
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    assert int((target != -100).sum()) == sum(m.count_tokens(c) - len(m.post_ids) for c in
                                              ["a red heart", "a blue circle with dots"])
    for p_ in m.image_tower.parameters():
        p_.requires_grad_(False)
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-2)
    m.train()
    first = None
    for _ in range(80):
        loss = m.caption_loss(x, tok["input_ids"], tok["attention_mask"])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first
    m.eval()
    greedy = m.generate(x, num_beams=1, max_new_tokens=6)
    beams = m.generate(x, num_beams=3, max_new_tokens=6)
    assert len(greedy) == len(beams) == 2 and all(isinstance(t, str) for t in greedy + beams)
    assert greedy == beams == ["a red heart", "a blue circle with dots"]  # memorised: image -> its caption
    with pytest.raises(ValueError, match="must be >= 1"):
        m.generate(x, max_new_tokens=0)


def test_chat_template_split_puts_image_inside_the_user_turn(tiny):
    tok = tiny.tok
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    try:
        pre, post = chat_parts(tok, "What is this emoji called?")
    finally:
        tok.chat_template = None
    assert tok.decode(pre).replace(" ", "").endswith("user")  # <|im_start|> user \n | image | ...
    assert "what is this emoji called?" in tok.decode(post) and "assistant" in tok.decode(post)


def test_missing_converted_llm_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTL_WEIGHTS_CACHE", str(tmp_path))
    cfg = tiny_llava_config(text={"path": "weights:smollm2", "config": None})
    with pytest.raises(WeightsError, match="run `mmtl weights get smollm2` once"):
        build_model(cfg)


def _pipeline(shards: dict, tmp_path: Path, name: str, kind: str, init_from=None):
    from mmtl.config import build_pipeline

    raw = yaml.safe_load((ROOT / "pipelines" / "emoji-llava.yaml").read_text())
    raw["data"] = {"train": shards["train"], "test": shards["test"]}
    raw["model"] = tiny_llava_config(init_from=init_from).model_dump(mode="json")
    raw["strategy"]["kind"] = kind
    raw["strategy"]["caption"].update(caption_field=None, num_beams=2, max_new_tokens=6, gallery=4)
    raw["train"].update(runs_root=str(tmp_path / "runs"), name=name, max_steps=4, micro_batch_size=8,
                        warmup_steps=0, checkpoint_every=2, log_every=1, lr=0.01)
    raw["tracking"]["model_name"] = f"llava-{name}"
    return build_pipeline(raw)


@pytest.mark.e2e
def test_two_stages_projector_then_lora_end_to_end(ray_local, tiny_shards, tmp_path):
    """Stage (a): projector only (frozen towers); stage (b): LoRA in the LLM + projector, warm-started from (a)'s
    export; both through Ray Train + DeepSpeed ZeRO-2, evaluated with captioning metrics and registered."""
    from safetensors.torch import load_file

    from mmtl.recipes import run_pipeline

    a = run_pipeline(_pipeline(tiny_shards, tmp_path, "stage-a", "frozen"), say=lambda m: None)
    assert a["recipe"] == "captioning" and a["steps"] == 4 and math.isfinite(a["metrics"]["train/loss"])
    trainable_a = a["params_trainable"]
    proj = sum(p.numel() for p in build_model(tiny_llava_config()).projector.parameters())
    assert trainable_a == proj  # stage (a) trains the projector only
    b = run_pipeline(_pipeline(tiny_shards, tmp_path, "stage-b", "lora", init_from=a["export_path"]),
                     say=lambda m: None)
    assert b["params_trainable"] > proj
    for k in ("bleu4", "cider_d", "exact_match"):
        assert f"test/captioning/{k}" in b["metrics"]
    sa, sb = load_file(a["export_path"]), load_file(b["export_path"])
    assert not any("lora_" in k for k in sb)  # merged
    assert set(sa) == set(sb)
    assert not torch.equal(sa["llm.model.layers.0.self_attn.q_proj.weight"],
                           sb["llm.model.layers.0.self_attn.q_proj.weight"])  # LoRA merged into the LLM
    assert torch.equal(sa["image_tower.conv_stem.weight"], sb["image_tower.conv_stem.weight"])  # towers: text only
    assert b["registered_model"]["name"] == "llava-stage-b"


def test_qformer_projector_gives_a_fixed_number_of_image_tokens_and_learns():
    from mmtl.models.projectors import QueryTransformer

    torch.manual_seed(0)
    m = build_model(tiny_llava_config(decoder=dict(image_layer=-3, prompt="What is this?", projector="qformer",
                                                   num_queries=3, qformer_layers=1)))
    assert isinstance(m.projector, QueryTransformer)
    x = torch.randn(2, 3, 32, 32)
    assert m.image_tokens(x).shape == (2, 4, 48) and m.image_embeds(x).shape == (2, 3, 32)  # 4 grid tokens -> 3
    big = torch.randn(1, 3, 64, 64)
    assert m.image_tokens(big).shape[1] == 16 and m.image_embeds(big).shape == (1, 3, 32)  # any grid -> Q tokens
    new = get_family("llava").new_parameters(m)
    assert "projector.queries" in new and set(new) == {f"projector.{n}" for n, _ in m.projector.named_parameters()}
    # the queries read the image: two images -> two captions, learned through the Q-Former
    tok = m.tokenize(["a red heart", "a blue circle"])
    for p_ in list(m.image_tower.parameters()):
        p_.requires_grad_(False)
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-2)
    m.train()
    for _ in range(80):
        loss = m.caption_loss(x, tok["input_ids"], tok["attention_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    assert m.generate(x, max_new_tokens=5) == ["a red heart", "a blue circle"]
    with pytest.raises(ValueError, match="heads dividing dim"):
        QueryTransformer(48, 32, num_queries=2, dim=30, heads=8)
