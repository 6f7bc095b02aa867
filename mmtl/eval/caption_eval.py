"""Captioning evaluation of a generative model on shard sets, after training (:func:`evaluate_caption_sets`,
called by :mod:`mmtl.recipes.captioning`) and from ``mmtl eval MODEL --task captioning`` (:func:`run_caption_eval`).

Per set: the model's captions (beam search with ``strategy.caption.num_beams``, ``max_new_tokens``), the
metrics of :func:`mmtl.eval.captioning.caption_metrics`, the nearest-neighbour baseline's metrics under
``nn_baseline/`` (training captions, frozen pretrained image tower), a PNG gallery and a JSON file of every
generated caption.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mmtl.data.captions import CaptionSet, load_caption_set, pil_geometry
from mmtl.eval.captioning import (
    caption_metrics,
    generate_all,
    group_references,
    image_features,
    nearest_neighbour_captions,
    write_gallery,
)

Say = Callable[[str], None]


def read_caption_set(model, pipe, spec, limit: Optional[int] = None) -> CaptionSet:
    """The :class:`~mmtl.data.captions.CaptionSet` of ``spec`` at ``model``'s input size and context length,
    with the pipeline's ``strategy.caption`` target. Raises like :func:`~mmtl.data.captions.load_caption_set`."""
    c = pipe.strategy.caption
    return load_caption_set(spec, pil_geometry(model.image_transform(False)), model.count_tokens,
                            pipe.model.context_length, c.caption_field, c.keywords_field,
                            pipe.data.max_image_pixels, limit, c.conversations_field)


def generator(model, pipe) -> Callable:
    """``(images (B, 3, S, S), prompt=None) -> B captions`` with the model family's ``generate`` and
    ``strategy.caption``'s decoding (prompt None: the pipeline's ``model.decoder.prompt``)."""
    from mmtl.models.family import TextGeneration, capability
    from mmtl.models.registry import family_of

    gen = capability(family_of(model), TextGeneration)
    if gen is None:
        raise ValueError(f"model family {pipe.model.family!r} does not generate text: --task captioning needs a "
                         "generative model (model.family: blip)")
    c = pipe.strategy.caption
    return lambda images, prompt=None: gen.generate(model, images, prompt, c.num_beams, c.max_new_tokens)


def generate_for_set(gen: Callable, cs: CaptionSet, mean, std) -> list[str]:
    """Outputs for every image of ``cs``: one batch run per distinct prompt of a chat-format set (its first
    questions), else the pipeline's prompt for all."""
    if cs.prompts is None:
        return generate_all(gen, cs.pixels, mean, std)
    out: list = [None] * len(cs)
    for prompt in dict.fromkeys(cs.prompts):
        idx = [i for i, p in enumerate(cs.prompts) if p == prompt]
        for i, text in zip(idx, generate_all(lambda x: gen(x, prompt), cs.pixels[idx], mean, std)):
            out[i] = text
    return out


def by_image(cs: CaptionSet) -> tuple[CaptionSet, list[list[str]]]:
    """One row per image of ``cs`` (its first sample) and each image's references: samples sharing an image id
    (:func:`mmtl.data.captions.image_id_of`; with the same question, for chat-format sets) are one image, so
    it is captioned and scored once against all its references."""
    ids = cs.image_ids or cs.uids
    if cs.prompts is not None:
        ids = [f"{i}\n{p}" for i, p in zip(ids, cs.prompts)]
    first, refs = group_references(ids, cs.captions)
    keep = np.zeros(len(cs), dtype=bool)
    keep[first] = True
    return cs.subset(keep), refs


def per_type_exact_match(types: list[str], refs: list[list[str]], hyp: list[str]) -> dict[str, float]:
    """Normalised exact match (:func:`~mmtl.eval.captioning.normalize_caption`: the generated answer equals one of
    the references; with one reference per question this is VQA accuracy) per question type, in [0, 1]:
    ``{"vqa/<type>/exact_match": ..., "vqa/<type>/questions": n, "vqa/exact_match": overall}``."""
    from mmtl.eval.captioning import normalize_caption
    from mmtl.fusion.heads import per_type_accuracy

    hits = [float(normalize_caption(h) in {normalize_caption(x) for x in r}) for r, h in zip(refs, hyp)]
    acc = per_type_accuracy(hits, types)
    out = {"vqa/exact_match": acc.pop("overall")}
    out.update({f"vqa/{t}/exact_match": v for t, v in acc.items()})
    out.update({f"vqa/{t}/questions": float(types.count(t)) for t in acc})
    return out


