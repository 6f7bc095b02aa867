"""Free-form VQA with the ``llava`` family: fewer image tokens (pixel shuffle), the system turn, and the
per-question-type exact match of the captioning evaluation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtl.models import build_model
from mmtl.models.llava import chat_parts, tiny_llava_config
from mmtl.models.projectors import pixel_shuffle


def test_pixel_shuffle_folds_each_block_into_one_token_in_grid_order():
    grid = torch.arange(4 * 4 * 2, dtype=torch.float32).reshape(1, 16, 2)  # 4x4 grid, row-major, 2 channels
    out = pixel_shuffle(grid, 2)
    assert out.shape == (1, 4, 8)
    # token 0 = the top-left 2x2 block: grid cells (0,0) (0,1) (1,0) (1,1) = rows 0, 1, 4, 5 of the flat grid
    assert out[0, 0].tolist() == torch.cat([grid[0, i] for i in (0, 1, 4, 5)]).tolist()
    # token 1 = the top-right block: cells (0,2) (0,3) (1,2) (1,3)
    assert out[0, 1].tolist() == torch.cat([grid[0, i] for i in (2, 3, 6, 7)]).tolist()
    assert torch.equal(pixel_shuffle(grid, 1), grid)
    with pytest.raises(ValueError, match="divisible by 3"):
        pixel_shuffle(grid, 3)
    with pytest.raises(ValueError, match="square"):
        pixel_shuffle(torch.zeros(1, 12, 2), 2)


def test_pixel_shuffle_model_sees_fewer_wider_tokens():
    torch.manual_seed(0)
    m = build_model(tiny_llava_config(decoder=dict(image_layer=-3, prompt="What is this?", pixel_shuffle=2)))
    x = torch.randn(2, 3, 64, 64)  # stride-16 stage: a 4x4 grid of 48-d tokens
    assert m.image_tokens(x).shape == (2, 4, 4 * 48)
    assert m.image_embeds(x).shape == (2, 4, 32)
    assert m.projector[0].in_features == 4 * 48
    tok = m.tokenize(["a red heart", "a blue circle"])
    loss = m.caption_loss(x, tok["input_ids"], tok["attention_mask"])
    assert torch.isfinite(loss) and loss.item() > 0
    with pytest.raises(ValueError, match="pixel_shuffle=2"):
        m.image_tokens(torch.randn(1, 3, 48, 48))  # a 3x3 grid cannot be cut into 2x2 blocks
    with pytest.raises(ValueError, match="pixel_shuffle=3"):  # refused when the model is built
        build_model(tiny_llava_config(decoder=dict(image_layer=-3, pixel_shuffle=3), image_size=64))


def test_system_prompt_replaces_the_template_default(chatml_tok):
    from mmtl.data.conversations import parse_conversation
    from mmtl.models.llava_chat import IMAGE_ID, tokenize_chats

    tok = chatml_tok
    default_pre, post = chat_parts(tok, "How many?")
    empty_pre, empty_post = chat_parts(tok, "How many?", "")
    assert "smollm" in tok.decode(default_pre) and "smollm" not in tok.decode(empty_pre)  # uncased tokenizer
    assert len(empty_pre) < len(default_pre) and empty_post == post
    own = chat_parts(tok, "How many?", "Answer with a number.")[0]
    assert "answer with a number" in tok.decode(own)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    plain = parse_conversation([{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "2"}])
    has_sys = parse_conversation([{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nHi"},
                                  {"from": "gpt", "value": "2"}])
    out = tokenize_chats(tok, [plain, has_sys], end, 0, 64, system_prompt="")
    first = [int(t) for t in out["input_ids"][0] if t != IMAGE_ID and t != 0]
    # the training text of a question = the prompt generation uses: pre + image + post, then the answer
    n_pre = len(empty_pre)
    assert first[:n_pre] == empty_pre and int(out["input_ids"][0][n_pre]) == IMAGE_ID
    assert first[n_pre:n_pre + len(empty_post)] == empty_post
    second = tok.decode([int(t) for t in out["input_ids"][1] if t >= 0])
    assert "be brief" in second and second.count("system") == 1  # a conversation's own system turn is kept


def test_per_type_exact_match_normalises_and_counts():
    from mmtl.eval.caption_eval import per_type_exact_match

    types = ["count", "count", "colour", "colour", "colour"]
    refs = [["2"], ["0"], ["red"], ["blue"], ["Yellow"]]
    hyp = ["2.", "1", "Red", "green", "yellow!"]
    out = per_type_exact_match(types, refs, hyp)
    assert out["vqa/count/exact_match"] == pytest.approx(0.5)
    assert out["vqa/colour/exact_match"] == pytest.approx(2 / 3)
    assert out["vqa/exact_match"] == pytest.approx(3 / 5)
    assert out["vqa/count/questions"] == 2 and out["vqa/colour/questions"] == 3


def test_caption_set_reads_question_types_only_when_every_sample_has_one(tmp_path):
    from conftest import synthetic_pair

    from mmtl.data.build import ShardWriter
    from mmtl.data.captions import load_caption_set

    conv = [{"from": "human", "value": "<image>\nhow many?"}, {"from": "gpt", "value": "1"}]

    def write(name, metas):
        with ShardWriter(str(tmp_path / name), prefix=name, max_samples_per_shard=8) as w:
            for i, meta in enumerate(metas):
                w.write(f"k{i}", synthetic_pair(i)[0], "png", "q", {"conversations": conv, **meta})
        return str(tmp_path / name)

    geo = (lambda im: im.resize((32, 32)))
    cs = load_caption_set(write("typed", [{"question_type": "count"}, {"question_type": "colour"}]), geo, len, 64,
                          conversations_field="conversations")
    assert cs.question_types == ["count", "colour"]
    assert cs.subset(np.array([False, True])).question_types == ["colour"]
    mixed = load_caption_set(write("mixed", [{"question_type": "count"}, {}]), geo, len, 64,
                             conversations_field="conversations")
    assert mixed.question_types is None
