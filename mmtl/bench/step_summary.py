"""Summaries of the step benchmark's timings (:mod:`mmtl.bench.step`): per side medians, ratios between sides,
what a log step costs, and the model's description."""
from __future__ import annotations

import statistics
from typing import Optional

from mmtl.config import ModelConfig


def _median(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def _log_step_extra(outs: list[dict], warmup: int, log_every: int) -> Optional[float]:
    """Mean wall period that holds a log step's extra work (progress line, Ray report) minus the mean of the
    other periods: what a log step costs on top of a plain one. The timestamp of step n is taken in
    ``on_step`` before that work, so it lands in the period that ends at step n + 1."""
    log, other = [], []
    for o in outs:
        for j, x in enumerate(o["wall"]):  # period j ends at step warmup + 1 + j
            (log if (warmup + j) % log_every == 0 else other).append(x)
    return round(statistics.fmean(log) - statistics.fmean(other), 4) if log and other else None


def _summarise(runs: dict[str, list[dict]], warmup: int, log_every: int) -> dict:
    sides = {}
    for side, outs in runs.items():
        per_run = [statistics.fmean(o["wall"]) for o in outs]
        per_run_cpu = [statistics.fmean(o["cpu"]) for o in outs]
        sides[side] = {
            "step_s": round(_median(per_run), 5),
            "cpu_step_s": round(_median(per_run_cpu), 5),
            # CPU of the loop's own thread (the rest of cpu_step_s: background threads, e.g. Ray's)
            "thread_cpu_step_s": round(_median([statistics.fmean(o["thread_cpu"]) for o in outs]), 5),
            "step_median_s": round(_median([x for o in outs for x in o["wall"]]), 5),
            "runs_step_s": [round(x, 5) for x in per_run],
            "log_step_extra_s": _log_step_extra(outs, warmup, log_every) if side.startswith("mmtl") else None,
        }
    step = {s: v["step_s"] for s, v in sides.items()}
    cpu = {s: v["cpu_step_s"] for s, v in sides.items()}
    pairs = (("mmtl/bare_ds", "mmtl", "bare_ds"), ("mmtl_ray/bare_ds", "mmtl_ray", "bare_ds"),
             ("bare_ds/torch", "bare_ds", "torch"))
    # paired: per repeat, the two sides ran back to back (same load); median over repeats
    paired = {k: round(_median([statistics.fmean(x["wall"]) / statistics.fmean(y["wall"])
                                for x, y in zip(runs[a], runs[b])]), 4)
              for k, a, b in pairs if a in runs and b in runs}
    out = {
        "sides": sides,
        "ratio": {k: round(_ratio(step.get(a), step.get(b)), 4) for k, a, b in pairs if a in step and b in step},
        "cpu_ratio": {k: round(_ratio(cpu.get(a), cpu.get(b)), 4) for k, a, b in pairs if a in cpu and b in cpu},
        "paired_ratio": paired,
        # the stage the engine ran (mmtl.train.ds_tuning: 0 for ZeRO 1-2 on one fp32 rank)
        "engine_zero_stage": runs["bare_ds"][0].get("engine_zero_stage"),
        "engine_build_s": round(_median([o["engine_build_s"] for o in runs["bare_ds"]]), 2),
        "final_checkpoint_s": round(_median([o["final_checkpoint_s"] for o in runs["mmtl"]]), 2),
        "mmtl_first_step_s": round(_median([o["first_step_s"] for o in runs["mmtl"]]), 2),
    }
    if "mmtl_ray" in runs:
        rr = runs["mmtl_ray"]
        out["ray"] = {k: [round(o[k], 2) for o in rr] for k in
                      ("worker_start_s", "worker_first_step_s", "final_checkpoint_s", "fit_s")}
        out["ray"]["worker_threads"] = rr[0]["threads"]
        out["ray"]["worker_niceness"] = rr[0]["niceness"]
    return out


def _model_summary(cfg: ModelConfig, params: Optional[dict]) -> dict:
    t = cfg.text.config or {}
    return {
        "vision": cfg.vision.timm_name, "image_size": cfg.image_size,
        "text": f"{t.get('model_type', 'bert')} {t.get('num_hidden_layers', '?')}x{t.get('hidden_size', '?')}"
                if t else cfg.text.path,
        "context_length": cfg.context_length, "embed_dim": cfg.embed_dim,
        "params": params["params_total"] if params else None,
        "params_trainable": params["params_trainable"] if params else None,
    }
