"""Class labels of samples: the one class-list resolution and the one label -> class index mapping, shared by
``mmtl eval`` zero-shot, training-time zero-shot evaluation and CoOp prompt tuning."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional, Sequence


def distinct_labels(meta: Iterable[dict], label_field: str) -> list[str]:
    """Sorted distinct values (as strings) of ``label_field`` in the samples' json ``meta``; samples without
    the field (or with null, or a non-dict meta) are ignored. Labels ``1`` and ``"1"`` are one class."""
    return sorted({str(m.get(label_field)) for m in meta if isinstance(m, dict) and m.get(label_field) is not None})


def resolve_classes(
    candidates: Sequence[tuple[str, Optional[Sequence[str]]]], meta: Iterable[dict], label_field: str
) -> tuple[list[str], str]:
    """The class list: the first non-empty candidate, else the labels found in the data.

    Args:
        candidates: ``(source, classes or None)`` in priority order, e.g. ``[("argument", from --classes),
            ("prompt", a learned prompt's classes), ("pipeline", eval.zero_shot.classes)]``.
        meta: the samples' json dicts, read only when no candidate is given.
        label_field: json field holding a sample's class name.

    Returns:
        ``(classes, source)``: ``source`` is the chosen candidate's name, or ``"data"`` for
        :func:`distinct_labels` of ``meta`` (possibly fewer than 2, or empty: the caller decides whether that
        is an error, so no exception is raised here).
    """
    for source, classes in candidates:
        if classes:
            return list(classes), source
    return distinct_labels(meta, label_field), "data"


def label_index(meta: Sequence[dict], label_field: str, classes: Sequence[str]) -> tuple[list[int], list[int], Counter]:
    """Map each sample to a class index.

    A label that is a class name maps to it; an integer label that is not a class name is taken as an index
    into ``classes`` (0 <= label < C).

    Returns:
        ``(keep, labels, skipped)``: positions of the samples with a known class (ascending), their class
        indices in [0, C), and counts of the others by reason (``no_label``, ``unknown_class``).
    """
    idx = {c: i for i, c in enumerate(classes)}
    keep, labels, skipped = [], [], Counter()
    for i, m in enumerate(meta):
        v = m.get(label_field) if isinstance(m, dict) else None
        if v is None:
            skipped["no_label"] += 1
        elif str(v) in idx:
            keep.append(i)
            labels.append(idx[str(v)])
        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(classes):
            keep.append(i)
            labels.append(v)
        else:
            skipped["unknown_class"] += 1
    return keep, labels, skipped
