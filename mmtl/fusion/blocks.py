"""Fusion layers over frozen tower tokens: Flamingo-style gated cross-attention, a Perceiver resampler, and the
late-fusion baseline.

Sources:
  * Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning" (NeurIPS), section 2.2 and
    figure 4: GATED XATTN-DENSE blocks, where text queries attend to visual tokens and a ``tanh(alpha)`` gate
    with ``alpha`` initialised at 0 multiplies the cross-attention and the feed-forward residuals, so at
    initialisation the block is the identity and the frozen language path is unchanged.
  * Jaegle et al. 2021, "Perceiver: General Perception with Iterative Attention" (ICML), as used in Flamingo's
    Perceiver Resampler (Alayrac et al. 2022, figure 5): a fixed set of learned latents cross-attends to the
    concatenation of visual tokens and latents, giving a fixed number of visual tokens.

Differences from Flamingo: the towers run once (their outputs can be cached), so the K gated blocks are stacked
*after* the last text layer instead of being interleaved between frozen LM layers; visual tokens get a learned
position embedding (one row per token index) because a CNN grid flattened into tokens carries no position.

Shapes: ``B`` batch, ``L`` text tokens, ``N`` image tokens, ``D_v`` / ``D_t`` token widths, ``R`` resampler
latents.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def feed_forward(dim: int, mult: int, dropout: float = 0.0) -> nn.Sequential:
    """Pre-norm-free MLP ``(…, dim) -> (…, dim)``: Linear(dim, mult*dim) -> GELU -> Dropout -> Linear."""
    return nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim))


def _check_heads(dim: int, n_heads: int) -> None:
    if dim % n_heads:
        raise ValueError(f"strategy.fusion.n_heads={n_heads} must divide the token width {dim}")


class GatedCrossAttentionBlock(nn.Module):
    """One Flamingo GATED XATTN-DENSE block (text queries, image keys/values), dimension ``dim`` throughout:

        x = x + tanh(alpha_xattn) * MHA(LN(x), media, media)
        x = x + tanh(alpha_self) * MHA(LN(x), x, x)          (only with ``self_attention``)
        x = x + tanh(alpha_dense) * FFW(LN(x))

    ``alpha_*`` are parameters of shape (1,) initialised at 0 (identity at step 0). ``self_attention`` adds the
    text self-attention that Flamingo gets from the frozen LM layer following each gated block (and that
    ALBEF / BLIP's multimodal encoder layers have): without it every text token attends to the image on its
    own and the tokens only meet in the final pooling.

    forward: ``x`` (B, L, dim) text tokens, ``media`` (B, N, dim) image tokens, ``media_mask`` (B, N) bool
    (True = attend) or None, ``text_mask`` (B, L) (1 = real token) or None -> (B, L, dim).
    """

    def __init__(self, dim: int, n_heads: int, ff_mult: int = 2, dropout: float = 0.0,
                 self_attention: bool = False) -> None:
        super().__init__()
        _check_heads(dim, n_heads)
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        if self_attention:
            self.norm_self = nn.LayerNorm(dim)
            self.self_attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
            self.self_gate = nn.Parameter(torch.zeros(1))
        else:
            self.self_attn = None
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = feed_forward(dim, ff_mult, dropout)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, media: Tensor, media_mask: Optional[Tensor] = None,
                text_mask: Optional[Tensor] = None) -> Tensor:
        pad = None if media_mask is None else ~media_mask.bool()
        a, _ = self.attn(self.norm_attn(x), media, media, key_padding_mask=pad, need_weights=False)
        x = x + torch.tanh(self.attn_gate) * a
        if self.self_attn is not None:
            h = self.norm_self(x)
            text_pad = None if text_mask is None else ~text_mask.bool()
            a, _ = self.self_attn(h, h, h, key_padding_mask=text_pad, need_weights=False)
            x = x + torch.tanh(self.self_gate) * a
        return x + torch.tanh(self.ff_gate) * self.ff(self.norm_ff(x))


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver Resampler: ``R`` learned latents, ``depth`` layers of

        latents = latents + MHA(LN(latents), LN([media; latents]))
        latents = latents + FFW(LN(latents))

    forward: ``media`` (B, N, dim) -> (B, R, dim) (layer-normed). Any N in, always R out.
    """

    def __init__(self, dim: int, n_latents: int, depth: int = 1, n_heads: int = 8, ff_mult: int = 2) -> None:
        super().__init__()
        _check_heads(dim, n_heads)
        if n_latents < 1 or depth < 1:
            raise ValueError(f"PerceiverResampler needs n_latents >= 1 and depth >= 1, got {n_latents}, {depth}")
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim), nn.MultiheadAttention(dim, n_heads, batch_first=True),
                           nn.LayerNorm(dim), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: Tensor) -> Tensor:
        lat = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for norm_m, norm_l, attn, norm_ff, ff in self.layers:
            q = norm_l(lat)
            kv = torch.cat([norm_m(media), q], dim=1)
            lat = lat + attn(q, kv, kv, need_weights=False)[0]
            lat = lat + ff(norm_ff(lat))
        return self.norm(lat)