def _fmt(v) -> str:
    return "undefined" if v is None else f"{v:.3f}"


def baseline_features(base_model, cs: CaptionSet):
    """(N, D) frozen-tower features of a set for the nearest-neighbour baseline."""
    return image_features(base_model.image_tokens, cs.pixels, base_model.mean, base_model.std)


def build_retriever(pipe, train: CaptionSet):
    """The :class:`~mmtl.models.caption_retrieval.CaptionRetriever` of ``strategy.caption.retrieval_k`` over the
    training set ``train``: the frozen pretrained image tower of ``model.vision`` (its weights file, as the
    nearest-neighbour baseline's), its features of every training image, the training captions.

    Raises:
        ValueError: the training set has fewer than ``k + 1`` captions (leave-one-out needs k others).
    """
    from mmtl.models.caption_retrieval import CaptionRetriever
    from mmtl.models.tokens import timm_image_tokens
    from mmtl.models.two_tower import build_vision_tower, vision_mean_std

    c, m = pipe.strategy.caption, pipe.model
    if len(train) <= c.retrieval_k:
        raise ValueError(f"strategy.caption.retrieval_k={c.retrieval_k} needs more than k training captions "
                         f"(data.train has {len(train)}; each image leaves itself out)")
    tower, _ = build_vision_tower(m.vision)
    mean, std = vision_mean_std(m.vision)
    feats = image_features(lambda x: timm_image_tokens(tower, x, m.decoder.image_layer), train.pixels, mean, std)
    return CaptionRetriever(tower, m.decoder.image_layer, train.captions, feats, c.retrieval_k, c.retrieval_prompt)


def training_prompts(retriever, train: CaptionSet) -> list[str]:
    """Retrieval prompts of the training images: each from its k nearest OTHER training images (samples of the
    same image, :attr:`CaptionSet.image_ids`, are left out), or the decoder would learn to copy its own caption."""
    groups = list(train.image_ids or train.uids)
    return retriever.prompts(retriever.features, leave_out=groups, key_groups=groups)


def evaluate_caption_sets(model, pipe, sets: dict[str, CaptionSet], *, out: Optional[Path] = None,
                          nn_train: Optional[tuple] = None, say: Say = print) -> tuple[dict, dict]:
    """Generate and score every set of ``sets``.

    Args:
        model: the trained generative model (eval mode). ``nn_train``: ``(base_model, train CaptionSet,
            train features (N, D))`` for the nearest-neighbour baseline, or None to skip it.
        out: folder for ``captions_<set>.json`` and ``gallery_<set>.png`` (None: no files).
    Returns:
        ``({"<set>/captioning/bleu4": ..., "<set>/nn_baseline/cider_d": ..., "<set>/gen_seconds": ...},
        {file name: path})``.
    """
    gen = generator(model, pipe)
    model.eval()
    metrics, files = {}, {}
    for name, samples in sets.items():
        t0 = time.time()
        cs, refs = by_image(samples)
        hyp = generate_for_set(gen, cs, model.mean, model.std)
        metrics.update({f"{name}/{k}": v for k, v in caption_metrics(refs, hyp).items()})
        metrics[f"{name}/images"] = float(len(cs))
        metrics[f"{name}/gen_seconds"] = round(time.time() - t0, 2)
        if cs.question_types is not None:
            per_type = per_type_exact_match(cs.question_types, refs, hyp)
            metrics.update({f"{name}/{k}": v for k, v in per_type.items()})
            say(f"{name}: exact match by question type: " + ", ".join(
                f"{t} {per_type[f'vqa/{t}/exact_match']:.3f}" for t in sorted(set(cs.question_types))))
        nn = None
        if nn_train is not None:
            base, train_set, train_feat = nn_train
            nn = nearest_neighbour_captions(train_feat, train_set.captions, baseline_features(base, cs))
            metrics.update({f"{name}/{k}": v for k, v in caption_metrics(refs, nn, "nn_baseline/").items()})
        say(f"{name}: {len(cs)} images, CIDEr-D {_fmt(metrics[f'{name}/captioning/cider_d'])}, BLEU-4 "
            f"{_fmt(metrics[f'{name}/captioning/bleu4'])}, exact {_fmt(metrics[f'{name}/captioning/exact_match'])}"
            + (f" | nearest-neighbour CIDEr-D {_fmt(metrics[f'{name}/nn_baseline/cider_d'])}" if nn else ""))
        if out is not None and pipe.strategy.caption.gallery:
            files[f"gallery_{name}"] = write_gallery(out / f"gallery_{name}.png", cs.pixels, cs.captions, hyp, nn,
                                                     pipe.strategy.caption.gallery)
        if out is not None:
            ret = getattr(model, "retriever", None)  # retrieval-augmented: each image's retrieval prompt, for reading
            prompts = (generate_all(ret.prompts_for_images, cs.pixels, model.mean, model.std)
                       if ret is not None and cs.prompts is None else cs.prompts)
            rows = [{"uid": u, **({"prompt": prompts[i]} if prompts else {}),
                     **({"question_type": cs.question_types[i]} if cs.question_types else {}), "reference": r,
                     "references": refs[i], "generated": h, **({"nearest_neighbour": nn[i]} if nn else {})}
                    for i, (u, r, h) in enumerate(zip(cs.uids, cs.captions, hyp))]
            p = out / f"captions_{name}.json"
            p.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
            files[f"captions_{name}"] = p
    return metrics, files


