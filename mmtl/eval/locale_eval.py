"""``mmtl eval --task retrieval --locale xx|de,fr|all``: retrieval recall@K per caption locale.

For each locale the queries/targets are the same images with that locale's captions (``en``: the shard's
own; others: ``captions.<locale>.json`` next to the data's shards, :mod:`mmtl.data.locales`). Samples
without a caption in a locale are left out of that locale's set and counted (``missing``), never given the
English caption. Recall@K both ways as :func:`mmtl.eval.metrics.recall_at_k` (CLIP's protocol, Radford et al.
2021): image->text and text->image, on the locale's N pairs.

Metric names: ``retrieval/<locale>/image_to_text_recall_at_K``, ``.../text_to_image_recall_at_K``,
``retrieval/<locale>/num_samples``, and the unweighted means over locales ``retrieval/mean/...`` and over the
non-English ones ``retrieval/mean_non_en/...``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mmtl.eval.args import EvalError


def _encode(model, texts: list[str], batch_size: int) -> torch.Tensor:
    """(N, D) L2-normalised text embeddings, encoded in length-sorted batches."""
    from mmtl.data.locale_features import encode_by_length

    return F.normalize(encode_by_length(model.tokenize, model.encode_text, texts, batch_size), dim=-1)


def locale_retrieval(model, emb, data, spec: str, ks: Sequence[int], batch_size: int = 64) -> dict:
    """Per-locale retrieval of the embedded set ``emb`` (an :class:`~mmtl.eval.batch_infer.Embedded` with
    ``image`` (N, D), English ``text`` (N, D), ``refs`` (shard, key) and ``captions``).

    Args:
        data: the shard spec that was embedded (its folder holds the sidecars).
        spec: ``"de"``, ``"de,fr"`` or ``"all"`` (``en`` + every sidecar locale).
        ks: recall cut-offs; per locale those <= its N are used.
    Returns:
        ``{"metrics": {...}, "locales": {locale: {"num_samples", "missing", "truncated", metrics...}}}``.
    Raises:
        EvalError: an unknown locale (the message lists the available ones) or no text embeddings.
    """
    from mmtl.data.locales import ENGLISH, load_locale, resolve_locales, split_dir_of
    from mmtl.data.shardlist import resolve_shards
    from mmtl.eval.registry import evaluate_task

    if emb.text is None:
        raise EvalError("--locale needs text embeddings (task retrieval)")
    split_dir = split_dir_of(resolve_shards(data)[0])
    try:
        locales = resolve_locales(split_dir, spec)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    keys = [str(ref[1]) for ref in emb.refs]
    ctx = int(getattr(model, "context_length", 0) or 0)
    model.eval()
    table: dict[str, dict] = {}
    for loc in locales:
        if loc == ENGLISH:
            idx, texts = list(range(len(keys))), list(emb.captions)
            img, txt = emb.image, F.normalize(emb.text.float(), dim=-1)
        else:
            caps = load_locale(split_dir, loc)
            idx = [i for i, k in enumerate(keys) if k in caps]
            texts = [caps[keys[i]] for i in idx]
            if not idx:
                table[loc] = {"num_samples": 0, "missing": len(keys), "truncated": 0}
                continue
            img, txt = emb.image[idx], _encode(model, texts, batch_size)
        use = sorted({int(k) for k in ks if 0 < int(k) <= len(idx)}) or [1]
        metrics = evaluate_task("retrieval", image=img, text=txt, ks=use)
        truncated = sum(model.count_tokens(t) > ctx for t in texts) if ctx and texts else 0
        table[loc] = {**{k.split("/", 1)[1]: v for k, v in metrics.items()}, "missing": len(keys) - len(idx),
                      "truncated": int(truncated)}
    out = {f"retrieval/{loc}/{k}": float(v) for loc, row in table.items() for k, v in row.items()
           if k not in ("missing", "truncated")}
    names = sorted({k for row in table.values() for k in row if "recall_at" in k})
    for label, group in (("mean", list(table)), ("mean_non_en", [lc for lc in table if lc != ENGLISH])):
        for name in names:
            vals = [table[lc][name] for lc in group if name in table[lc]]
            if vals:
                out[f"retrieval/{label}/{name}"] = float(sum(vals) / len(vals))
    return {"metrics": out, "locales": table}
