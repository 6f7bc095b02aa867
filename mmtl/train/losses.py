"""Contrastive losses over features gathered from all workers.

* CLIP InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
  Supervision", Fig. 3 pseudocode): symmetric cross-entropy over the (N, N) cosine-similarity matrix scaled
  by a learnable temperature ``exp(t)``, clamped at ``max_logit_scale`` (100 in CLIP).
* NT-Xent, SimCLR's loss (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
  Representations", Eq. 1): :func:`nt_xent`, for the self-supervised recipe's image tower.
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


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised temperature-scaled cross-entropy over 2N views.

    ``z1``, ``z2``: (N, D) projections of the two views of N samples (row i of each is a positive pair); they
    are L2-normalised here. With ``z = [z1; z2]`` (2N, D) and ``s_ij = z_i . z_j / tau``, each view's loss is
    ``l(i, j) = -log( exp(s_ij) / sum_{k != i} exp(s_ik) )`` for its positive j; the result is the mean over
    all 2N views (Eq. 1; Algorithm 1's ``1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]``).

    Returns ``(loss (), top1 ())``: the loss in nats and the share of views whose most similar other view is
    their positive.

    Raises:
        ValueError: shapes differ, or N < 1.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 1:
        raise ValueError(f"nt_xent needs two (N, D) tensors of one shape with N >= 1, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    sim = z @ z.t() / float(temperature)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(sim, target)
    top1 = (sim.argmax(dim=1) == target).float().mean()
    return loss, top1.detach()
