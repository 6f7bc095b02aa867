"""DINO self-distillation (strategy.self_supervised.method: dino): the loss by hand, the EMA teacher and the center,
the multi-crop map stage, DeepSpeed steps calling the teacher update, and a run end to end on Ray Train."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_pair, tiny_pipeline

SSL = {"tower": "image", "method": "dino", "dino_out_dim": 16, "proj_hidden": 32, "proj_dim": 8, "local_crops": 2,
       "local_size": 16}


def test_dino_loss_hand_computed():
    from mmtl.train.dino import dino_loss

    torch.manual_seed(0)
    b, k = 3, 5
    student = torch.randn(4 * b, k)  # 2 global + 2 local views, view-major
    teacher = torch.randn(2 * b, k)
    center = torch.randn(1, k) * 0.1
    loss, ent = dino_loss(student, teacher, center, 2, 0.1, 0.04)
    p = F.softmax((teacher - center) / 0.04, dim=-1).chunk(2)
    logs = F.log_softmax(student / 0.1, dim=-1).chunk(4)
    terms = [(-p[i] * logs[v]).sum(-1).mean() for i in range(2) for v in range(4) if v != i]
    assert len(terms) == 6 and loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    pt = F.softmax((teacher - center) / 0.04, dim=-1)
    assert ent.item() == pytest.approx(float(-(pt * pt.log()).sum(-1).mean()), rel=1e-5)


def _pipe(tmp_path, **train):
    from mmtl.config import Pipeline

    return Pipeline.model_validate(tiny_pipeline(
        {"train": str(tmp_path / "img"), "val": None, "test": None}, tmp_path / "runs",
        strategy={"kind": "self_supervised", "self_supervised": SSL},
        train={"num_workers": 1, "max_steps": 4, "checkpoint_every": 4, "micro_batch_size": 4, "zero_stage": 2,
               **train}))


def test_teacher_is_an_ema_of_the_student_and_the_center_moves(tmp_path):
    from mmtl.models import build_model
    from mmtl.train.dino import DinoModule

    pipe = _pipe(tmp_path)
    torch.manual_seed(0)
    m = DinoModule(build_model(pipe.model), pipe.strategy.self_supervised, max_steps=4).train()
    assert all(not p.requires_grad for p in list(m.teacher_tower.parameters()) + list(m.teacher_head.parameters()))
    g, loc = torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 3, 16, 16)
    loss = m(g, loc)
    loss.backward()
    assert math.isfinite(loss.item()) and m.ssl_head.prototypes.grad is not None
    assert m.metrics()["center_norm"] > 0  # the center took a step toward the teacher's batch mean
    student = [p.detach().clone() for p in m.model.image_tower.parameters()]
    teacher0 = [p.detach().clone() for p in m.teacher_tower.parameters()]
    with torch.no_grad():
        for p in m.model.image_tower.parameters():
            p.add_(0.5)  # as if an optimizer step moved the student
    assert m.momentum() == pytest.approx(0.996)
    m.after_optimizer_step()
    for s, t0, t in zip(student, teacher0, m.teacher_tower.parameters()):
        torch.testing.assert_close(t, 0.996 * t0 + 0.004 * (s + 0.5))
    assert int(m.steps_done) == 1 and m.momentum() == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    m.steps_done.fill_(4)
    assert m.momentum() == pytest.approx(1.0)


def test_config_rules():
    from pydantic import ValidationError

    from mmtl.config import SelfSupervisedConfig

    assert SelfSupervisedConfig(tower="image", method="dino").local_px(224) == 96
    with pytest.raises(ValidationError, match="use method: mlm"):
        SelfSupervisedConfig(tower="text", method="dino")
    with pytest.raises(ValidationError, match="local_scale"):
        SelfSupervisedConfig(tower="image", method="dino", local_scale=(0.5, 0.1))


def test_map_stage_crops_then_deepspeed_steps_update_the_teacher(tmp_path, ray_local):
    from mmtl.data.build import ShardWriter
    from mmtl.data.unpaired import build_unpaired_dataset
    from mmtl.models import build_model
    from mmtl.strategies import apply_strategy, get_strategy
    from mmtl.train.dino import DinoModule
    from mmtl.train.loop import run_training, single_process_group
    from mmtl.train.selfsup import SelfSupervisedModule

    with ShardWriter(tmp_path / "img", "img") as w:
        for i in range(16):
            w.write(f"{i:06d}", synthetic_pair(i)[0], "png", None)
    pipe = _pipe(tmp_path)
    rows = build_unpaired_dataset(pipe, pipe.data.train, epochs=1, processes=1).take_all()
    assert len(rows) == 16 and rows[0]["global_views"].shape == (2, 3, 32, 32)
    assert rows[0]["local_views"].shape == (2, 3, 16, 16)
    assert not np.allclose(rows[0]["global_views"][0], rows[0]["global_views"][1])  # two random global crops

    model = build_model(pipe.model)
    apply_strategy(model, pipe.strategy)
    created = []

    class Recorded:
        @staticmethod
        def from_pipeline(p, mdl):
            created.append(SelfSupervisedModule.from_pipeline(p, mdl))
            return created[-1]

    batches = ({k: torch.from_numpy(np.stack([r[k] for r in rows[j:j + 4]])) for k in ("global_views", "local_views")}
               for j in range(0, 16, 4))
    with single_process_group():
        m = run_training(pipe, model, batches, train_module=Recorded)
    module = created[0]
    assert isinstance(module, DinoModule) and m["steps"] == 4 and int(module.steps_done) == 4
    assert math.isfinite(m["train/dino_loss"]) and m["train/teacher_momentum"] > 0.996
    student = dict(module.model.image_tower.named_parameters())
    teacher = dict(module.teacher_tower.named_parameters())
    moved = [n for n in teacher if not torch.equal(teacher[n], student[n])]
    assert moved, "teacher equals the student: no EMA lag"
    sd = get_strategy("self_supervised").export_state_dict(
        pipe, {**{f"image_tower.{k}": v for k, v in module.model.image_tower.state_dict().items()},
               **{f"teacher_tower.{k}": v for k, v in module.teacher_tower.state_dict().items()},
               **{f"teacher_head.{k}": v for k, v in module.teacher_head.state_dict().items()},
               **{f"ssl_head.{k}": v for k, v in module.ssl_head.state_dict().items()}})
    assert {k.split(".")[0] for k in sd} == {"image_tower", "ssl_head"}
    n = next(iter(moved))
    assert torch.equal(sd[f"image_tower.{n}"], teacher[n])  # the export holds the teacher


@pytest.mark.e2e
def test_dino_run_end_to_end(tmp_path, ray_local):
    from safetensors.torch import load_file

    from mmtl.config import Pipeline
    from mmtl.data.build import ShardWriter
    from mmtl.recipes import run_pipeline

    for split, start in (("img", 0), ("imgtest", 500)):
        with ShardWriter(tmp_path / split, split) as w:
            for i in range(start, start + 16):
                w.write(f"{i:06d}", synthetic_pair(i)[0], "png", None)
    raw = tiny_pipeline({"train": str(tmp_path / "img"), "val": None, "test": str(tmp_path / "imgtest")},
                        tmp_path / "runs", strategy={"kind": "self_supervised", "self_supervised": SSL},
                        train={"name": "dino", "max_steps": 4, "checkpoint_every": 2, "micro_batch_size": 4})
    raw["eval"] = {"sets": ["test"], "batch_size": 8}
    s = run_pipeline(Pipeline.model_validate(raw), say=lambda m: None)
    m = s["metrics"]
    assert s["steps"] == 4 and s["method"] == "dino"
    assert math.isfinite(m["test/dino_loss"]) and math.isfinite(m["test/dino_loss_before"])
    assert 0 <= m["test/teacher_entropy"] <= math.log(16) + 1e-6 and m["train/teacher_momentum"] > 0.996
    assert {k.split(".")[0] for k in load_file(s["export_path"])} == {"image_tower", "ssl_head"}
