"""mmtl command line: thin wrappers that parse arguments, load the pipeline and call one function each."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from mmtl.cli_bench import bench_app
from mmtl.cli_common import _fail, _load, console
from mmtl.cli_data import datasets_app, shards_app

app = typer.Typer(help="Multimodal (image-text) transfer learning on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.add_typer(shards_app, name="shards")
app.add_typer(datasets_app, name="datasets")
app.add_typer(bench_app, name="bench")

ADDRESS_HELP = "Ray dashboard URL; default $RAY_ADDRESS (http) or http://127.0.0.1:8265"


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
    reg = summary.get("registered_model") or {}
    model_line = (f"registered: {reg['name']} version {reg['version']} (models:/{reg['name']}/{reg['version']})"
                  if reg.get("name") else f"MLflow model: {reg['uri']} (not registered: tracking.model_name is null)"
                  if reg.get("uri") else "MLflow model: not logged")
    Console().print(
        f"run dir: {summary['run_dir']}\nMLflow run: {summary['mlflow_run_id']}\nexport: {summary['export_path']}\n"
        f"{model_line}\nopen the UI: {summary['mlflow_ui']}",
        highlight=False,
    )


@app.command("config")
def config_cmd(
    pipeline: Path = typer.Argument(...),
    overrides: Optional[List[str]] = typer.Argument(None),
) -> None:
    """Validate a pipeline (with overrides) and print it resolved, then every resolved path (as # comments)."""
    from mmtl.config import config_report

    print(config_report(_load(pipeline, overrides or [])))


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
    """Evaluate a model on a shard set: zero-shot classification, image-text retrieval, or VQA / ITM accuracy."""
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
