"""``mmtl submit`` / ``status`` / ``logs`` / ``stop``: Ray Job Submission API (:mod:`mmtl.jobs.submit`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from mmtl.cli.common import console, fail

ADDRESS_HELP = "Ray dashboard URL; default $RAY_ADDRESS (http) or http://127.0.0.1:8265"


def submit_cmd(
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
        fail(str(exc), 2)
    except (ConnectionError, RuntimeError) as exc:
        fail(str(exc), 1)
    print(job)
    if wait:
        jobs.logs(job, address, follow=True)
        final = jobs.status(job, address)
        console.print(f"job {job}: {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)


def status_cmd(job_id: str = typer.Argument(...), address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
           verbose: bool = typer.Option(False, "--verbose", help="Print the job's info as JSON (secrets redacted)")) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from mmtl.jobs import submit as jobs

    try:
        print(json.dumps(jobs.job_info(job_id, address), indent=2, default=str) if verbose else jobs.status(job_id, address))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(str(exc), 1)


def logs_cmd(job_id: str = typer.Argument(...), address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
         follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends")) -> None:
    """Print (or follow) a submitted job's logs."""
    from mmtl.jobs import submit as jobs

    try:
        jobs.logs(job_id, address, follow=follow)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(str(exc), 1)


def stop_cmd(job_id: str = typer.Argument(...), address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """Stop a running job."""
    from mmtl.jobs import submit as jobs

    try:
        stopped = jobs.stop(job_id, address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(str(exc), 1)
    print("stopped" if stopped else "already finished")
