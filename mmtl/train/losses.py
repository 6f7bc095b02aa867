"""Contrastive losses over features gathered from all workers.

* CLIP InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
  Supervision", Fig. 3 pseudocode): symmetric cross-entropy over the (N, N) cosine-similarity matrix scaled
  by a learnable temperature ``exp(t)``, clamped at ``max_logit_scale`` (100 in CLIP).
* SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Eq. 1 / Algorithm 1):
  ``-1/N * sum_ij log sigmoid(z_ij * (t * x_i . y_j + b))`` with ``z_ij = 1`` on the diagonal, ``-1`` off it.

Negatives span the global batch: :func:`gather_with_grad` all-gathers the embeddings of every rank while
keeping the autograd path to the local slice (as open_clip's ``gather_with_grad``). Its backward sums the
incoming gradients over ranks with one ``all_reduce`` (gloo has no reduce-scatter) and returns the local
slice, so that after DeepSpeed averages parameter gradients over ranks the result equals the gradient of the
global-batch loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (B, D) from every rank into (W*B, D), keeping gradients to the local rows.

    Every rank must pass the same B (the ingest guarantees equal micro-batches). Without an initialised
    process group, or with world size 1, returns ``x`` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) on L2-normalised embeddings.

    Args:
        image_emb: (N, D) normalised image embeddings (global batch).
        text_emb: (N, D) normalised text embeddings; row i is the positive of image i.
        logit_scale: (1,) or () the already-exponentiated and clamped temperature ``exp(t)``.

    Returns:
        () mean of the image->text and text->image cross-entropies (nats).
    """
    logits = logit_scale.reshape(()) * image_emb @ text_emb.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.t().float(), labels))


def siglip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023, Eq. 1), normalised by the batch size N.

    Args:
        image_emb, text_emb: (N, D) normalised embeddings.
        logit_scale: (1,) exponentiated temperature; logit_bias: (1,) learnable bias ``b``.

    Returns:
        () loss (nats per image).
    """
    logits = (logit_scale.reshape(()) * image_emb @ text_emb.t() + logit_bias.reshape(())).float()
    n = logits.shape[0]
    z = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / n


def contrastive_loss(kind: str, image_emb, text_emb, logit_scale, logit_bias=None) -> torch.Tensor:
    """Dispatch to :func:`clip_loss` (``kind="clip"``) or :func:`siglip_loss` (``"siglip"``).

    Raises:
        ValueError: unknown ``kind`` or SigLIP without a ``logit_bias``.
    """
    if kind == "clip":
        return clip_loss(image_emb, text_emb, logit_scale)
    if kind == "siglip":
        if logit_bias is None:
            raise ValueError("siglip loss needs a logit_bias parameter")
        return siglip_loss(image_emb, text_emb, logit_scale, logit_bias)
    raise ValueError(f"unknown loss {kind!r}; expected 'clip' or 'siglip'")
