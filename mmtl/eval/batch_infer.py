"""Embedding a shard set for ``mmtl eval``: in this process (:func:`embed_local`) or with Ray Data batch
inference (:func:`embed_ray`, :class:`ShardEmbedder` actors); both give the same :class:`Embedded`."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Embedded:
    """Normalised embeddings of the clean samples, in shard order: ``image`` (N, D), ``text`` (N, D) or None;
    ``meta`` (the samples' json), ``refs`` ((shard, key) to find a sample again), reader ``stats``."""

    image: torch.Tensor
    text: Optional[torch.Tensor]
    meta: list[dict]
    refs: list[tuple[str, str]]
    stats: dict[str, int] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)


def _clean_opts(pipe):
    from mmtl.data.samples import CleanOptions

    return CleanOptions(max_image_pixels=pipe.data.max_image_pixels, min_caption_chars=pipe.data.min_caption_chars)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Encoder:
    """Batched image/text encoding of clean samples with one model (shared by the local and Ray paths)."""

    def __init__(self, model, device: torch.device, with_text: bool):
        self.model, self.device, self.with_text = model.to(device).eval(), device, with_text
        self.tf = model.image_transform(train=False)

    def __call__(self, samples) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from mmtl.data.encode_pool import fast_inference

        with fast_inference(self.model):  # inference mode, channels-last weights (restored)
            x = torch.stack([self.tf(s.image) for s in samples]).to(self.device)
            img = F.normalize(self.model.encode_image(x).float(), dim=-1).cpu().numpy()
            txt = None
            if self.with_text:
                tok = self.model.tokenize([s.caption for s in samples])
                tok = {k: v.to(self.device) for k, v in tok.items()}
                txt = F.normalize(self.model.encode_text(tok["input_ids"], tok["attention_mask"]).float(),
                                  dim=-1).cpu().numpy()
        # plain tensors (not inference tensors), so that callers may use them in any mode
        return torch.from_numpy(img), None if txt is None else torch.from_numpy(txt)


def _embed_shards(enc: _Encoder, shards: list[tuple[str, str]], opts, batch_size: int, stats: Counter):
    """Yield (img, txt, metas, refs, captions) per batch over ``shards`` [(url, shard_id)], in order (a batch
    may span shards)."""
    from mmtl.data.batches import encode_batches
    from mmtl.data.shardio import iter_shard

    from tqdm.auto import tqdm

    stream = (s for url, sid in shards for s in iter_shard(url, opts, stats, shard_id=sid))
    with tqdm(desc=f"embedding {len(shards)} shard(s)", unit="sample", leave=False, disable=None) as bar:
        for batch, (img, txt) in encode_batches(stream, enc, batch_size, progress=bar.update):
            yield img, txt, [s.meta for s in batch], [(s.shard, s.key) for s in batch], [s.caption for s in batch]


def embed_local(model, pipe, spec, *, batch_size: int = 64, with_text: bool = True, device: str = "auto") -> Embedded:
    """Embed every clean sample of ``spec`` in this process."""
    from mmtl.data.shardlist import resolve_shards, shard_ids

    shards = resolve_shards(spec)
    enc = _Encoder(model, _pick_device(device), with_text)
    stats: Counter = Counter()
    imgs, txts, meta, refs, caps = _collect(_embed_shards(enc, list(zip(shards, shard_ids(shards))),
                                                          _clean_opts(pipe), batch_size, stats))
    return _assemble(imgs, txts if with_text else None, meta, refs, caps, stats, spec)


def _collect(batches) -> tuple[list, list, list, list, list]:
    """(imgs, txts, meta, refs, captions) lists gathered from :func:`_embed_shards`' batches."""
    imgs, txts, meta, refs, caps = [], [], [], [], []
    for img, txt, m, r, c in batches:
        imgs.append(img)
        if txt is not None:
            txts.append(txt)
        meta += m
        refs += r
        caps += c
    return imgs, txts, meta, refs, caps


def _assemble(imgs, txts, meta, refs, caps, stats, spec) -> Embedded:
    if not imgs:
        from mmtl.data.shardlist import EmptyDatasetError

        raise EmptyDatasetError(f"no clean samples in {spec!r} (reader counts: {dict(stats)})")
    return Embedded(torch.cat(imgs), torch.cat(txts) if txts is not None else None, meta, refs,
                    {k: int(v) for k, v in sorted(stats.items())}, caps)


def _model_from_bytes(pipeline_yaml: str, weights: bytes):
    """Rebuild an exported model from its pipeline YAML and safetensors bytes (as ``load_exported`` does)."""
    from safetensors.torch import load as load_safetensors

    from mmtl.tracking.registry import model_from_export

    return model_from_export(pipeline_yaml, load_safetensors(weights))


