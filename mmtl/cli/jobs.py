"""``mmtl submit`` / ``status`` / ``logs`` / ``stop``: Ray Job Submission API (:mod:`mmtl.jobs.submit`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from mmtl.cli.common import console, fail

DASHBOARD_HELP = ("The cluster's job-submission API (Ray dashboard URL, port 8265); default $RAY_ADDRESS when it is "
                  "http(s)://, else http://127.0.0.1:8265")
OLD_ADDRESS_HELP = "Deprecated spelling of --dashboard here (--address is the Ray address in run / eval / retrain)"


def _dashboard(dashboard: Optional[str], address: Optional[str]) -> Optional[str]:
    """The job-submission URL from ``--dashboard``, or from the deprecated ``--address`` (with a note)."""
    if address is None:
        return dashboard
    if dashboard is not None:
        fail("give --dashboard only (--address is its old spelling for the job commands)")
    console.print("[yellow]note:[/] for submit / status / logs / stop the job-submission URL is now --dashboard "
                  "(--address is the Ray address in run, eval and retrain); --address still works here for now",
                  highlight=False)
    return address


def _dashboard_option():
    return typer.Option(None, "--dashboard", help=DASHBOARD_HELP)


def _old_address_option():
    return typer.Option(None, "--address", help=OLD_ADDRESS_HELP, hidden=True)


def submit_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML inside --working-dir"),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides passed to `mmtl run`"),
    dashboard: Optional[str] = _dashboard_option(),
    runtime_env: Optional[Path] = typer.Option(None, "--runtime-env", help="runtime_env YAML (default cluster/runtime_env.yaml)"),
    env: Optional[List[str]] = typer.Option(None, "--env", help="K=V environment variable for the job; repeatable"),
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="Project folder uploaded with the job"),
    pip: Optional[List[str]] = typer.Option(None, "--pip", help="Extra pip requirement for the job; repeatable"),
    wait: bool = typer.Option(False, "--wait", help="Follow the logs until the job ends; exit 1 unless it succeeded"),
    address: Optional[str] = _old_address_option(),
) -> None:
    """Submit `mmtl run PIPELINE` to a Ray cluster through the Job Submission API; prints the job id.

    Secrets (e.g. AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD) are forwarded from your environment into the
    job's runtime_env and never printed. The pipeline is validated locally before anything is sent. Results are
    kept only on storage that outlives the job: pass train.runs_root= on shared storage and an MLflow server as
    tracking.uri (mmtl warns when they would land in the job's temporary folder).

    Example:

    \b
        mmtl submit pipelines/quickstart.yaml --dashboard http://127.0.0.1:8265 train.runs_root=/mnt/runs train.shared_filesystem=true tracking.uri=http://mlflow:5000
    """
    from mmtl.config import PipelineError
    from mmtl.jobs import submit as jobs

    url = _dashboard(dashboard, address)
    try:
        kv = dict(e.split("=", 1) for e in env or [])
        job = jobs.submit(str(pipeline), url, overrides or [], str(runtime_env) if runtime_env else None, kv,
                          str(working_dir), pip)
    except (PipelineError, ValueError, FileNotFoundError) as exc:
        fail(str(exc), 2)
    except (ConnectionError, RuntimeError) as exc:
        fail(str(exc), 1)
    print(job)
    if wait:
        jobs.logs(job, url, follow=True)
        final = jobs.status(job, url)
        console.print(f"job {job}: {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)


def status_cmd(job_id: str = typer.Argument(...), dashboard: Optional[str] = _dashboard_option(),
               as_json: bool = typer.Option(False, "--json", help="Print the job's info as one JSON object (secrets "
                                            "redacted)"),
               address: Optional[str] = _old_address_option(),
               old_verbose: bool = typer.Option(False, "--verbose", hidden=True)) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED).

    Example:

    \b
        mmtl status raysubmit_XYZ --dashboard http://127.0.0.1:8265
    """
    from mmtl.jobs import submit as jobs

    url = _dashboard(dashboard, address)
    if old_verbose:  # -v / --verbose means "full library output" everywhere else
        console.print("[yellow]note:[/] `mmtl status --verbose` is now --json", highlight=False)
        as_json = True
    try:
        print(json.dumps(jobs.job_info(job_id, url), indent=2, default=str) if as_json else jobs.status(job_id, url))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(str(exc), 1)


def logs_cmd(job_id: str = typer.Argument(...), dashboard: Optional[str] = _dashboard_option(),
             follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends"),
             address: Optional[str] = _old_address_option()) -> None:
    """Print (or follow) a submitted job's logs.

    Example:

    \b
        mmtl logs raysubmit_XYZ --dashboard http://127.0.0.1:8265 --follow
    """
    from mmtl.jobs import submit as jobs

    try:
        jobs.logs(job_id, _dashboard(dashboard, address), follow=follow)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(str(exc), 1)


def stop_cmd(job_id: str = typer.Argument(...), dashboard: Optional[str] = _dashboard_option(),
             address: Optional[str] = _old_address_option()) -> None:
    """Stop a running job.

    Example:

    \b
        mmtl stop raysubmit_XYZ --dashboard http://127.0.0.1:8265
    """
    from mmtl.jobs import submit as jobs

    try:
        stopped = jobs.stop(job_id, _dashboard(dashboard, address))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(str(exc), 1)
    print("stopped" if stopped else "already finished")
