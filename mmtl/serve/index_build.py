"""``mmtl index build``: a Ray Data batch-inference job (an actor pool over the shards, one input row = one shard)
that embeds every clean sample's image and caption with an exported model and writes an index folder
(:mod:`mmtl.serve.index`): embeddings, metadata and a small JPEG thumbnail per sample, and a faiss index.

Shards are read by the robust reader (:func:`mmtl.data.shardio.iter_shard`: decode by content, pixel limit,
truncated/corrupt shards and bad samples skipped and counted per reason in the manifest's ``shards[].stats``).
Each actor holds one copy of the model (weights sent once through the object store as safetensors bytes).
"""
from __future__ import annotations

import collections
import io
import os
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

THUMB_PX = 96


def thumbnail_jpeg(image, px: int = THUMB_PX, quality: int = 85) -> bytes:
    """RGB PIL image -> JPEG bytes of a copy fitting in ``px`` x ``px`` (aspect kept, never enlarged)."""
    im = image.copy()
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class ShardIndexer:
    """Ray Data actor: one model; each call embeds whole shards (rows ``index``, ``shard``, ``shard_id``) and
    returns one row per shard with the image and caption embeddings as float32 bytes (N x D each) and the
    metadata columns as JSON (thumbnails as latin-1 text of their bytes: JSON-safe, no pickling)."""

    def __init__(self, pipeline_yaml: str, weights_box: list, batch_size: int, threads: int = 1):
        import ray

        from mmtl.data.samples import CleanOptions
        from mmtl.serve.embed import Embedder

        ref = weights_box[0]
        self.emb = Embedder.from_bytes(pipeline_yaml, ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref,
                                       threads=threads)
        d = self.emb.pipe.data
        self.opts = CleanOptions(max_image_pixels=d.max_image_pixels, min_caption_chars=d.min_caption_chars)
        self.batch_size = batch_size

    def embed_shard(self, url: str, shard_id: str) -> dict:
        """``{"n", "image" (N*D float32 bytes), "text", "columns" (JSON), "stats" (JSON)}`` for one shard."""
        from mmtl.data.batches import encode_batches
        from mmtl.data.shardio import iter_shard

        stats: collections.Counter = collections.Counter()
        cols: dict[str, list] = {"key": [], "uid": [], "caption": [], "shard": [], "meta": [], "thumbnail": []}
        imgs, txts = [], []

        def enc(batch):
            return self.emb.encode_images([s.image for s in batch]), self.emb.encode_texts([s.caption for s in batch])

        for batch, (img, txt) in encode_batches(iter_shard(url, self.opts, stats, shard_id=shard_id), enc,
                                                self.batch_size):
            imgs.append(img)
            txts.append(txt)
            for s in batch:
                cols["key"].append(s.key)
                cols["uid"].append(s.uid)
                cols["caption"].append(s.caption)
                cols["shard"].append(url)
                cols["meta"].append(json.dumps(s.meta, ensure_ascii=False))
                cols["thumbnail"].append(thumbnail_jpeg(s.image).decode("latin-1"))
        img = np.concatenate(imgs) if imgs else np.zeros((0, self.emb.dim), np.float32)
        txt = np.concatenate(txts) if txts else np.zeros((0, self.emb.dim), np.float32)
        return {"n": len(cols["key"]), "image": img.tobytes(), "text": txt.tobytes(), "columns": json.dumps(cols),
                "stats": json.dumps(dict(stats))}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = collections.defaultdict(list)
        for idx, url, sid in zip(batch["index"], batch["shard"], batch["shard_id"]):
            r = self.embed_shard(str(url), str(sid))
            out["index"].append(int(idx))
            for k, v in r.items():
                out[k].append(v)
        return {k: np.array(v, dtype=np.int64 if k in ("index", "n") else object) for k, v in out.items()}


def _collect(rows: list[dict], dim: int, shards: list[str]):
    from mmtl.serve.index import COLUMNS, Rows

    cols: dict[str, list] = {c: [] for c in COLUMNS}
    imgs, txts, per_shard = [], [], []
    for r in sorted(rows, key=lambda r: int(r["index"])):
        n = int(r["n"])
        per_shard.append({"shard": shards[int(r["index"])], "samples": n, "stats": json.loads(r["stats"])})
        if not n:
            continue
        c = json.loads(r["columns"])
        c["thumbnail"] = [t.encode("latin-1") for t in c["thumbnail"]]
        for k in COLUMNS:
            cols[k] += c[k]
        imgs.append(np.frombuffer(r["image"], np.float32).reshape(n, dim))
        txts.append(np.frombuffer(r["text"], np.float32).reshape(n, dim))
    if not imgs:
        return Rows(cols, np.zeros((0, dim), np.float32)), per_shard
    return Rows(cols, np.concatenate(imgs), np.concatenate(txts)), per_shard


