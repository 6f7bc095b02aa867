"""``mmtl run`` / ``config`` / ``export`` / ``retrain``: one pipeline's training, its resolved config, a run's
export and scheduled retraining. Each command parses its arguments and calls one function."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from mmtl.cli.common import console, fail, fail_on_missing_inputs, load_pipeline_or_exit, say_to_console


RAY_ADDRESS_HELP = ("Ray address to join (HOST:6379, ray://HOST:10001 or auto); default: $RAY_ADDRESS or a `ray start` "
                    "cluster on this machine, else a new local instance on 127.0.0.1. To send the run to a remote "
                    "cluster as a job use `mmtl submit --dashboard URL`.")


def run_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/quickstart.yaml"),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides: train.lr=1e-4 data.train=..."),
    resume: bool = typer.Option(False, "--resume", help="Require a resume: continue the newest unfinished run "
                                "(error if there is none). A plain run already resumes one when it exists."),
    fresh: bool = typer.Option(False, "--fresh", help="Never resume: start a new run folder even if an unfinished "
                               "run exists (the same as train.resume=never)."),
    address: Optional[str] = typer.Option(None, "--address", help=RAY_ADDRESS_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's, DeepSpeed's and MLflow's full output."),
) -> None:
    """Train, evaluate and register one pipeline; writes <runs_root>/<name>/summary.json and the full console
    output to <runs_root>/<name>/console.log.

    The run folder is <train.runs_root>/<train.name> (name default: the pipeline file's stem), printed at the
    start as `run dir ...`. A plain run continues the newest unfinished run of that name from its last
    checkpoint; a finished run is never overwritten: the next one goes to <name>-2, <name>-3, ... Give
    train.name=NAME for a folder of your choice, --fresh to start over. `mmtl config` shows the folder first.

    Example:

    \b
        mmtl run pipelines/quickstart.yaml train.max_steps=500 train.name=qs-500
    """
    from mmtl.cli import console_log

    if resume and fresh:
        fail("--resume and --fresh contradict each other: give one")
    log = console_log.start(verbose)
    pipe = load_pipeline_or_exit(pipeline, (overrides or []) + (["train.resume=never"] if fresh else []),
                                 check_paths=True)
    from mmtl.recipes import run_pipeline

    if address:
        from mmtl.runtime import init_ray

        try:
            init_ray(address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            fail(f"cannot join Ray at --address {address}: {exc}\n--address is the Ray (GCS) address: HOST:6379, "
                 "ray://HOST:10001 or auto; leave it out to start a local Ray. To run on a remote cluster as a "
                 "job: mmtl submit PIPELINE --dashboard http://HEAD:8265", 2)
    from mmtl.data.shardlist import ShardError

    try:
        summary = run_pipeline(pipe, address=address, must_resume=resume, say=say_to_console(),
                               on_run_dir=lambda d: log.attach(d / "console.log"))
    except ShardError as exc:  # missing / empty shards: bad input, found before anything is written
        fail(str(exc), 2)
    except KeyboardInterrupt:
        fail("interrupted; the run keeps its last checkpoint: continue it with `mmtl run <the same pipeline and "
             "overrides>` (a plain run resumes the newest unfinished one)", 130)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc), 1)
    except Exception as exc:  # Ray's OutOfMemoryError: one line instead of a traceback and Ray's tuning page
        from mmtl.runtime import out_of_memory

        msg = out_of_memory(exc)
        if msg is None:
            raise
        fail(msg, 1)
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
    out = Console()
    if not out.is_terminal:  # a log file or a pipe: wide enough that no metric name is cut
        out = Console(width=max(out.width, max((len(k) for k in m), default=20) + 45))
    out.print(table)
    reg = summary.get("registered_model") or {}
    model_line = (f"registered: {reg['name']} version {reg['version']} (models:/{reg['name']}/{reg['version']})"
                  if reg.get("name") else f"MLflow model: {reg['uri']} (not registered: tracking.model_name is null)"
                  if reg.get("uri") else "MLflow model: not logged")
    out.print(
        f"run dir: {summary['run_dir']}\nMLflow run: {summary['mlflow_run_id']}\nexport: {summary['export_path']}\n"
        f"{model_line}\nopen the UI: {summary['mlflow_ui']}",
        highlight=False, soft_wrap=True,  # commands meant for copying stay on one line
    )


def config_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML"),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides: train.zero_stage=3 ..."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Exit 0 even when local inputs do not exist "
                                       "(to look at a template pipeline)"),
) -> None:
    """Validate a pipeline (with overrides) and print it resolved, then every resolved path (as # comments):
    inputs, runs root, the run folder a run would use now, feature cache, MLflow store. Missing local inputs
    (shards, weights, init_from) are an error (exit 2) listing each, as `mmtl run` would refuse them.

    Example:

    \b
        mmtl config pipelines/quickstart.yaml train.zero_stage=3
    """
    from mmtl.recipes.config_report import config_report

    pipe = load_pipeline_or_exit(pipeline, overrides or [])
    print(config_report(pipe))
    if not allow_missing:
        fail_on_missing_inputs(pipe, pipeline)


def export_cmd(
    run_dir: str = typer.Argument(..., help="Run directory (<runs_root>/<name>), or a run on object storage "
                                  "(s3://bucket/prefix/<name>: downloaded to its local staging folder)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder; default <run_dir>/export-merged or export-adapter"),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="LoRA: fold the adapter into the base weights (loads without PEFT)"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint folder or step number; default the latest"),
    fmt: str = typer.Option("mmtl", "--format", help="mmtl (plus open_clip's files for open_clip runs) or "
                            "open_clip (required: an error when open_clip cannot express the run)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Write a standalone model folder (model.safetensors + pipeline.yaml; open_clip runs also
    open_clip_model.safetensors + open_clip_config.json) from a run's checkpoint.

    Example:

    \b
        mmtl export runs/product-search-lora --merge
    """
    from mmtl.recipes.export import ExportError, export_run
    from mmtl.storage import is_remote

    try:
        if is_remote(run_dir):
            from mmtl.runtime import fetch_run

            run_dir = fetch_run(run_dir)  # its staging folder; the export goes there unless --out says otherwise
    except (FileNotFoundError, OSError) as exc:
        fail(str(exc))
    run_dir = Path(run_dir)
    dest = out or run_dir / ("export-merged" if merge else "export-adapter")
    try:
        info = export_run(run_dir, dest, merge=merge, checkpoint=checkpoint, fmt=fmt)
    except (ExportError, FileNotFoundError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        diff = f", max |merged - adapted| = {info['max_abs_diff']:.1e}" if "max_abs_diff" in info else ""
        extra = f" (+ {', '.join(info['formats'])})" if info.get("formats") else ""
        console.print(f"exported step {info['step']} ({info['kind']}, merged={info['merged']}{diff}) -> {info['out']}"
                      f"{extra}", highlight=False)


def retrain_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML; its tracking.model_name holds the champion/challenger"),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides: retrain.margin=0.01 data.train=..."),
    address: Optional[str] = typer.Option(None, "--address", help=RAY_ADDRESS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Scheduled retraining: train on shards new since the last retrain (plus a replay share of old ones),
    warm-started from the `champion` model version; register the result as `challenger` and promote it to
    `champion` when it beats the champion by retrain.margin on retrain.metric.

    Exit 0: retrained or nothing new; 3: another retrain holds the lock; 1: failed; 2: bad pipeline.

    Example:

    \b
        mmtl retrain pipelines/quickstart.yaml retrain.margin=0.01 --json
    """
    pipe = load_pipeline_or_exit(pipeline, overrides or [], check_paths=True)
    from mlflow.exceptions import MlflowException

    from mmtl.data.shardio import ShardError
    from mmtl.jobs.retrain import exit_code
    from mmtl.jobs.retrain import retrain as run_retrain

    try:
        result = run_retrain(pipe, say=say_to_console("mmtl retrain"),
                             address=address)
    except (ValueError, FileNotFoundError, RuntimeError, ShardError, MlflowException) as exc:
        fail(str(exc), 1)
    print(json.dumps(result, default=str) if as_json else result["message"])
    raise typer.Exit(exit_code(result))
