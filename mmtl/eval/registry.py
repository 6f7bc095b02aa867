"""The eval tasks of mmtl, by name: the one table read by ``mmtl eval`` (:func:`mmtl.eval.runner.run_eval`)
and by training-time evaluation (:func:`mmtl.eval.evaluate.evaluate_sets` for contrastive models,
:func:`mmtl.eval.fusion_eval.evaluate_tokens` for cross_attention models).

Each :class:`EvalTask` says what its metrics need (``needs``: the keyword inputs of ``metrics``) and where
those come from (``source``: embeddings of a shard set, or a fusion module's token features), and returns its
metrics under the names ``mmtl eval`` reports (``zero_shot/acc1``, ``retrieval/image_to_text_recall_at_1``,
``vqa/overall``, ``itm/accuracy`` ...). Training runs report them per eval set: :func:`set_metric_name`.

To add a task: write its metrics function (and, for ``mmtl eval`` on embeddings, a report function writing
its files, like those of :mod:`mmtl.eval.tasks`) in ``mmtl/eval/<task>.py``, then add one :class:`EvalTask`
row to :data:`TASKS` (``mmtl eval --task`` and its help follow the table). The table's module imports only
the standard library: the metrics and report functions are imported when a task runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from mmtl.eval.args import EvalError

if TYPE_CHECKING:
    import torch

EMBEDDINGS = "embeddings"
"""``source`` of tasks on (N, D) image (and text) embeddings of a shard set."""
FUSION_TOKENS = "fusion_tokens"
"""``source`` of tasks on a :class:`~mmtl.fusion.features.TokenSet` scored by a fusion module."""


class UnknownTaskError(EvalError):
    """No task of that name; the message lists the known names."""


@dataclass(frozen=True)
class EvalTask:
    """One eval task.

    Attributes:
        name: the ``--task`` name ("zero-shot").
        summary: one line for help texts.
        source: :data:`EMBEDDINGS` or :data:`FUSION_TOKENS`.
        needs: keyword inputs ``metrics`` requires (see each row of :data:`TASKS`).
        metrics: ``metrics(**inputs) -> {name: value}`` with ``mmtl eval`` metric names.
        report: for ``mmtl eval`` on embeddings: ``report(task, emb=..., model=..., pipe=..., classes=...,
            templates=..., label_field=..., ks=..., out=..., say=..., prompt=...) -> dict`` (metrics, report
            files and the task's extra result fields, see :mod:`mmtl.eval.tasks`); None for fusion tasks, which
            ``mmtl eval`` runs through :func:`mmtl.eval.fusion_eval.run_fusion_eval`.
    """

    name: str
    summary: str
    source: str
    needs: tuple[str, ...]
    metrics: Callable[..., dict]
    report: Optional[Callable[..., dict]] = None

    @property
    def with_text(self) -> bool:
        """Whether the task needs text embeddings of the samples (not only image embeddings)."""
        return "text" in self.needs


def _zero_shot(image: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """Zero-shot classification of N images (N, D) against C class embeddings (C, D); ``labels``: N class
    indices in [0, C). ``zero_shot/acc1``, ``acc5`` (C >= 5), ``mean_per_class_recall``, ``chance``,
    ``majority``, ``num_classes``, ``num_samples`` (see :func:`mmtl.eval.metrics.zero_shot_metrics`)."""
    from mmtl.eval.metrics import zero_shot_metrics

    return {f"zero_shot/{k}": v for k, v in zero_shot_metrics(image, class_emb, labels).items()}


def _retrieval(image: torch.Tensor, text: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Image-text retrieval of N pairs, image (N, D) and text (N, D): ``retrieval/image_to_text_recall_at_K``,
    ``retrieval/text_to_image_recall_at_K`` for each K of ``ks`` (as given), ``retrieval/num_samples``."""
    from mmtl.eval.metrics import recall_at_k

    out = {f"retrieval/{k}": v for k, v in recall_at_k(image, text, ks).items()}
    out["retrieval/num_samples"] = float(len(image))
    return out


def _vqa(module, tokens, answers: list[str], batch_size: int = 256) -> dict:
    """VQA accuracy of a fusion ``module`` on the TokenSet ``tokens`` with the vocabulary ``answers``."""
    from mmtl.eval.fusion_eval import evaluate_vqa

    return evaluate_vqa(module, tokens, answers, batch_size)[0]


def _itm(module, tokens) -> dict:
    """ITM accuracy of a fusion ``module`` on the TokenSet ``tokens``."""
    from mmtl.eval.fusion_eval import evaluate_itm

    return evaluate_itm(module, tokens)


def _zero_shot_report(task: EvalTask, **kwargs) -> dict:
    """See :func:`mmtl.eval.tasks.zero_shot_report` (imported when run: this table stays import-light)."""
    from mmtl.eval.tasks import zero_shot_report

    return zero_shot_report(task, **kwargs)


def _retrieval_report(task: EvalTask, **kwargs) -> dict:
    """See :func:`mmtl.eval.tasks.retrieval_report`."""
    from mmtl.eval.tasks import retrieval_report

    return retrieval_report(task, **kwargs)


TASKS: dict[str, EvalTask] = {t.name: t for t in (
    EvalTask("zero-shot", "zero-shot classification", EMBEDDINGS, ("image", "class_emb", "labels"), _zero_shot,
             _zero_shot_report),
    EvalTask("retrieval", "image-text retrieval", EMBEDDINGS, ("image", "text", "ks"), _retrieval,
             _retrieval_report),
    EvalTask("vqa", "VQA accuracy (cross_attention models)", FUSION_TOKENS, ("module", "tokens", "answers"), _vqa),
    EvalTask("itm", "ITM accuracy (cross_attention models)", FUSION_TOKENS, ("module", "tokens"), _itm),
)}
"""Every task by name, in ``--task`` help order."""


def task_names() -> tuple[str, ...]:
    """The known task names, e.g. ``("zero-shot", "retrieval", "vqa", "itm")``."""
    return tuple(TASKS)


def get_task(name: str) -> EvalTask:
    """The task called ``name``.

    Raises:
        UnknownTaskError: no such task ("task must be one of zero-shot, retrieval, vqa, itm; got 'x'").
    """
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise UnknownTaskError(f"task must be one of {', '.join(TASKS)}; got {name!r}") from None


def evaluate_task(name: str, **inputs: Any) -> dict:
    """The metrics of task ``name`` on ``inputs`` (``mmtl eval`` names, e.g. ``{"retrieval/num_samples": 48.0,
    ...}``). Example: ``evaluate_task("retrieval", image=img, text=txt, ks=[1, 5])``.

    Raises:
        UnknownTaskError: unknown ``name``; EvalError: an input of ``task.needs`` is missing.
    """
    task = get_task(name)
    missing = [k for k in task.needs if k not in inputs]
    if missing:
        raise EvalError(f"task {name!r} needs {', '.join(task.needs)}; missing {', '.join(missing)}")
    return task.metrics(**inputs)


def task_help() -> str:
    """The ``--task`` help, from the table: embedding tasks, then fusion tasks (cross_attention models)."""
    emb = [t.name for t in TASKS.values() if t.source == EMBEDDINGS]
    fus = [t.name for t in TASKS.values() if t.source == FUSION_TOKENS]
    return f"{', '.join(emb)}, or {' / '.join(fus)} (cross_attention models)" if fus else ", ".join(emb)


def set_metric_name(set_name: str, metric: str) -> str:
    """The name a training run logs ``metric`` (an ``mmtl eval`` name) under for eval set ``set_name``:
    ``retrieval/x`` -> ``<set>/x``, ``zero_shot/x`` -> ``<set>/zero_shot_x``, others ``<set>/<metric>``
    (``test/vqa/overall``). These are the names training runs have always logged."""
    if metric.startswith("retrieval/"):
        return f"{set_name}/{metric[len('retrieval/'):]}"
    if metric.startswith("zero_shot/"):
        return f"{set_name}/zero_shot_{metric[len('zero_shot/'):]}"
    return f"{set_name}/{metric}"
