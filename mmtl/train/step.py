"""The contrastive train step: forward, global-batch loss, backward, optimizer step.

With ``grad_accum_steps = K > 1`` the loss keeps negatives over the whole accumulated global batch, as
open_clip's ``--accum-freq`` does: a first no-grad pass embeds all K micro-batches, then each micro-batch is
re-embedded with gradients and the loss is computed over all K micro-batches of all ranks with that
micro-batch's rows live. Summed over the K backward passes this is exactly the gradient of the loss over the
accumulated batch (each parameter gradient flows only through its own rows once), at the cost of one extra
forward per micro-batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from mmtl.train.losses import contrastive_loss, gather_with_grad


class ContrastiveModule(nn.Module):
    """Wraps a :class:`~mmtl.models.base.MultimodalModel` for the DeepSpeed engine.

    ``forward`` takes either raw inputs (``image`` (B,3,H,W), ``input_ids``/``attention_mask`` (B,L)) or
    cached frozen-tower outputs (``image_feat`` (B,D_v), ``text_feat`` (B,D_t)) and returns
    ``(image_emb (B,D), text_emb (B,D), logit_scale (1,))``; embeddings are L2-normalised and the scale is
    ``exp(t)`` clamped at ``model.max_logit_scale``. For SigLIP a learnable ``logit_bias`` (1,) is added,
    initialised at -10 (SigLIP paper, Sec. 3.2).
    """

    def __init__(self, model: nn.Module, loss: str = "clip"):
        super().__init__()
        self.model = model
        self.loss_kind = loss
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0)) if loss == "siglip" else None

    def forward(self, image=None, input_ids=None, attention_mask=None, image_feat=None, text_feat=None):
        m = self.model
        img = m.project_image(image_feat) if image_feat is not None else m.encode_image(image)
        txt = m.project_text(text_feat) if text_feat is not None else m.encode_text(input_ids, attention_mask)
        scale = m.logit_scale.exp().clamp(max=m.max_logit_scale)
        return img, txt, scale

    def loss(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Contrastive loss on already-gathered (N, D) embeddings."""
        return contrastive_loss(self.loss_kind, img, txt, scale, self.logit_bias)


def _gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def train_step(engine, micro_batches: list[dict], nonfinite: str = "error") -> Optional[float]:
    """One optimizer step over ``len(micro_batches)`` micro-batches (the engine's accumulation steps).

    Returns:
        The loss over the accumulated global batch (nats), or ``None`` when it was non-finite and
        ``nonfinite == "skip"`` (no parameter changed; every rank skips since the loss is global).

    Raises:
        FloatingPointError: non-finite loss with ``nonfinite == "error"``.
    """
    module = engine.module
    k = len(micro_batches)
    if not isinstance(module, ContrastiveModule):
        return _task_step(engine, micro_batches, nonfinite)
    if k == 1:
        img, txt, scale = engine(**micro_batches[0])
        loss = module.loss(gather_with_grad(img), gather_with_grad(txt), scale)
        if not _finite(loss, nonfinite):
            return None
        engine.backward(loss)
        engine.step()
        return float(loss.detach())
    with torch.no_grad():
        cached = [engine(**mb)[:2] for mb in micro_batches]
        all_img = [_gather_nograd(i) for i, _ in cached]
        all_txt = [_gather_nograd(t) for _, t in cached]
    value = None
    for j, mb in enumerate(micro_batches):
        img, txt, scale = engine(**mb)
        imgs = all_img[:j] + [gather_with_grad(img)] + all_img[j + 1 :]
        txts = all_txt[:j] + [gather_with_grad(txt)] + all_txt[j + 1 :]
        loss = module.loss(torch.cat(imgs), torch.cat(txts), scale)
        if j == 0 and not _finite(loss, nonfinite):
            return None
        # DeepSpeed divides by K on backward; each pass carries the full-loss gradient of its own rows.
        engine.backward(loss * k)
        engine.step()
        value = float(loss.detach())
    return value


def _task_step(engine, micro_batches: list[dict], nonfinite: str) -> Optional[float]:
    """A task module's step (:func:`mmtl.train.loop.make_train_module`): ``engine(**mb)`` is the micro-batch loss; DeepSpeed
    averages gradients over ranks and accumulates the micro-batches. Returns the mean micro-batch loss."""
    first = engine(**micro_batches[0])
    ok = torch.isfinite(first.detach()).all().float().reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # the loss is per rank: every rank must agree to skip
    if ok.item() < 1 and not _finite(first * float("nan"), nonfinite):
        return None
    total = 0.0
    for j, mb in enumerate(micro_batches):
        loss = first if j == 0 else engine(**mb)
        engine.backward(loss)
        engine.step()
        total += float(loss.detach())
    hook = getattr(engine.module, "after_optimizer_step", None)  # e.g. DINO's EMA teacher update
    if hook is not None:
        hook()
    return total / len(micro_batches)


def _finite(loss: torch.Tensor, policy: str) -> bool:
    if torch.isfinite(loss).all():
        return True
    if policy == "skip":
        return False
    raise FloatingPointError(
        f"non-finite loss ({float(loss)}); lower train.lr, check the data, or set train.nonfinite=skip"
    )