def run_caption_eval(spec: str, data: str, out_dir: Optional[str] = None, log_to_mlflow: bool = True,
                     tracking_uri: Optional[str] = None, say: Optional[Say] = None, task: str = "captioning") -> dict:
    """``mmtl eval MODEL --task captioning --data SHARDS``: resolve MODEL (run dir, export, ``runs:/``,
    ``models:/``), generate captions for ``data``, score them (with the nearest-neighbour baseline on the
    pipeline's ``data.train`` when ``strategy.caption.nn_baseline`` and it exists), write ``eval.json``, the
    gallery and the captions, and log a nested MLflow run. Returns the JSON-serialisable report.

    Raises:
        ModelSpecError: bad MODEL; ValueError: not a generative model; ImagelessSampleError / shard errors.
    """
    import shutil
    import tempfile

    from mmtl.data.shardlist import resolve_shards
    from mmtl.eval.mlflow_log import log_eval_run
    from mmtl.eval.resolve import resolve_export
    from mmtl.models import build_model
    from mmtl.tracking.registry import load_exported

    say = say or (lambda m: None)
    t0 = time.time()
    res = resolve_export(spec, tracking_uri)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="mmtl-eval-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        resolve_shards(data)
        model, pipe = load_exported(res.export_dir)
        generator(model, pipe)  # a non-generative model fails here, before any generation
        sets = {"data": read_caption_set(model, pipe, data)}
        nn_train = None
        if pipe.strategy.caption.nn_baseline and pipe.data.train:
            try:
                base = build_model(pipe.model)  # the pretrained (frozen) towers: the baseline's feature space
                train = read_caption_set(base, pipe, pipe.data.train)
                nn_train = (base, train, baseline_features(base, train))
            except (FileNotFoundError, ValueError) as e:
                say(f"nearest-neighbour baseline skipped: {e}")
        metrics, files = evaluate_caption_sets(model, pipe, sets, out=out, nn_train=nn_train, say=say)
        metrics = {k.removeprefix("data/"): v for k, v in metrics.items()}
        result = {"task": task, "model": res.describe(), "data": str(data),
                  "num_samples": len(sets["data"]), "metrics": metrics, "data_stats": sets["data"].stats,
                  "files": {k: str(v) for k, v in files.items()} if out_dir else {}, "out_dir": out_dir,
                  "embedding": "local", "ks": [], "java_metrics": "METEOR and SPICE not run (they need Java)",
                  "mlflow": {"logged": False, "reason": "disabled (--no-mlflow)"}}
        if log_to_mlflow and not res.mlflow_run_id:
            result["mlflow"] = {"logged": False, "reason": "the model has no MLflow run (plain export folder)"}
        result["seconds"] = round(time.time() - t0, 3)
        (out / "eval.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        if log_to_mlflow and res.mlflow_run_id:
            try:
                result["mlflow"] = log_eval_run(res, task, str(data), result,
                                                [*files.values(), out / "eval.json"], say)
            except Exception as e:  # the metrics are computed: report the failure, keep the result
                result["mlflow"] = {"logged": False, "reason": f"MLflow logging failed: {type(e).__name__}: {e}"}
        return json.loads(json.dumps(result, default=str))
    finally:
        res.cleanup()
        if not out_dir:
            shutil.rmtree(out, ignore_errors=True)
