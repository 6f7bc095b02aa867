"""``mmtl bench ...``: benchmarks that print ratios measured side by side in one run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mmtl.cli.common import fail, say_to_console

bench_app = typer.Typer(help="Benchmarks (ratios measured side by side in one run).", no_args_is_help=True)


@bench_app.command("ingest")
def bench_ingest_cmd(
    path: Optional[str] = typer.Argument(None, help="Shards to read; default: write synthetic 224-px JPEG shards"),
    samples: Optional[int] = typer.Option(None, help="Synthetic samples to write (default 10000, --full 30000)"),
    runs: Optional[int] = typer.Option(None, help="Timed runs per side, median reported (default 3, --full 5)"),
    full: bool = typer.Option(False, "--full", help="The long version"),
    image_size: int = typer.Option(64, help="Model input size (px)"),
    processes: int = typer.Option(2, help="Reader processes on both sides"),
    batch_size: int = typer.Option(64),
    draft: float = typer.Option(1.5, help="Also measure mmtl with data.jpeg_draft=DRAFT (0: skip that side)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (progress goes to stderr)"),
) -> None:
    """samples/s of mmtl's Ray Data ingest vs webdataset + torch DataLoader on the same shards and transform."""
    import sys

    from mmtl.bench.ingest import PRESETS, bench_ingest

    p = PRESETS["full" if full else "default"]
    r = bench_ingest(path, samples=p["samples"] if samples is None else samples,
                     runs=p["runs"] if runs is None else runs, image_size=image_size, processes=processes,
                     batch_size=batch_size, draft=draft or None,
                     say=lambda m: print(f"[bench ingest] {m}", file=sys.stderr, flush=True))
    if as_json:
        print(json.dumps(r))
    else:
        sp, tot, fb = r["samples_per_s"], r["samples_per_s_total"], r["first_batch_s"]
        lines = [f"steady state: mmtl {sp['mmtl']} samples/s  baseline {sp['baseline']} samples/s  ratio {r['ratio']}"]
        if draft:
            lines.append(f"JPEG draft {draft}: mmtl {sp['mmtl_draft']} samples/s  ratio "
                         f"{r['ratios']['mmtl_draft/baseline']}")
        lines += [(f"whole runs: mmtl {tot['mmtl']} samples/s  baseline {tot['baseline']} samples/s  ratio "
                   f"{r['ratio_total']}"),
                  (f"start-up: Ray {r['startup_s']:.1f} s; first batch (s) {fb} (median of {r['runs']} runs of "
                   f"{r['samples']} samples)"),
                  f"CPU ms/sample (steady): {r['cpu_ms_per_sample']}; per stage, one process: {r['per_sample_ms']}"]
        print("\n".join(lines))


