"""Captioning evaluation: BLEU-4 and CIDEr-D (``pycocoevalcap``), exact-caption accuracy, the nearest-neighbour
baseline and a PNG gallery.

* :func:`caption_metrics`: ``captioning/bleu4`` (Papineni et al. 2002, corpus-level BLEU with the brevity
  penalty, pycocoevalcap's ``Bleu(4)``), ``captioning/cider_d`` (Vedantam et al. 2015, CIDEr-D: TF-IDF n-gram
  cosine for n = 1..4 with clipped candidate counts and a Gaussian length penalty (sigma 6), x10;
  pycocoevalcap's ``Cider``; document frequencies come from the evaluated set's references) and
  ``captioning/exact_match`` (normalised generated == normalised reference: on emoji, the exact CLDR name).
  Texts are normalised as pycocoevalcap's PTB tokenizer does (lower case, punctuation tokens dropped) by
  :func:`normalize_caption`, in Python: the PTB tokenizer, METEOR and SPICE need Java and are **not** run.
* :func:`nearest_neighbour_captions`: Devlin et al. 2015 ("Language models for image captioning: the quirks
  and what works"), k = 1: each test image gets the caption of the training image closest by cosine similarity
  of frozen image-tower features (mean of the image tokens), on the same split.
* :func:`write_gallery`: image, reference and generated caption side by side (PIL, no matplotlib needed).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from mmtl.models.caption_retrieval import pooled_features, top_k_neighbours

#: pycocoevalcap's PTBTokenizer drops these tokens (``tokenizer/ptbtokenizer.py``).
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
               "...", ";"}
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|\.\.\.|--|[^\sa-z0-9]")


def normalize_caption(text: str) -> str:
    """Lower case, split into word and punctuation tokens, drop PTB punctuation, join with single spaces
    (``"Keycap: #"`` -> ``"keycap #"``)."""
    return " ".join(t for t in _TOKEN.findall(text.lower()) if t not in PUNCTUATION)


def caption_metrics(references: Sequence[str | Sequence[str]], generated: Sequence[str],
                    prefix: str = "captioning/") -> dict:
    """Corpus metrics of ``generated`` (one caption per image) against each image's references (same order).

    Args:
        references: per image one reference or a list of them (COCO: 5 per image; group samples of one image
            with :func:`group_references` first, or BLEU and CIDEr count the image several times).
        generated: one caption per image.
    Returns:
        ``{prefix + "bleu4", "bleu1", "cider_d", "exact_match", "num_samples", "empty_reference",
        "empty_prediction", "unscored"}``: BLEU and exact match (the generated caption equals one of the
        references, normalised) in [0, 1], CIDEr-D in [0, 10]; ``num_samples`` the images scored. Rules, counted:
        a reference empty after normalisation (e.g. ``"..."``) is dropped (``empty_reference``); an image left
        without any reference is not scored (``unscored``); an empty generated caption is scored as empty (it
        lowers BLEU and CIDEr) and counted (``empty_prediction``). ``cider_d`` is None (undefined) on fewer than
        2 scored images - its IDF weights come from the evaluated set, so on one image every n-gram has
        IDF 0 and any caption, even an exact one, would score 0 - with the reason in ``cider_d_undefined``;
        all metrics are None when no image can be scored.

    Raises:
        ValueError: lengths differ or are 0.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(references) != len(generated) or not references:
        raise ValueError(f"need as many generated captions as references (>= 1), got {len(generated)} and "
                         f"{len(references)}")
    gts, res, empty_ref = {}, {}, 0
    for i, (refs, g) in enumerate(zip(references, generated)):
        refs = [normalize_caption(r) for r in ([refs] if isinstance(refs, str) else refs)]
        empty_ref += sum(1 for r in refs if not r)
        if any(refs):
            gts[i], res[i] = [r for r in refs if r], [normalize_caption(g)]
    n = len(gts)
    out = {f"{prefix}num_samples": float(n), f"{prefix}empty_reference": float(empty_ref),
           f"{prefix}empty_prediction": float(sum(1 for h in res.values() if not h[0])),
           f"{prefix}unscored": float(len(references) - n)}
    if n == 0:
        return {f"{prefix}bleu4": None, f"{prefix}bleu1": None, f"{prefix}cider_d": None,
                f"{prefix}exact_match": None, f"{prefix}cider_d_undefined": "no image has a non-empty reference",
                **out}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    exact = float(np.mean([res[i][0] in gts[i] for i in gts]))
    out.update({f"{prefix}bleu4": float(bleu[3]), f"{prefix}bleu1": float(bleu[0]), f"{prefix}exact_match": exact})
    if n < 2:
        out.update({f"{prefix}cider_d": None, f"{prefix}cider_d_undefined": "needs at least 2 images (its IDF "
                                                                         "comes from the evaluated set)"})
    else:
        out[f"{prefix}cider_d"] = float(Cider().compute_score(gts, res)[0])
    return out


