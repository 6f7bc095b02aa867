"""Recipes: one small class per kind of training job, registered by name; each strategy names the recipe
that runs it (``Strategy.recipe``, default ``"contrastive"``); one runner (:mod:`mmtl.recipes.runner`) owns the
run sequence for all of them.

To add a kind of job: write ``mmtl/recipes/<name>.py`` with a :class:`~mmtl.recipes.base.Recipe` subclass
(``name``, its ``train_module``, ``prepare`` / ``evaluate`` / ``summary``) and add it to :data:`RECIPES`
below; its strategy (``recipe = "<name>"``) goes into :data:`mmtl.strategies.STRATEGIES`. A new contrastive
strategy needs no recipe change.
"""
from __future__ import annotations

from mmtl.recipes.base import Recipe, RunContext
from mmtl.recipes.contrastive import ContrastiveRecipe
from mmtl.recipes.fusion import FusionRecipe
from mmtl.recipes.prompt_learning import PromptLearningRecipe
from mmtl.recipes.self_supervised import SelfSupervisedRecipe

__all__ = ["RECIPES", "Recipe", "RunContext", "check_pipeline", "recipe_for", "run_pipeline"]

RECIPES: dict[str, type[Recipe]] = {r.name: r for r in (ContrastiveRecipe, PromptLearningRecipe, FusionRecipe,
                                                         SelfSupervisedRecipe)}


def recipe_for(kind: str) -> type[Recipe]:
    """The recipe class that runs ``strategy.kind == kind`` (the one its strategy names).

    Raises:
        ValueError: unknown kind (the message lists the known ones), or its strategy names an unknown recipe.
    """
    from mmtl.strategies import get_strategy

    name = get_strategy(kind).recipe
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"strategy.kind={kind!r} names recipe {name!r}, which is unknown "
                         f"(known: {', '.join(RECIPES)})") from None


def check_pipeline(pipe, eval_sets: bool = True) -> None:
    """Check a loaded pipeline against the registries, before anything starts: ``strategy.kind`` has a recipe
    and a strategy, the strategy accepts its options (:meth:`~mmtl.strategies.base.Strategy.check`), and every
    ``eval.sets`` name is a configured set (with ``eval_sets``; off for commands that only read data).

    Raises:
        ValueError: the message names the field and the known values.
    """
    from mmtl.recipes.runner import eval_specs
    from mmtl.strategies import get_strategy

    recipe_for(pipe.strategy.kind)
    get_strategy(pipe.strategy.kind).check(pipe.strategy, pipe.train.zero_stage)
    if eval_sets:
        eval_specs(pipe)


def run_pipeline(pipe, **kwargs) -> dict:
    """See :func:`mmtl.recipes.runner.run_pipeline`."""
    from mmtl.recipes.runner import run_pipeline as run

    return run(pipe, **kwargs)
