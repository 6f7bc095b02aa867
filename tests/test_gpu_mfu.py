"""The prepared GPU check (mmtl/bench/gpu_mfu.py, not run without a GPU): its pipeline validates, the FLOP count
of a step is positive and scales with the batch, the peak table answers by device name, and --dry-run works on
CPU with the tiny model."""
from __future__ import annotations

import json

from mmtl.bench.gpu_mfu import flops_per_step, gpu_pipeline, main, peak_flops
from mmtl.config import build_pipeline


def test_pipeline_and_flops(tmp_path):
    full = build_pipeline(gpu_pipeline(str(tmp_path), str(tmp_path), 256, 80))
    assert full.model.family == "open_clip" and full.model.arch == "ViT-B-16" and full.train.precision == "bf16"
    assert full.train.use_gpu and full.train.zero_stage == 2 and full.train.num_workers == 1
    tiny = build_pipeline(gpu_pipeline(str(tmp_path), str(tmp_path), 4, 2, tiny=True))
    assert not tiny.train.use_gpu and tiny.train.cpus_per_worker == 1.0  # the CPU smoke run fits a 2-core machine
    f4, f8 = flops_per_step(tiny, 4), flops_per_step(tiny, 8)
    assert f4 > 0 and 1.8 < f8 / f4 < 2.2
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None and peak_flops("cpu", 1.5) == 1.5e12


def test_dry_run_on_cpu(tmp_path, capsys):
    main(["--dry-run", "--tiny", "--micro-batch", "4", "--out", str(tmp_path)])
    r = json.loads(capsys.readouterr().out)
    assert r["ran"] is False and r["flops_per_step"] > 0 and r["arch"] == "tiny open_clip" and (tmp_path / "pipeline.yaml").exists()