def group_references(image_ids: Sequence[str], references: Sequence[str]) -> tuple[list[int], list[list[str]]]:
    """Samples of one image -> one entry: ``(index of each image's first sample, its references in sample
    order)``, images in order of first appearance (e.g. 5 COCO references stored as 5 samples -> 1 image)."""
    group: dict[str, int] = {}
    first: list[int] = []
    refs: list[list[str]] = []
    for i, (iid, r) in enumerate(zip(image_ids, references)):
        if iid not in group:
            group[iid] = len(first)
            first.append(i)
            refs.append([])
        refs[group[iid]].append(r)
    return first, refs


def normalized_images(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 ``(x / 255 - mean) / std`` (the eval transform's output)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def generate_all(generate: Callable[[torch.Tensor], list[str]], pixels: np.ndarray, mean, std,
                 batch_size: int = 32) -> list[str]:
    """Captions of all N images ``pixels`` (N, S, S, 3) uint8, ``batch_size`` at a time."""
    out: list[str] = []
    for i in range(0, len(pixels), batch_size):
        out += generate(normalized_images(pixels[i:i + batch_size], mean, std))
    return out


@torch.no_grad()
def image_features(image_tokens: Callable[[torch.Tensor], torch.Tensor], pixels: np.ndarray, mean, std,
                   batch_size: int = 64) -> torch.Tensor:
    """(N, D) L2-normalised mean image tokens of ``pixels`` (``image_tokens``: images -> (B, N_tok, D))."""
    return torch.cat([pooled_features(image_tokens, normalized_images(pixels[i:i + batch_size], mean, std))
                      for i in range(0, len(pixels), batch_size)])


def nearest_neighbour_captions(train_feat: torch.Tensor, train_captions: Sequence[str],
                               query_feat: torch.Tensor) -> list[str]:
    """Devlin et al. 2015 (k = 1): for each query (Q, D) the caption of the most cosine-similar training image
    among (N, D) (features already L2-normalised)."""
    best = top_k_neighbours(query_feat, train_feat, 1)[:, 0].tolist()
    return [train_captions[j] for j in best]


def write_gallery(path: Path, pixels: np.ndarray, references: Sequence[str], generated: Sequence[str],
                  baseline: Optional[Sequence[str]] = None, n: int = 16, cell: int = 96) -> Path:
    """A PNG of the first ``n`` images (evenly spaced over the set), each row: the image, its reference, the
    generated caption (and the baseline's). Returns ``path``."""
    from PIL import Image, ImageDraw

    n = min(n, len(pixels))
    idx = np.linspace(0, len(pixels) - 1, n).round().astype(int) if n else []
    width, row_h = cell + 620, cell + 8
    canvas = Image.new("RGB", (width, max(1, n) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, i in enumerate(idx):
        y = r * row_h + 4
        canvas.paste(Image.fromarray(pixels[i]).resize((cell, cell)), (4, y))
        lines = [f"ref:  {references[i]}", f"gen:  {generated[i]}"]
        if baseline is not None:
            lines.append(f"nn:   {baseline[i]}")
        ok = (normalize_caption(references[i]) == normalize_caption(generated[i]))
        for k, line in enumerate(lines):
            colour = (0, 120, 0) if (k == 1 and ok) else (0, 0, 0)
            draw.text((cell + 14, y + 6 + 18 * k), line[:95], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
