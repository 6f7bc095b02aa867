"""Zero-shot metrics with class embeddings from a prompt (a learned CoOp prompt or a template), split into
the base and new classes of a CoOp run (Zhou et al., IJCV 2022, base-to-new generalisation): used by the
prompt-learning recipe and by ``mmtl eval --task zero-shot --prompt``."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from mmtl.prompting.artifact import LoadedPrompt


def subset_metrics(image_emb: torch.Tensor, labels: Sequence[int], classes: Sequence[str], subset: Sequence[str],
                   embed: Callable[[list[str]], torch.Tensor]) -> Optional[dict]:
    """Zero-shot metrics of the samples whose class is in ``subset``, classified among ``subset`` only.

    ``image_emb`` (N, E), ``labels`` N indices into ``classes``, ``embed(names) -> (len(names), E)``.
    Returns :func:`~mmtl.eval.metrics.zero_shot_metrics` or None when no sample falls in ``subset``.
    """
    from mmtl.eval.metrics import zero_shot_metrics

    names = [c for c in subset if c in classes]
    pos = {classes.index(c): i for i, c in enumerate(names)}
    keep = [i for i, y in enumerate(labels) if y in pos]
    if len(names) < 2 or not keep:
        return None
    with torch.no_grad():
        cls_emb = embed(names).float().cpu()
    return zero_shot_metrics(image_emb[keep], cls_emb, [pos[labels[i]] for i in keep])


def split_metrics(image_emb: torch.Tensor, labels: Sequence[int], classes: Sequence[str],
                  embed: Callable[[list[str]], torch.Tensor], base: Optional[Sequence[str]],
                  new: Optional[Sequence[str]], subsets: Sequence[str] = ("all", "base", "new")) -> tuple[dict, dict]:
    """``{"<subset>_<metric>": v}`` for the subsets all / base / new (base and new only when new classes
    exist), and ``{subset: reason}`` for subsets skipped (e.g. class-specific context and new classes)."""
    out, skipped = {}, {}
    parts = {"all": list(classes)}
    if new and any(c in classes for c in new):
        parts.update(base=list(base or []), new=list(new))
    for name in subsets:
        if name not in parts:
            continue
        try:
            m = subset_metrics(image_emb, labels, list(classes), parts[name], embed)
        except ValueError as e:  # class-specific context asked for classes it has no vectors for
            skipped[name] = str(e)
            continue
        if m is None:
            skipped[name] = "fewer than 2 classes or no sample of these classes"
            continue
        out.update({f"{name}_{k}": v for k, v in m.items()})
    return out, skipped


def eval_with_prompt(prompt: LoadedPrompt, model, image_emb: torch.Tensor, labels: Sequence[int],
                     classes: Sequence[str]) -> tuple[torch.Tensor, dict, dict]:
    """For ``mmtl eval --task zero-shot`` with a learned prompt: ``(class embeddings (C, E) of classes,
    {"base_<metric>", "new_<metric>"} where the prompt has a base/new split, info dict)``.

    Raises:
        ValueError: class-specific context and a class it has no context for; a context/model mismatch.
    """
    learner = prompt.learner(model)
    with torch.no_grad():
        cls_emb = learner.embed_classes(model, list(classes)).float().cpu()
    extra, skipped = split_metrics(image_emb, labels, list(classes), lambda n: learner.embed_classes(model, n),
                                   prompt.meta.get("base_classes"), prompt.meta.get("new_classes"), ("base", "new"))
    return cls_emb, extra, {**prompt.describe(model), "skipped_subsets": skipped}