def masked_mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """(B, L, D) tokens, (B, L) mask (1 = real) or None -> (B, D) mean over the real tokens."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class CrossAttentionFusion(nn.Module):
    """Image tokens [+ their mean as a global token] -> LN + Linear(D_v, D_t) + learned position embedding
    [-> Perceiver resampler] -> K gated cross-attention blocks over the frozen text tokens -> masked mean pool.

    ``global_token`` appends the mean image token (for a CNN grid: exactly the tower's pooled embedding, what
    late fusion sees; ViT towers often carry such a token already, e.g. CLIP's class token), so the question
    can attend to the whole-image summary as well as to its parts.

    forward: ``image_tokens`` (B, N, D_v), ``text_tokens`` (B, L, D_t), ``text_mask`` (B, L) ->
    ``(pooled (B, D_t), fused tokens (B, L, D_t))``. With every gate at 0, ``fused == text_tokens`` exactly.

    Raises:
        ValueError: ``n_heads`` does not divide ``D_t``; N > ``max_image_tokens``.
    """

    def __init__(self, d_image: int, d_text: int, *, n_blocks: int = 2, n_heads: int = 8, ff_mult: int = 2,
                 dropout: float = 0.0, resampler_tokens: int = 0, resampler_depth: int = 1,
                 max_image_tokens: int = 256, self_attention: bool = False, global_token: bool = False) -> None:
        super().__init__()
        _check_heads(d_text, n_heads)
        self.out_dim = int(d_text)
        self.global_token = bool(global_token)
        self.media_proj = nn.Sequential(nn.LayerNorm(d_image), nn.Linear(d_image, d_text))
        self.pos = nn.Parameter(torch.randn(max_image_tokens, d_text) * 0.02)
        self.resampler = (PerceiverResampler(d_text, resampler_tokens, resampler_depth, n_heads, ff_mult)
                          if resampler_tokens > 0 else None)
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(d_text, n_heads, ff_mult, dropout, self_attention)
                                    for _ in range(n_blocks))

    def media(self, image_tokens: Tensor) -> Tensor:
        """(B, N, D_v) -> (B, N [+1] or R, D_t) keys/values for the gated blocks."""
        if self.global_token:  # the tokens' mean (a CNN grid's pooled embedding) as one more token, last
            image_tokens = torch.cat([image_tokens, image_tokens.mean(dim=1, keepdim=True)], dim=1)
        n = image_tokens.shape[1]
        if n > self.pos.shape[0]:
            raise ValueError(f"{n} image tokens > strategy.fusion.max_image_tokens={self.pos.shape[0]}")
        m = self.media_proj(image_tokens) + self.pos[:n]
        return self.resampler(m) if self.resampler is not None else m

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        media = self.media(image_tokens)
        x = text_tokens
        for blk in self.blocks:
            x = blk(x, media, text_mask=text_mask)
        return masked_mean(x, text_mask), x


class LateFusion(nn.Module):
    """The late-fusion baseline: pooled image tokens (mean) and pooled text tokens (masked mean), each layer-
    normed, concatenated. A task head (an MLP) on top makes it "MLP on concatenated pooled embeddings".

    forward: ``image_tokens`` (B, N, D_v), ``text_tokens`` (B, L, D_t), ``text_mask`` (B, L) ->
    ``(pooled (B, D_v + D_t), None)``.
    """

    def __init__(self, d_image: int, d_text: int) -> None:
        super().__init__()
        self.out_dim = int(d_image + d_text)
        self.norm_image, self.norm_text = nn.LayerNorm(d_image), nn.LayerNorm(d_text)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Optional[Tensor]) -> tuple[Tensor, None]:
        img = self.norm_image(image_tokens.mean(dim=1))
        txt = self.norm_text(masked_mean(text_tokens, text_mask))
        return torch.cat([img, txt], dim=-1), None
