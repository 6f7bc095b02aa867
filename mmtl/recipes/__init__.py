"""Recipes: one small class per kind of training job, registered by ``strategy.kind``; one runner
(:mod:`mmtl.recipes.runner`) owns the run sequence for all of them.

To add a kind of job: write ``mmtl/recipes/<name>.py`` with a :class:`~mmtl.recipes.base.Recipe` subclass
(``kinds = ("<strategy kind>",)``, its ``train_module``, ``prepare`` / ``evaluate`` / ``summary``) and add
it to :data:`RECIPES` below; its strategy goes into :data:`mmtl.strategies.STRATEGIES`.
"""
from __future__ import annotations

from mmtl.recipes.base import Recipe, RunContext
from mmtl.recipes.contrastive import ContrastiveRecipe
from mmtl.recipes.fusion import FusionRecipe
from mmtl.recipes.prompt_learning import PromptLearningRecipe

__all__ = ["RECIPES", "Recipe", "RunContext", "check_pipeline", "recipe_for", "run_pipeline"]

RECIPES: dict[str, type[Recipe]] = {kind: r for r in (ContrastiveRecipe, PromptLearningRecipe, FusionRecipe)
                                    for kind in r.kinds}


def recipe_for(kind: str) -> type[Recipe]:
    """The recipe class that runs ``strategy.kind == kind``.

    Raises:
        ValueError: no recipe for that kind (the message lists the known kinds).
    """
    try:
        return RECIPES[kind]
    except KeyError:
        raise ValueError(f"strategy.kind={kind!r} has no recipe (known: {', '.join(RECIPES)})") from None


def check_pipeline(pipe) -> None:
    """Check a loaded pipeline against the registries, before anything starts: ``strategy.kind`` has a recipe
    and a strategy, and the strategy accepts its options (:meth:`~mmtl.strategies.base.Strategy.check`).

    Raises:
        ValueError: the message names the field and the known values.
    """
    from mmtl.strategies import get_strategy

    recipe_for(pipe.strategy.kind)
    get_strategy(pipe.strategy.kind).check(pipe.strategy, pipe.train.zero_stage)


def run_pipeline(pipe, **kwargs) -> dict:
    """See :func:`mmtl.recipes.runner.run_pipeline`."""
    from mmtl.recipes.runner import run_pipeline as run

    return run(pipe, **kwargs)
