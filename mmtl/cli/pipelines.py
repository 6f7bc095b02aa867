"""``mmtl pipelines list`` / ``copy``: the bundled pipelines and standalone copies of them
(:mod:`mmtl.recipes.catalog`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import typer

from mmtl.cli.common import console, fail

pipelines_app = typer.Typer(help="The bundled pipelines: list them, copy one to start your own.",
                            no_args_is_help=True, rich_markup_mode=None)


@pipelines_app.command("list")
def pipelines_list(as_json: bool = typer.Option(False, "--json", help="Print one JSON object")) -> None:
    """List the bundled pipelines: use, model family, strategy, GPU, weights, and what each still needs
    (inputs that do not exist yet: your data, a weights file, an earlier run).

    Example:

    \b
        mmtl pipelines list
    """
    from rich.console import Console
    from rich.table import Table

    from mmtl.config import PipelineError
    from mmtl.recipes.catalog import list_pipelines

    try:
        rows = list_pipelines()
    except (FileNotFoundError, PipelineError) as exc:
        fail(str(exc), 1)
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return
    table = Table(title="bundled pipelines (mmtl pipelines copy NAME DEST to start from one)")
    for col in ("name", "use", "family", "strategy", "GPU", "weights", "needs"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.name, r.use, r.family, r.strategy, r.gpu, r.weights,
                      ", ".join(r.needs) if r.needs else "runs as is")
    Console(width=max(Console().width, 160)).print(table)


@pipelines_app.command("copy")
def pipelines_copy(
    name: str = typer.Argument(..., help="A bundled pipeline (mmtl pipelines list)"),
    dest: Path = typer.Argument(..., help="New pipeline file, or a folder to copy it into"),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides written into the copy: "
                                                    "data.train=./shards/train ..."),
    force: bool = typer.Option(False, "--force", help="Overwrite DEST if it exists"),
) -> None:
    """Copy a bundled pipeline to DEST as a standalone file: its input paths become absolute (so they are right
    from wherever DEST is), outputs (runs, cache, MLflow store) go next to DEST, and KEY=VALUE overrides are
    written in (relative paths in them are taken from the current directory). Prints every rewritten path and
    what is still missing.

    Example:

    \b
        mmtl pipelines copy quickstart my-pipeline.yaml data.train=./shards/train data.val=./shards/val data.test=./shards/test
    """
    from mmtl.config import PipelineError
    from mmtl.recipes.catalog import copy_pipeline

    try:
        info = copy_pipeline(name, dest, overrides or [], force=force)
    except (FileNotFoundError, FileExistsError, PipelineError) as exc:
        fail(str(exc))
    console.print(f"wrote {info['dest']} (from {info['src']})", highlight=False)
    for key, path in info["rewritten"].items():
        console.print(f"  {key}: {path}", highlight=False)
    if not info["comments_kept"]:
        console.print("  note: an override added a key the file did not have, so its inline comments were dropped",
                      highlight=False)
    if info["missing"]:
        console.print("still to set (mmtl config / run refuse missing inputs):", highlight=False)
        for m in info["missing"]:
            console.print(f"  {m}", highlight=False)
    console.print(f"next: mmtl config {info['dest']}   then   mmtl run {info['dest']}", highlight=False)
