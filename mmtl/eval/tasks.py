"""``mmtl eval`` reports of the embedding tasks (rows of :mod:`mmtl.eval.registry`): zero-shot classification
and image-text retrieval on an :class:`~mmtl.eval.batch_infer.Embedded` set, each computing its metrics through
the registry and writing its report files."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

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


def zero_shot_report(task, *, emb: Embedded, model, pipe, classes: Optional[list[str]],
                     templates: Optional[list[str]], label_field: str, out: Path, say: Say, prompt=None, **_) -> dict:
    """``mmtl eval --task zero-shot`` on ``emb`` (image (N, D)): classes (:func:`mmtl.data.labels.resolve_classes`:
    ``classes``, else the learned ``prompt``'s, else ``eval.zero_shot.classes``, else the data's labels), class
    embeddings from ``templates`` (else the pipeline's, else :data:`DEFAULT_TEMPLATES`) or the learned prompt,
    ``task.metrics`` (plus base/new metrics of a prompt with a split), ``zero_shot_per_class.csv`` and
    ``zero_shot_confusion.png`` in ``out``.

    Returns ``{"metrics", "classes", "classes_from", "templates", "label_field", "skipped", "per_class",
    "confusion_matrix", ["prompt"], "files"}``.

    Raises:
        EvalError: fewer than 2 classes found in the data, no sample labelled with a class, a bad prompt.
    """
    from mmtl.data.labels import label_index, resolve_classes
    from mmtl.eval.evaluate import encode_prompts
    from mmtl.eval.metrics import class_embeddings, confusion_matrix

    zs = pipe.eval.zero_shot
    learned = prompt.default_classes() if classes is None and prompt is not None else None  # CoOp knows its classes
    classes, source = resolve_classes([("argument", classes), ("prompt", learned),
                                       ("pipeline", zs.classes if zs is not None else None)], emb.meta, label_field)
    if source == "data" and len(classes) < 2:
        raise EvalError(f"no classes given and the samples' json field {label_field!r} holds "
                        f"{len(classes)} distinct value(s): pass --classes or --label-field")
    if templates is None:
        templates = list(zs.templates) if zs is not None and zs.templates else list(DEFAULT_TEMPLATES)
    keep, labels, skipped = label_index(emb.meta, label_field, classes)
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
            from mmtl.eval.prompt_eval import eval_with_prompt

            try:
                cls_emb, extra, prompt_info = eval_with_prompt(prompt, model, image, labels, classes)
            except ValueError as e:
                raise EvalError(f"--prompt {prompt.dir}: {e}") from None
        else:
            cls_emb = class_embeddings(classes, templates, lambda p: encode_prompts(model, p)).float().cpu()
    metrics = {**task.metrics(image=image, class_emb=cls_emb, labels=labels),
               **{f"zero_shot/{k}": v for k, v in extra.items()}}
    pred = (F.normalize(image, dim=-1) @ cls_emb.t()).argmax(1).tolist()
    cm = confusion_matrix(pred, labels, len(classes))
    rows = per_class_rows(cm, classes)
    csv_path = write_csv(rows, out / "zero_shot_per_class.csv")
    title = f"zero-shot acc1 {metrics['zero_shot/acc1']:.3f}, {len(labels)} samples, {len(classes)} classes"
    png = confusion_png(cm, classes, out / "zero_shot_confusion.png", title)
    return {"metrics": metrics, "classes": classes, "classes_from": source, "templates": templates,
            "label_field": label_field,
            "skipped": dict(skipped), "per_class": rows, "confusion_matrix": cm.tolist(),
            **({"prompt": prompt_info} if prompt_info is not None else {}),
            "files": {"per_class_csv": csv_path, "confusion_png": png}}


def retrieval_report(task, *, emb: Embedded, pipe, ks: Sequence[int], out: Path, **_) -> dict:
    """``mmtl eval --task retrieval`` on ``emb`` (image (N, D), text (N, D)): ``task.metrics`` for the K of ``ks``
    with 0 < K <= N (sorted; none: K=1), and ``retrieval_examples.png`` in ``out`` (4 text queries evenly
    spaced over the set with their top-5 images, read back from the shards of ``pipe``'s cleaning options).

    Returns ``{"metrics", "ks", "ks_skipped", "examples", "files"}``.
    """
    n = len(emb.image)
    use = sorted({int(k) for k in ks if 0 < int(k) <= n}) or [1]
    metrics = task.metrics(image=emb.image, text=emb.text, ks=use)
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
    return {"metrics": metrics, "ks": use, "ks_skipped": sorted({int(k) for k in ks} - set(use)),
            "examples": [{"query": e["query"], "key": emb.refs[e["query"]][1], "caption": e["caption"],
                          "top": [{"key": emb.refs[j][1], "score": round(v, 6), "true": j == e["query"]}
                                  for j, v in e["hits"]]} for e in examples],
            "files": {"examples_png": png}}


def _blank():
    from PIL import Image

    return Image.new("RGB", (8, 8), (255, 255, 255))
