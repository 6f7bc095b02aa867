"""`mmtl bench strategies`: every row is a valid pipeline with the intended strategy; the table renders."""
from __future__ import annotations

import pytest

from mmtl.bench.strategies import ROWS, bench_strategies, common_overrides, format_markdown
from mmtl.config import load_pipeline


def test_rows_resolve_to_the_intended_strategies(tmp_path):
    common = common_overrides(96, 40, 16, str(tmp_path), 2e-5, 24)
    pipes = {name: load_pipeline("pipelines/quickstart.yaml", common + extra) for name, (_, extra) in ROWS.items()}
    assert pipes["frozen"].strategy.kind == "frozen" and pipes["frozen"].strategy.lock == "both"
    assert pipes["lit"].strategy.lock == "image"
    assert pipes["lora_text"].strategy.kind == "lora" and pipes["lora_text"].strategy.lora.towers == ["text"]
    assert pipes["lora_both"].strategy.lora.towers == ["image", "text"]
    assert pipes["full"].strategy.kind == "full"
    for p in pipes.values():  # same data, resolution, steps, batch for every row
        assert (p.model.image_size, p.train.max_steps, p.train.micro_batch_size, p.train.tower_lr) == (96, 40, 16, 2e-5)
        assert p.data.train == pipes["frozen"].data.train and p.eval.sets == ["test"]


def test_unknown_row_is_refused():
    with pytest.raises(ValueError, match="unknown rows"):
        bench_strategies(rows=["frozen", "nope"])


def test_markdown_table():
    row = {"strategy": "LoRA both towers", "i2t_R@1": 0.25, "i2t_R@10": 0.5, "t2i_R@1": 0.2, "t2i_R@10": 0.6,
           "params_trainable": 1234567, "trainable_share": 0.0431, "est_model_state_mib": 110.4, "peak_rss_mib": 2800.0,
           "train_s": 300.2, "row_s": 340.0, "load_start": 2.0, "load_end": 2.5}
    md = format_markdown({"settings": {"image_size": 128, "steps": 120, "micro_batch": 32, "context_length": 32,
                                       "tower_lr": 1e-5, "cpus": 2}, "rows": [row]})
    assert "| LoRA both towers | 0.250 | 0.500 | 0.200 | 0.600 | 1,234,567 (4.31%) | 110 MiB | 2800 MiB | 300 s |" in md
    assert "128 px, 120 steps" in md
