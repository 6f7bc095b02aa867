"""Ray Data streaming of unpaired shards for the self-supervised recipe: image-only shards -> two augmented views
per image (SimCLR), text-only shards -> masked tokens (masked-LM). Both are made in the Ray Data map stage,
never in the training loop.

The stages match :func:`mmtl.data.stream.build_image_dataset` (per-epoch shard permutation, the robust reader
of :mod:`mmtl.data.shardio` with reject counts sent to the stats actor, seeded in-shard shuffle buffer, one
fused ``map_batches`` operator); only the per-sample work differs:

* image (``tower: image``): :class:`SimCLRViews` (Chen et al. 2020, Sec. 3 / App. A: random resized crop,
  horizontal flip, colour jitter with p=0.8, grayscale with p=0.2) applied twice -> ``view1``, ``view2``
  (3,S,S) float32, normalised with the tower's mean/std; with ``method: dino`` :class:`DinoCrops` ->
  ``global_views`` (2,3,S,S) and ``local_views`` (V,3,s,s);
* text (``tower: text``): the tokenizer (right-padded to ``model.context_length``), then :class:`MLMMasker`
  (transformers' ``DataCollatorForLanguageModeling.torch_mask_tokens``: ``mlm_probability`` of the non-special
  tokens selected, 80 % -> [MASK], 10 % -> a random token, 10 % kept) -> ``input_ids``, ``attention_mask``,
  ``labels`` (L,) int64 (-100 where no loss is taken). Texts with fewer than ``min_tokens`` tokens are
  rejected by the reader as ``too_few_tokens`` (counted).

Randomness is seeded per (``data.seed``, epoch, shard), so a pass is reproducible.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import random
import zlib
from typing import Iterator, Optional

from mmtl.config import Pipeline, SelfSupervisedConfig
from mmtl.data.shardio import iter_shard, resolve_shards
from mmtl.data.stream import _shuffled, clean_options, epoch_items


class SimCLRViews:
    """Picklable PIL RGB -> (3, S, S) float tensor: one random SimCLR view (call it twice for a pair).

    ``RandomResizedCrop(S, scale=crop_scale)`` (bicubic) -> ``RandomHorizontalFlip`` (if ``flip``) ->
    ``RandomApply([ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)], p=0.8)`` -> ``RandomGrayscale(grayscale_p)`` -> tensor
    -> ``Normalize(mean, std)``. Uses torch's global RNG (seed it per task)."""

    def __init__(self, image_size: int, mean, std, cfg: SelfSupervisedConfig, scale=None) -> None:
        from torchvision import transforms as T

        s = cfg.color_jitter
        steps = [T.RandomResizedCrop(image_size, scale=tuple(scale or cfg.crop_scale),
                                     interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
        if cfg.flip:
            steps.append(T.RandomHorizontalFlip())
        if s > 0:
            steps.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.5, 0.2 * s))], p=0.8))
        steps += [T.RandomGrayscale(cfg.grayscale_p), T.ToTensor(), T.Normalize(mean, std)]
        self.tf = T.Compose(steps)

    def __call__(self, img):
        return self.tf(img)


class DinoCrops:
    """Picklable PIL RGB -> ``{"global_views": (2, 3, S, S), "local_views": (V, 3, s, s)}`` float tensors: DINO's
    multi-crop (Caron et al. 2021, sec. 3.1): two global views (``global_scale``) at the model's input size and
    ``local_crops`` local views (``local_scale``) at ``local_size``, each with SimCLR's flip / colour jitter /
    grayscale. No ``local_views`` key when ``local_crops`` is 0."""

    def __init__(self, image_size: int, mean, std, cfg: SelfSupervisedConfig) -> None:
        self.glob = SimCLRViews(image_size, mean, std, cfg, scale=cfg.global_scale)
        self.local = SimCLRViews(cfg.local_px(image_size), mean, std, cfg, scale=cfg.local_scale)
        self.n_local = int(cfg.local_crops)

    def __call__(self, img) -> dict:
        import torch

        out = {"global_views": torch.stack([self.glob(img), self.glob(img)])}
        if self.n_local:
            out["local_views"] = torch.stack([self.local(img) for _ in range(self.n_local)])
        return out


