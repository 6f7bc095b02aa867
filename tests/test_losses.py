"""Losses, metrics and the global-batch gradient of the gathered contrastive loss (2 gloo processes)."""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port

from mmtl.eval.metrics import class_embeddings, recall_at_k, zero_shot_metrics
from mmtl.eval.ridge import ridge_recall
from mmtl.train.losses import clip_loss, gather_with_grad, siglip_loss


def test_clip_loss_matches_hand_computation():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    s = torch.tensor([2.0])
    logits = 2.0 * img @ txt.t()
    # row-wise CE by hand
    def ce(row, i):
        return -(row[i] - torch.logsumexp(row, 0))
    i2t = (ce(logits[0], 0) + ce(logits[1], 1)) / 2
    t2i = (ce(logits.t()[0], 0) + ce(logits.t()[1], 1)) / 2
    assert torch.allclose(clip_loss(img, txt, s), (i2t + t2i) / 2)


def test_clip_loss_perfect_alignment_is_low():
    x = torch.eye(8)
    assert clip_loss(x, x, torch.tensor([100.0])) < 1e-3
    assert clip_loss(x, x.roll(1, 0), torch.tensor([100.0])) > 10


def test_siglip_loss_hand_value():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = img.clone()
    t, b = torch.tensor([1.0]), torch.tensor([0.0])
    # diag logits 1 (z=+1), off-diag 0 (z=-1): each term -log sigmoid
    expect = -(2 * math.log(1 / (1 + math.exp(-1))) + 2 * math.log(0.5)) / 2
    assert siglip_loss(img, txt, t, b).item() == pytest.approx(expect, rel=1e-6)



def _worker(rank, world, port, img_full, txt_full, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = img_full.shape[0] // world
    w = torch.nn.Parameter(torch.eye(img_full.shape[1]))
    scale = torch.nn.Parameter(torch.tensor([3.0]))
    img = F.normalize(img_full[rank * b:(rank + 1) * b] @ w, dim=-1)
    txt = F.normalize(txt_full[rank * b:(rank + 1) * b], dim=-1)
    loss = clip_loss(gather_with_grad(img), gather_with_grad(txt), scale)
    loss.backward()
    g = w.grad.clone()
    dist.all_reduce(g)
    g /= world  # what DeepSpeed's gradient averaging does
    out[rank] = (loss.item(), g.numpy())
    dist.destroy_process_group()


def test_gathered_loss_gradient_equals_global_batch_gradient():
    torch.manual_seed(0)
    img, txt = torch.randn(8, 4), torch.randn(8, 4)
    w = torch.nn.Parameter(torch.eye(4))
    ref = clip_loss(F.normalize(img @ w, dim=-1), F.normalize(txt, dim=-1), torch.tensor([3.0]))
    ref.backward()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), img, txt, out), nprocs=2, join=True)
    for r in range(2):
        assert out[r][0] == pytest.approx(ref.item(), rel=1e-5)
        np.testing.assert_allclose(out[r][1], w.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_recall_at_k_hand_example():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0]])
    r = recall_at_k(img, txt, ks=(1, 2))
    # cosines: img0 -> [.995, 1, 0]: truth 2nd; img1 -> [.0995, 0, 1]: truth 3rd;
    # img2 -> [.774, .707, .707]: truth ties with t1 (ties favour the truth) -> 2nd
    assert r["image_to_text_recall_at_1"] == pytest.approx(0.0)
    assert r["image_to_text_recall_at_2"] == pytest.approx(2 / 3)
    # text queries: t0 -> [1, 0, .704]: 1st; t1 -> [1, 0, .707]: truth img1 3rd; t2 -> [0, 1, .707]: 2nd
    assert r["text_to_image_recall_at_1"] == pytest.approx(1 / 3)
    assert r["text_to_image_recall_at_2"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        recall_at_k(img, txt[:2])


def test_zero_shot_metrics_hand_example():
    cls = F.normalize(torch.eye(3), dim=-1)
    img = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    m = zero_shot_metrics(img, cls, [0, 1, 2, 2])
    assert m["acc1"] == pytest.approx(0.75)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["chance"] == pytest.approx(1 / 3) and "acc5" not in m


def test_template_ensemble_is_mean_of_normalised():
    emb = {"a x": torch.tensor([2.0, 0.0]), "b x": torch.tensor([0.0, 1.0])}
    out = class_embeddings(["x"], ["a {}", "b {}"], lambda ps: torch.stack([emb[p] for p in ps]))
    assert torch.allclose(out[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0))


def test_ridge_recovers_linear_map():
    rng = np.random.RandomState(0)
    x = rng.randn(200, 16)
    y = x @ rng.randn(16, 8)
    r = ridge_recall((x[:150], y[:150]), (x[150:], y[150:]), lam=1e-3)
    assert r["image_to_text_recall_at_1"] > 0.9
