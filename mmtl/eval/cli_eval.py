"""``mmtl eval``: evaluate an exported model on a shard set (zero-shot classification or image-text retrieval).

:func:`run_eval` resolves MODEL (:mod:`mmtl.eval.resolve`: run directory, export folder, ``runs:/`` or
``models:/`` URI), embeds the set, computes the metrics of :mod:`mmtl.eval.metrics` and writes report files:

* ``zero-shot``: ``zero_shot/acc1``, ``zero_shot/acc5`` (C >= 5), ``zero_shot/mean_per_class_recall``,
  ``zero_shot/chance``, ``zero_shot/majority``, ``zero_shot/num_classes``, ``zero_shot/num_samples``; files
  ``zero_shot_per_class.csv`` (support, correct, recall, precision, most confused class per class) and
  ``zero_shot_confusion.png`` (matplotlib when installed, else drawn with PIL).
* ``retrieval``: ``retrieval/image_to_text_recall_at_K``, ``retrieval/text_to_image_recall_at_K`` (for each K
  <= N), ``retrieval/num_samples``; file ``retrieval_examples.png``: 4 text queries (evenly spaced over the
  set) with their top-5 images, the true image framed green.

Every run also writes ``eval.json`` (the returned dict). Metric names hold no ``@`` (MLflow forbids it).

Embedding: in this process for up to :data:`RAY_THRESHOLD` samples; above it (or with ``use_ray=True``) with
Ray Data batch inference: ``ray.data.from_items`` over the shard list (one row per shard) and ``map_batches``
with :class:`ShardEmbedder` actors (``ActorPoolStrategy(min_size=1, max_size=ray_actors)``, ``num_cpus=1``
each) that hold the model (weights shipped through the object store, never unpickled from a file). Order and
results are the same either way.

MLflow: when the model came from an MLflow run (a run directory's ``run.json``, or a ``runs:/`` /
``models:/`` URI) and ``log_to_mlflow``, a new run ``eval-<task>-<data>`` is created in the source run's
experiment, nested under it (``mlflow.parentRunId``), with the metrics, params and the files under the
artifact folder ``eval/``. The training run itself is left untouched.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

TASKS = ("zero-shot", "retrieval")
RAY_THRESHOLD = 5_000
"""Above this many samples (tar-header count) the set is embedded with Ray Data."""
DEFAULT_TEMPLATES = ("a photo of a {}.",)
EXAMPLE_QUERIES = 4
EXAMPLE_TOP = 5
Say = Callable[[str], None]


class EvalError(ValueError):
    """Bad eval arguments (task, classes, templates, labels); the message says what to fix."""


# ------------------------------------------------------------------------------------------- arguments


def parse_classes(classes: Optional[str]) -> Optional[list[str]]:
    """Class names from a file (one per line; blank lines and lines starting with ``#`` skipped) or a comma
    list. None -> None. Raises EvalError for fewer than 2 names, duplicates, or a missing ``*.txt`` file."""
    if classes is None:
        return None
    text = str(classes)
    p = Path(text).expanduser()
    if p.is_file():
        names = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        where = f"classes file {p}"
    elif "," not in text and (text.endswith((".txt", ".csv", ".lst")) or os.sep in text):
        raise EvalError(f"classes file {text!r} not found (give a file with one class name per line, or a comma list)")
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
        where = f"classes {text!r}"
    if len(names) < 2:
        raise EvalError(f"{where}: need at least 2 class names, got {names}")
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise EvalError(f"{where}: duplicate class names {dup}")
    return names


def _check_template(t: str, where: str) -> str:
    if "{}" not in t and "{c}" not in t:
        raise EvalError(f"{where}: template {t!r} has no {{}} placeholder for the class name")
    try:
        (t.replace("{c}", "x").format("x") if "{}" in t else t.replace("{c}", "x"))
    except (IndexError, KeyError, ValueError) as e:
        raise EvalError(f"{where}: template {t!r} is not a valid format string ({e}); use one {{}}") from None
    return t


def parse_templates(templates: Optional[str]) -> Optional[list[str]]:
    """Prompt templates from a file (one per line with ``{}``; blank lines skipped) or one literal template
    containing ``{}``. None -> None. Raises EvalError for a missing file or a template without ``{}``."""
    if templates is None:
        return None
    p = Path(str(templates)).expanduser()
    if p.is_file():
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
        out = [_check_template(ln, f"templates file {p}") for ln in lines if ln]
        if not out:
            raise EvalError(f"templates file {p} is empty")
        return out
    if "{}" in str(templates) or "{c}" in str(templates):
        return [_check_template(str(templates), "--templates")]
    raise EvalError(f"templates {templates!r} is neither a file nor a template with {{}} (give a file with one "
                    "template per line, each with {}, or one such template)")


def _data_name(data: str) -> str:
    p = Path(str(data).rstrip("/"))
    name = p.name if p.suffix not in (".tar", ".gz", ".tgz") else p.parent.name
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
    return name or "data"


# ------------------------------------------------------------------------------------------- embedding


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

    @torch.no_grad()
    def __call__(self, samples) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = torch.stack([self.tf(s.image) for s in samples]).to(self.device)
        img = F.normalize(self.model.encode_image(x).float(), dim=-1).cpu()
        txt = None
        if self.with_text:
            tok = self.model.tokenize([s.caption for s in samples])
            tok = {k: v.to(self.device) for k, v in tok.items()}
            txt = F.normalize(self.model.encode_text(tok["input_ids"], tok["attention_mask"]).float(), dim=-1).cpu()
        return img, txt


def _embed_shards(enc: _Encoder, shards: list[tuple[str, str]], opts, batch_size: int, stats: Counter):
    """Yield (img, txt, metas, refs, captions) per batch over ``shards`` [(url, shard_id)], in order."""
    from mmtl.data.shardio import iter_shard

    batch = []

    def flush():
        img, txt = enc(batch)
        out = (img, txt, [s.meta for s in batch], [(s.shard, s.key) for s in batch], [s.caption for s in batch])
        batch.clear()
        return out

    for url, sid in shards:
        for s in iter_shard(url, opts, stats, shard_id=sid):
            batch.append(s)
            if len(batch) >= batch_size:
                yield flush()
    if batch:
        yield flush()


def embed_local(model, pipe, spec, *, batch_size: int = 64, with_text: bool = True, device: str = "auto") -> Embedded:
    """Embed every clean sample of ``spec`` in this process."""
    from mmtl.data.shardlist import resolve_shards, shard_ids

    shards = resolve_shards(spec)
    enc = _Encoder(model, _pick_device(device), with_text)
    stats: Counter = Counter()
    imgs, txts, meta, refs, caps = [], [], [], [], []
    for img, txt, m, r, c in _embed_shards(enc, list(zip(shards, shard_ids(shards))), _clean_opts(pipe),
                                            batch_size, stats):
        imgs.append(img)
        if txt is not None:
            txts.append(txt)
        meta += m
        refs += r
        caps += c
    return _assemble(imgs, txts if with_text else None, meta, refs, caps, stats, spec)


def _assemble(imgs, txts, meta, refs, caps, stats, spec) -> Embedded:
    if not imgs:
        from mmtl.data.shardlist import EmptyDatasetError

        raise EmptyDatasetError(f"no clean samples in {spec!r} (reader counts: {dict(stats)})")
    return Embedded(torch.cat(imgs), torch.cat(txts) if txts is not None else None, meta, refs,
                    {k: int(v) for k, v in sorted(stats.items())}, caps)


def _model_from_bytes(pipeline_yaml: str, weights: bytes):
    """Rebuild an exported model from its pipeline YAML and safetensors bytes (as ``load_exported`` does)."""
    import yaml
    from safetensors.torch import load as load_safetensors

    from mmtl.config import Pipeline
    from mmtl.models import build_model

    pipe = Pipeline.model_validate(yaml.safe_load(pipeline_yaml))
    cfg = pipe.model.model_copy(deep=True)
    cfg.vision.weights = None
    if cfg.family != "two_tower":
        cfg.weights = None
    model = build_model(cfg)
    sd = load_safetensors(weights)
    model.load_state_dict({k: v for k, v in sd.items() if k != "logit_bias"}, strict=True)
    return model.eval(), pipe


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
            imgs, txts, meta, refs, caps = [], [], [], [], []
            for img, txt, m, r, c in _embed_shards(self.enc, [(str(url), str(sid))], self.opts, self.batch_size,
                                                    stats):
                imgs.append(img)
                if txt is not None:
                    txts.append(txt)
                meta += m
                refs += r
                caps += c
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


# ------------------------------------------------------------------------------------------- metrics


def ranks(queries: torch.Tensor, gallery: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Rank of each query's true match (row i of ``gallery``): gallery items scoring strictly higher (ties
    favour the truth, as :func:`~mmtl.eval.metrics.recall_at_k`). Chunked: memory O(chunk * N)."""
    q, g = F.normalize(queries.float(), dim=-1), F.normalize(gallery.float(), dim=-1)
    out = []
    for i in range(0, len(q), chunk):
        s = q[i : i + chunk] @ g.t()
        rows = torch.arange(s.shape[0])
        truth = s[rows, rows + i].unsqueeze(1)
        out.append((s > truth).sum(dim=1))
    return torch.cat(out)


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """``image_to_text_recall_at_K`` / ``text_to_image_recall_at_K`` (same definitions as
    :func:`~mmtl.eval.metrics.recall_at_k`, computed in chunks so large sets fit in memory)."""
    if image.shape != text.shape or image.shape[0] == 0:
        raise ValueError(f"need equal non-empty (N, D) embeddings, got {tuple(image.shape)} and {tuple(text.shape)}")
    out = {}
    for name, r in (("image_to_text", ranks(image, text)), ("text_to_image", ranks(text, image))):
        for k in ks:
            out[f"{name}_recall_at_{k}"] = float((r < k).float().mean())
    return out


def per_class_rows(cm: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One row per class from a confusion matrix (rows true, columns predicted)."""
    rows = []
    for i, c in enumerate(classes):
        support, correct, predicted = int(cm[i].sum()), int(cm[i, i]), int(cm[:, i].sum())
        off = cm[i].copy()
        off[i] = -1
        j = int(off.argmax()) if len(classes) > 1 else i
        rows.append({"index": i, "class": c, "support": support, "predicted": predicted, "correct": correct,
                     "recall": round(correct / support, 6) if support else None,
                     "precision": round(correct / predicted, 6) if predicted else None,
                     "most_confused_with": classes[j] if off[j] > 0 else "",
                     "most_confused_count": int(max(off[j], 0))})
    return rows


def _label_index(meta: list[dict], label_field: str, classes: list[str]) -> tuple[list[int], list[int], Counter]:
    """(kept sample positions, their class indices, skipped counts). A label that is a class name maps to it;
    an integer label that is not a class name is taken as an index into ``classes``."""
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


# ------------------------------------------------------------------------------------------- pictures


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def confusion_png(cm: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG (counts written in cells up to 30 classes)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return _confusion_png_pil(cm, classes, path, title)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = len(classes)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = min(4 + 0.45 * c, 40)
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(c), labels=list(classes), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(c), labels=list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path


def _confusion_png_pil(cm: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    from PIL import Image, ImageDraw

    c = len(classes)
    cell, font = max(18, min(40, 600 // max(c, 1))), _font(11)
    label_w = 8 + 7 * max((len(x) for x in classes), default=1)
    top = 30 + label_w
    img = Image.new("RGB", (label_w + c * cell + 10, top + c * cell + 10), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((5, 5), title, fill="black", font=font)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for i, name in enumerate(classes):
        d.text((4, top + i * cell + cell // 3), name, fill="black", font=font)
        col = Image.new("RGB", (label_w, 14), "white")
        ImageDraw.Draw(col).text((2, 0), name, fill="black", font=font)
        img.paste(col.rotate(90, expand=True), (label_w + i * cell + cell // 4, 28))
        for j in range(c):
            v = float(norm[i, j])
            shade = (int(255 - 200 * v), int(255 - 150 * v), 255)
            x0, y0 = label_w + j * cell, top + i * cell
            d.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=shade, outline=(200, 200, 200))
            if cm[i, j] and cell >= 18:
                d.text((x0 + 3, y0 + cell // 3), str(int(cm[i, j])), fill="white" if v > 0.5 else "black", font=font)
    img.save(path, format="PNG")
    return path


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width)[:6] or [""]


def retrieval_png(queries: list[dict], path: Path, thumb: int = 96) -> Path:
    """A grid: one row per text query (its caption and true image), then its top-K images with rank and cosine
    similarity, the true image framed green, others grey. ``queries``: dicts with ``caption``,
    ``image`` (PIL), ``hits`` [(PIL image, score, is_true)]."""
    from PIL import Image, ImageDraw

    font = _font(12)
    pad, text_w, label_h = 8, 220, 18
    k = max((len(q["hits"]) for q in queries), default=0)
    row_h = thumb + label_h + 2 * pad
    width = text_w + thumb + pad * 3 + k * (thumb + pad) + pad
    img = Image.new("RGB", (width, 24 + row_h * len(queries)), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 4), f"text -> image: top-{k} matches (green = true pair)", fill="black", font=font)

    def tile(im, x, y, color):
        t = im.convert("RGB")
        t.thumbnail((thumb, thumb), Image.NEAREST if max(t.size) < thumb else Image.BICUBIC)
        if max(t.size) < thumb:
            s = thumb / max(t.size)
            t = t.resize((max(1, round(t.width * s)), max(1, round(t.height * s))), Image.NEAREST)
        d.rectangle((x - 3, y - 3, x + thumb + 2, y + thumb + 2), outline=color, width=3)
        img.paste(t, (x + (thumb - t.width) // 2, y + (thumb - t.height) // 2))

    for r, q in enumerate(queries):
        y = 24 + r * row_h + pad
        for li, line in enumerate(_wrap(q["caption"], 30)):
            d.text((pad, y + li * 15), line, fill="black", font=font)
        x = text_w + pad
        tile(q["image"], x, y, (120, 120, 120))
        d.text((x, y + thumb + 4), "query's image", fill="black", font=font)
        for j, (im, score, true) in enumerate(q["hits"]):
            x = text_w + thumb + pad * 3 + j * (thumb + pad)
            tile(im, x, y, (30, 170, 30) if true else (190, 190, 190))
            d.text((x, y + thumb + 4), f"#{j + 1} {score:.3f}", fill="black", font=font)
    img.save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------------- run


def _resolve(spec: str, tracking_uri: Optional[str]):
    from mmtl.eval.resolve import resolve_export

    return resolve_export(spec, tracking_uri)


def _load_model(res):
    """(model, pipeline) of a resolved export."""
    from mmtl.tracking.registry import load_exported

    return load_exported(res.export_dir)


def _zero_shot(emb: Embedded, model, pipe, classes, templates, label_field, out: Path, say: Say) -> dict:
    from mmtl.eval.evaluate import encode_prompts
    from mmtl.eval.metrics import class_embeddings, confusion_matrix, zero_shot_metrics

    zs = pipe.eval.zero_shot
    source = "argument"
    if classes is None and zs is not None and zs.classes:
        classes, source = list(zs.classes), "pipeline"
    if classes is None:
        found = sorted({str(m.get(label_field)) for m in emb.meta if isinstance(m, dict) and
                        m.get(label_field) is not None})
        if len(found) < 2:
            raise EvalError(f"no classes given and the samples' json field {label_field!r} holds "
                            f"{len(found)} distinct value(s): pass --classes or --label-field")
        classes, source = found, "data"
    if templates is None:
        templates = list(zs.templates) if zs is not None and zs.templates else list(DEFAULT_TEMPLATES)
    keep, labels, skipped = _label_index(emb.meta, label_field, classes)
    if not keep:
        seen = sorted({repr(m.get(label_field)) for m in emb.meta if isinstance(m, dict)})[:5]
        raise EvalError(f"no sample's json field {label_field!r} names one of the {len(classes)} classes "
                        f"(values seen: {', '.join(seen) or 'none'}; classes: {classes[:5]}...)")
    if skipped:
        say(f"zero-shot: skipped {dict(skipped)} samples without a known {label_field!r}")
    with torch.no_grad():  # the model is back on the CPU: C x T short prompts
        cls_emb = class_embeddings(classes, templates, lambda p: encode_prompts(model, p)).float().cpu()
    image = emb.image[keep]
    metrics = zero_shot_metrics(image, cls_emb, labels)
    pred = (F.normalize(image, dim=-1) @ cls_emb.t()).argmax(1).tolist()
    cm = confusion_matrix(pred, labels, len(classes))
    rows = per_class_rows(cm, classes)
    csv_path = out / "zero_shot_per_class.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    png = confusion_png(cm, classes, out / "zero_shot_confusion.png",
                        f"zero-shot acc1 {metrics['acc1']:.3f}, {len(labels)} samples, {len(classes)} classes")
    return {"metrics": {f"zero_shot/{k}": v for k, v in metrics.items()}, "classes": classes,
            "classes_from": source, "templates": templates, "label_field": label_field,
            "skipped": dict(skipped), "per_class": rows, "confusion_matrix": cm.tolist(),
            "files": {"per_class_csv": csv_path, "confusion_png": png}}


def _retrieval(emb: Embedded, pipe, ks: Sequence[int], out: Path) -> dict:
    n = len(emb.image)
    use = sorted({int(k) for k in ks if 0 < int(k) <= n}) or [1]
    metrics = retrieval_metrics(emb.image, emb.text, use)
    metrics["num_samples"] = float(n)
    picks = sorted({int(round(x)) for x in np.linspace(0, n - 1, min(EXAMPLE_QUERIES, n))})
    top = min(EXAMPLE_TOP, n)
    examples, need = [], set()
    for i in picks:
        s = F.normalize(emb.text[i : i + 1], dim=-1) @ F.normalize(emb.image, dim=-1).t()
        vals, idx = s[0].topk(top)
        hits = [(int(j), float(v)) for v, j in zip(vals, idx)]
        examples.append({"query": i, "caption": emb.captions[i] if emb.captions else "", "hits": hits})
        need.update([emb.refs[i]] + [emb.refs[j] for j, _ in hits])
    samples = load_samples(sorted(need), pipe)
    blank = _blank()
    queries = [{"caption": e["caption"], "image": getattr(samples.get(emb.refs[e["query"]]), "image", blank),
                "hits": [(getattr(samples.get(emb.refs[j]), "image", blank), v, j == e["query"]) for j, v in e["hits"]]}
               for e in examples]
    png = retrieval_png(queries, out / "retrieval_examples.png")
    return {"metrics": {f"retrieval/{k}": v for k, v in metrics.items()},
            "ks": use, "ks_skipped": sorted({int(k) for k in ks} - set(use)),
            "examples": [{"query": e["query"], "key": emb.refs[e["query"]][1], "caption": e["caption"],
                          "top": [{"key": emb.refs[j][1], "score": round(v, 6), "true": j == e["query"]}
                                  for j, v in e["hits"]]} for e in examples],
            "files": {"examples_png": png}}


def _blank():
    from PIL import Image

    return Image.new("RGB", (8, 8), (255, 255, 255))


def _log_mlflow(res, task: str, data: str, result: dict, files: list[Path], say: Say) -> dict:
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from mmtl.tracking import mlflow_utils as mlu

    uri, parent = res.tracking_uri, res.mlflow_run_id
    client = MlflowClient(tracking_uri=uri)
    src = client.get_run(parent)
    name = f"eval-{task}-{_data_name(data)}"
    tags = {"mlflow.parentRunId": parent, "mmtl.eval.source_run_id": parent, "mmtl.eval.task": task,
            "mmtl.eval.model": res.spec}
    if res.registered:
        tags["mmtl.eval.registered_model"] = json.dumps(res.registered, sort_keys=True)
    run = client.create_run(src.info.experiment_id, run_name=name, tags=tags)
    rid = run.info.run_id
    try:
        params = {"task": task, "data": data, "model": res.spec, "embedding": result["embedding"],
                  "num_samples": result["num_samples"]}
        if task == "zero-shot":
            params.update(label_field=result["label_field"], num_classes=len(result["classes"]),
                          classes=", ".join(result["classes"]), templates=" | ".join(result["templates"]),
                          classes_from=result["classes_from"])
        else:
            params["ks"] = ",".join(map(str, result["ks"]))
        client.log_batch(rid, params=[Param(k, str(v)[: mlu.MAX_PARAM_CHARS]) for k, v in params.items()])
        mlu.log_metrics(uri, rid, {**result["metrics"], **{f"data/{k}": v for k, v in result["data_stats"].items()}})
        for f in files:
            client.log_artifact(rid, str(f), "eval")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    say(f"logged to MLflow run {rid} (nested under {parent}) at {uri}")
    return {"logged": True, "eval_run_id": rid, "parent_run_id": parent, "experiment_id": src.info.experiment_id,
            "tracking_uri": uri, "run_name": name, "artifact_path": "eval"}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


def run_eval(spec: str, task: str, data: str, classes: Optional[str] = None, templates: Optional[str] = None,
             label_field: str = "category", ks: Sequence[int] = (1, 5, 10), batch_size: int = 64,
             out_dir: Optional[str] = None, log_to_mlflow: bool = True, tracking_uri: Optional[str] = None, *,
             use_ray: Optional[bool] = None, ray_threshold: int = RAY_THRESHOLD, ray_actors: int = 2,
             ray_address: Optional[str] = None, device: str = "auto", say: Optional[Say] = None) -> dict:
    """Evaluate MODEL ``spec`` on the shard set ``data``; return a JSON-serialisable report.

    Args:
        spec: run directory, export folder, ``runs:/<id>/model``, ``models:/<name>@<alias>`` or
            ``models:/<name>/<version>`` (see :mod:`mmtl.eval.resolve`).
        task: "zero-shot" or "retrieval".
        data: shard spec (folder, glob, brace pattern, tar path or URI).
        classes: zero-shot class names: a file (one a line) or a comma list; default the pipeline's
            ``eval.zero_shot.classes``, else the sorted distinct ``label_field`` values of the data.
        templates: a file of prompt templates (one a line, each with ``{}``) or one template; default the
            pipeline's ``eval.zero_shot.templates``, else ``"a photo of a {}."``.
        label_field: json field with the class name (an int is taken as a class index).
        ks: recall@K cut-offs for retrieval (those > N are dropped and listed in ``ks_skipped``).
        batch_size: images per forward pass.
        out_dir: folder for the report files (created); None: files only go to MLflow (temporary folder).
        log_to_mlflow: log to a new run nested under the model's MLflow run, when there is one.
        tracking_uri: MLflow tracking URI for ``runs:/`` / ``models:/`` specs (default ``$MLFLOW_TRACKING_URI``);
            a run directory's own ``run.json`` URI takes precedence for logging.
        use_ray: True forces Ray Data batch inference, False forbids it; None: Ray above ``ray_threshold``
            samples.
        ray_actors: at most this many embedding actors (1 CPU each).
        ray_address: Ray cluster to join (default: as ``mmtl run``: a local instance if none runs).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        say: progress messages (default: none).

    Returns ``{"task", "model" (resolution details), "data", "num_samples", "embedding" ("local"|"ray"),
    "metrics", "data_stats", "files", "out_dir", "mlflow", "seconds", ...}`` plus, for zero-shot, ``classes``,
    ``classes_from``, ``templates``, ``label_field``, ``skipped``, ``per_class``, ``confusion_matrix``; for
    retrieval ``ks``, ``ks_skipped``, ``examples``. Also written to ``<out_dir>/eval.json``.

    Raises:
        ModelSpecError: bad MODEL (see :mod:`mmtl.eval.resolve`).
        EvalError: bad task / classes / templates / labels.
        MissingShardsError / EmptyDatasetError: the data.
    """
    from mmtl.data.shardlist import resolve_shards
    from mmtl.data.stream import count_samples

    say = say or (lambda m: None)
    t0 = time.time()
    if task not in TASKS:
        raise EvalError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    ks = [int(k) for k in ks]
    if task == "retrieval" and (not ks or any(k < 1 for k in ks)):
        raise EvalError(f"ks must be positive integers, got {ks}")
    class_list = parse_classes(classes) if task == "zero-shot" else None
    template_list = parse_templates(templates) if task == "zero-shot" else None
    res = _resolve(spec, tracking_uri)
    tmp_out = None
    try:
        resolve_shards(data)  # missing data fails before the model loads
        model, pipe = _load_model(res)
        say(f"model: {res.kind} {res.export_dir}" + (f" (MLflow run {res.mlflow_run_id})" if res.mlflow_run_id else ""))
        if use_ray is None:
            n_est = count_samples(data)
            use_ray = n_est > ray_threshold
            say(f"data: ~{n_est} samples -> embedding {'with Ray Data' if use_ray else 'in this process'}")
        with_text = task == "retrieval"
        if use_ray:
            emb = embed_ray(res.export_dir, data, batch_size=batch_size, with_text=with_text, device=device,
                            ray_actors=ray_actors, ray_address=ray_address)
        else:
            emb = embed_local(model, pipe, data, batch_size=batch_size, with_text=with_text, device=device)
            model.cpu()
        say(f"embedded {len(emb.image)} samples ({time.time() - t0:.1f}s)")
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
        else:
            out = tmp_out = Path(tempfile.mkdtemp(prefix="mmtl-eval-"))
        result: dict[str, Any] = {"task": task, "model": res.describe(), "data": str(data),
                                  "num_samples": len(emb.image), "embedding": "ray" if use_ray else "local",
                                  "data_stats": emb.stats}
        if task == "zero-shot":
            part = _zero_shot(emb, model, pipe, class_list, template_list, label_field, out, say)
        else:
            part = _retrieval(emb, pipe, ks, out)
        result.update(part)
        files = [Path(p) for p in part["files"].values()]
        eval_json = out / "eval.json"
        result["files"]["eval_json"] = eval_json
        result["out_dir"] = str(out) if tmp_out is None else None
        result["mlflow"] = {"logged": False, "reason": "disabled (--no-mlflow)"}
        if log_to_mlflow and not res.mlflow_run_id:
            result["mlflow"] = {"logged": False, "reason": "the model has no MLflow run (plain export folder)"}
        result["seconds"] = round(time.time() - t0, 3)
        eval_json.write_text(json.dumps(_jsonable(result), indent=2) + "\n", encoding="utf-8")
        if log_to_mlflow and res.mlflow_run_id:
            try:
                result["mlflow"] = _log_mlflow(res, task, str(data), result, files + [eval_json], say)
            except Exception as e:  # the metrics are computed: report the failure, keep the result
                result["mlflow"] = {"logged": False, "reason": f"MLflow logging failed: {type(e).__name__}: {e}"}
                say(f"warning: {result['mlflow']['reason']}")
            result["seconds"] = round(time.time() - t0, 3)
            eval_json.write_text(json.dumps(_jsonable(result), indent=2) + "\n", encoding="utf-8")
        if tmp_out is not None:
            result["files"] = {}
        return _jsonable(result)
    finally:
        res.cleanup()
        if tmp_out is not None:
            shutil.rmtree(tmp_out, ignore_errors=True)