class MLMMasker:
    """Picklable BERT masking with transformers' ``DataCollatorForLanguageModeling`` (15 % by default).

    ``__call__(input_ids (B,L) long, generator) -> (masked input_ids (B,L), labels (B,L))``; special tokens
    ([CLS], [SEP], [PAD]) are never selected; ``labels`` is -100 at unselected positions (ignored by the loss).
    """

    def __init__(self, tokenizer, mlm_probability: float) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=float(mlm_probability))
        self.special = sorted(set(tokenizer.all_special_ids))

    def __call__(self, input_ids, generator):
        import torch

        special = torch.isin(input_ids, torch.tensor(self.special, dtype=input_ids.dtype))
        self.collator.generator = generator
        return self.collator.torch_mask_tokens(input_ids.clone(), special_tokens_mask=special)


def seed_of(seed: int, epoch: int, shard: str) -> int:
    """A 31-bit seed for one (seed, epoch, shard) map task (crc32: stable across processes and machines)."""
    return zlib.crc32(f"{seed}:{epoch}:{shard}".encode()) & 0x7FFFFFFF


def image_views(model_cfg, scfg: SelfSupervisedConfig):
    """The view maker of ``scfg.method``: :class:`SimCLRViews` (simclr) or :class:`DinoCrops` (dino), with the
    image tower's normalisation. Raises ValueError like :func:`simclr_views`."""
    if scfg.method != "dino":
        return simclr_views(model_cfg, scfg)
    from mmtl.models.two_tower import two_tower_mean_std

    mean, std = two_tower_mean_std(model_cfg, "strategy.self_supervised.method=dino")
    return DinoCrops(model_cfg.image_size, mean, std, scfg)


def simclr_views(model_cfg, scfg: SelfSupervisedConfig) -> SimCLRViews:
    """:class:`SimCLRViews` at ``model.image_size`` with the image tower's normalisation (``two_tower``: the
    timm tower's mean/std, :func:`mmtl.models.two_tower.vision_mean_std`).

    Raises:
        ValueError: ``model.family`` is not ``two_tower`` (SimCLR views are defined for timm image towers).
    """
    from mmtl.models.two_tower import two_tower_mean_std

    mean, std = two_tower_mean_std(model_cfg, "strategy.self_supervised.method=simclr")
    return SimCLRViews(model_cfg.image_size, mean, std, scfg)


@functools.lru_cache(maxsize=4)
def _prep(model_cfg_json: str, ssl_json: str):
    """(tokenizer wrapper, SimCLRViews or None) built once per Ray worker process."""
    from mmtl.config import ModelConfig
    from mmtl.models import build_tokenizer

    cfg = ModelConfig.model_validate_json(model_cfg_json)
    scfg = SelfSupervisedConfig.model_validate_json(ssl_json)
    return build_tokenizer(cfg), (image_views(cfg, scfg) if scfg.tower == "image" else None)


