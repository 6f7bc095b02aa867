"""``mmtl index build`` and ``mmtl serve``: an embedding index built by a Ray Data job, and the Ray Serve
application that answers embedding, search and classification requests (:mod:`mmtl.serve`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from mmtl.cli.common import fail, say_to_console

index_app = typer.Typer(help="Embedding indexes for search (faiss + parquet).", no_args_is_help=True)
MODEL_HELP = ("Run directory, export folder, runs:/<run_id>/model, models:/<name>@<alias> or "
              "models:/<name>/<version>")


@index_app.command("build")
def index_build_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    shards: List[str] = typer.Argument(..., help="Shard folders, globs, brace patterns or files"),
    out: Path = typer.Option(..., "--out", help="Index folder to write (or extend with --append)"),
    kind: Optional[str] = typer.Option(None, "--kind", help="flat (exact inner product, default) or hnsw "
                                                            "(approximate; its recall@10 vs flat goes to index.json)"),
    append: bool = typer.Option(False, "--append", help="Add these shards to the existing index in --out "
                                                        "(same model required)"),
    actors: int = typer.Option(1, help="Ray Data actors (1 CPU each); keep below the CPU count"),
    batch_size: int = typer.Option(64, help="Samples per forward pass"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI for runs:/ and models:/ "
                                                          "(default $MLFLOW_TRACKING_URI)"),
    address: Optional[str] = typer.Option(None, help="Ray address to join (default: local 127.0.0.1)"),
) -> None:
    """Embed every clean sample of SHARDS with MODEL and write faiss vectors + parquet metadata + thumbnails.

    Example:

    \b
        mmtl index build runs/quickstart mmtl/assets/emoji/train --out runs/emoji-index
        mmtl index build runs/quickstart mmtl/assets/emoji/test --out runs/emoji-index --append
    """
    from mmtl.data.shardlist import ShardError
    from mmtl.eval.resolve import ModelSpecError
    from mmtl.serve.index import IndexFolderError
    from mmtl.serve.index_build import build_index

    try:
        m = build_index(model, shards, out, kind=kind, append=append, tracking_uri=tracking_uri, actors=actors,
                        batch_size=batch_size, ray_address=address, say=say_to_console())
    except (ModelSpecError, IndexFolderError, ShardError, ValueError) as exc:
        fail(str(exc))
    keep = ("kind", "count", "dim", "seconds", "samples_per_s", "recall_at_10_vs_flat", "recall_queries")
    print(json.dumps({**{k: m[k] for k in keep if k in m}, "out": str(out),
                      "model": m["model"].get("spec"), "fingerprint": m["model"]["fingerprint"]}, indent=2))


def serve_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    index: Optional[Path] = typer.Option(None, "--index", help="Index folder from `mmtl index build` (enables /search)"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the HTTP proxy binds (default loopback only)"),
    port: int = typer.Option(8000, "--port"),
    token: Optional[str] = typer.Option(None, "--token", help="Bearer token required on every route but /, /healthz, "
                                                              "/readyz (default $MMTL_SERVE_TOKEN; none if unset)"),
    config: Optional[Path] = typer.Option(None, "--config", help="Replicas, autoscaling, batching, limits "
                                                                 "(default cluster/serve.yaml)"),
    no_batching: bool = typer.Option(False, "--no-batching", help="Encode every request alone"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI for runs:/ and models:/"),
    address: Optional[str] = typer.Option(None, help="Ray address to join (default: local 127.0.0.1)"),
    watch_alias: bool = typer.Option(False, "--watch-alias", help="MODEL is models:/<name>@<alias>: redeploy when "
                                                                  "the alias moves (e.g. after `mmtl retrain`), "
                                                                  "rebuilding --index for the new model"),
    watch_interval: float = typer.Option(60.0, help="Seconds between registry polls with --watch-alias"),
) -> None:
    """Serve MODEL with Ray Serve: /embed/text, /embed/image, /search, /classify (also with a learned CoOp
    prompt) for embedding models, /caption for generative models (blip, llava), /vqa or /itm for cross-attention
    models; /healthz, /readyz, docs at /docs and a search page at /. Runs until interrupted (Ctrl-C), then stops
    Serve and the Ray it started.

    Example:

    \b
        mmtl serve runs/quickstart --index runs/emoji-index --port 8000
    """
    import signal
    import threading

    from mmtl.eval.resolve import ModelSpecError
    from mmtl.serve.config import load_serve_config
    from mmtl.serve.index import IndexFolderError
    from mmtl.serve.server import start, stop

    say = say_to_console()
    watcher = None
    try:
        cfg = load_serve_config(config, {"batching": {"enabled": False}} if no_batching else None)
        running = start(model, index_dir=str(index) if index else None, host=host, port=port, token=token,
                        config=cfg, tracking_uri=tracking_uri, ray_address=address, say=say)
        if watch_alias:
            from mmtl.serve.watch import AliasWatcher, make_redeploy

            redeploy = make_redeploy(model, str(index) if index else None, say, host=host, port=port, token=token,
                                     config=cfg, tracking_uri=tracking_uri, ray_address=address)
            watcher = AliasWatcher(model, tracking_uri, redeploy, say=say)
    except (ModelSpecError, IndexFolderError, ValueError) as exc:
        fail(str(exc))
    say(f"ready: {running.url}/ (page), {running.url}/docs (API); Ctrl-C stops"
        + (f"; watching {model} (version {watcher.served}) every {watch_interval:.0f} s" if watcher else ""))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(watch_interval if watcher else None):
            watcher.poll_once()
    except KeyboardInterrupt:
        pass
    finally:
        import ray

        stop(running)
        ray.shutdown()
        say("stopped")