@bench_app.command("step")
def bench_step_cmd(
    steps: Optional[int] = typer.Option(None, help="Timed steps per loop (default 12, --full 30)"),
    warmup: Optional[int] = typer.Option(None, help="Untimed steps first (default 3, --full 5)"),
    zero_stages: Optional[str] = typer.Option(None, help="Comma list of ZeRO stages (default 2, --full 0,2)"),
    micro_batch: int = typer.Option(32),
    repeats: Optional[int] = typer.Option(None, help="Repeats, median reported (default 2, --full 3)"),
    full: bool = typer.Option(False, "--full", help="The long version (~15-20 min on 2 cores)"),
    no_ray: bool = typer.Option(False, "--no-ray", help="Skip the Ray Train variant"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (progress goes to stderr)"),
) -> None:
    """Step time: mmtl loop vs a bare loop on the same DeepSpeed engine, and bare DeepSpeed vs plain torch."""
    import sys

    from mmtl.bench.step import (
        bench_step,
        format_table,
        stdout_to_stderr,
        step_settings,
    )

    stages = None if zero_stages is None else [int(x) for x in zero_stages.split(",") if x.strip()]
    p = step_settings(full, steps=steps, warmup=warmup, zero_stages=stages, repeats=repeats)
    with stdout_to_stderr() as out:
        r = bench_step(**p, micro_batch=micro_batch, use_ray=not no_ray,
                       say=lambda m: print(f"[bench step] {m}", file=sys.stderr, flush=True))
        out.write((json.dumps(r) if as_json else format_table(r)) + "\n")


@bench_app.command("strategies")
def bench_strategies_cmd(
    pipeline: str = typer.Option("pipelines/quickstart.yaml", help="Pipeline whose data and towers every row uses"),
    rows: str = typer.Option("frozen,lit,lora_text,lora_both,full", help="Comma list of rows"),
    image_size: int = typer.Option(128, help="Input resolution (pixels) for every row"),
    steps: int = typer.Option(150, help="Optimizer steps per row"),
    micro_batch: int = typer.Option(32, help="Micro-batch per worker"),
    tower_lr: float = typer.Option(1e-5, help="LR of fine-tuned tower weights (LiT, full); heads/LoRA use train.lr"),
    context_length: int = typer.Option(32, help="Text tokens per caption"),
    runs_root: str = typer.Option("runs/bench-strategies", help="Where the rows' runs go"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON result here (updated after each row)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the Markdown table"),
) -> None:
    """Transfer strategies side by side (frozen heads, LiT, LoRA text, LoRA both, full): R@K, params, memory, time."""
    from mmtl.bench.strategies import bench_strategies, format_markdown

    try:
        r = bench_strategies(pipeline, [x.strip() for x in rows.split(",") if x.strip()], image_size, steps,
                             micro_batch, tower_lr, context_length, runs_root, out,
                             say=say_to_console())
    except (ValueError, RuntimeError) as exc:
        fail(str(exc), 1)
    print(json.dumps(r, indent=1) if as_json else format_markdown(r))


@bench_app.command("features")
def bench_features_cmd(
    pipeline: str = typer.Option("pipelines/quickstart.yaml", help="Pipeline whose model and data.train images to use"),
    images: int = typer.Option(256, help="Images (the first of data.train)"),
    runs: int = typer.Option(1, help="Interleaved runs per side, median reported"),
    workers: int = typer.Option(2, help="Ray actors of the ray side (1 CPU, 1 torch thread each)"),
    batch_size: int = typer.Option(64),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (progress goes to stderr)"),
) -> None:
    """images/s of frozen-feature extraction (local, Ray actors) vs the single-process torch loop, same images."""
    import sys

    from mmtl.bench.features import bench_features, format_table

    try:
        r = bench_features(pipeline, images=images, runs=runs, workers=workers, batch_size=batch_size,
                           say=lambda m: print(f"[bench features] {m}", file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc), 1)
    print(json.dumps(r) if as_json else format_table(r))


@bench_app.command("text-probe")
def bench_text_probe_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline whose model (text tower, tokenizer) is probed"),
    reports: Path = typer.Option(..., "--reports", help="reports.jsonl (mmtl datasets iu-xray-reports)"),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Load these weights first (a run folder, "
                                            "an export or a model.safetensors), e.g. a self-supervised run"),
    min_positives: int = typer.Option(20, "--min-positives", help="Keep labels with at least this many train reports"),
    batch_size: int = typer.Option(64),
) -> None:
    """Linear probe (one-vs-rest logistic regression, macro-F1) on frozen mean-pooled text embeddings."""
    from mmtl.cli.common import load_pipeline_or_exit
    from mmtl.eval.text_probe import text_probe
    from mmtl.models import build_model

    pipe = load_pipeline_or_exit(pipeline, [], for_run=False)
    pipe.model.init_from = init_from
    try:
        res = text_probe(build_model(pipe.model), reports, min_positives=min_positives, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc), 1)
    print(json.dumps({"init_from": init_from, **res}, indent=2))
