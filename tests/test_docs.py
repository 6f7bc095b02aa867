"""Docs that cannot drift (issue 22): every `mmtl ...` line of README.md and docs/*.md goes through the real
command-line parser (click's full parse: subcommand, options, required arguments, option values; the command
itself never runs), dotted overrides on those lines are validated against the pipeline schema, and the
defaults the docs state are compared with the code. Every command's --help has an example that parses too.
No Ray, no models: a few seconds."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from mmtl.cli import app

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ROOT = typer.main.get_command(app)


def is_group(cmd) -> bool:
    """A command group (typer vendors its own click: duck-typed rather than by class)."""
    return hasattr(cmd, "commands") and hasattr(cmd, "resolve_command")


def parse(args: list[str]):
    """The command and its parsed context for ``mmtl ARGS``; raises click's usage error (it has
    ``format_message``) for what the CLI would refuse."""
    cmd, ctx = ROOT, ROOT.make_context("mmtl", list(args))
    while is_group(cmd):
        rest = list(getattr(ctx, "_protected_args", [])) + list(ctx.args)
        name, sub, rest = cmd.resolve_command(ctx, rest)
        cmd, ctx = sub, sub.make_context(name, rest, parent=ctx)
    return cmd, ctx


def _fenced_lines(text: str) -> list[str]:
    """`mmtl ...` command lines of the ```bash blocks (continuations joined, `a && mmtl b` split)."""
    out = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("mmtl "):
                    out.append(part)
    return out


def _inline_spans(text: str) -> list[str]:
    body = re.sub(r"```.*?```", "", text, flags=re.S)
    return [s for s in re.findall(r"`(mmtl [^`]+)`", body)]


def command_lines() -> list[tuple[str, str]]:
    return [(p.relative_to(REPO).as_posix(), line) for p in DOCS for line in _fenced_lines(p.read_text())]


def _pipeline_for(cmd_name: str, params: dict) -> tuple[Path, list[str]] | None:
    """(pipeline file, overrides) of a line whose overrides are pipeline keys; unknown files (a user's own copy)
    are checked against the quickstart's schema."""
    if cmd_name in ("run", "config", "submit", "retrain"):
        path, overrides = Path(str(params["pipeline"])), params.get("overrides") or []
    elif cmd_name == "copy":
        path, overrides = REPO / "pipelines" / f"{params['name']}.yaml", params.get("overrides") or []
    else:
        return None
    path = path if path.is_absolute() else REPO / path
    return (path if path.is_file() else REPO / "pipelines" / "quickstart.yaml"), list(overrides)


@pytest.mark.parametrize("where, line", command_lines())
def test_documented_command_parses(where, line):
    from mmtl.config import PipelineError, load_pipeline

    args = shlex.split(line, comments=True)[1:]
    try:
        cmd, ctx = parse(args)
    except Exception as exc:  # click's UsageError family (typer's vendored click)
        if not hasattr(exc, "format_message"):
            raise
        pytest.fail(f"{where}: `{line}` does not parse: {exc.format_message()}")
    spec = _pipeline_for(cmd.name, ctx.params)
    if spec is not None:
        path, overrides = spec
        overrides = [o for o in overrides if "$" not in o]  # shell variables: not known here
        try:
            load_pipeline(path, overrides)
        except PipelineError as exc:
            pytest.fail(f"{where}: `{line}`: the overrides do not validate: {exc}")


def test_there_are_documented_commands_to_check():
    lines = command_lines()
    assert len(lines) >= 30
    assert {"README.md", "docs/cluster-and-retraining.md", "docs/pipelines.md"} <= {w for w, _ in lines}


def test_links_between_docs_resolve():
    bad = []
    for p in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", p.read_text()):
            if not (p.parent / target).exists():
                bad.append(f"{p.relative_to(REPO)} -> {target}")
    assert not bad, bad


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def test_inline_command_mentions_name_real_commands_and_options():
    """`mmtl eval MODEL --task ... --data SHARDS` in running text: the command exists and has those options."""
    bad = []
    for p in DOCS:
        for span in _inline_spans(p.read_text()):
            words = span.split()[1:]
            while words and words[0] in _options(ROOT):  # global options: mmtl -v run ...
                words.pop(0)
            cmd = ROOT
            while is_group(cmd) and words and words[0] in cmd.commands:
                cmd = cmd.commands[words.pop(0)]
            if is_group(cmd):
                if words:
                    bad.append(f"{p.name}: `{span}`: no command {words[0]!r}")
                continue
            for w in words:
                for opt in re.findall(r"--[a-z][a-z0-9-]*", w):
                    if opt not in _options(cmd) and opt != "--help":
                        bad.append(f"{p.name}: `{span}`: {cmd.name} has no {opt}")
    assert not bad, "\n".join(bad)


# ---- stated defaults ------------------------------------------------------------------------------------------
def _schema_default(dotted: str):
    from mmtl.config import Pipeline

    cls, field = Pipeline, None
    for part in dotted.split("."):
        field = cls.model_fields[part]
        ann = field.annotation
        cls = next((a for a in (getattr(ann, "__args__", None) or (ann,)) if hasattr(a, "model_fields")), None)
    return field.get_default(call_default_factory=True)


def _all_commands(cmd=ROOT):
    if is_group(cmd):
        for sub in cmd.commands.values():
            yield from _all_commands(sub)
    else:
        yield cmd


DEFAULT = re.compile(r"`([a-z_]+\.[a-z_.]+|--[a-z][a-z0-9-]*)`[^`()\n]{0,40}\(default:? `([^`]+)`")


def _command_before(text: str, pos: int):
    """The command of the last ``mmtl WORD [WORD]`` mentioned before ``pos`` (None if none)."""
    found = None
    for m in re.finditer(r"mmtl ([a-z-]+)(?: ([a-z-]+))?", text[:pos]):
        cmd, words = ROOT, [w for w in m.groups() if w]
        while is_group(cmd) and words and words[0] in cmd.commands:
            cmd = cmd.commands[words.pop(0)]
        if not is_group(cmd):
            found = cmd
    return found


def stated_defaults() -> list[tuple[str, str, str, object]]:
    """(file, key, documented value, the command last mentioned before it) of every stated default."""
    out = []
    for p in DOCS:
        text = p.read_text()
        out += [(p.name, m.group(1), m.group(2), _command_before(text, m.start())) for m in DEFAULT.finditer(text)]
    return out


def test_stated_defaults_match_the_code():
    """"`train.resume` (default `auto`)" / "`--label-field` ... (default `category`)" in the docs equal the
    pipeline schema's default / the default of that option in the command the text is about (the last
    `mmtl ...` mentioned before it)."""
    found = stated_defaults()
    assert len(found) >= 5, found
    bad = []
    for where, key, value, near in found:
        if key.startswith("--"):
            near_opts = [p for p in getattr(near, "params", []) if key in p.opts]
            params = near_opts or [p for c in _all_commands() for p in c.params if key in p.opts]
            ok = bool(params) and all(str(p.default) == value for p in params)
        else:
            ok = str(_schema_default(key)) == value
        if not ok:
            bad.append(f"{where}: {key} documented default {value!r}")
    assert not bad, "\n".join(bad)


def test_bench_strategies_defaults_in_help_and_docs_match_the_code():
    import inspect

    from mmtl.bench.strategies import bench_strategies
    from mmtl.cli.bench import STRATEGY_SETTINGS, bench_strategies_cmd

    sig = inspect.signature(bench_strategies).parameters
    helptext = inspect.signature(bench_strategies_cmd).parameters["overrides"].default.help
    for key, name in STRATEGY_SETTINGS.items():
        m = re.search(re.escape(key) + r" \((?:default )?([^)]+)\)", helptext)
        assert m and type(sig[name].default)(m.group(1)) == sig[name].default, (key, m and m.group(1))
    text = (REPO / "docs" / "benchmarks.md").read_text()
    assert f"are {sig['steps'].default} steps" in text


# ---- help --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", list(_all_commands()), ids=lambda c: c.name)
def test_every_command_help_has_an_example_that_parses(cmd):
    helptext = cmd.help or ""
    m = re.search(r"Example:\s*\n\s*\x08?\s*\n?\s*(mmtl [^\n]+)", helptext)
    assert m, f"{cmd.name}: no example in its help"
    parse(shlex.split(m.group(1))[1:])


def test_flags_take_no_value_in_help():
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["shards", "inspect", "--help"])
    assert res.exit_code == 0 and "<bool>" not in res.output and "--json " in res.output
