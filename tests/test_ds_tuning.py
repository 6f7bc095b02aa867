"""On one fp32 rank without optimizer offload the DeepSpeed engine runs ZeRO stage 0 without the backward
all-reduce (mmtl.train.ds_tuning): same updates as plain torch and as ZeRO-2, checkpoints record the engine's
stage, and a checkpoint written by a ZeRO-2 engine (before this rule) still resumes exactly."""
from __future__ import annotations

import copy
import json

import torch

import mmtl.train.loop as loop
from mmtl.config import TrainConfig
from mmtl.train.ds_tuning import engine_zero_stage, skip_single_rank_allreduce, with_zero_stage


def test_engine_stage_rule():
    cfg = TrainConfig(zero_stage=2)
    assert engine_zero_stage(cfg, 1) == 0 and engine_zero_stage(cfg, 2) == 2
    assert engine_zero_stage(TrainConfig(zero_stage=1), 1) == 0
    assert engine_zero_stage(TrainConfig(zero_stage=3), 1) == 3
    assert engine_zero_stage(TrainConfig(zero_stage=2, precision="bf16"), 1) == 2
    assert engine_zero_stage(TrainConfig(zero_stage=2, offload_optimizer=True), 1) == 2
    assert skip_single_rank_allreduce(cfg, 1, 0) and not skip_single_rank_allreduce(cfg, 2, 0)
    assert not skip_single_rank_allreduce(TrainConfig(zero_stage=0, precision="bf16"), 1, 0)
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "train_batch_size": 8}
    assert with_zero_stage(ds, 0) == {"zero_optimization": {"stage": 0}, "train_batch_size": 8}
    assert with_zero_stage(ds, 2) is ds


def test_single_rank_engine_matches_plain_torch_and_zero2():
    from mmtl.bench.step_loops import bench_pipeline, build_bench_model, make_batches, run_torch
    from mmtl.models import tiny_two_tower_config
    from mmtl.train.loop import build_engine, single_process_group
    from mmtl.train.step import train_step

    cfg = tiny_two_tower_config()
    batches = make_batches(cfg, 4, 8)
    with single_process_group():
        pipe = bench_pipeline(cfg, 2, 8, 5)
        pristine = build_bench_model(pipe)
        ref = copy.deepcopy(pristine)  # in train mode (dropout active): the same seed before each side's steps
        torch.manual_seed(123)
        run_torch(pipe, ref, batches)
        for stage in (None, 2):  # None: the rule (stage 0 here); 2: ZeRO-2 as configured
            engine = build_engine(pipe, copy.deepcopy(pristine), zero_stage=stage)
            assert engine.zero_optimization_stage() == (0 if stage is None else 2)
            assert engine.enable_backward_allreduce == (stage is not None)
            torch.manual_seed(123)
            for b in batches:
                train_step(engine, [b])
            got = dict(engine.module.model.named_parameters())
            for k, v in ref.named_parameters():
                torch.testing.assert_close(got[k].detach(), v.detach(), atol=1e-6, rtol=1e-5,
                                           msg=lambda m, k=k: f"{k}: {m}")


def test_zero2_checkpoint_from_before_the_rule_resumes(tmp_path, monkeypatch):
    import test_resume_strategies as rs

    full = rs.STRATEGIES["full"]
    with monkeypatch.context() as m:  # the old behaviour: the engine runs the configured stage
        m.setattr(loop, "engine_zero_stage", lambda cfg, world_size: cfg.zero_stage)
        uninterrupted = rs._train(full, 4, keep=tmp_path / "ckpt2")
    meta_p = tmp_path / "ckpt2" / "mmtl_meta.json"
    meta = json.loads(meta_p.read_text())
    assert meta["engine_zero_stage"] == 2
    del meta["engine_zero_stage"]  # as written before the key existed
    meta_p.write_text(json.dumps(meta))
    resumed = rs._train(full, 4, resume_dir=tmp_path / "ckpt2")
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], atol=1e-6, rtol=1e-5)
    fresh = rs._train(full, 2, keep=tmp_path / "new")
    assert json.loads((tmp_path / "new" / "mmtl_meta.json").read_text())["engine_zero_stage"] == 0
    assert fresh
