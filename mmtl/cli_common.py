"""Shared pieces of the mmtl command line: the stderr console, error exit and pipeline loading."""
from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.console import Console

console = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    """Print ``error: msg`` on stderr and exit with ``code`` (2: usage / input error, 1: the work failed)."""
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def _load(pipeline: Path, overrides: List[str]):
    """Load and validate a pipeline file with dotted overrides; exits with code 2 and the field path on error."""
    from mmtl.config import PipelineError, load_pipeline

    try:
        return load_pipeline(pipeline, overrides)
    except PipelineError as exc:
        _fail(str(exc))