class ShardEmbedder:
    """Ray Data actor: holds one model; each call embeds whole shards (one input row = one shard) and returns
    one row per shard with the embeddings as float32 bytes and the metadata as JSON."""

    def __init__(self, pipeline_yaml: str, weights_box: list, batch_size: int, with_text: bool, device: str):
        import ray

        ref = weights_box[0]
        weights = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        torch.set_num_threads(1)
        model, self.pipe = _model_from_bytes(pipeline_yaml, weights)
        self.enc = _Encoder(model, _pick_device(device), with_text)
        self.opts, self.batch_size, self.with_text = _clean_opts(self.pipe), batch_size, with_text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in ("index", "n", "dim", "image", "text", "meta", "refs", "captions",
                                                "stats")}
        for idx, url, sid in zip(batch["index"], batch["shard"], batch["shard_id"]):
            stats: Counter = Counter()
            imgs, txts, meta, refs, caps = _collect(_embed_shards(self.enc, [(str(url), str(sid))], self.opts,
                                                                  self.batch_size, stats))
            img = torch.cat(imgs).numpy().astype(np.float32) if imgs else np.zeros((0, 0), np.float32)
            txt = torch.cat(txts).numpy().astype(np.float32) if txts else np.zeros((0, 0), np.float32)
            out["index"].append(int(idx))
            out["n"].append(len(meta))
            out["dim"].append(int(img.shape[1]) if img.size else 0)
            out["image"].append(img.tobytes())
            out["text"].append(txt.tobytes())
            out["meta"].append(json.dumps(meta))
            out["refs"].append(json.dumps(refs))
            out["captions"].append(json.dumps(caps))
            out["stats"].append(json.dumps(dict(stats)))
        return {k: np.array(v, dtype=object) if k in ("image", "text", "meta", "refs", "captions", "stats")
                else np.array(v, dtype=np.int64) for k, v in out.items()}


def embed_ray(export_dir: Path, spec, *, batch_size: int = 64, with_text: bool = True, device: str = "auto",
              ray_actors: int = 2, ray_address: Optional[str] = None) -> Embedded:
    """Embed ``spec`` with Ray Data batch inference (see the module docstring); joins or starts Ray."""
    import ray

    from mmtl.data.shardlist import resolve_shards, shard_ids
    from mmtl.runtime import init_ray

    shards = resolve_shards(spec)
    init_ray(ray_address)
    num_gpus = 0.0
    if device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0):
        num_gpus, device = 1.0, "cuda"
    elif device == "auto":
        device = "cpu"
    weights_ref = ray.put((Path(export_dir) / "model.safetensors").read_bytes())
    items = [{"index": i, "shard": url, "shard_id": sid} for i, (url, sid) in enumerate(zip(shards, shard_ids(shards)))]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ShardEmbedder,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(ray_actors, len(items)))),
        num_cpus=1,
        num_gpus=num_gpus or None,
        fn_constructor_kwargs={"pipeline_yaml": (Path(export_dir) / "pipeline.yaml").read_text(),
                               "weights_box": [weights_ref], "batch_size": batch_size, "with_text": with_text,
                               "device": device},
    )
    rows = sorted(ds.take_all(), key=lambda r: int(r["index"]))
    stats: Counter = Counter()
    imgs, txts, meta, refs, caps = [], [], [], [], []
    for r in rows:
        stats.update(json.loads(r["stats"]))
        n, dim = int(r["n"]), int(r["dim"])
        if not n:
            continue
        imgs.append(torch.from_numpy(np.frombuffer(r["image"], dtype=np.float32).reshape(n, dim).copy()))
        if with_text:
            txts.append(torch.from_numpy(np.frombuffer(r["text"], dtype=np.float32).reshape(n, -1).copy()))
        meta += json.loads(r["meta"])
        refs += [tuple(x) for x in json.loads(r["refs"])]
        caps += json.loads(r["captions"])
    return _assemble(imgs, txts if with_text else None, meta, refs, caps, stats, spec)


def load_samples(refs: Sequence[tuple[str, str]], pipe) -> dict[tuple[str, str], Any]:
    """The clean samples named by (shard, key), reading only the shards involved."""
    from mmtl.data.shardio import iter_shard

    want: dict[str, set] = {}
    for shard, key in refs:
        want.setdefault(shard, set()).add(key)
    found = {}
    opts = _clean_opts(pipe)
    for shard, keys in want.items():
        for s in iter_shard(shard, opts):
            if s.key in keys:
                found[(shard, s.key)] = s
                if len(found) == len(refs):
                    break
    return found
