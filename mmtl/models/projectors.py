"""Projectors from image-tower tokens to a language model's width, for the ``llava`` family
(``model.decoder.projector``).

* ``linear``: one Linear (LLaVA, Liu et al. 2023): (B, N, D_img) -> (B, N, D_llm);
* ``mlp2x_gelu``: Linear -> GELU -> Linear (LLaVA-1.5, Liu et al. 2024): (B, N, D_img) -> (B, N, D_llm);
* ``qformer``: :class:`QueryTransformer`, BLIP-2's querying transformer (Li et al. 2023, section 3.1; MiniGPT-4,
  Zhu et al. 2023, puts one Linear after it): Q learned queries, each layer
  ``q += SelfAttn(LN(q)); q += CrossAttn(LN(q), image tokens); q += FFN(LN(q))``, then LayerNorm and a Linear to
  the LLM width: (B, N, D_img) -> (B, Q, D_llm), a fixed number of image tokens whatever the tower's grid.
  Unlike BLIP-2 it starts from random weights (no BERT initialisation, no image-text pretraining stage) and is
  trained in stage (a) like the MLP.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class QueryTransformer(nn.Module):
    """BLIP-2-style Q-Former (module docstring).

    Args:
        d_image: image-token width D_img; d_out: output width (the LLM's hidden size).
        num_queries: Q, the number of learned queries (= image tokens the LLM sees).
        dim: the queries' width; layers / heads: transformer depth and attention heads (``dim % heads == 0``).

    Raises:
        ValueError: ``num_queries`` or ``layers`` below 1, or ``heads`` not dividing ``dim``.
    """

    def __init__(self, d_image: int, d_out: int, num_queries: int = 32, dim: int = 256, layers: int = 2,
                 heads: int = 8) -> None:
        super().__init__()
        if num_queries < 1 or layers < 1 or dim % heads:
            raise ValueError(f"qformer needs num_queries >= 1, layers >= 1 and heads dividing dim; got "
                             f"{num_queries}, {layers}, heads {heads} for dim {dim}")
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.media_in = nn.Linear(d_image, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm_self": nn.LayerNorm(dim), "self_attn": nn.MultiheadAttention(dim, heads, batch_first=True),
            "norm_cross": nn.LayerNorm(dim), "cross_attn": nn.MultiheadAttention(dim, heads, batch_first=True),
            "norm_ff": nn.LayerNorm(dim),
            "ff": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))}) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, d_out)

    def forward(self, image_tokens: Tensor) -> Tensor:
        """(B, N, D_img) -> (B, Q, d_out)."""
        media = self.media_in(image_tokens)
        q = self.queries.unsqueeze(0).expand(image_tokens.shape[0], -1, -1).to(media.dtype)
        for blk in self.blocks:
            h = blk["norm_self"](q)
            q = q + blk["self_attn"](h, h, h, need_weights=False)[0]
            q = q + blk["cross_attn"](blk["norm_cross"](q), media, media, need_weights=False)[0]
            q = q + blk["ff"](blk["norm_ff"](q))
        return self.out(self.norm(q))


def pixel_shuffle(tokens: Tensor, s: int) -> Tensor:
    """Fold each ``s x s`` block of a square row-major token grid into one token (space-to-depth; nanoVLM's
    modality projector, Idefics3): (B, h*w, D) -> (B, h*w / s^2, s^2 * D). ``s == 1``: unchanged.

    Raises:
        ValueError: the grid is not square or its side is not divisible by ``s``.
    """
    if s == 1:
        return tokens
    b, n, d = tokens.shape
    side = int(round(n ** 0.5))
    if side * side != n or side % s:
        raise ValueError(f"model.decoder.pixel_shuffle={s} needs a square token grid with a side divisible by {s}; "
                         f"got {n} tokens")
    x = tokens.reshape(b, side // s, s, side // s, s, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (side // s) ** 2, s * s * d)


def build_projector(kind: str, d_image: int, d_llm: int, num_queries: int = 32, qformer_layers: int = 2) -> nn.Module:
    """The projector ``kind`` (module docstring). Raises ValueError for an unknown kind."""
    if kind == "linear":
        return nn.Linear(d_image, d_llm)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(d_image, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm))
    if kind == "qformer":
        dim = min(256, d_llm - d_llm % 8) if d_llm >= 8 else d_llm
        return QueryTransformer(d_image, d_llm, num_queries, dim=dim, layers=qformer_layers,
                                heads=8 if dim % 8 == 0 else 1)
    raise ValueError(f"unknown model.decoder.projector {kind!r}; expected linear, mlp2x_gelu or qformer")
