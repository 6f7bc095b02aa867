"""Recipes: one small class per kind of training job, registered by name; each strategy names the recipe
that runs it (``Strategy.recipe``, default ``"contrastive"``), except for generative model families, whose
own recipe runs them (``blip`` -> ``captioning``, :func:`recipe_for`); one runner (:mod:`mmtl.recipes.runner`) owns the
run sequence for all of them.

To add a kind of job: write ``mmtl/recipes/<name>.py`` with a :class:`~mmtl.recipes.base.Recipe` subclass
(``name``, its ``train_module``, ``prepare`` / ``evaluate`` / ``summary``) and add it to :data:`RECIPES`
below; its strategy (``recipe = "<name>"``) goes into :data:`mmtl.strategies.STRATEGIES`. A new contrastive
strategy needs no recipe change.
"""
from __future__ import annotations

from mmtl.recipes.base import Recipe, RunContext
from mmtl.recipes.captioning import CaptioningRecipe
from mmtl.recipes.contrastive import ContrastiveRecipe
from mmtl.recipes.fusion import FusionRecipe
from mmtl.recipes.prompt_learning import PromptLearningRecipe
from mmtl.recipes.self_supervised import SelfSupervisedRecipe

__all__ = ["RECIPES", "Recipe", "RunContext", "check_pipeline", "recipe_for", "run_pipeline"]

RECIPES: dict[str, type[Recipe]] = {r.name: r for r in (ContrastiveRecipe, PromptLearningRecipe, FusionRecipe,
                                                       CaptioningRecipe, SelfSupervisedRecipe)}


def recipe_for(kind: str, family: str | None = None) -> type[Recipe]:
    """The recipe class that runs ``strategy.kind`` ``kind`` for a model of the family named ``family``: a generative
    family's own recipe (``TextGeneration.recipe_name``, e.g. ``captioning`` for ``blip``), else the one the
    strategy names.

    Raises:
        ValueError: unknown kind (the message lists the known ones), a strategy the generative family's recipe
            does not train, or a strategy naming an unknown recipe.
    """
    from mmtl.models.family import TextGeneration, capability
    from mmtl.models.registry import get_family
    from mmtl.strategies import get_strategy

    name = get_strategy(kind).recipe
    gen = capability(get_family(family), TextGeneration) if family is not None else None
    if gen is not None:
        name = gen.recipe_name()
        allowed = getattr(RECIPES.get(name), "strategies", ())
        if kind not in allowed:
            raise ValueError(f"strategy.kind={kind!r} cannot train a model.family={family!r} model (its recipe "
                             f"{name!r} trains: {', '.join(allowed)})")
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

    recipe_for(pipe.strategy.kind, pipe.model.family)
    get_strategy(pipe.strategy.kind).check(pipe.strategy, pipe.train.zero_stage)
    if eval_sets:
        eval_specs(pipe)


def run_pipeline(pipe, **kwargs) -> dict:
    """See :func:`mmtl.recipes.runner.run_pipeline`."""
    from mmtl.recipes.runner import run_pipeline as run

    return run(pipe, **kwargs)
