"""Frozen-tower batch inference, in this process or over all cores: the encoders behind the frozen-feature
cache (:mod:`mmtl.data.features`), the fusion token cache and eval embedding.

An encoder runs ``fn(model, batch)`` (a picklable, module-level function) on batches of a sample stream and
yields ``(batch, result)`` in stream order, like :func:`mmtl.data.batches.encode_batches`, always under
``torch.inference_mode`` with the model's 4-D weights in channels-last memory format (oneDNN's fast layout
for convolutions on CPU: EfficientNet-Lite0's forward ~1.9x faster at 1 thread; features equal within
~1e-5, float rounding):

* :class:`LocalEncoder`: this process (weights' memory format restored afterwards, values unchanged).
* :class:`RayEncoder`: ``workers`` Ray actors, one CPU and one torch thread each, each holding a copy of the
  model (sent once through the object store). The stream is read and cleaned here (rejects are counted
  once); batches go round-robin to the actors, at most two per actor in flight, so memory stays bounded.
  On a 2-core machine two 1-thread processes beat one 2-thread process by far for a small-kernel CNN
  (intra-op threads of depthwise convolutions scale poorly and spin when the cores are shared).

:func:`open_encoder` picks one: Ray for ``samples >= RAY_MIN_SAMPLES`` on a machine with more than one CPU
(starting Ray costs seconds: not worth it for small sets), else local.
"""
from __future__ import annotations

import collections
import contextlib
import os
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

import torch

from mmtl.data.batches import encode_batches

T = TypeVar("T")

#: Below this many samples to encode, :func:`open_encoder` stays in this process.
RAY_MIN_SAMPLES = 512


@contextlib.contextmanager
def fast_inference(model, threads: Optional[int] = None, convert: bool = True):
    """``torch.inference_mode``, the model's 4-D weights channels-last, ``threads`` torch threads (None: as
    is); the weights' memory format and the thread count are restored on exit.

    ``convert=False`` leaves the weights' memory format alone: for a model that stays in memory for many
    small calls (serving), which converts once at load, since converting and restoring the image tower's
    kernels costs ~10 ms a call on a CPU (measured: a one-text query 22 ms with it, 11 ms without)."""
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    if convert:
        model.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            yield
    finally:
        if convert:
            model.to(memory_format=torch.contiguous_format)
        torch.set_num_threads(prev)


class LocalEncoder:
    """Encodes in this process (``threads``: torch threads while a batch is encoded, None: unchanged).

    The settings of :func:`fast_inference` hold only while ``fn`` runs (entered per batch: a context held
    across a generator's ``yield`` would leak inference mode into the caller's code)."""

    workers = 1

    def __init__(self, model, threads: Optional[int] = None) -> None:
        self.model, self.threads = model, threads

    def encode_batches(self, samples: Iterable[T], fn: Callable[[Any, list[T]], Any], batch_size: int,
                       progress: Optional[Callable[[int], None]] = None) -> Iterator[tuple[list[T], Any]]:
        """``(batch, fn(model, batch))`` per batch of ``batch_size``, in stream order."""
        def run(batch: list[T]) -> Any:
            with fast_inference(self.model, self.threads):
                return fn(self.model, batch)

        yield from encode_batches(samples, run, batch_size, progress=progress)

    def close(self) -> None:
        pass


class _Actor:
    """One Ray worker's copy of the model (channels-last, 1 torch thread by default)."""

    def __init__(self, model_box: list, threads: int) -> None:
        import ray

        torch.set_num_threads(threads)
        ref = model_box[0]
        self.model = (ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref).eval()
        self.model.to(memory_format=torch.channels_last)

    def run(self, fn, batch):
        with torch.inference_mode():
            return fn(self.model, batch)

    def ready(self) -> bool:
        return True


class RayEncoder:
    """``workers`` Ray actors (1 CPU, ``threads`` torch threads each) holding copies of ``model``; joins or
    starts Ray (:func:`mmtl.runtime.init_ray`). Close it (or use ``with``) to free the CPUs."""

    def __init__(self, model, workers: int, threads: int = 1) -> None:
        import ray

        from mmtl.runtime import init_ray

        init_ray()
        actor = ray.remote(num_cpus=1)(_Actor)
        box = [ray.put(model)]
        self.workers = workers
        self.actors = [actor.remote(box, threads) for _ in range(workers)]

    def encode_batches(self, samples: Iterable[T], fn: Callable[[Any, list[T]], Any], batch_size: int,
                       progress: Optional[Callable[[int], None]] = None) -> Iterator[tuple[list[T], Any]]:
        """``(batch, fn(model, batch))`` per batch of ``batch_size``, in stream order (``progress`` is called
        with B when a batch's result is in)."""
        import ray

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending: collections.deque = collections.deque()
        turn = 0

        def submit(batch: list) -> None:
            nonlocal turn
            pending.append((batch, self.actors[turn % len(self.actors)].run.remote(fn, batch)))
            turn += 1

        def take() -> tuple[list, Any]:
            batch, ref = pending.popleft()
            out = ray.get(ref)
            if progress is not None:
                progress(len(batch))
            return batch, out

        batch: list = []
        for s in samples:
            batch.append(s)
            if len(batch) >= batch_size:
                submit(batch)
                batch = []
                if len(pending) >= 2 * len(self.actors):
                    yield take()
        if batch:
            submit(batch)
        while pending:
            yield take()

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> "RayEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cpu_workers() -> int:
    """CPUs of this machine (Ray's CPU count when Ray is already running here)."""
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.available_resources().get("CPU", 1)))
    except ImportError:  # pragma: no cover - Ray is a dependency
        pass
    return os.cpu_count() or 1


@contextlib.contextmanager
def open_encoder(model, samples: int, workers: Optional[int] = None) -> Iterator[Any]:
    """A :class:`RayEncoder` with ``workers`` actors (None: :func:`cpu_workers`) when ``samples`` >=
    :data:`RAY_MIN_SAMPLES` and there is more than one worker, else a :class:`LocalEncoder`; closed on exit."""
    n = cpu_workers() if workers is None else workers
    enc = RayEncoder(model, n) if n > 1 and samples >= RAY_MIN_SAMPLES else LocalEncoder(model)
    try:
        yield enc
    finally:
        enc.close()
