"""Cross-attention fusion: token features per family, gated blocks, heads and losses (no Ray)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmtl.config import CrossAttentionConfig, StrategyConfig
from mmtl.fusion.blocks import CrossAttentionFusion, GatedCrossAttentionBlock, LateFusion, PerceiverResampler
from mmtl.fusion.heads import (build_vocab, itm_loss, mine_hard_negatives, per_type_accuracy, soft_scores,
                               vqa_accuracy, vqa_loss)
from mmtl.fusion.task import FusionTaskModule


@pytest.fixture(scope="module")
def tiny_model():
    from mmtl.models import build_model, tiny_two_tower_config
    from mmtl.strategies import apply_strategy

    torch.manual_seed(0)
    m = build_model(tiny_two_tower_config(image_size=64))
    apply_strategy(m, StrategyConfig(kind="cross_attention"))
    return m


@pytest.mark.parametrize("family", ["two_tower", "open_clip", "hf"])
def test_token_shapes_every_family(family):
    from mmtl.models import build_model, tiny_hf_clip_config, tiny_open_clip_config, tiny_two_tower_config

    cfg = {"two_tower": tiny_two_tower_config(image_size=64), "open_clip": tiny_open_clip_config(),
           "hf": tiny_hf_clip_config()}[family]
    m = build_model(cfg).eval()
    tok = m.tokenize(["how many red circles are there?", "a"])
    with torch.no_grad():
        it = m.image_tokens(torch.randn(2, 3, cfg.image_size, cfg.image_size))
        tt = m.text_tokens(tok["input_ids"], tok["attention_mask"])
    d_v, d_t = m.token_dims()
    assert it.dim() == 3 and it.shape[0] == 2 and it.shape[2] == d_v and it.shape[1] >= 1
    assert tt.shape == (2, cfg.context_length, d_t)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():  # an intermediate stage / block: -2 = the last one before the final tokens
        final, mid = m.image_tokens(x), m.image_tokens(x, layer=-2)
    assert mid.shape[0] == 2 and mid.shape[2] == m.token_dims(-2)[0] and m.token_dims(-2)[1] == d_t
    if family == "open_clip":  # final tokens = ln_post(last block's patch tokens)
        assert torch.allclose(m.image_tower.ln_post(mid), final, atol=1e-5)
    if family == "hf":  # CLIP: last_hidden_state is the last block's output (class token kept)
        assert torch.allclose(mid, final, atol=1e-5)
    with pytest.raises(ValueError, match="image_layer=-99"):
        m.token_dims(-99)
    with pytest.raises(ValueError, match="image_layer=-99"):
        m.image_tokens(torch.randn(1, 3, cfg.image_size, cfg.image_size), layer=-99)
    if family == "two_tower":  # tokens pool back to the pooled features exactly
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert it.shape[1] == 4  # 64 px / 32 = 2x2 grid
            assert torch.allclose(m.image_tokens(x).mean(1), m.image_features(x), atol=1e-5)
            stride16 = m.image_tokens(x, layer=-3)  # one feature-pyramid level finer: 4x4 grid at 64 px
            assert stride16.shape == (2, 16, m.token_dims(-3)[0])
            mask = tok["attention_mask"].unsqueeze(-1).float()
            pooled = (tt * mask).sum(1) / mask.sum(1)
            assert torch.allclose(pooled, m.text_features(tok["input_ids"], tok["attention_mask"]), atol=1e-5)


def test_gates_at_zero_leave_text_unchanged():
    torch.manual_seed(0)
    text, image = torch.randn(3, 7, 32), torch.randn(3, 5, 48)
    mask = torch.ones(3, 7)
    mask[0, 4:] = 0
    for resampler, self_attention in ((0, False), (4, False), (0, True)):
        fusion = CrossAttentionFusion(48, 32, n_blocks=3, n_heads=4, resampler_tokens=resampler,
                                      self_attention=self_attention)
        pooled, fused = fusion(image, text, mask)
        assert torch.equal(fused, text)
        assert torch.allclose(pooled[0], text[0, :4].mean(0), atol=1e-6)
        with torch.no_grad():
            fusion.blocks[0].attn_gate.fill_(0.5)
        assert not torch.allclose(fusion(image, text, mask)[1], text)
    blk = GatedCrossAttentionBlock(32, 4)
    assert blk.attn_gate.shape == (1,) and float(blk.attn_gate) == 0 and float(blk.ff_gate) == 0
    # text self-attention mixes real tokens only: changing the padding of row 0 leaves its real tokens alone
    fusion = CrossAttentionFusion(48, 32, n_blocks=2, n_heads=4, self_attention=True).eval()
    with torch.no_grad():
        for b in fusion.blocks:
            b.attn_gate.fill_(1.0), b.self_gate.fill_(1.0), b.ff_gate.fill_(1.0)
        other = text.clone()
        other[0, 4:] = torch.randn(3, 32) * 10
        a, b = fusion(image, text, mask)[1], fusion(image, other, mask)[1]
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-5) and not torch.allclose(a[0, :4], text[0, :4])
    assert torch.equal(a[1:], b[1:])


def test_resampler_fixed_token_count_and_errors():
    r = PerceiverResampler(32, n_latents=6, depth=2, n_heads=4)
    assert r(torch.randn(2, 11, 32)).shape == (2, 6, 32)
    with pytest.raises(ValueError, match="n_heads"):
        CrossAttentionFusion(48, 30, n_heads=4)
    fusion = CrossAttentionFusion(8, 16, n_heads=2, max_image_tokens=4)
    with pytest.raises(ValueError, match="max_image_tokens"):
        fusion(torch.randn(1, 5, 8), torch.randn(1, 3, 16), None)
    assert LateFusion(8, 16)(torch.randn(2, 5, 8), torch.randn(2, 3, 16), None)[0].shape == (2, 24)


@pytest.mark.parametrize("kind", ["xattn", "late"])
def test_only_fusion_and_head_get_gradients(tiny_model, kind):
    m = tiny_model
    module = FusionTaskModule(m, CrossAttentionConfig(kind=kind, n_heads=2, hidden=16), n_answers=5)
    tok = m.tokenize(["how many?", "what colour is the square?", "where?", "is it left?"])
    images = torch.randn(4, 3, 64, 64)
    it = m.image_tokens(images)  # computed with autograd on: frozen towers must still get no gradient
    tt = m.text_tokens(tok["input_ids"], tok["attention_mask"])
    target = torch.zeros(4, 5)
    target[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1
    loss = module(image_tokens=it, text_tokens=tt, text_mask=tok["attention_mask"], answer_target=target)
    loss.backward()
    for name, p in module.named_parameters():
        if name.startswith("model."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    if kind == "xattn":  # at step 0 only the gates (and the head) see a non-zero gradient through the blocks
        assert float(module.fusion.blocks[-1].ff_gate.grad.abs()) > 0
    assert set(module.metrics()) == {"vqa_acc"} and module.metrics() == {}


def test_vqa_loss_and_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    target = torch.tensor([[1.0, 0.0, 1 / 3], [0.0, 2 / 3, 1.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bce = lambda z, y: -(y * math.log(sig(z)) + (1 - y) * math.log(1 - sig(z)))  # noqa: E731
    expect = sum(bce(float(z), float(y)) for z, y in zip(logits.flatten(), target.flatten())) / 2
    assert float(vqa_loss(logits, target)) == pytest.approx(expect, rel=1e-6)
    acc = vqa_accuracy(logits, target)  # argmax 0 -> 1.0; argmax 1 -> 2/3
    assert acc.tolist() == pytest.approx([1.0, 2 / 3])
    assert per_type_accuracy(acc.tolist(), ["count", "colour"]) == pytest.approx(
        {"overall": 5 / 6, "colour": 2 / 3, "count": 1.0})
    with pytest.raises(ValueError):
        vqa_loss(logits, target[:, :2])


def test_soft_scores_and_vocab():
    vocab = {"2": 0, "3": 1, "red": 2}
    assert soft_scores(["2"], vocab).tolist() == [1, 0, 0]
    assert soft_scores(["2", "3"], vocab).tolist() == [0.5, 0.5, 0]
    np.testing.assert_allclose(soft_scores(["2", "2", "3", "blue"], vocab), [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(soft_scores(["red"] * 4 + ["2"] * 6, vocab), [1, 0, 1])  # VQA: min(1, n/3)
    assert build_vocab([["a"], ["b"], ["a"], ["c", "a"]], 2) == ["a", "b"]
    with pytest.raises(ValueError, match="at least 2"):
        build_vocab([["a"], ["a"]], 10)


def test_hard_negatives_and_itm():
    torch.manual_seed(0)
    sim = torch.tensor([[9.0, 8.0, -9.0], [-9.0, 9.0, 8.0], [8.0, -9.0, 9.0]])
    for _ in range(5):
        neg_t, neg_i = mine_hard_negatives(sim)
        assert neg_t.tolist() == [1, 2, 0]  # the hardest non-matching text per image
        assert neg_i.tolist() == [2, 0, 1]  # the hardest non-matching image per text
    with pytest.raises(ValueError):
        mine_hard_negatives(torch.zeros(1, 1))
    assert float(itm_loss(torch.tensor([0.0]), torch.tensor([0.0, 0.0]))) == pytest.approx(math.log(2))
    # samples 0 and 1 show the same image, 1 and 2 share a text: known positives are never drawn
    from mmtl.fusion.heads import itc_loss, known_positives

    pos = known_positives(torch.tensor([7, 7, 3]), torch.tensor([0, 1, 1]))
    assert pos.tolist() == [[True, True, False], [True, True, True], [False, True, True]]
    for _ in range(5):
        neg_t, neg_i = mine_hard_negatives(sim, positive=pos)
        assert neg_t.tolist() == [2, -1, 0] and neg_i.tolist() == [2, -1, 0]  # row 1 has no negative left
    # ITC with positives: targets spread over them (hand computation for row 0: targets 1/2, 1/2, 0)
    img = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    logits = img @ txt.t()
    full = itc_loss(img, txt, torch.tensor(1.0), pos)
    def soft_ce(lg, p):  # cross-entropy against targets spread evenly over each row's positives
        return -(p.float() / p.float().sum(1, keepdim=True) * torch.log_softmax(lg, 1)).sum(1).mean()

    ref = (soft_ce(logits, pos) + soft_ce(logits.t(), pos.t())) / 2
    assert float(full) == pytest.approx(float(ref), rel=1e-5)
    assert float(itc_loss(img, txt, torch.tensor(1.0))) == pytest.approx(
        float(itc_loss(img, txt, torch.tensor(1.0), torch.zeros(3, 3, dtype=torch.bool))), rel=1e-6)


def test_itm_module_trains_step(tiny_model):
    module = FusionTaskModule(tiny_model, CrossAttentionConfig(task="itm", n_heads=2, hidden=16))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    it, tt, mask = torch.randn(6, 4, 256), torch.randn(6, 5, 32), torch.ones(6, 5)
    loss = module(image_tokens=it, text_tokens=tt, text_mask=mask)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and "itm_acc" in module.metrics()
    # one image for the whole batch: every pair is a known positive, so only positives are scored
    same = module(image_tokens=it, text_tokens=tt, text_mask=mask, image_id=torch.zeros(6, dtype=torch.long),
                  text_id=torch.arange(6))
    assert torch.isfinite(same) and module._seen == 6


def test_strategy_refuses_unsupported_options(tiny_model):
    from mmtl.strategies import apply_strategy

    with pytest.raises(ValueError, match="tower_lora"):
        apply_strategy(tiny_model, StrategyConfig(kind="cross_attention", fusion={"tower_lora": True}))
    with pytest.raises(ValueError, match="lock"):
        apply_strategy(tiny_model, StrategyConfig(kind="cross_attention", lock="image"))
    with pytest.raises(ValueError, match="at least 2"):
        FusionTaskModule(tiny_model, CrossAttentionConfig(), n_answers=None)


def test_itm_and_vqa_evaluation_on_token_sets(tiny_model):
    from mmtl.eval.fusion_eval import evaluate_itm, evaluate_vqa
    from mmtl.fusion.features import TokenSet
    from mmtl.data.arrays import RowIndexed

    rng = np.random.default_rng(0)
    image, text = rng.standard_normal((3, 4, 256)), rng.standard_normal((6, 5, 32))
    image_tokens = RowIndexed(image.astype(np.float16), np.array([0, 0, 1, 1, 2, 2]))  # images a, b, c
    ts = TokenSet(image_tokens, text.astype(np.float16), np.ones((6, 5), dtype=np.int64), ["q"] * 6,
                  [["2"], ["red"], ["2", "3"], ["x"], ["3"], ["red"]],
                  ["count", "colour", "count", "count", "count", "colour"], ["a", "a", "b", "b", "c", "c"])
    itm = FusionTaskModule(tiny_model, CrossAttentionConfig(task="itm", n_heads=2, hidden=16)).eval()
    out = evaluate_itm(itm, ts)
    assert out["itm/num_samples"] == 6 and 0 <= out["itm/accuracy"] <= 1 and {"itm/count", "itm/colour"} <= set(out)
    vqa = FusionTaskModule(tiny_model, CrossAttentionConfig(n_heads=2, hidden=16), n_answers=3).eval()
    with torch.no_grad():
        vqa.head.net[-1].bias.copy_(torch.tensor([10.0, 0.0, 0.0]))  # always answers "2"
        vqa.head.net[-1].weight.zero_()
    metrics, preds = evaluate_vqa(vqa, ts, ["2", "3", "red"])
    assert preds == [0] * 6
    # scores of "2": 1, 0, 0.5, 0, 0, 0 -> count (1 + 0.5 + 0 + 0) / 4, colour 0
    assert metrics["vqa/count"] == pytest.approx(0.375) and metrics["vqa/colour"] == 0
    assert metrics["vqa/overall"] == pytest.approx(1.5 / 6) and metrics["vqa/out_of_vocab"] == 1
    # the training-time entry point goes through the eval-task registry: same numbers
    from types import SimpleNamespace

    from mmtl.eval.fusion_eval import evaluate_tokens

    def pipe(task):
        return SimpleNamespace(strategy=SimpleNamespace(fusion=SimpleNamespace(task=task, answers=["2", "3", "red"])))

    assert evaluate_tokens(vqa, pipe("vqa"), ts) == metrics
    assert evaluate_tokens(itm, pipe("itm"), ts) == out


def test_row_indexed_arrays_share_rows_and_batch_like_the_materialised_array():
    from mmtl.data.arrays import RowIndexed
    from mmtl.train.loop import feature_batches

    table = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    rows = np.array([2, 0, 0, 1, 2])
    view, full = RowIndexed(table, rows), table[rows]
    assert len(view) == 5 and view.shape == (5, 2, 4) and view.nbytes == table.nbytes + rows.nbytes
    np.testing.assert_array_equal(view[1:4], full[1:4])
    np.testing.assert_array_equal(view[np.array([4, 0, 3])], full[[4, 0, 3]])
    batch = next(feature_batches(iter([{"idx": torch.tensor([3, 1])}]), {"img": view, "y": np.arange(5)}))
    assert torch.equal(batch["img"], torch.from_numpy(full[[3, 1]])) and batch["y"].tolist() == [3, 1]
    with pytest.raises(ValueError, match="index"):
        RowIndexed(table, np.array([0, 3]))
    with pytest.raises(ValueError, match="index"):
        RowIndexed(table, np.zeros((2, 2), dtype=int))


def test_token_set_stores_each_image_once_and_the_cache_round_trips(tiny_model, tmp_path):
    from mmtl.data.samples import CleanOptions
    from mmtl.datasets.diagrams import build_diagrams
    from mmtl.fusion.features import load_or_compute

    build_diagrams(tmp_path / "d", train_images=6, test_images=2, image_size=64)
    fcfg, opts = CrossAttentionConfig(n_heads=2), CleanOptions()
    spec = str(tmp_path / "d" / "train")
    ts = load_or_compute(tiny_model, spec, fcfg, opts, tmp_path / "cache")
    ids = np.array(ts.image_ids)
    assert len(ts.image_tokens.table) == len(set(ts.image_ids)) == 6 and len(ts) > 6  # several questions each
    assert ts.image_tokens.shape == (len(ts), 4, 256)
    assert all(len(set(ts.image_tokens.rows[ids == i])) == 1 for i in set(ts.image_ids))
    again = load_or_compute(tiny_model, spec, fcfg, opts, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("fusion-*.npz"))) == 1
    np.testing.assert_array_equal(again.image_tokens[:], ts.image_tokens[:])
    np.testing.assert_array_equal(again.text_tokens, ts.text_tokens)
    assert again.answers == ts.answers and again.image_ids == ts.image_ids


def test_global_token_is_the_mean_image_token_with_its_own_position():
    torch.manual_seed(0)
    image = torch.randn(2, 4, 48)
    fusion = CrossAttentionFusion(48, 32, n_heads=4, global_token=True, max_image_tokens=5)
    media = fusion.media(image)
    assert media.shape == (2, 5, 32)
    expected = fusion.media_proj(image.mean(1)) + fusion.pos[4]
    assert torch.allclose(media[:, 4], expected, atol=1e-6)
    assert torch.allclose(media[:, :4], fusion.media_proj(image) + fusion.pos[:4], atol=1e-6)
    with pytest.raises(ValueError, match="max_image_tokens"):
        CrossAttentionFusion(48, 32, n_heads=4, global_token=True, max_image_tokens=4).media(image)


def test_vqa_samples_without_answers_are_skipped_and_counted(tiny_model, tmp_path):
    import io

    from PIL import Image

    from mmtl.data.samples import CleanOptions
    from mmtl.data.shardlist import EmptyDatasetError
    from mmtl.data.shardwriter import ShardWriter
    from mmtl.fusion.features import compute_tokens

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    metas = [{"answers": ["2"], "image_id": "a"}, {"answers": [], "image_id": "a"}, {"answers": ["  "]},
             {"image_id": "b"}, {"answers": "red", "question_type": "colour", "image_id": "c"}]
    with ShardWriter(tmp_path / "s", prefix="q") as w:
        for i, meta in enumerate(metas):
            w.write(f"k{i}", buf.getvalue(), "png", f"question {i}?", meta)
    ts = compute_tokens(tiny_model, str(tmp_path / "s"), CrossAttentionConfig(n_heads=2), CleanOptions())
    assert ts.answers == [["2"], ["red"]] and ts.qtypes == ["all", "colour"] and ts.image_ids == ["a", "c"]
    assert ts.stats["no_answers"] == 3 and len(ts.image_tokens.table) == 2  # image "b" never computed
    with ShardWriter(tmp_path / "long", prefix="q") as w:  # a question longer than the context is counted
        w.write("k0", buf.getvalue(), "png", "how many " * 60 + "circles?", {"answers": ["2"]})
        w.write("k1", buf.getvalue(), "png", "how many circles?", {"answers": ["1"]})
    counting = CleanOptions(context_length=tiny_model.cfg.context_length, count_tokens=tiny_model.count_tokens)
    long = compute_tokens(tiny_model, str(tmp_path / "long"), CrossAttentionConfig(n_heads=2), counting)
    assert long.stats["caption_truncated"] == 1 and len(long) == 2
    itm = compute_tokens(tiny_model, str(tmp_path / "s"), CrossAttentionConfig(task="itm", n_heads=2), CleanOptions())
    assert len(itm) == 5 and itm.captions[0] == "question 0? 2" and itm.captions[1] == "question 1?"
    blue = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 30, 200)).save(blue, format="PNG")
    with ShardWriter(tmp_path / "reused", prefix="q") as w:  # image_id "a" reused for another picture
        w.write("k0", buf.getvalue(), "png", "q0?", {"answers": ["1"], "image_id": "a"})
        w.write("k1", blue.getvalue(), "png", "q1?", {"answers": ["2"], "image_id": "a"})
        w.write("k2", buf.getvalue(), "png", "q2?", {"answers": ["3"], "image_id": "a"})
    ts = compute_tokens(tiny_model, str(tmp_path / "reused"), CrossAttentionConfig(n_heads=2), CleanOptions())
    assert ts.stats["image_id_conflict"] == 1 and len(ts.image_tokens.table) == 2
    assert list(ts.image_tokens.rows) == [0, 1, 0] and ts.image_ids[0] == ts.image_ids[2] != ts.image_ids[1]
    with ShardWriter(tmp_path / "none", prefix="q") as w:
        w.write("k0", buf.getvalue(), "png", "question?", {"image_id": "x"})
    with pytest.raises(EmptyDatasetError, match="answers"):
        compute_tokens(tiny_model, str(tmp_path / "none"), CrossAttentionConfig(n_heads=2), CleanOptions())


def test_answer_normalisation_and_vocab_errors(tmp_path):
    import collections

    from mmtl.config import build_pipeline
    from mmtl.fusion.features import _answers, normalize_answer
    from mmtl.recipes.fusion import answer_vocab

    assert [normalize_answer(v) for v in ("Red ", "two  words", 2, 2.0, 2.5, True, None, [1], {"a": 1}, " ")] == \
        ["red", "two words", "2", "2", "2.5", None, None, None, None, None]
    stats = collections.Counter()
    assert _answers({"answers": ["Red", 3, [1, 2], {"a": 1}, "", False]}, "answers", stats) == ["red", "3"]
    assert stats["bad_answer"] == 3
    raw = {"data": {"train": "x"}, "strategy": {"kind": "cross_attention", "fusion": {"answers": ["Red", "red "]}}}
    with pytest.raises(ValueError, match="more than once"):
        answer_vocab(build_pipeline(raw), [])
    raw["strategy"]["fusion"]["answers"] = ["Yes", "no"]
    assert answer_vocab(build_pipeline(raw), []) == ["yes", "no"]


def test_diagram_vqa_pipeline_is_the_measured_recipe():
    """pipelines/diagram-vqa.yaml keeps meaning what the README table measured with it."""
    from pathlib import Path

    from mmtl.config import load_pipeline

    pipe = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / "diagram-vqa.yaml")
    f, t = pipe.strategy.fusion, pipe.train
    assert pipe.strategy.kind == "cross_attention" and pipe.model.family == "two_tower"
    assert pipe.model.vision.timm_name == "tf_efficientnet_lite0" and pipe.model.image_size == 192
    assert (f.task, f.kind, f.n_blocks, f.n_heads, f.ff_mult, f.hidden, f.dropout) == ("vqa", "xattn", 2, 8, 2, 512, 0.1)
    assert (f.self_attention, f.global_token, f.image_layer, f.image_pool, f.resampler_tokens) == (False, False, -1, 1, 0)
    assert (t.num_workers * t.micro_batch_size * t.grad_accum_steps, t.max_steps, t.lr, t.warmup_steps) == \
        (128, 1000, 5e-4, 100)