def build_index(model_spec: str, shards_spec, out: str | Path, *, kind: Optional[str] = None, append: bool = False,
                tracking_uri: Optional[str] = None, actors: int = 1, batch_size: int = 64,
                ray_address: Optional[str] = None, say: Callable[[str], None] = lambda m: None) -> dict:
    """Embed ``shards_spec`` with the model ``model_spec`` names (forms of :func:`mmtl.eval.resolve.resolve_export`)
    on a Ray Data actor pool of ``actors`` actors (1 CPU each) and write / extend the index folder ``out``.

    Returns the manifest (plus ``seconds`` and ``samples_per_s`` of this build).

    Raises:
        ModelSpecError: MODEL names nothing loadable. ShardError: shards missing / none match.
        IndexFolderError / IndexModelMismatch: see :func:`mmtl.serve.index.write_index` (checked before any
            embedding for ``--append`` with another model, or an existing index without ``--append``).
        ValueError: the model does not embed images (a generative or fusion export).
    """
    import ray

    from mmtl.data.shardlist import resolve_shards, shard_ids
    from mmtl.eval.resolve import resolve_export
    from mmtl.runtime import init_ray
    from mmtl.serve.embed import model_fingerprint
    from mmtl.serve.index import IndexFolderError, check_model, read_manifest, write_index
    from mmtl.serve.served_model import export_kind, read_export_pipeline

    out = Path(out)
    res = resolve_export(model_spec, tracking_uri)
    try:
        fp = model_fingerprint(res.export_dir)
        model_kind = export_kind(read_export_pipeline(res.export_dir))
        if model_kind != "embedding":
            raise ValueError(f"{model_spec} is a {model_kind} model: it does not embed images, so it cannot build an "
                             "index (serve it without --index: `mmtl serve MODEL`)")
        if append:
            check_model(read_manifest(out), fp, out)
        elif (out / "index.json").exists():
            raise IndexFolderError(f"{out} already holds an index: pass --append to add shards, or another --out")
        shards = [s if "://" in s else os.path.abspath(s) for s in resolve_shards(shards_spec)]  # for --append /
        # a rebuild from another directory (the manifest lists them)
        pipeline_yaml = (res.export_dir / "pipeline.yaml").read_text()
        weights = (res.export_dir / "model.safetensors").read_bytes()
        model = {**{k: v for k, v in res.describe().items() if k != "export_dir"}, "fingerprint": fp}
        if res.temporary is not None:
            model["spec"] = model_spec
    finally:
        res.cleanup()
    t0 = time.perf_counter()
    init_ray(ray_address)
    items = [{"index": i, "shard": u, "shard_id": s} for i, (u, s) in enumerate(zip(shards, shard_ids(shards)))]
    say(f"embedding {len(shards)} shard(s) on {min(actors, len(items))} actor(s)")
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardIndexer, batch_size=1, batch_format="numpy", num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(actors, len(items)))),
        fn_constructor_kwargs={"pipeline_yaml": pipeline_yaml, "weights_box": [ray.put(weights)],
                               "batch_size": batch_size})
    rows = ds.take_all()
    import yaml

    dim = int(yaml.safe_load(pipeline_yaml)["model"]["embed_dim"])
    new, per_shard = _collect(rows, dim, shards)
    seconds = time.perf_counter() - t0
    manifest = write_index(out, new, model=model, kind=kind, shards=per_shard, append=append)
    say(f"indexed {len(new)} sample(s) in {seconds:.1f} s -> {out} ({manifest['count']} in all)")
    if manifest.get("skipped"):
        say("vectors skipped (not finite or zero; keys in index.json): "
            + ", ".join(f"{k} {len(v)}" for k, v in manifest["skipped"].items()))
    return {**manifest, "seconds": round(seconds, 2), "samples_per_s": round(len(new) / max(seconds, 1e-9), 1)}
