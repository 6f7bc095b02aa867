"""``mmtl bench ...``: benchmarks that print ratios measured side by side in one run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from mmtl.cli.common import console, fail, say_to_console

bench_app = typer.Typer(help="Benchmarks (ratios measured side by side in one run).", no_args_is_help=True,
                        rich_markup_mode=None)


@bench_app.command("ingest")
def bench_ingest_cmd(
    path: Optional[str] = typer.Argument(None, help="Shards to read; default: write synthetic 224-px JPEG shards"),
    samples: Optional[int] = typer.Option(None, help="Synthetic samples to write (default 10000, --full 30000)"),
    runs: Optional[int] = typer.Option(None, help="Timed runs per side, median reported (default 3, --full 5)"),
    full: bool = typer.Option(False, "--full", help="The long version"),
    image_size: int = typer.Option(64, help="Model input size (px)"),
    processes: int = typer.Option(2, help="Reader processes on both sides"),
    batch_size: int = typer.Option(64),
    draft: float = typer.Option(0.0, help="Also measure mmtl with data.jpeg_draft=DRAFT (0: side mmtl_nodraft, full "
                                "decodes; > 0: side mmtl_draft; the mmtl side runs the defaults: draft 1.5; "
                                "negative: skip that side)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (progress goes to stderr)"),
) -> None:
    """samples/s of mmtl's Ray Data ingest vs webdataset + torch DataLoader on the same shards and transform.

    Example:

    \b
        mmtl bench ingest --json
    """
    import sys

    from mmtl.bench.ingest import PRESETS, alt_side, bench_ingest

    p = PRESETS["full" if full else "default"]
    r = bench_ingest(path, samples=p["samples"] if samples is None else samples,
                     runs=p["runs"] if runs is None else runs, image_size=image_size, processes=processes,
                     batch_size=batch_size, draft=None if draft < 0 else draft,
                     say=lambda m: print(f"[bench ingest] {m}", file=sys.stderr, flush=True))
    if as_json:
        print(json.dumps(r))
    else:
        sp, tot, fb = r["samples_per_s"], r["samples_per_s_total"], r["first_batch_s"]
        lines = [f"steady state: mmtl {sp['mmtl']} samples/s  baseline {sp['baseline']} samples/s  ratio {r['ratio']}"]
        if draft >= 0:
            alt = alt_side(draft)
            lines.append(f"{alt} (data.jpeg_draft={draft:g}): {sp[alt]} samples/s  ratio {r['ratios'][alt + '/baseline']}")
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
    """Step time: mmtl loop vs a bare loop on the same DeepSpeed engine, and bare DeepSpeed vs plain torch.

    Example:

    \b
        mmtl bench step --json
    """
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


# the bench's row settings, each a pipeline setting: a dotted override of that key sets it
STRATEGY_SETTINGS = {"model.image_size": "image_size", "train.max_steps": "steps",
                     "train.micro_batch_size": "micro_batch", "train.tower_lr": "tower_lr",
                     "model.context_length": "context_length", "train.runs_root": "runs_root"}


@bench_app.command("strategies")
def bench_strategies_cmd(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Dotted overrides for every row: model.image_size (default 128), train.max_steps (150), "
                   "train.micro_batch_size (32), train.tower_lr (1e-5), model.context_length (32), train.runs_root "
                   "(runs/bench-strategies); any other pipeline key is passed to every row as is"),
    pipeline: str = typer.Option("pipelines/quickstart.yaml", "--pipeline",
                                 help="Pipeline whose data and towers every row uses"),
    rows: str = typer.Option("frozen,lit,lora_text,lora_both,full", "--rows", help="Comma list of rows"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON result here (updated after each row)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the Markdown table"),
    image_size: Optional[int] = typer.Option(None, "--image-size", hidden=True),  # old spellings, as overrides
    steps: Optional[int] = typer.Option(None, "--steps", hidden=True),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", hidden=True),
    tower_lr: Optional[float] = typer.Option(None, "--tower-lr", hidden=True),
    context_length: Optional[int] = typer.Option(None, "--context-length", hidden=True),
    runs_root: Optional[str] = typer.Option(None, "--runs-root", hidden=True),
) -> None:
    """Transfer strategies side by side (frozen heads, LiT, LoRA text, LoRA both, full): R@K, params, memory, time.

    Example:

    \b
        mmtl bench strategies train.max_steps=120 --out strategies.json
    """
    from mmtl.bench.strategies import bench_strategies, format_markdown
    from mmtl.config import PipelineError, parse_override

    import inspect

    defaults = inspect.signature(bench_strategies).parameters  # one place for the defaults (the help repeats them)
    settings = {name: defaults[name].default for name in STRATEGY_SETTINGS.values()}
    old = {"image_size": image_size, "steps": steps, "micro_batch": micro_batch, "tower_lr": tower_lr,
           "context_length": context_length, "runs_root": runs_root}
    for name, value in old.items():
        if value is not None:
            key = next(k for k, v in STRATEGY_SETTINGS.items() if v == name)
            console.print(f"[yellow]note:[/] --{name.replace('_', '-')} is now the override {key}={value}",
                          highlight=False)
            settings[name] = value
    extra = []
    for item in overrides or []:
        try:
            parts, value = parse_override(item)
        except PipelineError as exc:
            fail(str(exc))
        key = ".".join(parts)
        if key in STRATEGY_SETTINGS:
            settings[STRATEGY_SETTINGS[key]] = value
        else:
            extra.append(item)
    try:
        r = bench_strategies(pipeline, [x.strip() for x in rows.split(",") if x.strip()], settings["image_size"],
                             settings["steps"], settings["micro_batch"], settings["tower_lr"],
                             settings["context_length"], str(settings["runs_root"]), out, say=say_to_console(),
                             extra_overrides=extra)
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
    """images/s of frozen-feature extraction (local, Ray actors) vs the single-process torch loop, same images.

    Example:

    \b
        mmtl bench features --images 256 --runs 2 --json
    """
    import sys

    from mmtl.bench.features import bench_features, format_table

    try:
        r = bench_features(pipeline, images=images, runs=runs, workers=workers, batch_size=batch_size,
                           say=lambda m: print(f"[bench features] {m}", file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc), 1)
    print(json.dumps(r) if as_json else format_table(r))


@bench_app.command("serve")
def bench_serve_cmd(
    model: str = typer.Argument(..., help="Run directory, export folder, runs:/ or models:/ URI"),
    index: Path = typer.Option(..., "--index", help="Index folder from `mmtl index build` (same model)"),
    requests: int = typer.Option(200, help="Requests per route and concurrency"),
    concurrency: str = typer.Option("1,8,32", help="Comma list of concurrent clients"),
    time_limit: float = typer.Option(60.0, help="Seconds at most per route and concurrency"),
    port: int = typer.Option(8765, help="Port on 127.0.0.1 for the app under test"),
    config: Optional[Path] = typer.Option(None, help="Serve config (default cluster/serve.yaml)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON result to this file (stdout may "
                                                          "carry Ray's log lines)"),
) -> None:
    """Latency (p50/p95/p99) and requests/s of /search (text) and /embed/image at each concurrency, with and
    without request batching, against the app started on 127.0.0.1 (stopped afterwards).

    Example:

    \b
        mmtl bench serve runs/quickstart --index runs/emoji-index --requests 200 --json
    """
    from mmtl.eval.resolve import ModelSpecError
    from mmtl.serve.index import IndexFolderError
    from mmtl.serve.loadtest import bench_serve

    try:
        levels = tuple(int(c) for c in concurrency.split(","))
        r = bench_serve(model, str(index), requests=requests, concurrencies=levels, time_limit_s=time_limit, port=port,
                        config_path=str(config) if config else None, say=say_to_console("bench serve"))
    except (ModelSpecError, IndexFolderError, ValueError) as exc:
        fail(str(exc))
    if out:
        out.write_text(json.dumps(r, indent=2))
    if as_json:
        print(json.dumps(r))
        return
    print("| batching | route | clients | done | req/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in r["cells"]:
        print(f"| {'on' if x['batching'] else 'off'} | {x['route']} | {x['concurrency']} | {x['done']} | {x['rps']} | "
              f"{x['p50_ms']} | {x['p95_ms']} | {x['p99_ms']} | {sum(x['errors'].values())} |")
    print("\nthroughput ratio, most clients / 1 client: " + ", ".join(f"{k} {v}x" for k, v in r["ratios"].items()))
    for k, v in r["targets"].items():
        print(f"target {k}: {v['value']} -> {'met' if v['met'] else 'NOT met'}")


@bench_app.command("text-probe")
def bench_text_probe_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline whose model (text tower, tokenizer) is probed"),
    reports: Path = typer.Option(..., "--reports", help="reports.jsonl (mmtl datasets iu-xray-reports)"),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Load these weights first (a run folder, "
                                            "an export or a model.safetensors), e.g. a self-supervised run"),
    min_positives: int = typer.Option(20, "--min-positives", help="Keep labels with at least this many train reports"),
    batch_size: int = typer.Option(64),
) -> None:
    """Linear probe (one-vs-rest logistic regression, macro-F1) on frozen mean-pooled text embeddings.

    Example:

    \b
        mmtl bench text-probe pipelines/iu-xray-mlm.yaml --reports data/iu-xray-reports/reports.jsonl
    """
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
