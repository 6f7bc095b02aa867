"""The step benchmark runs end to end on a tiny model, without Ray, and returns a well-formed result."""
from __future__ import annotations

import json
import math

import torch.distributed as dist


def test_bench_step_tiny_no_ray():
    from mmtl.bench.step import format_table, bench_step
    from mmtl.models import tiny_two_tower_config

    r = bench_step(steps=3, warmup=1, zero_stages=(0,), micro_batch=8, use_ray=False, repeats=1,
                   model_cfg=tiny_two_tower_config())
    json.dumps(r)  # JSON-serialisable (the CLI's --json)
    assert set(r["stages"]) == {"zero0"}
    st = r["stages"]["zero0"]
    assert set(st["sides"]) == {"torch", "bare_ds", "mmtl"}
    for side in st["sides"].values():
        assert side["step_s"] > 0 and side["cpu_step_s"] >= 0 and len(side["runs_step_s"]) == 1
    assert set(st["ratio"]) == {"mmtl/bare_ds", "bare_ds/torch"}
    for v in st["ratio"].values():
        assert math.isfinite(v) and v > 0
    rr = r["ratios"]  # the headline ratios of `mmtl bench step --json`, from the only stage measured
    assert rr["stage"] == "zero0" and rr["mmtl/bare_ds"] == st["ratio"]["mmtl/bare_ds"]
    assert set(rr) == {"stage", "mmtl/bare_ds", "mmtl/bare_ds_cpu", "bare_ds/torch", "bare_ds/torch_cpu",
                       "mmtl/torch", "mmtl/torch_cpu"}
    assert all(math.isfinite(v) and v > 0 for k, v in rr.items() if k != "stage")
    assert st["final_checkpoint_s"] >= 0 and st["engine_build_s"] > 0
    assert r["model"]["params"] > 0 and r["model"]["params_trainable"] == r["model"]["params"]
    assert r["steps"] == 3 and r["warmup"] == 1 and r["ray"] is None
    assert "zero0" in format_table(r)
    assert not dist.is_initialized()  # the single-process group it made is gone


def test_bench_step_presets():
    from mmtl.bench.step import PRESETS, bench_step, step_settings
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(bench_step).parameters.items()}
    assert {k: defaults[k] for k in PRESETS["default"]} == PRESETS["default"]  # defaults = the short preset
    assert PRESETS["default"]["zero_stages"] == (2,)
    assert step_settings(True)["zero_stages"] == (0, 2) and step_settings(True)["repeats"] == 3
    assert step_settings(False, steps=7, zero_stages=[1], repeats=None) == {**PRESETS["default"], "steps": 7,
                                                                            "zero_stages": (1,)}


def test_bench_model_trains_in_the_modes_run_training_sets():
    """Every side gets the model in the modes ``run_training`` sets (towers in train mode under strategy full):
    ``build_model`` leaves the towers in eval mode, which skipped dropout and batch statistics on the torch and
    bare DeepSpeed sides only (the in-process mmtl side measured 1.07x the bare loop because of it)."""
    from mmtl.bench.step_loops import bench_pipeline, build_bench_model
    from mmtl.models import tiny_two_tower_config

    model = build_bench_model(bench_pipeline(tiny_two_tower_config(), 2, 8, 4))
    assert all(m.training for m in model.modules())


def test_side_order_is_abba():
    from mmtl.bench.step import side_order

    sides = ["torch", "bare_ds", "mmtl", "mmtl_ray"]
    assert side_order(sides, 0) == sides and side_order(sides, 1) == sides[::-1]
    assert side_order(sides, 2) == ["bare_ds", "mmtl", "mmtl_ray", "torch"]
    assert side_order(sides, 3) == ["torch", "mmtl_ray", "mmtl", "bare_ds"]
    for r in range(8):  # every side runs once per repeat
        assert sorted(side_order(sides, r)) == sorted(sides)
