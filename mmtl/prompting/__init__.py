"""Prompt learning for frozen image-text models: CoOp (Zhou et al., IJCV 2022), ``strategy.kind: prompt_tuning``.

:mod:`~mmtl.prompting.coop` (prompt learner, text-with-context encoding per family, train module),
:mod:`~mmtl.prompting.artifact` (the saved prompt, base/new metrics), :mod:`mmtl.recipes.prompt_learning` (the recipe).
"""
