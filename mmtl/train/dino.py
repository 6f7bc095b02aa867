"""DINO self-distillation for the image tower (``strategy.self_supervised.method: dino``; Caron et al. 2021,
"Emerging Properties in Self-Supervised Vision Transformers", algorithm 1).

* student: the model's image tower (``self.model``, what trains and what the export holds) + :class:`DinoHead`
  (``self.ssl_head``): a 3-layer MLP to a bottleneck, L2 normalisation, and a weight-normalised linear layer to K
  prototypes (its norm fixed to 1, DINO's ``norm_last_layer``);
* teacher: copies of the tower and the head (``teacher_tower``, ``teacher_head``; no gradients), updated after
  every optimizer step as an exponential moving average of the student, with the momentum raised from
  ``teacher_momentum`` to 1 on a cosine schedule over ``train.max_steps`` (the step count is a buffer, so it
  survives a resume);
* loss (eq. 1 and algorithm 1): teacher probabilities ``softmax((t - c) / tau_t)`` of the 2 global views (centering
  by ``c`` and sharpening by the low ``tau_t``), student log-probabilities ``log_softmax(s / tau_s)`` of all views
  (2 global + ``local_crops`` local ones), cross-entropy summed over prototypes, averaged over every (teacher view,
  other student view) pair; the center is an EMA (``center_momentum``) of the teacher outputs' batch mean over
  all ranks.

Micro-batch (from :class:`mmtl.data.unpaired.DinoCrops` in the Ray Data map stage): ``global_views`` (B, 2, 3, S, S)
and, with local crops, ``local_views`` (B, V, 3, s, s); the image tower must take both sizes (timm CNNs do; a
ViT needs ``dynamic_img_size``). Not with ZeRO-3 (the teacher update needs whole parameters).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class DinoHead(nn.Module):
    """``(B, D) -> (B, K)``: Linear-GELU-Linear-GELU-Linear to ``bottleneck``, L2-normalise, then the prototypes
    ``normalize(x) @ normalize(W)^T`` (a weight-normalised layer with its norm fixed at 1)."""

    def __init__(self, d: int, out_dim: int, hidden: int = 512, bottleneck: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()


def dino_loss(student: Tensor, teacher: Tensor, center: Tensor, n_global: int, student_temp: float,
              teacher_temp: float) -> tuple[Tensor, Tensor]:
    """DINO's loss (Caron et al. 2021, eq. 1 / algorithm 1) and the teacher's mean entropy (nats).

    Args:
        student: (V * B, K) student outputs, views stacked view-major (view 0's B rows first); the first
            ``n_global`` views are the global ones.
        teacher: (n_global * B, K) teacher outputs of the global views, same order. center: (1, K).
    Returns:
        ``(loss, teacher_entropy)``: the mean over (teacher view i, student view v != i) of
        ``-sum_k p_t[i] * log p_s[v]``; the entropy of ``p_t`` averaged over rows.
    """
    views = student.shape[0] // (teacher.shape[0] // n_global)
    s = F.log_softmax(student.float() / student_temp, dim=-1).chunk(views)
    p = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach()
    total, pairs = student.new_zeros((), dtype=torch.float32), 0
    for i, q in enumerate(p.chunk(n_global)):
        for v, logp in enumerate(s):
            if v != i:
                total = total + (-q * logp).sum(dim=-1).mean()
                pairs += 1
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1).mean()
    return total / pairs, entropy


class DinoModule(nn.Module):
    """Student (``model`` image tower + ``ssl_head``) and EMA teacher; ``forward(global_views, local_views=None)`` is
    the DINO loss (see module docstring). ``metrics()``: ``dino_loss``, ``teacher_entropy`` (nats; ln K means a
    uniform teacher, i.e. collapse to uniform), ``center_norm``, ``teacher_momentum``."""

    def __init__(self, model: nn.Module, cfg, max_steps: int) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        d = int(model.image_dim)
        self.ssl_head = DinoHead(d, cfg.dino_out_dim, cfg.proj_hidden, cfg.proj_dim)
        self.teacher_tower = copy.deepcopy(model.image_tower).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.ssl_head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.dino_out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.max_steps = max(int(max_steps), 1)
        self._last: dict[str, float] = {}

    def _views(self, global_views: Tensor, local_views: Optional[Tensor]) -> list[Tensor]:
        views = list(global_views.unbind(1))
        if local_views is not None and local_views.numel():
            views += list(local_views.unbind(1))
        return views

    def forward(self, global_views: Tensor, local_views: Optional[Tensor] = None, **_) -> Tensor:
        views = self._views(global_views, local_views)
        n_global = global_views.shape[1]
        out = [self.ssl_head(self.model.image_features(torch.cat(views[:n_global])))]  # global views, one pass
        if len(views) > n_global:  # local views (another size): a second pass
            out.append(self.ssl_head(self.model.image_features(torch.cat(views[n_global:]))))
        student = torch.cat(out)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_tower(torch.cat(views[:n_global])))
        loss, entropy = dino_loss(student, teacher, self.center, n_global, self.cfg.student_temp,
                                  self.cfg.teacher_temp)
        if self.training:
            self._update_center(teacher)
        self._last = {"dino_loss": float(loss.detach()), "teacher_entropy": float(entropy),
                      "center_norm": float(self.center.norm())}
        return loss

    @torch.no_grad()
    def _update_center(self, teacher: Tensor) -> None:
        batch = teacher.float().sum(dim=0, keepdim=True)
        n = torch.tensor([float(teacher.shape[0])], device=batch.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch)
            dist.all_reduce(n)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(batch / n * (1 - m))

    def momentum(self) -> float:
        """Teacher EMA momentum at the current step: ``1 - (1 - m0) * (cos(pi * k / K) + 1) / 2``."""
        k = min(int(self.steps_done), self.max_steps)
        return 1 - (1 - self.cfg.teacher_momentum) * (math.cos(math.pi * k / self.max_steps) + 1) / 2

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """teacher <- m * teacher + (1 - m) * student, for the tower and the head (called by the training step
        after every optimizer step)."""
        m = self.momentum()
        for src, dst in ((self.model.image_tower, self.teacher_tower), (self.ssl_head, self.teacher_head)):
            for ps, pt in zip(src.parameters(), dst.parameters()):
                pt.mul_(m).add_(ps.detach().to(pt.dtype), alpha=1 - m)
        self.steps_done += 1
        self._last["teacher_momentum"] = m

    def metrics(self) -> dict[str, float]:
        return dict(self._last)


@torch.no_grad()
def heldout_dino(module: DinoModule, images: list, crops, seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Held-out self-distillation measure of the module's *student* tower and head (after training it holds the
    exported teacher) on PIL ``images``: :func:`dino_loss` of its outputs on all crops against its own outputs on
    the global crops (center 0), i.e. how consistent and how sharp its prototypes are across crops, and their
    entropy (a collapsed model has low loss *and* entropy near 0 or ln K). The same crops for any module (torch
    seeded with ``seed``). Returns ``dino_loss``, ``teacher_entropy`` (means over batches weighted by size),
    ``images``.

    Raises:
        ValueError: no image.
    """
    if not images:
        raise ValueError("heldout_dino: no image")
    was = module.training
    module.eval()
    state = torch.get_rng_state()
    torch.manual_seed(int(seed))
    cfg, loss_sum, ent_sum, n = module.cfg, 0.0, 0.0, 0
    embed = (lambda x: module.ssl_head(module.model.image_features(x)))  # noqa: E731
    try:
        for i in range(0, len(images), batch_size):
            batch = [crops(im) for im in images[i:i + batch_size]]
            views = module._views(torch.stack([b["global_views"] for b in batch]),
                                  torch.stack([b["local_views"] for b in batch]) if "local_views" in batch[0] else None)
            teacher = embed(torch.cat(views[:2]))
            student = torch.cat([teacher] + ([embed(torch.cat(views[2:]))] if len(views) > 2 else []))
            loss, ent = dino_loss(student, teacher, torch.zeros_like(module.center), 2, cfg.student_temp,
                                  cfg.teacher_temp)
            loss_sum += float(loss) * len(batch)
            ent_sum += float(ent) * len(batch)
            n += len(batch)
    finally:
        torch.set_rng_state(state)
        module.train(was)
    return {"dino_loss": loss_sum / n, "teacher_entropy": ent_sum / n, "images": float(n)}
