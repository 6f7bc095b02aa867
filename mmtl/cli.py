"""mmtl command line: thin wrappers that parse arguments, load the pipeline and call one function each."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Multimodal (image-text) transfer learning on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
shards_app = typer.Typer(help="Build and inspect WebDataset shards.", no_args_is_help=True)
datasets_app = typer.Typer(help="Bundled and importable real datasets.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (ratios measured side by side in one run).", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
app.add_typer(datasets_app, name="datasets")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def _load(pipeline: Path, overrides: List[str]):
    from mmtl.config import PipelineError, load_pipeline

    try:
        return load_pipeline(pipeline, overrides)
    except PipelineError as exc:
        _fail(str(exc))


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/quickstart.yaml"),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides: train.lr=1e-4 data.train=..."),
    resume: bool = typer.Option(False, "--resume", help="Resume the newest unfinished run (error if none)."),
    address: Optional[str] = typer.Option(
        None, help="Ray address to join; default: $RAY_ADDRESS or a `ray start` cluster on this machine, else a new "
                   "local instance on 127.0.0.1."),
) -> None:
    """Train, evaluate and register one pipeline; writes <runs_root>/<name>/summary.json."""
    pipe = _load(pipeline, overrides or [])
    from mmtl.run import run_pipeline

    if address:
        from mmtl.runtime import init_ray

        init_ray(address)
    try:
        summary = run_pipeline(pipe, address=address, must_resume=resume, say=lambda m: console.print(f"[cyan]mmtl[/] {m}", highlight=False))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc), 1)
    print_summary(summary)


def print_summary(summary: dict) -> None:
    """Rich table of the run's metrics (before / after / ridge side by side) and where to look next."""
    m = summary["metrics"]
    after = sorted(k for k in m if not k.startswith(("before/", "ridge/", "train/")))
    table = Table(title=f"mmtl run {summary['run_name']} ({summary['steps']} steps, {summary['wall_time_s']:.0f} s)")
    for col in ("metric", "before", "after", "ridge baseline"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for k in after:
        table.add_row(k, fmt(m.get(f"before/{k}")), fmt(m[k]), fmt(m.get(f"ridge/{k}")))
    for k in sorted(x for x in m if x.startswith("train/")):
        table.add_row(k, "", fmt(m[k]), "")
    Console().print(table)
    Console().print(
        f"run dir: {summary['run_dir']}\nMLflow run: {summary['mlflow_run_id']}\nexport: {summary['export_path']}\n"
        f"registered: {summary.get('registered_model')}\nopen the UI: {summary['mlflow_ui']}",
        highlight=False,
    )


@app.command("config")
def config_cmd(
    pipeline: Path = typer.Argument(...),
    overrides: Optional[List[str]] = typer.Argument(None),
) -> None:
    """Validate a pipeline (with overrides) and print it resolved."""
    print(_load(pipeline, overrides or []).to_yaml())


@shards_app.command("build")
def shards_build(
    src: str = typer.Argument(..., help="Folder of images with same-stem .txt captions, or a .csv/.tsv/.parquet"),
    out: Path = typer.Option(..., "--out", help="Output folder for the shards"),
    image_col: str = typer.Option("image", help="Table column with image paths"),
    caption_col: str = typer.Option("caption", help="Table column with captions"),
    prefix: str = typer.Option("shard", help="Shard file prefix: PREFIX-000000.tar"),
    max_samples: int = typer.Option(10_000, help="Samples per shard at most"),
    max_bytes: int = typer.Option(1 << 30, help="Bytes per shard at most"),
    val_fraction: float = typer.Option(0.0, help="Share of samples for out/val"),
    test_fraction: float = typer.Option(0.0, help="Share of samples for out/test"),
    seed: int = typer.Option(0, help="Split seed"),
) -> None:
    """Write WebDataset shards (img2dataset layout) and a stats.json."""
    from mmtl.data.build import build_shards

    try:
        stats = build_shards(src, str(out), image_col=image_col, caption_col=caption_col, prefix=prefix,
                             max_samples_per_shard=max_samples, max_bytes_per_shard=max_bytes,
                             val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    print(json.dumps(stats, indent=2))


@shards_app.command("inspect")
def shards_inspect(
    paths: List[str] = typer.Argument(..., help="Dir, glob, brace pattern (a-{000000..000009}.tar) or list"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
    pipeline: Optional[Path] = typer.Option(None, help="Use this pipeline's tokenizer, context length, limits"),
    dump: Optional[Path] = typer.Option(None, help="Write accepted samples as {key}.png + {key}.txt here"),
) -> None:
    """Count good samples and rejects by reason, reading through the training cleaning code."""
    from mmtl.data.inspect import inspect_shards
    from mmtl.data.samples import CleanOptions

    opts = CleanOptions()
    if pipeline:
        pipe = _load(pipeline, [])
        from mmtl.data.stream import clean_options
        from mmtl.models import build_tokenizer

        opts = clean_options(pipe, count_tokens=build_tokenizer(pipe.model).count)
    spec = paths[0] if len(paths) == 1 else list(paths)
    report = inspect_shards(spec, opts, dump_dir=str(dump) if dump else None)
    if as_json:
        print(json.dumps(report))
    else:
        table = Table(title="shards inspect")
        table.add_column("field")
        table.add_column("value", justify="right")
        for k in ("shards", "samples_ok", "caption_truncated"):
            table.add_row(k, str(report.get(k, 0)))
        for k, v in sorted(report.get("rejected", {}).items()):
            table.add_row(f"rejected: {k}", str(v))
        Console().print(table)
        for w in report.get("warnings", []):
            console.print(f"[yellow]warning:[/] {w}", highlight=False)
        for e in report.get("errors", []):
            console.print(f"[red]error:[/] {e}", highlight=False)
    if report.get("errors"):
        raise typer.Exit(1)


@datasets_app.command("emoji")
def datasets_emoji(
    out: Path = typer.Option(Path("mmtl/assets/emoji"), help="Output folder"),
    npm_dir: Optional[Path] = typer.Option(None, help="Folder with node_modules already installed"),
) -> None:
    """Rebuild the bundled emoji image-text shards from the npm packages (needs npm + rsvg-convert)."""
    from mmtl.datasets.emoji import build_emoji_dataset

    print(json.dumps(build_emoji_dataset(str(out), str(npm_dir) if npm_dir else None), indent=2))


ADDRESS_HELP = "Ray dashboard URL; default $RAY_ADDRESS (http) or http://127.0.0.1:8265"


@app.command()
def submit(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML inside --working-dir"),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides passed to `mmtl run`"),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    runtime_env: Optional[Path] = typer.Option(None, "--runtime-env", help="runtime_env YAML (default cluster/runtime_env.yaml)"),
    env: Optional[List[str]] = typer.Option(None, "--env", help="K=V environment variable for the job; repeatable"),
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="Project folder uploaded with the job"),
    pip: Optional[List[str]] = typer.Option(None, "--pip", help="Extra pip requirement for the job; repeatable"),
    wait: bool = typer.Option(False, "--wait", help="Follow the logs until the job ends; exit 1 unless it succeeded"),
) -> None:
    """Submit `mmtl run PIPELINE` to a Ray cluster through the Job Submission API; prints the job id.

    Secrets (e.g. AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD) are forwarded from your environment into the
    job's runtime_env and never printed. The pipeline is validated locally before anything is sent.
    """
    from mmtl.config import PipelineError
    from mmtl.jobs import submit as jobs

    try:
        kv = dict(e.split("=", 1) for e in env or [])
        job = jobs.submit(str(pipeline), address, overrides or [], str(runtime_env) if runtime_env else None, kv,
                          str(working_dir), pip)
    except (PipelineError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc), 2)
    except (ConnectionError, RuntimeError) as exc:
        _fail(str(exc), 1)
    print(job)
    if wait:
        jobs.logs(job, address, follow=True)
        final = jobs.status(job, address)
        console.print(f"job {job}: {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(job_id: str = typer.Argument(...), address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
           verbose: bool = typer.Option(False, "--verbose", help="Print the job's info as JSON (secrets redacted)")) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from mmtl.jobs import submit as jobs

    try:
        print(json.dumps(jobs.job_info(job_id, address), indent=2, default=str) if verbose else jobs.status(job_id, address))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        _fail(str(exc), 1)


