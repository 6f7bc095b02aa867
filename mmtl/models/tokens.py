"""Token-level tower outputs for every model family, for fusion modules (:mod:`mmtl.fusion`).

:meth:`MultimodalModel.image_tokens` / :meth:`~MultimodalModel.text_tokens` / :meth:`~MultimodalModel.token_dims`
call :func:`image_tokens` / :func:`text_tokens` / :func:`token_dims` here, which ask the model's family (its
:class:`~mmtl.models.family.TokenFeatures` capability, :mod:`mmtl.models.registry`). The per-backbone extractors
below (timm, open_clip, transformers CLIP/SigLIP) are what the built-in families use:

* ``two_tower``: image tokens are the timm ``forward_features`` map before global pooling, flattened row by row
  (a CNN's (B, C, h, w) grid -> (B, h*w, C): EfficientNet-Lite0 gives 1,280-d tokens on a (S/32)^2 grid, 5x5 at
  160 px; a timm ViT's prefix tokens are dropped). Their mean is exactly the pooled ``image_features`` of
  an EfficientNet. Text tokens are the encoder's ``last_hidden_state`` (B, L, D_t); their masked mean is the
  mean-pooled ``text_features``.
* ``hf`` (transformers CLIP / SigLIP): ``vision_model(...).last_hidden_state`` (CLIP keeps its class token
  first) and ``text_model(...).last_hidden_state`` (after the final layer norm), at the towers' hidden widths,
  before any projection.
* ``open_clip``: ViT patch tokens after ``ln_post`` (``VisionTransformer._pool``'s ``tokens``, width
  ``transformer.width``) and text token states after ``ln_final``, before pooling and projection. ModifiedResNet
  and timm-trunk image towers are refused (ValueError).

Intermediate levels (``layer``, ``strategy.fusion.image_layer``): ``-1`` is the final tokens above; ``-k``
(k >= 2) is the output of the (k-1)-th last stage / block of the image tower, counted from the end of
``[stage or block outputs ..., final tokens]``: for a timm CNN its feature-pyramid stages (``feature_info``;
EfficientNet-Lite0: -2 = stride 32 / 320-d, -3 = stride 16 / 112-d, a 12x12 grid at 192 px), for ViTs the
transformer blocks without the final norm (-2 = last block, -3 = the penultimate one that LLaVA uses; hf keeps
CLIP's class token, open_clip and timm drop prefix tokens). Lower levels see less of the image per token (a
smaller receptive field), which helps questions about where things are and how many there are.

Shapes: ``images`` (B, 3, S, S) normalised float; ``input_ids``, ``attention_mask`` (B, L) long (right padded);
image tokens (B, N, D_v); text tokens (B, L, D_t) aligned with ``attention_mask`` (1 = real token).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _token_features(model, what: str):
    """The :class:`~mmtl.models.family.TokenFeatures` of ``model``'s family; ValueError when it has none."""
    from mmtl.models.family import TokenFeatures, capability
    from mmtl.models.registry import family_of

    fam = family_of(model)
    feats = capability(fam, TokenFeatures)
    if feats is None:
        raise ValueError(f"{what}: model family {fam.name!r} has no token features")
    return feats


def _check_ids(input_ids: Tensor, attention_mask: Tensor) -> None:
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be (B, L)")


def level_index(n_levels: int, layer: int) -> int:
    """0-based stage / block index of ``layer`` among ``n_levels`` (-2 -> the last one, -3 -> the one before).

    Raises:
        ValueError: ``layer`` is -1 or above (the final tokens are no intermediate level), or below
            ``-(n_levels + 1)``.
    """
    if layer >= -1 or layer < -(n_levels + 1):
        raise ValueError(f"image_layer={layer}: this image tower has {n_levels} stages/blocks, so an intermediate "
                         f"layer is -2 .. -{n_levels + 1} (-1 = the final tokens)")
    return n_levels + layer + 1


def grid_to_tokens(x: Tensor) -> Tensor:
    """(B, C, h, w) feature map -> (B, h*w, C) tokens, row-major."""
    return x.flatten(2).transpose(1, 2)


