"""Encode a stream of samples in batches: the one loop behind frozen-feature caching, eval embedding, Ray batch
inference and fusion token features."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def encode_batches(
    samples: Iterable[T],
    encode: Callable[[Any], R],
    batch_size: int,
    collate: Optional[Callable[[list[T]], Any]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> Iterator[tuple[list[T], R]]:
    """Group ``samples`` into batches of ``batch_size`` (the last one may be shorter) and encode each.

    Lazy: ``samples`` is read only as the result is consumed, one batch ahead at most, so a generator that
    does bookkeeping per sample sees it done for every sample of a batch before that batch is encoded.

    Args:
        samples: any iterable (e.g. :class:`~mmtl.data.samples.Sample` objects, or per-sample tensors).
        encode: called once per batch with ``collate(batch)``; returns whatever the caller collects (e.g.
            an (B, D) tensor or a tuple of them). Runs under the caller's grad mode.
        batch_size: items per batch, >= 1.
        collate: list of B items -> the ``encode`` input (e.g. ``torch.stack``); default: the list itself.
        progress: called with the batch length B just before each batch is encoded (e.g. ``bar.update``).

    Yields:
        ``(batch, encode(collate(batch)))`` per batch, in stream order: ``batch`` is the list of B items.
        An empty stream yields nothing (``encode`` is never called).

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[T] = []

    def run(items: list[T]) -> tuple[list[T], R]:
        if progress is not None:
            progress(len(items))
        return items, encode(collate(items) if collate is not None else items)

    for s in samples:
        batch.append(s)
        if len(batch) >= batch_size:
            full, batch = batch, []
            yield run(full)
    if batch:
        yield run(batch)
