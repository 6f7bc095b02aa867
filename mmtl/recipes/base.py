"""What a recipe is: the part of a training run that differs between kinds of jobs.

The run sequence itself (run directory, MLflow run, seed, model, strategy, training through Ray Train +
DeepSpeed, export, metrics, registry, ``summary.json``) is written once, in :mod:`mmtl.recipes.runner`. A
recipe is a class registered by name (:data:`mmtl.recipes.RECIPES`).
The strategy of ``strategy.kind`` names its recipe (:attr:`mmtl.strategies.base.Strategy.recipe`). A recipe
says only:

* :meth:`Recipe.prepare` which in-memory arrays the workers train on (cached features / tokens), or ``None``
  to stream and decode ``data.train`` shards, and what to measure before training;
* :attr:`Recipe.train_module` which module the DeepSpeed engine wraps (``None``: the contrastive module;
  else a class with ``from_pipeline(pipe, model)``, see :func:`mmtl.train.loop.make_train_module`);
* :meth:`Recipe.evaluate` which eval tasks run after training, on the exported weights;
* :meth:`Recipe.register` what is logged / registered as the run's MLflow model;
* :meth:`Recipe.summary` the recipe's own fields of ``summary.json``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from mmtl.config import Pipeline

Say = Callable[[str], None]


@dataclass
class RunContext:
    """Everything a recipe may read about the run in progress (filled by the runner).

    Attributes:
        pipe: the validated pipeline (a recipe may resolve fields in it before training, e.g. the answer
            vocabulary; the runner then rewrites ``<run_dir>/pipeline.yaml``).
        run_dir, uri, run_id: the run directory, the absolute MLflow tracking URI and the MLflow run id.
        resuming: True when continuing an unfinished run from its last checkpoint.
        say: one-line progress printer.
        specs: ``{eval set name: shard spec}`` of ``eval.sets``.
        model: the built model with the strategy applied (set before :meth:`Recipe.prepare`).
        trainable: :func:`mmtl.strategies.trainable_summary` of ``model`` after the strategy.
        final_train: the last ``train/*`` metrics reported by the workers (after training).
        steps: optimizer steps done (after training).
        t_start: ``time.time()`` at the start of the run (seconds).
    """

    pipe: Pipeline
    run_dir: Path
    uri: str
    run_id: str
    resuming: bool
    say: Say
    specs: dict[str, Any]
    model: Any = None
    trainable: dict = field(default_factory=dict)
    final_train: dict = field(default_factory=dict)
    steps: int = 0
    t_start: float = field(default_factory=time.time)

    @property
    def cache_root(self) -> Path:
        """Where frozen features / tokens are cached: ``data.cache_dir`` or ``<train.runs_root>/cache`` (a runs
        root on object storage: its local staging folder, :func:`mmtl.storage.local_root`)."""
        from mmtl.storage import local_root

        return Path(self.pipe.data.cache_dir or Path(local_root(self.pipe.train.runs_root)) / "cache")

    def common_summary(self) -> dict[str, Any]:
        """The fields every ``summary.json`` starts with (run identity and where to look)."""
        from mmtl.runtime import run_uri

        store = run_uri(self.run_dir)  # a runs root on object storage: run_dir is the driver's staging copy
        return {"status": "finished", "run_name": self.run_dir.name, "run_dir": str(self.run_dir),
                **({"run_uri": store} if store else {}),
                "mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.uri,
                "mlflow_ui": f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1 --port 5000"}


class Recipe:
    """Base recipe: trains ``train_module`` on what :meth:`prepare` returns. One instance per run.

    Attributes:
        name: the registry key; strategies name it in their ``recipe`` attribute.
        train_module: the task-module class the engine wraps, or ``None`` for the contrastive module.
    """

    name: ClassVar[str] = ""
    train_module: ClassVar[Optional[type]] = None

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    @classmethod
    def data_modality(cls, pipe: Pipeline) -> str:
        """What the recipe's shards must hold: ``"pair"`` (image-text pairs, the default), ``"image"`` or
        ``"text"`` (unpaired samples); the runner refuses other shards before anything starts."""
        return "pair"

    def prepare(self) -> Optional[dict]:
        """Before training: caches and baselines. Returns ``{name: (N, ...) array}`` rows for the workers, or
        ``None`` to stream ``data.train`` shards.

        Raises:
            ValueError: data or options that cannot train (before Ray starts).
        """
        return None

    def stream(self):
        """The Ray Dataset builder of streamed training rows, ``(pipe, spec, epochs, stats_actor) -> Dataset``,
        when :meth:`prepare` returns None; None (default): :func:`mmtl.data.stream.build_image_dataset`."""
        return None

    def trains(self) -> bool:
        """False when the pipeline only evaluates (e.g. CoOp's ``zero_shot_only``)."""
        return True

    def module_to_report(self):
        """The module whose trainable parameters are reported before training (default: the model)."""
        return self.ctx.model

    def evaluate(self, export_dir: Optional[Path]) -> dict[str, float]:
        """After training (``export_dir`` holds the exported weights; ``None`` when nothing trained): the
        metrics to log to MLflow at the final step."""
        return {}

    def register(self, export_dir: Path) -> Optional[dict]:
        """Log the export as the run's MLflow model (registered under ``tracking.model_name`` when set)."""
        from mmtl.tracking.registry import log_exported_model

        return log_exported_model(self.ctx.uri, self.ctx.run_id, export_dir, self.ctx.pipe.tracking.model_name)

    def summary(self, base: dict[str, Any], metrics: dict[str, float]) -> dict[str, Any]:
        """The whole ``summary.json``: ``base`` (common fields + steps, times, export, registered model) plus
        the recipe's own fields; ``metrics`` is what :meth:`evaluate` returned."""
        return {**base, "metrics": {**self.ctx.final_train, **metrics}}
