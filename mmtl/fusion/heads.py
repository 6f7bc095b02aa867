"""Task heads and losses on fused features: VQA as answer classification, image-text matching (ITM).

VQA (Antol et al. 2015, "VQA: Visual Question Answering"; Goyal et al. 2017, "Making the V in VQA Matter"):
the answer to a question is a class of a fixed answer vocabulary of ``A`` answers. With several reference
answers per question each answer gets the soft score ``min(1, n_a / 3)`` (``n_a`` = how many references gave
it); mmtl generalises the 3 to ``min(3, number of references)``, so one reference scores 1 and two different
references 0.5 each. Training uses binary cross-entropy on the soft scores (Teney et al. 2018, "Tips and
Tricks for Visual Question Answering"), summed over answers and averaged over questions; accuracy of a
prediction is the soft score of the predicted (argmax) answer.

ITM (Li et al. 2021, "Align before Fuse", ALBEF, section 3.2): a binary "does this text match this image"
logit on the fused features; for each image one negative text and for each text one negative image are drawn
from the batch with probability ``softmax(similarity)`` over the non-matching pairs (hard negatives mined
from the contrastive similarity), and the loss is binary cross-entropy over the B positives and 2B negatives.

Shapes: ``B`` questions / pairs, ``A`` answers, ``D`` fused feature width.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---- VQA ----------------------------------------------------------------------------------------------
def soft_scores(answers: Sequence[str], vocab: dict[str, int]) -> np.ndarray:
    """(A,) float32 soft target of one question: ``min(1, n_a / min(3, len(answers)))`` per answer ``a`` in
    ``vocab`` (answer -> index); answers outside the vocabulary are dropped (the row may be all zeros)."""
    out = np.zeros(len(vocab), dtype=np.float32)
    if not answers:
        return out
    denom = min(3, len(answers))
    for a, n in Counter(answers).items():
        if a in vocab:
            out[vocab[a]] = min(1.0, n / denom)
    return out


def build_vocab(answer_lists: Iterable[Sequence[str]], max_answers: int) -> list[str]:
    """The ``max_answers`` most frequent answers (ties broken alphabetically, for determinism).

    Raises:
        ValueError: fewer than 2 distinct answers.
    """
    counts: Counter = Counter()
    for answers in answer_lists:
        counts.update(set(answers))
    vocab = [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_answers]]
    if len(vocab) < 2:
        raise ValueError(f"the answer vocabulary needs at least 2 answers, the data has {vocab}")
    return vocab


class VQAHead(nn.Module):
    """MLP ``(B, D) -> (B, A)`` answer logits: Linear(D, hidden) -> GELU -> LayerNorm -> Dropout -> Linear."""

    def __init__(self, d_in: int, hidden: int, n_answers: int, dropout: float = 0.0) -> None:
        super().__init__()
        if n_answers < 2:
            raise ValueError(f"VQAHead needs at least 2 answers, got {n_answers}")
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_answers))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def vqa_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Scalar: binary cross-entropy of ``logits`` (B, A) against soft scores ``target`` (B, A), summed over
    answers, averaged over questions."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="sum") / logits.shape[0]


def vqa_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """(B,) VQA accuracy per question: the soft score of the argmax answer."""
    return target.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1).float()


def per_type_accuracy(scores: Sequence[float], qtypes: Sequence[str]) -> dict[str, float]:
    """Mean of ``scores`` per question type plus ``overall``: ``{"overall": .., "<type>": ..}``."""
    if len(scores) != len(qtypes):
        raise ValueError(f"{len(scores)} scores but {len(qtypes)} question types")
    by: dict[str, list[float]] = defaultdict(list)
    for s, t in zip(scores, qtypes):
        by[str(t)].append(float(s))
    out = {"overall": float(np.mean(scores)) if len(scores) else float("nan")}
    out.update({t: float(np.mean(v)) for t, v in sorted(by.items())})
    return out


# ---- ITM ----------------------------------------------------------------------------------------------
class ITMHead(nn.Module):
    """MLP ``(B, D) -> (B,)`` match logit: Linear(D, hidden) -> GELU -> LayerNorm -> Linear(hidden, 1)."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def mine_hard_negatives(sim: Tensor, generator: Optional[torch.Generator] = None,
                        positive: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """ALBEF hard negatives from an image-text similarity ``sim`` (B, B) (row i: image i vs every text; the
    diagonal holds the matching pairs).

    ``positive`` (B, B) bool marks further pairs known to match (another question about the same image,
    the same text on another image); the diagonal is always positive. Positives are never drawn.

    Returns ``(neg_text (B,), neg_image (B,))``: for image i the index of a non-matching text drawn with
    probability ``softmax(sim[i])`` restricted to non-positive j, and for text j a non-matching image drawn
    from ``softmax(sim[:, j])``; -1 where a row has no non-positive candidate. No gradient flows through the
    draw.

    Raises:
        ValueError: ``sim`` is not square, B < 2, or ``positive`` has another shape.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be (B, B), got {tuple(sim.shape)}")
    b = sim.shape[0]
    if b < 2:
        raise ValueError("ITM hard negatives need a batch of at least 2 pairs")
    s = sim.detach().float()
    pos = torch.eye(b, dtype=torch.bool, device=s.device)
    if positive is not None:
        if positive.shape != (b, b):
            raise ValueError(f"positive must be ({b}, {b}), got {tuple(positive.shape)}")
        pos = pos | positive.bool().to(s.device)

    def draw(scores: Tensor, mask: Tensor) -> Tensor:
        ok = ~mask.all(dim=1)
        out = torch.full((b,), -1, dtype=torch.long, device=s.device)
        if ok.any():
            w = F.softmax(scores[ok].masked_fill(mask[ok], float("-inf")), dim=1)
            out[ok] = torch.multinomial(w, 1, generator=generator).squeeze(1)
        return out

    return draw(s, pos), draw(s.t(), pos.t())


def known_positives(image_id: Optional[Tensor], text_id: Optional[Tensor]) -> Optional[Tensor]:
    """(B, B) bool: pairs (i, j) with the same image id or the same text id (either may be None); None if both
    are None. Ids are (B,) integer tensors."""
    out = None
    for ids in (image_id, text_id):
        if ids is not None:
            same = ids.view(-1, 1) == ids.view(1, -1)
            out = same if out is None else out | same
    return out


def itm_loss(pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
    """Scalar: mean binary cross-entropy over positives (label 1) and negatives (label 0) together."""
    logits = torch.cat([pos_logits, neg_logits])
    labels = torch.cat([torch.ones_like(pos_logits), torch.zeros_like(neg_logits)])
    return F.binary_cross_entropy_with_logits(logits, labels)


def itc_loss(image: Tensor, text: Tensor, scale: Tensor, positive: Optional[Tensor] = None) -> Tensor:
    """Symmetric InfoNCE over the batch (CLIP/ALBEF ITC): ``image``, ``text`` (B, D) L2-normalised. With
    ``positive`` (B, B) bool (diagonal implied), the target of a row is spread evenly over its positives (ALBEF's
    retrieval fine-tuning treats pairs of the same image id this way)."""
    logits = scale * image @ text.t()
    b = image.shape[0]
    if positive is None:
        labels = torch.arange(b, device=image.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    pos = positive.bool().to(image.device) | torch.eye(b, dtype=torch.bool, device=image.device)
    target = pos.float() / pos.float().sum(1, keepdim=True)
    target_t = pos.t().float() / pos.t().float().sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target_t)) / 2
