"""Shared pieces of the mmtl command line: the stderr console, error exit, pipeline loading, progress messages,
and building a command from a typed options dataclass."""
from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, soft_wrap=True)  # messages keep paths and commands on one line


def fail(msg: str, code: int = 2) -> typing.NoReturn:
    """Print ``error: msg`` on stderr and exit with ``code`` (2: usage / input error, 1: the work failed).
    ``msg`` is plain text: brackets in it (``eval.sets=[test]``) are printed, not read as rich markup."""
    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False)
    raise typer.Exit(code)


def load_pipeline_or_exit(pipeline: Path, overrides: List[str], for_run: bool = True, check_paths: bool = False):
    """Load and validate a pipeline file with dotted overrides, and check it against the registries
    (:func:`mmtl.recipes.check_pipeline`: ``strategy.kind`` has a recipe and a strategy that accepts its
    options; with ``for_run`` also that ``eval.sets`` names configured sets); with ``check_paths`` every local
    input must exist (:func:`mmtl.recipes.config_report.missing_inputs`). Exits with code 2 and the file and
    field path on error (no traceback)."""
    from mmtl.config import PipelineError, load_pipeline

    try:
        pipe = load_pipeline(pipeline, overrides)
    except PipelineError as exc:
        fail(str(exc))
    from mmtl.recipes import check_pipeline

    try:
        check_pipeline(pipe, eval_sets=for_run)
    except ValueError as exc:
        fail(f"{pipeline}: {exc}")
    if check_paths:
        fail_on_missing_inputs(pipe, pipeline)
    return pipe


def fail_on_missing_inputs(pipe, pipeline: Path) -> None:
    """Exit 2 listing every missing local input of ``pipe`` (file ``pipeline``), before anything starts."""
    from mmtl.recipes.config_report import missing_inputs

    missing = missing_inputs(pipe)
    if missing:
        fail(f"{pipeline}: {len(missing)} input path(s) do not exist (relative paths are relative to "
             f"{pipe._project_root}):\n" + "\n".join(f"  {m}" for m in missing)
             + "\nset them in the pipeline or as overrides, e.g. data.train=/my/shards/train")


def say_to_console(prefix: str = "mmtl") -> Callable[[str], None]:
    """A ``say`` callback printing ``<prefix> message`` (prefix in cyan) on stderr. Messages are plain text:
    ``features[train]`` is printed as such (rich would otherwise take ``[train]`` for a markup tag and drop it)."""
    return lambda m: console.print(f"[cyan]{escape(prefix)}[/] {escape(m)}", highlight=False, soft_wrap=True)


def options_command(options_cls: type, body: Callable[..., None], name: str, doc: str,
                    extra: Optional[dict[str, tuple[type, Any]]] = None,
                    extra_after: Optional[str] = None) -> Callable[..., None]:
    """A typer command callback whose parameters are the fields of the dataclass ``options_cls`` (each
    ``Annotated[T, Cli(help, flag)]`` from :mod:`mmtl.eval.options`; field default = option default, no
    default = required) and ``extra`` CLI-only parameters ``{name: (type, typer.Option(...))}``, listed after
    the field ``extra_after`` (default: last).

    The callback builds ``options_cls(**fields)`` and calls ``body(options, **extra values)``.

    Raises:
        TypeError: a field without ``Cli`` metadata (every option needs its help text).
    """
    hints = typing.get_type_hints(options_cls, include_extras=True)
    params: list[inspect.Parameter] = []
    fields = [f.name for f in dataclasses.fields(options_cls)]
    for f in dataclasses.fields(options_cls):
        hint = hints[f.name]
        meta = [m for m in getattr(hint, "__metadata__", ()) if hasattr(m, "help") and hasattr(m, "flag")]
        if typing.get_origin(hint) is not typing.Annotated or len(meta) != 1:
            raise TypeError(f"{options_cls.__name__}.{f.name} needs Annotated[type, Cli(help, flag)] metadata")
        cli, typ = meta[0], typing.get_args(hint)[0]
        required = f.default is dataclasses.MISSING
        if cli.flag is None:
            info = typer.Argument(... if required else f.default, help=cli.help)
        else:
            info = typer.Option(... if required else f.default, cli.flag, help=cli.help)
        params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=info, annotation=typ))
    at = fields.index(extra_after) + 1 if extra_after else len(params)
    params[at:at] = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=info, annotation=typ)
                     for k, (typ, info) in (extra or {}).items()]

    def command(**kwargs: Any) -> None:
        body(options_cls(**{k: kwargs.pop(k) for k in fields}), **kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__, command.__qualname__, command.__doc__ = name, name, doc
    return command
