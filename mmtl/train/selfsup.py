"""Train modules of ``strategy.kind: self_supervised`` (see :func:`mmtl.train.loop.make_train_module`).

Each holds the :class:`~mmtl.models.base.MultimodalModel` as ``self.model`` (only the adapted tower trains,
:mod:`mmtl.strategies.self_supervised`) and its self-supervised head as ``self.ssl_head`` (dropped at export:
the export holds only the adapted tower, under the model's own key names, so ``model.init_from`` of an
alignment pipeline loads it).

* :class:`MaskedLMModule` (``tower: text``): BERT's MLM head (``BertOnlyMLMHead``, the ``cls`` part of
  ``BertForMaskedLM``) on the text tower's last hidden states; its decoder weight is tied to the tower's word
  embeddings (as in ``BertForMaskedLM``), the transform and the output bias are loaded from the text model's
  weights when they hold ``cls.predictions.*`` and are freshly initialised otherwise (the MiniLM package holds
  none). Micro-batch: ``input_ids``, ``attention_mask``, ``labels`` (B, L) from :class:`mmtl.data.unpaired.MLMMasker`;
  the loss is the mean cross-entropy over the labelled (masked) positions; only those positions are decoded.
* :class:`SimCLRModule` (``tower: image``): the image tower's pooled features -> projection MLP
  ``Linear(D_v, hidden) -> ReLU -> Linear(hidden, proj_dim)`` (SimCLR's g(.)) -> NT-Xent over the global
  batch (both views of every rank). Micro-batch: ``view1``, ``view2`` (B, 3, S, S).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmtl.config import Pipeline, SelfSupervisedConfig
from mmtl.train.losses import gather_with_grad, nt_xent

log = logging.getLogger("mmtl.train")


def _text_model_file(model: nn.Module) -> Optional[str]:
    """The safetensors file the text tower was loaded from (``model.text.path``), or None (random init)."""
    cfg = getattr(model, "cfg", None)
    path = getattr(getattr(cfg, "text", None), "path", None)
    if not path:
        return None
    from mmtl.models.weights import resolve_weights

    f = resolve_weights(path, "model_dir") / "model.safetensors"
    return str(f) if f.is_file() else None


def build_mlm_head(model: nn.Module) -> tuple[nn.Module, str]:
    """BERT's MLM head for ``model.text_tower`` with the decoder tied to its word embeddings; returns
    ``(head, source)`` where source says where the transform weights came from (``"package"`` or ``"fresh"``).

    Raises:
        ValueError: the text tower is not a BERT-style transformers encoder (needs ``config.hidden_size``,
            ``vocab_size`` and ``embeddings.word_embeddings``).
    """
    from transformers.models.bert.modeling_bert import BertConfig, BertOnlyMLMHead

    tower = model.text_tower
    conf = getattr(tower, "config", None)
    if conf is None or not hasattr(tower, "get_input_embeddings") or getattr(conf, "model_type", "") not in (
            "bert", "roberta", "xlm-roberta", "electra", "mpnet"):
        raise ValueError("strategy.self_supervised.method=mlm needs a BERT-style transformers text tower "
                         f"(model.family two_tower), got {type(tower).__name__}")
    bconf = BertConfig(hidden_size=conf.hidden_size, vocab_size=conf.vocab_size,
                       hidden_act=getattr(conf, "hidden_act", "gelu"),
                       layer_norm_eps=getattr(conf, "layer_norm_eps", 1e-12),
                       initializer_range=getattr(conf, "initializer_range", 0.02))
    head = BertOnlyMLMHead(bconf)
    for m in head.modules():  # BertPreTrainedModel._init_weights
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=bconf.initializer_range)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    pred = head.predictions
    pred.decoder.weight = tower.get_input_embeddings().weight  # tied, as BertForMaskedLM.tie_weights
    pred.bias = pred.decoder.bias
    source = "fresh"
    f = _text_model_file(model)
    if f:
        from safetensors import safe_open

        with safe_open(f, "pt") as sf:
            keys = {k.removeprefix("cls."): k for k in sf.keys() if k.startswith("cls.predictions.")}
            own = head.state_dict()
            wanted = {k: sf.get_tensor(v) for k, v in keys.items()
                      if k in own and k != "predictions.decoder.weight" and own[k].shape == sf.get_tensor(v).shape}
        if wanted:
            head.load_state_dict(wanted, strict=False)
            source = "package"
    return head, source


class MaskedLMModule(nn.Module):
    """Text tower + BERT MLM head; ``forward(input_ids, attention_mask, labels)`` is the mean masked-token
    cross-entropy (nats; see module docstring). ``metrics()``: ``mlm_loss``, ``mlm_perplexity`` (exp of the
    loss) and ``masked_tokens`` of the last micro-batch."""

    def __init__(self, model: nn.Module, cfg: SelfSupervisedConfig) -> None:
        super().__init__()
        self.model = model
        self.ssl_head, self.head_source = build_mlm_head(model)
        self._last = {"mlm_loss": float("nan"), "masked_tokens": 0.0}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, **_) -> Tensor:
        n = max(int(attention_mask.sum(dim=1).max()), 1)  # right padding: trim to the longest text
        ids, mask, labels = input_ids[:, :n], attention_mask[:, :n], labels[:, :n]
        hidden = self.model.text_tower(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, n, D_t)
        sel = labels != -100
        if not bool(sel.any()):  # nothing masked in this micro-batch: a zero loss that still touches the graph
            loss = hidden.sum() * 0.0
        else:
            logits = self.ssl_head(hidden[sel])  # (M, V): only the masked positions are decoded
            loss = F.cross_entropy(logits.float(), labels[sel])
        self._last = {"mlm_loss": float(loss.detach()), "masked_tokens": float(sel.sum())}
        return loss

    def metrics(self) -> dict[str, float]:
        loss = self._last["mlm_loss"]
        return {**self._last, "mlm_perplexity": math.exp(min(loss, 50.0)) if loss == loss else float("nan")}


class SimCLRModule(nn.Module):
    """Image tower + projection MLP; ``forward(view1, view2)`` is NT-Xent (:func:`nt_xent`) over the views of
    the global batch. ``metrics()``: ``ntxent_loss`` and ``ntxent_top1`` (positive found among 2N-1)."""

    def __init__(self, model: nn.Module, cfg: SelfSupervisedConfig) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(cfg.temperature)
        d = int(model.image_dim)
        self.ssl_head = nn.Sequential(nn.Linear(d, cfg.proj_hidden), nn.ReLU(),
                                      nn.Linear(cfg.proj_hidden, cfg.proj_dim))
        self._last = {"ntxent_loss": float("nan"), "ntxent_top1": float("nan")}

    def project(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, proj_dim) projections (not normalised)."""
        return self.ssl_head(self.model.image_features(images))

    def forward(self, view1: Tensor, view2: Tensor, **_) -> Tensor:
        z = self.project(torch.cat([view1, view2]))
        z1, z2 = z.chunk(2)
        loss, top1 = nt_xent(gather_with_grad(z1), gather_with_grad(z2), self.temperature)
        self._last = {"ntxent_loss": float(loss.detach()), "ntxent_top1": float(top1)}
        return loss

    def metrics(self) -> dict[str, float]:
        return dict(self._last)