def _unpaired_batches(items: dict, opts, buffer: int, seed: int, stats_actor: Optional[str], model_cfg_json: str,
                      ssl_json: str, rows_per_block: int) -> Iterator[dict]:
    """map_batches body: each (epoch, shard) item -> clean unpaired samples -> view pairs or masked tokens."""
    import ray
    import torch

    torch.set_num_threads(1)
    tok, views = _prep(model_cfg_json, ssl_json)
    scfg = SelfSupervisedConfig.model_validate_json(ssl_json)
    masker = MLMMasker(tok.tokenizer, scfg.mlm_probability) if scfg.tower == "text" else None
    if opts.modality == "text":
        opts = dataclasses.replace(opts, count_tokens=tok.count)
    for shard, epoch, shard_id in zip(items["shard"], items["epoch"], items["shard_id"]):
        shard, epoch, shard_id = str(shard), int(epoch), str(shard_id)
        stats: collections.Counter = collections.Counter()
        s = seed_of(seed, epoch, shard)
        rng, gen = random.Random(s), torch.Generator().manual_seed(s)
        torch.manual_seed(s)  # torchvision's random transforms draw from the global RNG
        rows: list = []

        def flush() -> dict:
            if views is not None and isinstance(rows[0], dict):  # DINO crops
                out = {k: torch.stack([r[k] for r in rows]).numpy() for k in rows[0]}
            elif views is not None:
                out = {"view1": torch.stack([a for a, _ in rows]).numpy(),
                       "view2": torch.stack([b for _, b in rows]).numpy()}
            else:
                enc = tok([t for t in rows])
                ids, labels = masker(enc["input_ids"], gen)
                out = {"input_ids": ids.numpy(), "attention_mask": enc["attention_mask"].numpy(),
                       "labels": labels.numpy()}
            rows.clear()
            return out

        for sample in _shuffled(iter_shard(shard, opts, stats, shard_id=shard_id), buffer, rng):
            if isinstance(views, DinoCrops):
                rows.append(views(sample.image))
            else:
                rows.append((views(sample.image), views(sample.image)) if views is not None else sample.caption)
            if len(rows) >= rows_per_block:
                yield flush()
        if rows:
            yield flush()
        if stats_actor:
            try:
                ray.get_actor(stats_actor).add.remote(dict(stats))
            except ValueError:
                pass


def unpaired_options(pipe: Pipeline):
    """The reader's :class:`~mmtl.data.samples.CleanOptions` for the self-supervised tower: image-only samples,
    or text-only samples with ``min_text_tokens`` (``count_tokens`` is filled in where the tokenizer lives)."""
    scfg = pipe.strategy.self_supervised
    opts = dataclasses.replace(clean_options(pipe), modality=scfg.tower)
    if scfg.tower == "text":
        opts.min_text_tokens = scfg.min_tokens
    return opts


def build_unpaired_dataset(pipe: Pipeline, spec, epochs: int, stats_actor: Optional[str] = None, train: bool = True,
                           *, processes: Optional[int] = None, rows_per_block: int = 64):
    """Ray Dataset of self-supervised rows for ``epochs`` passes over the unpaired shards of ``spec``.

    Rows: image -> ``view1``, ``view2`` (3,S,S) float32; text -> ``input_ids``, ``attention_mask``, ``labels``
    (L,) int64. At most ``processes`` map tasks at once (default: the cluster's CPUs), each reserving
    ``data.decode_cpus``.

    Raises:
        MissingShardsError / EmptyDatasetError: before any read.
    """
    import ray
    from ray.data import TaskPoolStrategy

    shards = resolve_shards(spec)
    items = epoch_items(shards, epochs, pipe.data.seed, pipe.data.shuffle_shards and train)
    if processes is None:
        processes = max(1, int(ray.cluster_resources().get("CPU", 1)))
    fn = functools.partial(_unpaired_batches, opts=unpaired_options(pipe),
                           buffer=pipe.data.shuffle_buffer if train else 0, seed=pipe.data.seed,
                           stats_actor=stats_actor, model_cfg_json=pipe.model.model_dump_json(),
                           ssl_json=pipe.strategy.self_supervised.model_dump_json(), rows_per_block=int(rows_per_block))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    out = ds.map_batches(fn, batch_size=1, compute=TaskPoolStrategy(size=max(1, min(int(processes), len(items)))),
                         num_cpus=pipe.data.decode_cpus, zero_copy_batch=True)
    s, L = pipe.model.image_size, pipe.model.context_length
    row = 2 * 3 * s * s * 4 if pipe.strategy.self_supervised.tower == "image" else 3 * L * 8
    out.context.target_max_block_size = int(rows_per_block) * row
    return out

