"""``mmtl bench strategies``: the transfer strategies side by side on one pipeline (default: the quickstart's
emoji data and towers), each trained by the real ``mmtl run`` path with the same data, resolution, steps and
global batch, one after the other in one process.

Rows (``strategy.*`` / ``train.*`` overrides on top of the pipeline and the common settings):

=============  ============================================================================================
row            what trains
=============  ============================================================================================
frozen         projection heads + logit scale; both towers frozen (their outputs are cached)
lit            LiT (Zhai et al. 2022): image tower locked, text tower fine-tuned at ``train.tower_lr``
lora_text      LoRA (Hu et al. 2021) in the text tower + heads; image tower frozen
lora_both      LoRA in both towers + heads (family default targets)
full           every weight; towers at ``train.tower_lr``, heads at ``train.lr``
=============  ============================================================================================

Reported per row: held-out image->text and text->image R@1 / R@10 on ``eval.sets[0]``, trainable parameters,
estimated model-state memory per worker (:mod:`mmtl.train.memory`), peak resident memory of a training worker
(``ru_maxrss``, MiB: includes the Ray worker, the towers and activations), training wall time (Ray Train
``fit``) and the whole row's wall time, and the 1-minute load average at the start and end of the row
(other work on the machine slows rows down).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ROWS: dict[str, tuple[str, list[str]]] = {
    "frozen": ("frozen towers, heads only", ["strategy.kind=frozen", "strategy.lock=both"]),
    "lit": ("LiT: image locked, text tuned", ["strategy.kind=frozen", "strategy.lock=image"]),
    "lora_text": ("LoRA text tower", ["strategy.kind=lora", "strategy.lora.towers=[text]"]),
    "lora_both": ("LoRA both towers", ["strategy.kind=lora", "strategy.lora.towers=[image,text]"]),
    "full": ("full fine-tuning", ["strategy.kind=full"]),
}


def common_overrides(image_size: int, steps: int, micro_batch: int, runs_root: str, tower_lr: float,
                     context_length: int) -> list[str]:
    """Settings shared by every row (same data, resolution, steps, global batch and eval)."""
    return [
        f"model.image_size={image_size}", f"model.context_length={context_length}",
        f"train.max_steps={steps}", f"train.micro_batch_size={micro_batch}", "train.grad_accum_steps=1",
        "train.global_batch_size=null", f"train.warmup_steps={max(1, steps // 10)}",
        f"train.checkpoint_every={steps}", f"train.tower_lr={tower_lr}", f"train.runs_root={runs_root}",
        "train.resume=never", "train.max_failures=0",
        "eval.before_training=false", "eval.ridge_baseline=false", "eval.sets=[test]", "eval.zero_shot=null",
        "tracking.model_name=null", "tracking.log_model=false", "tracking.experiment=bench-strategies",
    ]


def run_row(pipeline: str, name: str, common: list[str], say: Callable[[str], None]) -> dict:
    """Train and evaluate one row through :func:`mmtl.recipes.run_pipeline`; returns its measured fields."""
    from mmtl.config import load_pipeline
    from mmtl.recipes import run_pipeline

    label, extra = ROWS[name]
    pipe = load_pipeline(pipeline, common + extra + [f"train.name=bench-{name}"])
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    summary = run_pipeline(pipe, say=lambda m: say(f"[{name}] {m}"))
    m, tr = summary["metrics"], summary["trainable"]
    ev = pipe.eval.sets[0]
    return {
        "row": name, "strategy": label,
        "i2t_R@1": m[f"{ev}/image_to_text_recall_at_1"], "i2t_R@10": m.get(f"{ev}/image_to_text_recall_at_10"),
        "t2i_R@1": m[f"{ev}/text_to_image_recall_at_1"], "t2i_R@10": m.get(f"{ev}/text_to_image_recall_at_10"),
        "params_trainable": tr["params_trainable"], "trainable_share": tr["trainable_share"],
        "est_model_state_mib": tr["est_model_state_bytes_per_worker"] / 2**20,
        "peak_rss_mib": m.get("train/peak_rss_mb"), "train_s": summary["train_time_s"],
        "row_s": time.perf_counter() - t0, "load_start": load0, "load_end": os.getloadavg()[0],
        "final_loss": m.get("train/loss"), "run_dir": summary["run_dir"],
    }


def bench_strategies(pipeline: str = "pipelines/quickstart.yaml", rows: Sequence[str] = tuple(ROWS),
                     image_size: int = 128, steps: int = 150, micro_batch: int = 32, tower_lr: float = 1e-5,
                     context_length: int = 32, runs_root: str = "runs/bench-strategies",
                     out: Optional[Path] = None, say: Callable[[str], None] = print,
                     extra_overrides: Sequence[str] = ()) -> dict:
    """Run ``rows`` (names from :data:`ROWS`) and return ``{"settings": ..., "rows": [...]}``; with ``out`` the
    result is also written there as JSON after every row (a crash keeps the finished rows). ``extra_overrides``
    (dotted ``a.b=c``) are applied to every row after the common settings.

    Raises:
        ValueError: unknown row name.
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {list(ROWS)}")
    settings = {"pipeline": pipeline, "image_size": image_size, "steps": steps, "micro_batch": micro_batch,
                "tower_lr": tower_lr, "context_length": context_length, "cpus": os.cpu_count()}
    common = common_overrides(image_size, steps, micro_batch, str(Path(runs_root).resolve()), tower_lr, context_length)
    common += list(extra_overrides)
    if extra_overrides:
        settings["overrides"] = list(extra_overrides)
    result: dict = {"settings": settings, "rows": []}
    for name in rows:
        say(f"row {name}: {ROWS[name][0]}")
        result["rows"].append(run_row(pipeline, name, common, say))
        if out:
            Path(out).write_text(json.dumps(result, indent=1))
    return result


def format_markdown(result: dict) -> str:
    """The result as a Markdown table (the README's)."""
    head = ("| strategy | i2t R@1 | i2t R@10 | t2i R@1 | t2i R@10 | trainable params | est. model states / worker "
            "| peak RSS / worker | train time | row time | load |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        lines.append(
            f"| {r['strategy']} | {r['i2t_R@1']:.3f} | {r['i2t_R@10']:.3f} | {r['t2i_R@1']:.3f} | {r['t2i_R@10']:.3f} "
            f"| {r['params_trainable']:,} ({100 * r['trainable_share']:.2f}%) | {r['est_model_state_mib']:.0f} MiB "
            f"| {r['peak_rss_mib']:.0f} MiB | {r['train_s']:.0f} s | {r['row_s']:.0f} s "
            f"| {r['load_start']:.1f}-{r['load_end']:.1f} |")
    s = result["settings"]
    lines.append(f"\n{s['image_size']} px, {s['steps']} steps, micro-batch {s['micro_batch']} x 2 workers, "
                 f"context {s['context_length']} tokens, tower LR {s['tower_lr']:g}, {s['cpus']} CPUs.")
    return "\n".join(lines)
