"""``mmtl eval``: built from the typed fields of :class:`mmtl.eval.options.EvalOptions` (flags, defaults and help
live there, next to :func:`mmtl.eval.runner.run_eval`); this module only prints the report."""
from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from mmtl.cli.common import console, fail, options_command, say_to_console
from mmtl.eval.options import EvalOptions

EVAL_DOC = """Evaluate a model on a shard set: zero-shot classification, image-text retrieval, or VQA / ITM accuracy.

Without --task the task is picked from the first samples of --data before the model loads: a --label-field
label -> zero-shot, VQA answers -> vqa, plain captions -> retrieval.

Example:

\b
    mmtl eval runs/quickstart --data mmtl/assets/emoji/test --task retrieval --json
"""


def _eval(opts: EvalOptions, as_json: bool) -> None:
    from mmtl.data.shardlist import ShardError
    from mmtl.eval.args import EvalError
    from mmtl.eval.resolve import ModelSpecError

    try:
        report = opts.run(say=say_to_console())
    except (ModelSpecError, EvalError) as exc:
        fail(str(exc))
    except (ShardError, FileNotFoundError, ValueError, RuntimeError) as exc:
        fail(str(exc), 1)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_report(report)


def print_report(report: dict) -> None:
    """Rich table of ``report["metrics"]``, then the report files and where the MLflow run went (stderr)."""
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


eval_cmd = options_command(EvalOptions, _eval, "eval_cmd", EVAL_DOC,
                           extra={"as_json": (bool, typer.Option(False, "--json", help="Print one JSON object"))},
                           extra_after="device")
