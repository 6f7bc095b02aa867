"""mmtl command line (``mmtl = "mmtl.cli:app"``): thin commands that parse arguments, load the pipeline and call
one function each. The table below is every command; the modules hold them by theme:

* :mod:`mmtl.cli.run`: ``run``, ``config``, ``export``, ``retrain`` (and :func:`print_summary`);
* :mod:`mmtl.cli.jobs`: ``submit``, ``status``, ``logs``, ``stop`` (Ray Job Submission API);
* :mod:`mmtl.cli.eval`: ``eval`` (built from :class:`mmtl.eval.options.EvalOptions`);
* :mod:`mmtl.cli.generate`: ``generate`` (captions / text from a generative model);
* :mod:`mmtl.cli.data`: ``shards ...``, ``datasets ...``; :mod:`mmtl.cli.bench`: ``bench ...``;
* :mod:`mmtl.cli.pipelines`: ``pipelines list``, ``pipelines copy`` (:mod:`mmtl.recipes.catalog`);
* :mod:`mmtl.cli.weights`: ``weights list``, ``weights get`` (converted weights cache);
* :mod:`mmtl.cli.serve`: ``index build``, ``serve`` (:mod:`mmtl.serve`);
* :mod:`mmtl.cli.common`: console, :func:`~mmtl.cli.common.fail`, pipeline loading.

Nothing below the CLI imports it; the modules import heavy libraries inside the commands only.
"""
from __future__ import annotations

import typer

from mmtl.cli import jobs as _jobs
from mmtl.cli import run as _run
from mmtl.cli.bench import bench_app
from mmtl.cli.data import datasets_app, shards_app
from mmtl.cli.eval import eval_cmd
from mmtl.cli.pipelines import pipelines_app
from mmtl.cli.generate import generate_cmd
from mmtl.cli.run import print_summary
from mmtl.cli.weights import weights_app
from mmtl.cli.serve import index_app, serve_cmd

__all__ = ["app", "main", "print_summary"]

app = typer.Typer(help="Multimodal (image-text) transfer learning on Ray.", no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False, add_completion=False)


@app.callback()
def _options(ctx: typer.Context,
             verbose: bool = typer.Option(False, "--verbose", "-v",
                                          help="Show the full output of Ray, DeepSpeed and MLflow (also MMTL_VERBOSE=1); "
                                               "by default their known noise is kept out of the terminal "
                                               "(a run still writes everything to <run_dir>/console.log).")) -> None:
    """Multimodal (image-text) transfer learning on Ray."""
    from mmtl.cli import console_log

    console_log.start(verbose)
    ctx.call_on_close(console_log.stop)


app.add_typer(pipelines_app, name="pipelines")
app.add_typer(shards_app, name="shards")
app.add_typer(datasets_app, name="datasets")
app.add_typer(bench_app, name="bench")
app.add_typer(weights_app, name="weights")
app.add_typer(index_app, name="index")
app.command("run")(_run.run_cmd)
app.command("config")(_run.config_cmd)
app.command("submit")(_jobs.submit_cmd)
app.command("status")(_jobs.status_cmd)
app.command("logs")(_jobs.logs_cmd)
app.command("stop")(_jobs.stop_cmd)
app.command("export")(_run.export_cmd)
app.command("eval")(eval_cmd)
app.command("generate")(generate_cmd)
app.command("retrain")(_run.retrain_cmd)
app.command("serve")(serve_cmd)


def main() -> None:  # pragma: no cover
    app()
