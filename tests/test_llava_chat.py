"""Chat-format samples (LLaVA ``conversations``) for the ``llava`` family: checking, counting, labels on the
assistant turns, the loss, and a tiny model that learns per-sample answers to per-sample questions."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmtl.data.conversations import ConversationRejected, parse_conversation
from mmtl.models import build_model
from mmtl.models.llava import tiny_llava_config
from mmtl.models.llava_chat import IMAGE_ID, tokenize_chats

H = lambda v: {"from": "human", "value": v}  # noqa: E731
G = lambda v: {"from": "gpt", "value": v}  # noqa: E731
Q = "<image>\nWhat colour is this tile?"

# (key, conversations, expected reason or None when kept, counted notes)
CASES = [
    ("ok", [H(Q), G("It is a dark red tile.")], None, []),
    ("sys", [{"from": "system", "value": "Answer in one word."}, H(Q), G("Purple.")], None, []),
    ("endhum", [H(Q), G("Teal."), H("Are you sure?")], None, ["trailing_user_turn"]),
    ("alias", [{"role": "user", "content": Q}, {"role": "assistant", "content": "Green."}], None, []),
    ("noimg", [H("What colour is the square?"), G("Yellow.")], None, ["image_token_inserted"]),
    ("upper", [H("<image>\nIs the word <Image> on the sign?"), G("No.")], None, []),
    ("onlyhum", [H(Q)], "no_assistant_turn", []),
    ("emptyans", [H(Q), G("  ")], "empty_assistant_turn", []),
    ("gptfirst", [G("Hello!"), H(Q), G("Orange.")], "roles_out_of_order", []),
    ("tool", [H(Q), G("Let me check."), {"from": "tool", "value": "{}"}, G("Pink.")], "unknown_role", []),
    ("strconv", '[{"from": "human", "value": "hi"}]', "bad_conversation_format", []),
    ("nullval", [{"from": "human", "value": None}, G("Grey.")], "bad_conversation_format", []),
    ("badkeys", [{"speaker": "human", "text": Q}, G("Grey.")], "bad_conversation_format", []),
    ("dup", [H("<image>\nWhat is this?\n<image>"), G("A red square.")], "image_token_count", []),
    ("multi", [H(Q), G("Blue."), H("<image>\nAnd its shape?"), G("A circle.")], "image_token_count", []),
    ("asst", [H("What shape?"), G("<image>\nA green circle.")], "image_token_in_assistant", []),
]


@pytest.mark.parametrize("key,conv,reason,notes", CASES, ids=[c[0] for c in CASES])
def test_parse_conversation(key, conv, reason, notes):
    if reason is not None:
        with pytest.raises(ConversationRejected) as e:
            parse_conversation(conv)
        assert e.value.reason == reason
        if reason == "unknown_role":
            assert "'tool'" in str(e.value)
        return
    c = parse_conversation(conv)
    assert c.notes == notes
    assert sum(m["content"].count("<image>") for m in c.messages) == 1
    assert c.messages[-1]["role"] == "assistant" and {m["role"] for m in c.messages} <= {"system", "user", "assistant"}
    if key == "upper":
        assert "<Image>" in c.messages[0]["content"]
    if key == "noimg":
        assert c.messages[0]["content"] == "<image>\nWhat colour is the square?"


def _write_chat_shards(out: Path) -> Path:
    from conftest import synthetic_pair

    from mmtl.data.build import ShardWriter

    with ShardWriter(str(out), prefix="chat", max_samples_per_shard=8) as w:
        for i, (key, conv, _, _) in enumerate(CASES):
            img, _, _ = synthetic_pair(i)
            w.write(key, img, "png", "a coloured tile", {"conversations": conv})
    return out


def test_reader_skips_and_counts_by_reason(tmp_path):
    from mmtl.data.captions import load_caption_set

    cs = load_caption_set(str(_write_chat_shards(tmp_path / "chat")), lambda im: im.resize((32, 32)), len, 64,
                          conversations_field="conversations")
    kept = [c[0] for c in CASES if c[2] is None]
    assert sorted(cs.keys) == sorted(kept)
    want = {}
    for _, _, reason, notes in CASES:
        if reason:
            want[reason] = want.get(reason, 0) + 1
        for n in notes:
            want[n] = want.get(n, 0) + 1
    assert {k: v for k, v in cs.stats.items() if k in want} == want
    assert cs.stats["samples_ok"] == len(kept)
    i = cs.keys.index("sys")
    assert cs.prompts[i] == "What colour is this tile?" and cs.captions[i] == "Purple."


def test_chat_template_labels_cover_exactly_the_answers(chatml_tok):
    tok = chatml_tok
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with_sys = parse_conversation([{"from": "system", "value": "Answer in one word."}, H(Q), G("Purple."),
                                   H("And the border?"), G("Thin black.")])
    no_sys = parse_conversation([H(Q), G("Teal.")])
    out = tokenize_chats(tok, [with_sys, no_sys], eos_id=end, pad_id=0, context_length=96)
    assert out["kept"].tolist() == [True, True] and out["stats"] == {}
    for row, answers in zip(range(2), (["Purple.", "Thin black."], ["Teal."])):
        ids, lab = out["input_ids"][row], out["labels"][row]
        assert (ids == IMAGE_ID).sum() == 1
        sup = [int(t) for t in lab if t != -100]
        want = []
        for a in answers:
            want += tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert sup == want  # the answers and their end tokens, nothing of system / user / headers
        text = tok.decode([int(t) for t, m in zip(ids, out["attention_mask"][row]) if m and t != IMAGE_ID])
        assert text.count("<|im_start|> system") + text.count("<|im_start|>system") == 1
    first = tok.decode([int(t) for t in out["input_ids"][0] if t >= 0])
    assert "answer in one word" in first and "smollm" not in first  # no default system prompt in front of it
    assert "smollm" in tok.decode([int(t) for t in out["input_ids"][1] if t >= 0])
    cut = tokenize_chats(tok, [with_sys], eos_id=end, pad_id=0, context_length=30)
    assert cut["stats"] == {"conversation_truncated": 1} and cut["kept"].tolist() == [True]
    none = tokenize_chats(tok, [with_sys], eos_id=end, pad_id=0, context_length=12)  # the image is cut off
    assert none["stats"] == {"conversation_truncated": 1, "conversation_too_long": 1} and not none["kept"][0]


def test_chat_loss_matches_full_logits_and_learns_per_question_answers():
    torch.manual_seed(0)
    m = build_model(tiny_llava_config(context_length=40))
    convs = [parse_conversation([H("<image>\nWhat colour?"), G("red")]),
             parse_conversation([H("<image>\nWhat shape?"), G("a circle")])]
    t = {k: torch.as_tensor(v) for k, v in m.tokenize_chats(convs).items() if k in ("input_ids", "attention_mask",
                                                                                   "labels")}
    x = torch.randn(2, 3, 32, 32)
    # by hand: the image tokens spliced at the IMAGE_ID position, next-token CE over the labelled positions
    emb, img = m.llm.get_input_embeddings(), m.image_embeds(x)
    seqs, labs, masks = [], [], []
    for b in range(2):
        p = int((t["input_ids"][b] == IMAGE_ID).nonzero())
        ids = t["input_ids"][b].clamp(min=0)
        seqs.append(torch.cat([emb(ids[:p]), img[b], emb(ids[p + 1:])]))
        labs.append(torch.cat([t["labels"][b, :p], torch.full((img.shape[1],), -100), t["labels"][b, p + 1:]]))
        masks.append(torch.cat([t["attention_mask"][b, :p], torch.ones(img.shape[1], dtype=torch.long),
                                t["attention_mask"][b, p + 1:]]))
    logits = m.llm(inputs_embeds=torch.stack(seqs), attention_mask=torch.stack(masks)).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.stack(labs)[:, 1:].reshape(-1))
    assert m.chat_loss(x, t["input_ids"], t["attention_mask"], t["labels"]).item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="exactly one image position"):
        m.chat_loss(x, t["input_ids"].clamp(min=0), t["attention_mask"], t["labels"])
    # the same image, two questions, two answers: the answer depends on the question
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    for p_ in m.image_tower.parameters():
        p_.requires_grad_(False)
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-2)
    m.train()
    for _ in range(80):
        loss = m.chat_loss(x, t["input_ids"], t["attention_mask"], t["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    assert m.generate(x[:1], "What colour?", max_new_tokens=4) == ["red"]
    assert m.generate(x[:1], "What shape?", max_new_tokens=4) == ["a circle"]


@pytest.mark.e2e
def test_chat_pipeline_end_to_end(ray_local, tmp_path):
    """pipelines/diagram-llava.yaml with the tiny llava model on a tiny generated diagram set: chat samples ->
    Ray Train + DeepSpeed ZeRO-2 (labels through the arrays) -> export -> per-question generation in evaluation."""
    import json

    import yaml

    from mmtl.config import build_pipeline
    from mmtl.datasets.diagrams import build_diagrams
    from mmtl.recipes import run_pipeline

    build_diagrams(tmp_path / "d", train_images=8, test_images=4, image_size=64, seed=1)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines" / "diagram-llava.yaml").read_text())
    raw["data"] = {"train": str(tmp_path / "d" / "train"), "test": str(tmp_path / "d" / "test")}
    raw["model"] = tiny_llava_config(context_length=48).model_dump(mode="json")
    raw["strategy"]["caption"].update(max_new_tokens=4, gallery=2)
    raw["train"].update(runs_root=str(tmp_path / "runs"), name="chat", max_steps=3, micro_batch_size=4,
                        warmup_steps=0, checkpoint_every=3, log_every=1, lr=0.01)
    raw["tracking"]["model_name"] = None
    s = run_pipeline(build_pipeline(raw), say=lambda m: None)
    from mmtl.data.captions import load_caption_set

    n_train = len(load_caption_set(raw["data"]["train"], lambda im: im, len, 48))  # image-question samples
    assert s["steps"] == 3 and s["num_train_captions"] == n_train  # every sample's conversation kept
    rows = json.loads((Path(s["run_dir"]) / "captioning" / "captions_test.json").read_text())
    assert len(rows) == 16 and all(r["prompt"] and "<image>" not in r["prompt"] for r in rows)
    assert len({r["prompt"] for r in rows}) > 1 and 0 <= s["metrics"]["test/captioning/exact_match"] <= 1
    # free-form VQA: exact match per question type, the same from `mmtl eval --task vqa` on the export
    types = [r["question_type"] for r in rows]
    m = s["metrics"]
    assert {t: m[f"test/vqa/{t}/questions"] for t in set(types)} == {t: types.count(t) for t in set(types)}
    hits = sum(m[f"test/vqa/{t}/exact_match"] * types.count(t) for t in set(types))
    assert hits / len(rows) == pytest.approx(m["test/vqa/exact_match"])
    from mmtl.eval.runner import run_eval

    rep = run_eval(str(Path(s["run_dir"]) / "export"), "vqa", raw["data"]["test"], log_to_mlflow=False)
    assert rep["task"] == "vqa" and rep["metrics"]["vqa/exact_match"] == pytest.approx(m["test/vqa/exact_match"])