# ---- timm image towers (two_tower) ----------------------------------------------------------------------
def _timm_levels(tower: nn.Module) -> int:
    blocks = getattr(tower, "blocks", None)
    if getattr(tower, "feature_info", None) is not None and not hasattr(tower, "patch_embed"):
        return len(tower.feature_info)  # CNN stages
    if blocks is not None:
        return len(blocks)  # ViT blocks
    raise ValueError(f"timm tower {type(tower).__name__} exposes no stages or blocks for image_layer")


def timm_image_tokens(tower: nn.Module, images: Tensor, layer: int = -1) -> Tensor:
    """(B, 3, S, S) -> (B, N, C) tokens of a timm model: ``forward_features`` (CNN grid flattened row by row, ViT
    prefix tokens dropped) for ``layer`` -1, else ``forward_intermediates`` of that stage / block.

    Raises:
        ValueError: no ``forward_intermediates`` for ``layer != -1``, ``layer`` out of range, or an output that
            is neither (B, C, h, w) nor (B, N, C).
    """
    if layer != -1:
        if not hasattr(tower, "forward_intermediates"):
            raise ValueError(f"timm tower {type(tower).__name__} has no forward_intermediates: use image_layer=-1")
        idx = level_index(_timm_levels(tower), layer)
        return grid_to_tokens(tower.forward_intermediates(images, indices=[idx], intermediates_only=True)[0])
    x = tower.forward_features(images)
    if x.dim() == 4:  # CNN feature map (B, C, h, w) -> (B, h*w, C), row-major grid
        return grid_to_tokens(x)
    if x.dim() == 3:  # ViT-like (B, prefix + N, C)
        return x[:, int(getattr(tower, "num_prefix_tokens", 0)):]
    raise ValueError(f"timm forward_features returned shape {tuple(x.shape)}; expected (B,C,h,w) or (B,N,C)")


def timm_token_dim(tower: nn.Module, layer: int = -1) -> int:
    """Width C of :func:`timm_image_tokens` at ``layer`` (no forward pass); ValueError like it."""
    if layer == -1:
        return int(tower.num_features)
    idx = level_index(_timm_levels(tower), layer)
    if hasattr(tower, "patch_embed"):  # ViT blocks keep the embedding width
        return int(tower.embed_dim)
    return int(tower.feature_info[idx]["num_chs"])


# ---- open_clip ----------------------------------------------------------------------------------------
def open_clip_image_tokens(visual: nn.Module, images: Tensor, layer: int = -1) -> Tensor:
    """(B, 3, S, S) -> (B, N, width) patch tokens of an open_clip ``VisionTransformer`` (after ``ln_post`` for
    ``layer`` -1, else the block output of that level, prefix tokens dropped).

    Raises:
        ValueError: not a VisionTransformer (ModifiedResNet, timm trunk), or ``layer`` out of range.
    """
    if not all(hasattr(visual, a) for a in ("_embeds", "transformer", "_pool")):
        raise ValueError(f"open_clip image tower {type(visual).__name__} has no patch tokens in mmtl "
                         "(only VisionTransformer towers are supported)")
    if layer != -1:
        idx = level_index(len(visual.transformer.resblocks), layer)
        out = visual.forward_intermediates(images, indices=[idx], intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]
    x = visual.transformer(visual._embeds(images))
    _, tokens = visual._pool(x)
    return tokens


