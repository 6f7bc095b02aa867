"""The train module of ``strategy.kind: cross_attention`` (see :func:`mmtl.train.loop.make_train_module`).

:class:`FusionTaskModule` holds the frozen :class:`~mmtl.models.base.MultimodalModel` as ``self.model`` (its
towers are not run during training: the driver precomputes their tokens once), a fusion module
(:class:`~mmtl.fusion.blocks.CrossAttentionFusion` for ``strategy.fusion.kind: xattn`` or
:class:`~mmtl.fusion.blocks.LateFusion` for ``late``) and a task head (:mod:`mmtl.fusion.heads`).

Micro-batch arrays (names = ``forward`` arguments, see :func:`mmtl.train.loop.feature_batches`):
``image_tokens`` (B, N, D_v), ``text_tokens`` (B, L, D_t), ``text_mask`` (B, L), and for VQA
``answer_target`` (B, A) soft scores; for ITM optionally ``image_id`` / ``text_id`` (B,) integer ids, so that
another question about the same image, or the same text, is never drawn as a negative; ``qtype`` (B,) is
accepted and ignored.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmtl.config import CrossAttentionConfig, Pipeline
from mmtl.fusion.blocks import CrossAttentionFusion, LateFusion, masked_mean
from mmtl.fusion.heads import (ITMHead, VQAHead, itc_loss, itm_loss, known_positives, mine_hard_negatives,
                               vqa_accuracy, vqa_loss)

ITC_DIM = 256


def build_fusion(fcfg: CrossAttentionConfig, d_image: int, d_text: int) -> nn.Module:
    """The fusion module of ``strategy.fusion.kind`` for tokens of widths ``d_image`` / ``d_text``."""
    if fcfg.kind == "late":
        return LateFusion(d_image, d_text)
    return CrossAttentionFusion(d_image, d_text, n_blocks=fcfg.n_blocks, n_heads=fcfg.n_heads, ff_mult=fcfg.ff_mult,
                                dropout=fcfg.dropout, resampler_tokens=fcfg.resampler_tokens,
                                resampler_depth=fcfg.resampler_depth, max_image_tokens=fcfg.max_image_tokens,
                                self_attention=fcfg.self_attention, global_token=fcfg.global_token)


class FusionTaskModule(nn.Module):
    """Frozen towers' tokens -> fusion -> VQA or ITM head; ``forward(**micro_batch)`` is the scalar loss.

    Parameters outside ``self.model`` are the trainable ones: ``fusion.*``, ``head.*`` and, for ITM, the
    contrastive projections ``itc_image.*`` / ``itc_text.*`` / ``itc_scale`` whose similarity mines the hard
    negatives (ALBEF trains the same ITC loss next to ITM).
    """

    def __init__(self, model: nn.Module, fcfg: CrossAttentionConfig, n_answers: Optional[int] = None) -> None:
        super().__init__()
        self.model = model
        self.task = fcfg.task
        d_image, d_text = model.token_dims(fcfg.image_layer)
        self.fusion = build_fusion(fcfg, d_image, d_text)
        if fcfg.task == "vqa":
            if not n_answers or n_answers < 2:
                raise ValueError(f"VQA needs an answer vocabulary of at least 2 answers, got {n_answers}")
            self.head = VQAHead(self.fusion.out_dim, fcfg.hidden, n_answers, fcfg.dropout)
        else:
            self.head = ITMHead(self.fusion.out_dim, fcfg.hidden)
            self.itc_image = nn.Linear(d_image, ITC_DIM)
            self.itc_text = nn.Linear(d_text, ITC_DIM)
            self.itc_scale = nn.Parameter(torch.full((1,), 2.659))  # log(1 / 0.07), CLIP's initial temperature
        self._seen, self._score = 0.0, 0.0

    @classmethod
    def from_pipeline(cls, pipe: Pipeline, model: nn.Module) -> "FusionTaskModule":
        """Build from ``pipe.strategy.fusion`` (its ``answers`` must be filled for VQA: the driver does it)."""
        f = pipe.strategy.fusion
        return cls(model, f, len(f.answers) if f.answers else None)

    def fused(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """(B, N, D_v), (B, L, D_t), (B, L) -> (B, D) pooled fused features for the head."""
        pooled, _ = self.fusion(image_tokens, text_tokens, text_mask)
        return pooled

    def answer_logits(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """VQA: (B, A) answer logits."""
        return self.head(self.fused(image_tokens, text_tokens, text_mask))

    def match_logits(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """ITM: (B,) match logits of the aligned pairs (row i image with row i text)."""
        return self.head(self.fused(image_tokens, text_tokens, text_mask))

    def similarity(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """ITM: (B, B) scaled cosine similarity of the ITC projections (row: image, column: text)."""
        img = F.normalize(self.itc_image(image_tokens.mean(dim=1)), dim=-1)
        txt = F.normalize(self.itc_text(masked_mean(text_tokens, text_mask)), dim=-1)
        return self.itc_scale.exp().clamp(max=100.0) * img @ txt.t()

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor,
                answer_target: Optional[Tensor] = None, qtype: Optional[Tensor] = None,
                image_id: Optional[Tensor] = None, text_id: Optional[Tensor] = None) -> Tensor:
        if self.task == "vqa":
            if answer_target is None:
                raise ValueError("VQA training batches need `answer_target` (B, A) soft scores")
            logits = self.answer_logits(image_tokens, text_tokens, text_mask)
            with torch.no_grad():
                self._score += float(vqa_accuracy(logits, answer_target).sum())
                self._seen += logits.shape[0]
            return vqa_loss(logits, answer_target)
        return self._itm_loss(image_tokens, text_tokens, text_mask, known_positives(image_id, text_id))

    def _itm_loss(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor,
                  positive: Optional[Tensor] = None) -> Tensor:
        img = F.normalize(self.itc_image(image_tokens.mean(dim=1)), dim=-1)
        txt = F.normalize(self.itc_text(masked_mean(text_tokens, text_mask)), dim=-1)
        scale = self.itc_scale.exp().clamp(max=100.0)
        loss_itc = itc_loss(img, txt, scale, positive)
        neg_text, neg_image = mine_hard_negatives(scale * img @ txt.t(), positive=positive)
        pos = self.match_logits(image_tokens, text_tokens, text_mask)
        a, b = neg_text >= 0, neg_image >= 0  # rows whose batch holds a non-matching candidate
        neg_a = self.match_logits(image_tokens[a], text_tokens[neg_text[a]], text_mask[neg_text[a]])
        neg_b = self.match_logits(image_tokens[neg_image[b]], text_tokens[b], text_mask[b])
        neg = torch.cat([neg_a, neg_b])
        with torch.no_grad():
            self._score += float((pos > 0).sum() + (neg <= 0).sum())
            self._seen += pos.shape[0] + neg.shape[0]
        return loss_itc + itm_loss(pos, neg)

    def metrics(self) -> dict[str, float]:
        """Running training accuracy since the last call (``vqa_acc`` or ``itm_acc``), then reset."""
        if not self._seen:
            return {}
        out = {f"{self.task}_acc": self._score / self._seen}
        self._seen, self._score = 0.0, 0.0
        return out
