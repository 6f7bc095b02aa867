"""The two ``mmtl eval`` tasks on embedded samples: zero-shot classification and image-text retrieval
(chunked recall@K), each computing its metrics and writing its report files."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mmtl.eval.args import EvalError
from mmtl.eval.batch_infer import Embedded, load_samples
from mmtl.eval.reports import confusion_png, per_class_rows, retrieval_png, write_csv

DEFAULT_TEMPLATES = ("a photo of a {}.",)
EXAMPLE_QUERIES = 4
EXAMPLE_TOP = 5
Say = Callable[[str], None]


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


def _zero_shot(emb: Embedded, model, pipe, classes, templates, label_field, out: Path, say: Say,
               prompt=None) -> dict:
    from mmtl.eval.evaluate import encode_prompts
    from mmtl.eval.metrics import class_embeddings, confusion_matrix, zero_shot_metrics

    zs = pipe.eval.zero_shot
    source = "argument"
    if classes is None and prompt is not None:  # a learned CoOp prompt (mmtl.prompting) knows its classes
        classes, source = prompt.default_classes(), "prompt"
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
    image = emb.image[keep]
    extra, prompt_info = {}, None
    with torch.no_grad():  # the model is back on the CPU: C x T short prompts
        if prompt is not None:  # learned context instead of templates; base/new metrics where split
            from mmtl.prompting.artifact import eval_with_prompt

            try:
                cls_emb, extra, prompt_info = eval_with_prompt(prompt, model, image, labels, classes)
            except ValueError as e:
                raise EvalError(f"--prompt {prompt.dir}: {e}") from None
        else:
            cls_emb = class_embeddings(classes, templates, lambda p: encode_prompts(model, p)).float().cpu()
    metrics = {**zero_shot_metrics(image, cls_emb, labels), **extra}
    pred = (F.normalize(image, dim=-1) @ cls_emb.t()).argmax(1).tolist()
    cm = confusion_matrix(pred, labels, len(classes))
    rows = per_class_rows(cm, classes)
    csv_path = write_csv(rows, out / "zero_shot_per_class.csv")
    png = confusion_png(cm, classes, out / "zero_shot_confusion.png",
                        f"zero-shot acc1 {metrics['acc1']:.3f}, {len(labels)} samples, {len(classes)} classes")
    return {"metrics": {f"zero_shot/{k}": v for k, v in metrics.items()}, "classes": classes,
            "classes_from": source, "templates": templates, "label_field": label_field,
            "skipped": dict(skipped), "per_class": rows, "confusion_matrix": cm.tolist(),
            **({"prompt": prompt_info} if prompt_info is not None else {}),
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
