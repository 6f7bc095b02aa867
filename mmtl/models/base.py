"""The common interface every model family builds: :class:`MultimodalModel`.

A model is two towers (image, text) producing pooled features, two heads projecting them to a shared
``embed_dim`` space, and a learnable temperature ``logit_scale`` (log space, shape ``(1,)``: DeepSpeed
cannot broadcast 0-dim parameters). The training loop only uses the methods below, so families differ only
in how towers, tokenizer and image transform are built.

Shapes: ``B`` batch, ``L`` context length, ``D_v`` / ``D_t`` tower feature widths, ``D`` ``embed_dim``.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Which = Literal["image", "text"]


def make_head(in_dim: int, out_dim: int, kind: Literal["linear", "mlp"]) -> nn.Module:
    """Projection head ``(B, in_dim) -> (B, out_dim)``.

    ``linear``: one ``nn.Linear`` without bias. ``mlp``: ``Linear(in, in) -> GELU -> Linear(in, out)`` (biases).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
    raise ValueError(f"model.head must be 'linear' or 'mlp', got {kind!r}")


def fingerprint_of(identity: dict[str, Any]) -> str:
    """Stable 24-hex-char sha256 of a JSON-able identity dict (keys sorted)."""
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class MultimodalModel(nn.Module):
    """Two towers + two heads + a temperature. Subclasses set the towers and implement the abstract methods.

    Attributes:
        image_tower, text_tower: backbones (``image_features`` / ``text_features`` run them and pool).
        image_head, text_head: projections to ``embed_dim``.
        logit_scale: ``nn.Parameter`` of shape ``(1,)``, log of the inverse temperature.
        max_logit_scale: upper clamp of ``exp(logit_scale)`` applied by :meth:`scale`.
        image_dim, text_dim, embed_dim: ``D_v``, ``D_t``, ``D``.
        image_size: square input side in pixels; context_length: tokens per text ``L``.
    """

    image_tower: nn.Module
    text_tower: nn.Module
    image_head: nn.Module
    text_head: nn.Module

    def __init__(
        self,
        *,
        image_dim: int,
        text_dim: int,
        embed_dim: int,
        head: Literal["linear", "mlp"] = "linear",
        init_logit_scale: float,
        max_logit_scale: float,
        image_size: int,
        context_length: int,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_dim, self.text_dim, self.embed_dim = int(image_dim), int(text_dim), int(embed_dim)
        self.image_size, self.context_length = int(image_size), int(context_length)
        self.image_head = make_head(self.image_dim, self.embed_dim, head)
        self.text_head = make_head(self.text_dim, self.embed_dim, head)
        self.head_dropout = nn.Dropout(float(head_dropout))  # on tower features, training mode only
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        self.max_logit_scale = float(max_logit_scale)

    # ---- to implement per family -------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        """Pooled image-tower output. ``images`` (B,3,H,W) float, normalised -> (B, D_v)."""
        raise NotImplementedError

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Pooled text-tower output. ``input_ids``, ``attention_mask`` (B,L) long -> (B, D_t)."""
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """``texts`` -> ``dict(input_ids=(B,L) long, attention_mask=(B,L) long)``, L = context_length."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` including special tokens, without truncation."""
        raise NotImplementedError

    def image_transform(self, train: bool) -> Callable[[Any], Tensor]:
        """A picklable callable: PIL RGB image -> normalised (3, image_size, image_size) float tensor."""
        raise NotImplementedError

    def fingerprint(self, which: Which) -> str:
        """Stable hash of the tower identity (architecture, weights content, input size, pooling)."""
        raise NotImplementedError

    # ---- token-level features (fusion), see mmtl.models.tokens --------------------------------------
    def image_tokens(self, images: Tensor, layer: int = -1) -> Tensor:
        """(B,3,H,W) normalised float -> (B, N, D_v) image-tower tokens before pooling (patches / grid cells);
        ``layer`` -1: the final tokens, -k: an intermediate stage / block (:mod:`mmtl.models.tokens`)."""
        from mmtl.models.tokens import image_tokens

        return image_tokens(self, images, layer)

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,L) ids + mask -> (B, L, D_t) text-tower token states (padding where ``attention_mask`` is 0)."""
        from mmtl.models.tokens import text_tokens

        return text_tokens(self, input_ids, attention_mask)

    def token_dims(self, layer: int = -1) -> tuple[int, int]:
        """``(D_v, D_t)``: the widths of :meth:`image_tokens` (of level ``layer``) and :meth:`text_tokens`."""
        from mmtl.models.tokens import token_dims

        return token_dims(self, layer)

    # ---- shared ------------------------------------------------------------------------------------
    def scale(self) -> Tensor:
        """Inverse temperature ``exp(logit_scale)`` clamped to ``<= max_logit_scale``; shape (1,)."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def project_image(self, feats: Tensor) -> Tensor:
        """(B, D_v) tower features (e.g. cached frozen features) -> (B, D) L2-normalised embeddings."""
        return F.normalize(self.image_head(self.head_dropout(feats)), dim=-1)

    def project_text(self, feats: Tensor) -> Tensor:
        """(B, D_t) tower features -> (B, D) L2-normalised embeddings."""
        return F.normalize(self.text_head(self.head_dropout(feats)), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        """(B,3,H,W) float -> (B, D) L2-normalised image embeddings."""
        return self.project_image(self.image_features(images))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,L) ids and mask -> (B, D) L2-normalised text embeddings."""
        return self.project_text(self.text_features(input_ids, attention_mask))

    def forward(
        self,
        images: Optional[Tensor] = None,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Return ``(encode_image(images), encode_text(input_ids, attention_mask))``; a side is ``None``
        when its inputs are ``None``. Use :meth:`scale` for the temperature."""
        img = self.encode_image(images) if images is not None else None
        if input_ids is not None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            txt = self.encode_text(input_ids, mask)
        else:
            txt = None
        return img, txt
