"""``mmtl bench ...``: benchmarks that print ratios measured side by side in one run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mmtl.cli.common import console, fail, say_to_console

bench_app = typer.Typer(help="Benchmarks (ratios measured side by side in one run).", no_args_is_help=True)


@bench_app.command("ingest")
def bench_ingest_cmd(
    path: Optional[str] = typer.Argument(None, help="Shards to read; default: write synthetic 224-px JPEG shards"),
    samples: int = typer.Option(2000, help="Synthetic samples to write"),
    runs: int = typer.Option(3, help="Timed runs per side (median reported)"),
    image_size: int = typer.Option(64, help="Model input size (px)"),
    processes: int = typer.Option(2, help="Reader processes on both sides"),
    batch_size: int = typer.Option(64),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """samples/s of mmtl's Ray Data ingest vs webdataset + torch DataLoader on the same shards and transform."""
    from mmtl.bench.ingest import bench_ingest

    r = bench_ingest(path, samples=samples, runs=runs, image_size=image_size, processes=processes,
                     batch_size=batch_size, say=None if as_json else (lambda m: console.print(m, highlight=False)))
    if as_json:
        print(json.dumps(r))
    else:
        sp = r["samples_per_s"]
        print(f"mmtl {sp['mmtl']:.1f} samples/s  baseline {sp['baseline']:.1f} samples/s  ratio {r['ratio']:.3f}"
              f"  (median of {r['runs']}, Ray start-up {r['startup_s']:.1f} s)")


@bench_app.command("step")
def bench_step_cmd(
    steps: int = typer.Option(30, help="Timed steps per loop"),
    warmup: int = typer.Option(5, help="Untimed steps first"),
    zero_stages: str = typer.Option("0,2", help="Comma list of ZeRO stages"),
    micro_batch: int = typer.Option(32),
    repeats: int = typer.Option(3, help="Repeats (median reported)"),
    no_ray: bool = typer.Option(False, "--no-ray", help="Skip the Ray Train variant"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Step time: mmtl loop vs a bare loop on the same DeepSpeed engine, and bare DeepSpeed vs plain torch."""
    from mmtl.bench.step import bench_step

    from mmtl.bench.step import format_table, stdout_to_stderr

    stages = tuple(int(x) for x in zero_stages.split(",") if x.strip())
    with stdout_to_stderr() as out:
        r = bench_step(steps=steps, warmup=warmup, zero_stages=stages, micro_batch=micro_batch,
                       use_ray=not no_ray, repeats=repeats)
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
