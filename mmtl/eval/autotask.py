"""``mmtl eval`` without ``--task``: pick the task from the data, and refuse a task the data cannot serve, by
reading the first few samples before any model is loaded or anything is embedded.

* samples whose json holds the label field (``--label-field``, default ``category``) -> ``zero-shot``;
* samples with ``answers`` in their json (a VQA set) -> ``vqa`` (the model must be a cross_attention run);
* otherwise (image-caption pairs) -> ``retrieval``.

An explicit ``--task zero-shot`` on data without labels is an error that suggests ``--task retrieval`` or
``--label-field``.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Optional

from mmtl.eval.args import EvalError

PEEK_SAMPLES = 32
"""Samples read (from the first shards) to decide; the same reader and cleaning as training."""


@dataclass
class DataPeek:
    """What the first samples of a set hold: ``samples`` read, how many have the label field (``labelled``),
    ``answers`` (VQA), and the json keys seen (``keys``, sorted)."""

    samples: int = 0
    labelled: int = 0
    answers: int = 0
    keys: list[str] = field(default_factory=list)


def peek(data: str, label_field: str, n: int = PEEK_SAMPLES) -> DataPeek:
    """Read up to ``n`` clean samples of the shard set ``data`` (first shards first).

    Raises:
        ShardError (``mmtl.data.shardlist``): missing shards (as the full evaluation would).
    """
    import contextlib
    import itertools

    from mmtl.data.samples import CleanOptions
    from mmtl.data.shardio import ShardError, iter_shard, resolve_shards

    out, keys = DataPeek(), set()
    for url in resolve_shards(data):
        if out.samples >= n:
            break
        try:
            with contextlib.closing(iter_shard(url, CleanOptions(), collections.Counter(), [])) as samples:
                for s in itertools.islice(samples, n - out.samples):
                    meta = s.meta if isinstance(s.meta, dict) else {}
                    keys.update(meta)
                    out.samples += 1
                    out.labelled += meta.get(label_field) not in (None, "")
                    out.answers += bool(meta.get("answers"))
        except ShardError:  # unreadable shard: the full evaluation reports it; decide from the others
            continue
    out.keys = sorted(keys)
    return out


def choose_task(task: Optional[str], data: str, label_field: str,
                say: Optional[Callable[[str], None]] = None) -> str:
    """``task`` checked against the data, or (``task`` None) the task the data suits (module docstring).

    Raises:
        EvalError: ``zero-shot`` asked for but none of the first samples has ``label_field`` in its json
            (the message suggests ``--task retrieval`` and ``--label-field``).
    """
    say = say or (lambda m: None)
    if task is not None and task != "zero-shot":
        return task
    p = peek(data, label_field)
    if p.samples == 0:  # nothing readable: let the evaluation report the data problem
        return task or "retrieval"
    keys = ", ".join(p.keys) or "none"
    if task == "zero-shot":
        if p.labelled == 0:
            raise EvalError(
                f"--task zero-shot needs a class label in each sample's json field {label_field!r}, but none of the "
                f"first {p.samples} samples of {data} has one (json keys: {keys}). For image-caption pairs use "
                f"--task retrieval; for labels under another key pass --label-field KEY.")
        return task
    if p.labelled:
        chosen, why = "zero-shot", f"{p.labelled} of the first {p.samples} samples have a {label_field!r} label"
    elif p.answers:
        chosen, why = "vqa", f"{p.answers} of the first {p.samples} samples have 'answers' (a cross_attention model)"
    else:
        chosen, why = "retrieval", (f"the first {p.samples} samples have captions but no {label_field!r} label "
                                    f"(json keys: {keys}); for classification pass --task zero-shot --label-field KEY")
    say(f"task: {chosen} ({why}; choose with --task)")
    return chosen