@app.command()
def logs(job_id: str = typer.Argument(...), address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
         follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends")) -> None:
    """Print (or follow) a submitted job's logs."""
    from mmtl.jobs import submit as jobs

    try:
        jobs.logs(job_id, address, follow=follow)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        _fail(str(exc), 1)


@app.command()
def stop(job_id: str = typer.Argument(...), address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """Stop a running job."""
    from mmtl.jobs import submit as jobs

    try:
        stopped = jobs.stop(job_id, address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        _fail(str(exc), 1)
    print("stopped" if stopped else "already finished")


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
                             say=lambda m: console.print(f"[cyan]mmtl[/] {m}", highlight=False))
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc), 1)
    print(json.dumps(r, indent=1) if as_json else format_markdown(r))


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory (<runs_root>/<name>)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder; default <run_dir>/export-merged or export-adapter"),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="LoRA: fold the adapter into the base weights (loads without PEFT)"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint folder or step number; default the latest"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Write a standalone model folder (model.safetensors + pipeline.yaml) from a run's checkpoint."""
    from mmtl.export import ExportError, export_run

    dest = out or run_dir / ("export-merged" if merge else "export-adapter")
    try:
        info = export_run(run_dir, dest, merge=merge, checkpoint=checkpoint)
    except (ExportError, FileNotFoundError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        diff = f", max |merged - adapted| = {info['max_abs_diff']:.1e}" if "max_abs_diff" in info else ""
        console.print(f"exported step {info['step']} ({info['kind']}, merged={info['merged']}{diff}) -> {info['out']}",
                      highlight=False)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Run dir, export folder, runs:/<run_id>/model, models:/<name>@<alias> or models:/<name>/<version>"),
    data: str = typer.Option(..., "--data", help="Shard spec: folder, glob, brace pattern, .tar or URI"),
    task: str = typer.Option("zero-shot", "--task", help="zero-shot, retrieval, or vqa / itm (cross_attention models)"),
    classes: Optional[str] = typer.Option(None, "--classes", help="Class names: a file (one a line) or a comma list"),
    templates: Optional[str] = typer.Option(None, "--templates", help="Prompt templates: a file (one a line, with {}) or one template"),
    label_field: str = typer.Option("category", "--label-field", help="Sample json field holding the class name"),
    ks: str = typer.Option("1,5,10", "--ks", help="Recall@K cut-offs for retrieval (comma list)"),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass"),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eval.json and the CSV/PNG reports"),
    log_mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", help="Log to a run nested under the model's MLflow run"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow URI for runs:/ and models:/ (default $MLFLOW_TRACKING_URI)"),
    use_ray: Optional[bool] = typer.Option(None, "--ray/--no-ray", help="Force / forbid Ray Data batch inference (default: above 5,000 samples)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address to join for the Ray path"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Learned CoOp prompt for zero-shot: a prompt_tuning run dir, its export or prompt.safetensors (default: the model's own, if any)"),
) -> None:
    """Evaluate a model on a shard set: zero-shot classification (template ensemble) or image-text retrieval."""
    from mmtl.data.shardlist import ShardError
    from mmtl.eval.cli_eval import EvalError, run_eval
    from mmtl.eval.resolve import ModelSpecError

    try:
        ks_list = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        _fail(f"--ks must be a comma list of integers, got {ks!r}")
    try:
        report = run_eval(model, task, data, classes, templates, label_field, ks_list, batch_size,
                          str(out) if out else None, log_mlflow, tracking_uri, use_ray=use_ray, ray_address=address,
                          device=device, say=lambda m: console.print(f"[cyan]mmtl[/] {m}", highlight=False),
                          prompt=prompt)
    except (ModelSpecError, EvalError) as exc:
        _fail(str(exc))
    except (ShardError, FileNotFoundError, ValueError, RuntimeError) as exc:
        _fail(str(exc), 1)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"{report['task']} on {report['data']} ({report['num_samples']} samples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in report["metrics"].items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
    for name, path in report.get("files", {}).items():
        console.print(f"{name}: {path}", highlight=False)
    ml = report["mlflow"]
    console.print(f"mlflow: run {ml['eval_run_id']} at {ml['tracking_uri']}" if ml.get("logged")
                  else f"mlflow: not logged ({ml['reason']})", highlight=False)


@datasets_app.command("diagrams")
def datasets_diagrams(
    out: Path = typer.Option(Path("data/diagrams"), "--out", help="Output folder (train/, test/, answers.txt)"),
    train_images: int = typer.Option(1000, "--train-images", help="Train images (4 questions each)"),
    test_images: int = typer.Option(250, "--test-images", help="Test images (layouts never seen in train)"),
    image_size: int = typer.Option(160, "--image-size", help="Rendered image side in pixels"),
    test_percent: int = typer.Option(20, "--test-percent", help="Share of layouts assigned to test"),
    seed: int = typer.Option(0, "--seed", help="Generator seed"),
) -> None:
    """Render a diagram VQA set offline (shapes, labelled boxes and arrows; count/colour/position/relation)."""
    from mmtl.datasets.diagrams import build_diagrams

    try:
        stats = build_diagrams(out, train_images=train_images, test_images=test_images, image_size=image_size,
                               test_percent=test_percent, seed=seed)
    except ValueError as exc:
        _fail(str(exc), 1)
    print(json.dumps(stats, indent=2))


@datasets_app.command("fashion-mnist")
def datasets_fashion_mnist(
    out: Path = typer.Option(Path("data/fashion-mnist"), "--out", help="Output folder (train/, test/, classes.txt)"),
    src: Path = typer.Option(Path("/usr/share/datasets/fashion-mnist"), "--src",
                             help="IDX files, gz or raw (Debian: apt-get install dataset-fashion-mnist)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many samples per split"),
    shots_per_class: Optional[int] = typer.Option(None, "--shots-per-class", help="Few-shot train set size per class"),
    seed: int = typer.Option(0, "--seed", help="Seed of the few-shot draw"),
    split: Optional[List[str]] = typer.Option(None, "--split", help="train and/or test; repeatable (default both)"),
    max_samples: int = typer.Option(5000, "--max-samples", help="Samples per shard at most"),
) -> None:
    """Import Fashion-MNIST (IDX files) into WebDataset shards with class-name captions."""
    from mmtl.datasets.fashion_mnist import import_fashion_mnist

    try:
        stats = import_fashion_mnist(src, out, splits=tuple(split or ("train", "test")), limit=limit,
                                     shots_per_class=shots_per_class, seed=seed, max_samples_per_shard=max_samples,
                                     progress=True)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc), 1)
    print(json.dumps(stats, indent=2))


@app.command()
def retrain(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML; its tracking.model_name holds the champion/challenger"),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides: retrain.margin=0.01 data.train=..."),
    address: Optional[str] = typer.Option(None, help="Ray address to join; default: local instance."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Scheduled retraining: train on shards new since the last retrain (plus a replay share of old ones),
    warm-started from the `champion` model version; register the result as `challenger` and promote it to
    `champion` when it beats the champion by retrain.margin on retrain.metric.

    Exit 0: retrained or nothing new; 3: another retrain holds the lock; 1: failed; 2: bad pipeline."""
    pipe = _load(pipeline, overrides or [])
    from mlflow.exceptions import MlflowException

    from mmtl.data.shardio import ShardError
    from mmtl.jobs.retrain import exit_code
    from mmtl.jobs.retrain import retrain as run_retrain

    try:
        result = run_retrain(pipe, say=lambda m: console.print(f"[cyan]mmtl retrain[/] {m}", highlight=False),
                             address=address)
    except (ValueError, FileNotFoundError, RuntimeError, ShardError, MlflowException) as exc:
        _fail(str(exc), 1)
    print(json.dumps(result, default=str) if as_json else result["message"])
    raise typer.Exit(exit_code(result))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