class SelfSupervisedModule:
    """Factory named by the recipe: ``from_pipeline(pipe, model)`` builds :class:`MaskedLMModule` for
    ``tower: text``, :class:`SimCLRModule` for ``method: simclr`` and :class:`mmtl.train.dino.DinoModule` for
    ``method: dino`` (ValueError with ZeRO-3)."""

    @staticmethod
    def from_pipeline(pipe: Pipeline, model: nn.Module) -> nn.Module:
        cfg = pipe.strategy.self_supervised
        if cfg.method == "dino":
            from mmtl.train.dino import DinoModule

            if pipe.train.zero_stage == 3:
                raise ValueError("strategy.self_supervised.method=dino needs whole parameters for the EMA teacher: "
                                 "use train.zero_stage 0, 1 or 2")
            return DinoModule(model, cfg, pipe.train.max_steps)
        return MaskedLMModule(model, cfg) if cfg.tower == "text" else SimCLRModule(model, cfg)


@torch.no_grad()
def heldout_mlm(module: MaskedLMModule, texts: list[str], tokenize, masker, seed: int = 0,
                batch_size: int = 64) -> dict[str, float]:
    """Held-out masked-LM measure of ``module`` on ``texts``: the same masks for any module (``masker``, an
    :class:`mmtl.data.unpaired.MLMMasker`, drawn from a generator seeded with ``seed``), so before/after numbers
    compare. Returns ``mlm_loss`` (token-weighted mean cross-entropy over all masked tokens, nats),
    ``mlm_perplexity`` (``exp`` of it), ``masked_tokens`` and ``texts``.

    Raises:
        ValueError: no text, or no token got masked.
    """
    if not texts:
        raise ValueError("heldout_mlm: no text to measure")
    was = module.training
    module.eval()
    gen = torch.Generator().manual_seed(int(seed))
    total, count = 0.0, 0
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenize(texts[i:i + batch_size])
            ids, labels = masker(enc["input_ids"], gen)
            m = int((labels != -100).sum())
            if m:
                total += float(module(ids, enc["attention_mask"], labels)) * m
                count += m
    finally:
        module.train(was)
    if not count:
        raise ValueError("heldout_mlm: no token was masked (texts too short?)")
    loss = total / count
    return {"mlm_loss": loss, "mlm_perplexity": math.exp(loss), "masked_tokens": float(count),
            "texts": float(len(texts))}


@torch.no_grad()
def heldout_ntxent(module: SimCLRModule, images: list, views, seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Held-out SimCLR measure of ``module`` on PIL ``images``: two ``views`` per image (torch seeded with
    ``seed``, so before/after see the same views), NT-Xent per batch of ``batch_size`` images (a batch of 1 is
    skipped: no negative). Returns ``ntxent_loss`` and ``ntxent_top1`` (means over batches weighted by size),
    ``images`` and ``batch_size`` (the loss depends on it: 2B-1 candidates).

    Raises:
        ValueError: fewer than 2 images.
    """
    if len(images) < 2:
        raise ValueError("heldout_ntxent: needs at least 2 images")
    was = module.training
    module.eval()
    state = torch.get_rng_state()
    torch.manual_seed(int(seed))
    loss_sum, top_sum, n = 0.0, 0.0, 0
    try:
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            if len(chunk) < 2:
                continue
            v1 = torch.stack([views(im) for im in chunk])
            v2 = torch.stack([views(im) for im in chunk])
            z1, z2 = module.project(v1), module.project(v2)
            loss, top1 = nt_xent(z1, z2, module.temperature)
            loss_sum += float(loss) * len(chunk)
            top_sum += float(top1) * len(chunk)
            n += len(chunk)
    finally:
        torch.set_rng_state(state)
        module.train(was)
    return {"ntxent_loss": loss_sum / n, "ntxent_top1": top_sum / n, "images": float(n),
            "batch_size": float(batch_size)}