def open_clip_text_tokens(tower: nn.Module, input_ids: Tensor) -> Tensor:
    """(B, L) ids -> (B, L, width) states after ``ln_final`` of an mmtl open_clip text tower
    (:class:`~mmtl.models.open_clip_text.OpenClipTextTower` or ``OpenClipCustomTextTower``).

    Raises:
        ValueError: a non-causal CLIP-layout tower given fewer than ``context_length`` tokens.
    """
    n = input_ids.shape[1]
    if hasattr(tower, "text"):  # OpenClipCustomTextTower: a TextTransformer, full context length
        text = tower.text
        pad = tower.context_length - n
        ids = torch.nn.functional.pad(input_ids, (0, pad), value=getattr(text, "pad_id", 0)) if pad > 0 else input_ids
        old = text.output_tokens
        text.output_tokens = True
        try:
            _, tokens = text(ids)
        finally:
            text.output_tokens = old
        return tokens[:, :n]
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(input_ids).to(cast) + tower.positional_embedding[:n].to(cast)
    mask = tower.attn_mask[:n, :n] if tower.attn_mask is not None else None
    if mask is None and n != tower.context_length:
        raise ValueError("non-causal open_clip text towers need full-length inputs")
    return tower.ln_final(tower.transformer(x, attn_mask=mask))


def open_clip_token_dims(visual: nn.Module, text_tower: nn.Module, layer: int = -1) -> tuple[int, int]:
    """``(D_v, D_t)``: transformer widths of the open_clip image and text towers; ValueError like
    :func:`open_clip_image_tokens`."""
    if not hasattr(visual, "transformer"):
        raise ValueError(f"open_clip image tower {type(visual).__name__} has no patch tokens in mmtl")
    if layer != -1:
        level_index(len(visual.transformer.resblocks), layer)
    tt = text_tower.text.transformer if hasattr(text_tower, "text") else text_tower.transformer
    return int(visual.transformer.width), int(tt.width)


# ---- transformers CLIP / SigLIP (hf) --------------------------------------------------------------------
def hf_image_tokens(vision_model: nn.Module, images: Tensor, layer: int = -1) -> Tensor:
    """(B, 3, S, S) -> (B, N, hidden) ``vision_model`` states: ``last_hidden_state`` for ``layer`` -1 (CLIP keeps
    its class token first), else the output of that encoder layer. Raises ValueError: ``layer`` out of range."""
    if layer == -1:
        return vision_model(pixel_values=images).last_hidden_state
    idx = level_index(int(vision_model.config.num_hidden_layers), layer)
    return vision_model(pixel_values=images, output_hidden_states=True).hidden_states[idx + 1]  # [0] = embeddings


def hf_token_dims(vision_model: nn.Module, text_model: nn.Module, layer: int = -1) -> tuple[int, int]:
    """``(D_v, D_t)``: hidden sizes of ``vision_model`` and ``text_model``; ValueError: ``layer`` out of range."""
    vcfg = vision_model.config
    if layer != -1:
        level_index(int(vcfg.num_hidden_layers), layer)
    return int(vcfg.hidden_size), int(text_model.config.hidden_size)


# ---- dispatch -----------------------------------------------------------------------------------------
def image_tokens(model, images: Tensor, layer: int = -1) -> Tensor:
    """(B, 3, S, S) normalised images -> (B, N, D_v) image-tower tokens of level ``layer`` (-1: final; see the
    module docstring per family).

    Raises:
        ValueError: a family / tower without token outputs, or ``layer`` out of range for the tower.
    """
    return _token_features(model, "image_tokens").image_tokens(model, images, layer)


def text_tokens(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L) ids + mask -> (B, L, D_t) text-tower token states aligned with ``attention_mask``.

    Raises:
        ValueError: shapes differ / not 2-D, or a family without token outputs.
    """
    _check_ids(input_ids, attention_mask)
    return _token_features(model, "text_tokens").text_tokens(model, input_ids, attention_mask)


def token_dims(model, layer: int = -1) -> tuple[int, int]:
    """``(D_v, D_t)``: widths of :func:`image_tokens` (of level ``layer``) and :func:`text_tokens` (no forward
    pass). Raises ValueError like :func:`image_tokens`."""
    return _token_features(model, "token_dims").token_dims(model, layer)


def text_tokens_trimmable(model) -> bool:
    """Whether right padding may be cut off a batch before :func:`text_tokens` without changing the real tokens'
    states (masked encoders: two_tower, hf CLIP; not SigLIP nor open_clip). ValueError: no token outputs."""
    return bool(_token_features(model, "text_tokens_trimmable").text_tokens_trimmable(model))
