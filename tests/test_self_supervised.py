"""Self-supervised recipe: NT-Xent against hand-computed values, MLM masking counts, and one tiny end-to-end
masked-LM run on local Ray followed by a contrastive run warm-started from it (``model.init_from``)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import synthetic_pair, tiny_pipeline, write_split

TEXTS = ["the heart size is normal and the lungs are clear", "no pleural effusion or pneumothorax is seen",
         "mild cardiomegaly with low lung volumes", "degenerative changes of the thoracic spine are present",
         "there is a right lower lobe opacity concerning for pneumonia", "stable calcified granuloma in the left apex"]


def test_nt_xent_hand_computed():
    from mmtl.train.losses import nt_xent

    # two orthogonal samples, views identical: each view sees its positive at cos 1 and two negatives at cos 0
    e = torch.eye(2)
    loss, top1 = nt_xent(e, e.clone(), temperature=1.0)
    assert float(loss) == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)  # -log(e / (e + 1 + 1))
    assert float(top1) == 1.0
    # Eq. 1 written out as a loop over the 2N views, temperature 0.5
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).double()
    n, tau, total = 3, 0.5, 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / den)
    assert float(nt_xent(z1, z2, tau)[0]) == pytest.approx(total / (2 * n), abs=1e-5)
    with pytest.raises(ValueError, match="of one shape"):
        nt_xent(z1, z2[:2], tau)


def test_mlm_masking_counts():
    from mmtl.data.unpaired import MLMMasker
    from mmtl.models import build_tokenizer, tiny_two_tower_config

    tok = build_tokenizer(tiny_two_tower_config(context_length=64))
    enc = tok(TEXTS * 50)
    ids = enc["input_ids"]
    masker = MLMMasker(tok.tokenizer, 0.15)
    masked, labels = masker(ids, torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(tok.tokenizer.all_special_ids))
    sel = labels != -100
    assert not bool((sel & special).any())  # [CLS] / [SEP] / [PAD] are never selected
    assert torch.equal(labels[sel], ids[sel])  # targets are the original tokens
    share = float(sel.sum()) / float((~special).sum())
    assert 0.13 < share < 0.17, share  # 15 % of the maskable tokens
    to_mask = float((masked[sel] == tok.tokenizer.mask_token_id).float().mean())
    kept = float((masked[sel] == ids[sel]).float().mean())
    assert 0.75 < to_mask < 0.85 and 0.06 < kept < 0.14, (to_mask, kept)  # BERT's 80 / 10 / 10
    assert torch.equal(masked[~sel], ids[~sel])
    again, _ = MLMMasker(tok.tokenizer, 0.15)(ids, torch.Generator().manual_seed(0))
    assert torch.equal(again, masked)  # seeded: before/after measures see the same masks


def _text_shards(root):
    from mmtl.data.build import build_shards

    src = root / "texts.txt"
    src.write_text("\n".join(TEXTS * 12 + ["ok"]), encoding="utf-8")
    build_shards(str(src), str(root / "text"), modality="text", test_fraction=0.2, max_samples_per_shard=20,
                 progress=False)
    return root / "text"


def test_mlm_run_then_warm_started_alignment(tmp_path, ray_local):
    import mlflow
    from safetensors.torch import load_file

    from mmtl.config import Pipeline
    from mmtl.recipes import run_pipeline

    text = _text_shards(tmp_path)
    runs = tmp_path / "runs"
    raw = tiny_pipeline({"train": str(text / "train"), "val": None, "test": str(text / "test")}, runs,
                        strategy={"kind": "self_supervised", "self_supervised": {"tower": "text", "method": "mlm"}},
                        train={"name": "ssl", "max_steps": 6, "checkpoint_every": 3, "lr": 0.003,
                               "micro_batch_size": 8})
    raw["eval"] = {"sets": ["test"], "batch_size": 32}
    raw["data"]["min_caption_chars"] = 1
    ssl = run_pipeline(Pipeline.model_validate(raw), say=lambda s: None)
    m = ssl["metrics"]
    assert ssl["steps"] == 6 and ssl["tower"] == "text" and ssl["registered_model"] is None
    assert m["test/mlm_perplexity"] < m["test/mlm_perplexity_before"]  # 6 steps on 6 repeated texts
    assert m["test/masked_tokens"] == m["test/masked_tokens_before"] > 0  # the same held-out masks
    assert math.isfinite(m["train/mlm_loss"]) and m["train/mlm_perplexity"] > 1
    export = load_file(ssl["export_path"])
    assert {k.split(".")[0] for k in export} == {"text_tower", "ssl_head"}  # the adapted tower + the MLM head

    # alignment warm-started from the self-supervised run folder: its text tower is the adapted one
    pair = write_split(tmp_path / "pairs", 48)
    test = write_split(tmp_path / "ptest", 16, start=500)
    raw2 = tiny_pipeline({"train": str(pair), "val": None, "test": str(test)}, runs,
                         train={"name": "align", "max_steps": 3, "checkpoint_every": 3})
    raw2["model"]["init_from"] = ssl["run_dir"]
    raw2["eval"]["before_training"] = False
    align = run_pipeline(Pipeline.model_validate(raw2), say=lambda s: None)
    aligned = load_file(align["export_path"])
    text_keys = [k for k in export if k.startswith("text_tower.")]
    assert text_keys and all(torch.equal(aligned[k], export[k]) for k in text_keys)  # frozen: equal
    run = mlflow.MlflowClient(align["mlflow_tracking_uri"]).get_run(align["mlflow_run_id"])
    assert run.data.tags["mmtl.parent_run_id"] == ssl["mlflow_run_id"]
    assert run.data.tags["mmtl.parent_strategy"] == "self_supervised"
    assert str(text / "train") in run.data.tags["mmtl.parent_data_train"]


def test_map_stage_views_and_masks_then_simclr_steps(tmp_path, ray_local):
    """The Ray Data map stage makes two different views per image (and masked tokens per text); SimCLR then
    trains 3 DeepSpeed steps on those rows in one process (the image tower changes, the text tower does not)."""
    from mmtl.config import Pipeline
    from mmtl.data.build import ShardWriter
    from mmtl.data.unpaired import build_unpaired_dataset
    from mmtl.models import build_model
    from mmtl.strategies import apply_strategy
    from mmtl.train.loop import run_training, single_process_group
    from mmtl.train.selfsup import SelfSupervisedModule, SimCLRModule

    with ShardWriter(tmp_path / "img", "img") as w:
        for i in range(16):
            w.write(f"{i:06d}", synthetic_pair(i)[0], "png", None)
    ssl = {"tower": "image", "method": "simclr", "temperature": 0.5}
    raw = tiny_pipeline({"train": str(tmp_path / "img"), "val": None, "test": None}, tmp_path / "runs",
                        strategy={"kind": "self_supervised", "self_supervised": ssl},
                        train={"num_workers": 1, "max_steps": 3, "checkpoint_every": 3, "micro_batch_size": 4,
                               "zero_stage": 2})
    pipe = Pipeline.model_validate(raw)
    rows = build_unpaired_dataset(pipe, pipe.data.train, epochs=1, processes=1).take_all()
    assert len(rows) == 16 and rows[0]["view1"].shape == (3, 32, 32)
    assert all(not np.allclose(r["view1"], r["view2"]) for r in rows)  # two random views of each image

    model = build_model(pipe.model)
    apply_strategy(model, pipe.strategy)
    assert isinstance(SelfSupervisedModule.from_pipeline(pipe, model), SimCLRModule)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batches = ({"view1": torch.from_numpy(np.stack([r["view1"] for r in rows[j:j + 4]])),
                "view2": torch.from_numpy(np.stack([r["view2"] for r in rows[j:j + 4]]))} for j in range(0, 16, 4))
    with single_process_group():
        m = run_training(pipe, model, batches, train_module=SelfSupervisedModule)
    assert m["steps"] == 3 and math.isfinite(m["train/ntxent_loss"]) and 0 <= m["train/ntxent_top1"] <= 1
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"image_tower"}

    # text-only rows: masked ids, labels only at masked positions
    text = _text_shards(tmp_path)
    tp = Pipeline.model_validate(tiny_pipeline({"train": str(text / "train"), "val": None, "test": None}, tmp_path,
                                               strategy={"kind": "self_supervised"}))
    trows = build_unpaired_dataset(tp, tp.data.train, epochs=1, processes=1).take_all()
    labels = np.stack([r["labels"] for r in trows])
    ids = np.stack([r["input_ids"] for r in trows])
    assert trows and min(int(r["attention_mask"].sum()) for r in trows) >= 7 + 2  # "ok" (1 token) was skipped
    assert (labels != -100).sum() > 0 and (ids[labels != -100] != labels[labels != -100]).mean() > 0.5


def test_partial_unlock_trains_only_the_tail_and_keeps_frozen_batchnorm_stats():
    """strategy.unlock_image_blocks with the self_supervised recipe: the last N blocks and what follows the block
    container train; earlier layers are frozen and their BatchNorm stays in eval mode (running stats kept)."""
    from torch import nn

    from mmtl.config.schema import StrategyConfig
    from mmtl.strategies.self_supervised import SelfSupervisedStrategy
    from mmtl.train.loop import set_train_modes

    def blk():
        return nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    class Tower(nn.Module):  # the layout of a timm EfficientNet: stem, blocks, conv_head + bn2, pooling
        def __init__(self):
            super().__init__()
            self.conv_stem, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.blocks = nn.Sequential(blk(), blk(), blk())
            self.conv_head, self.bn2 = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)

    model = nn.Module()
    model.image_tower, model.text_tower = Tower(), nn.Linear(3, 3)
    cfg = StrategyConfig(kind="self_supervised", unlock_image_blocks=2,
                         self_supervised={"tower": "image", "method": "simclr"})
    SelfSupervisedStrategy().apply(model, cfg)
    trainable = {n.split(".")[1] + ("." + n.split(".")[2] if n.split(".")[1] == "blocks" else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.1", "blocks.2", "conv_head", "bn2"}
    set_train_modes(model)
    t = model.image_tower
    assert not t.bn1.training and not t.blocks[0][1].training
    assert t.blocks[1][1].training and t.bn2.training
    SelfSupervisedStrategy().apply(model, cfg.model_copy(update={"unlock_image_blocks": 0}))
    assert all(p.requires_grad for p in model.image_tower.parameters())
    assert not any(p.requires_grad for p in model.text_tower.parameters())
    with pytest.raises(ValueError, match="has 3"):
        SelfSupervisedStrategy().apply(model, cfg.model_copy(update={"unlock_image_blocks": 4}))
