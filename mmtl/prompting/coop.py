"""CoOp: context optimisation for a frozen image-text model (Zhou, Yang, Loy & Liu, "Learning to Prompt for
Vision-Language Models", IJCV 2022).

The text of class ``c`` is ``[SOS] ctx_1 .. ctx_M <tokens of c><suffix> [EOS]``: M learnable vectors in the
text tower's token-embedding space take the place of a hand-written template ("a photo of a"). The model
stays frozen; only the context is trained, with cross-entropy over ``scale * cos(image, class text)``.

Shapes: ``B`` batch, ``C`` classes, ``M`` context vectors, ``D`` token-embedding width (``D_w``), ``L`` tokens.
Context: class-shared ``(M, D)`` or class-specific ``(C, M, D)``. Class embeddings: ``(C, embed_dim)``.

Families: those whose family object has the ``context_text_encoder`` capability
(:class:`mmtl.models.family.ContextTextEncoding`): ``two_tower`` (BERT-like encoders fed ``inputs_embeds``; mean
or CLS pooling as the model) and ``hf`` CLIP (its text transformer re-run on embeddings: causal mask, final layer
norm, pooled at the EOS position = last attended token, ``text_projection``). ``open_clip`` and SigLIP raise
NotImplementedError.
With ``init`` set and untrained, the prompt gives exactly the embedding of the text ``"<init> <c><suffix>"``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmtl.models.family import ContextTextEncoder, ContextTextEncoding, capability
from mmtl.models.registry import find_family


def _encoder(model) -> tuple[str, ContextTextEncoder]:
    """(family name, :class:`~mmtl.models.family.ContextTextEncoder`) of ``model``, from its family's
    ``context_text_encoder`` capability.

    Raises:
        NotImplementedError: the model has no registered family, its family has no such capability
            (open_clip), or this model variant has none (hf SigLIP: the family returns None).
    """
    fam = find_family(model)
    cap = capability(fam, ContextTextEncoding)
    enc = cap.context_text_encoder(model) if cap is not None else None
    if enc is not None:
        return fam.name, enc
    if cap is not None and getattr(model, "model_type", None):
        what = f"{fam.name} {model.model_type}"  # a family with the capability, but not for this variant
    else:
        what = repr(getattr(getattr(model, "cfg", None), "family", None))
    raise NotImplementedError(f"prompt_tuning (CoOp) has no text-with-context encoder for model family {what}: "
                              "supported are two_tower and hf CLIP (open_clip and SigLIP are not implemented)")


def family_of(model) -> str:
    """The name of ``model``'s family when it can encode text with a learned context (``"two_tower"``, or
    ``"hf"`` for CLIP).

    Raises:
        NotImplementedError: any other family (open_clip) or an hf SigLIP model.
    """
    return _encoder(model)[0]


check_family = family_of


def token_embedding(model) -> nn.Embedding:
    """The text tower's token-embedding table (vocab, D). NotImplementedError like :func:`family_of`."""
    return _encoder(model)[1].token_embedding


def _hf_tok(model):
    return model.tokenizer.tokenizer  # mmtl's HFTokenize wraps a transformers tokenizer


def phrase_ids(model, phrase: str) -> list[int]:
    """Token ids of ``phrase`` without special tokens."""
    return list(_hf_tok(model)(phrase, add_special_tokens=False)["input_ids"])


def class_token_ids(model, classnames: Sequence[str], n_ctx: int, suffix: str = ".") -> tuple[Tensor, Tensor]:
    """``ids`` (C, L) and ``mask`` (C, L) of ``[SOS] <M placeholders> <class><suffix> [EOS] pad..``, right-padded
    to the longest row; the placeholders (positions 1..M) are replaced by the context in :func:`encode_with_context`.

    Raises:
        ValueError: no room for the context within ``model.context_length``, or the tokenizer does not start
            sequences with a [CLS]/<BOS> token.
    """
    tok = _hf_tok(model)
    room = model.context_length - n_ctx
    if room < 3:
        raise ValueError(f"strategy.prompt.n_ctx={n_ctx} leaves {room} of model.context_length="
                         f"{model.context_length} tokens for [SOS] class name [EOS]")
    enc = tok([f"{c}{suffix}" for c in classnames], padding="longest", truncation=True, max_length=room,
              return_tensors="pt", return_token_type_ids=False)
    ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    starts = {t for t in (tok.cls_token_id, tok.bos_token_id) if t is not None}
    if not starts or any(int(i) not in starts for i in ids[:, 0]):
        raise ValueError("CoOp needs a tokenizer that starts every sequence with [CLS]/<BOS> (context goes after it)")
    c = len(classnames)
    ids = torch.cat([ids[:, :1], torch.zeros(c, n_ctx, dtype=ids.dtype), ids[:, 1:]], dim=1)
    mask = torch.cat([mask[:, :1], torch.ones(c, n_ctx, dtype=mask.dtype), mask[:, 1:]], dim=1)
    return ids, mask


def encode_with_context(model, ids: Tensor, mask: Tensor, ctx: Tensor) -> Tensor:
    """Class text embeddings with the context inserted.

    Args:
        ids, mask: (C, L) from :func:`class_token_ids` (M placeholder positions after [SOS]).
        ctx: (M, D) class-shared or (C, M, D) class-specific context.
    Returns:
        (C, embed_dim) L2-normalised embeddings (``model.project_text`` of the pooled text features).
    """
    emb = token_embedding(model)(ids)  # (C, L, D)
    c, m = ids.shape[0], ctx.shape[-2]
    ctx = ctx.unsqueeze(0).expand(c, -1, -1) if ctx.dim() == 2 else ctx
    x = torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + m:]], dim=1)
    feats = _encoder(model)[1].features(x, mask)  # (C, D_t)
    return model.project_text(feats)


class PromptLearner(nn.Module):
    """The learnable context of CoOp for a fixed list of class names.

    Attributes:
        ctx: ``nn.Parameter`` (M, D) class-shared or (C, M, D) class-specific.
        classnames, n_ctx, init, class_specific, class_suffix: how the prompt was built (saved with it).
    Token ids and masks of the classes are non-persistent buffers: the state dict holds only ``ctx``.
    """

    def __init__(self, model, classnames: Sequence[str], n_ctx: int = 4, init: Optional[str] = "a photo of a",
                 class_specific: bool = False, class_suffix: str = ".", init_std: float = 0.02,
                 ctx: Optional[Tensor] = None) -> None:
        """Build the context: from ``ctx`` when given (a saved prompt), else from the token embeddings of
        ``init`` (its token count must equal ``n_ctx``), else N(0, ``init_std``) (CoOp's random init).

        Raises:
            ValueError: fewer than 1 class, duplicate names, ``init`` with another token count than ``n_ctx``,
                or ``ctx`` of the wrong shape.
        """
        super().__init__()
        names = [str(c) for c in classnames]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"CoOp needs distinct class names, got {names}")
        self.classnames, self.n_ctx, self.init = names, int(n_ctx), init
        self.class_specific, self.class_suffix = bool(class_specific), class_suffix
        emb = token_embedding(model)
        d = emb.embedding_dim
        shape = (len(names), self.n_ctx, d) if self.class_specific else (self.n_ctx, d)
        if ctx is None:
            if init:
                ids = phrase_ids(model, init)
                if len(ids) != self.n_ctx:
                    raise ValueError(f"strategy.prompt.init={init!r} is {len(ids)} tokens but n_ctx={self.n_ctx}: "
                                     f"set strategy.prompt.n_ctx={len(ids)} (or init=null for random init)")
                base = emb.weight.detach()[torch.tensor(ids)].clone().float()
            else:
                base = torch.randn(self.n_ctx, d) * init_std
            ctx = base.unsqueeze(0).repeat(len(names), 1, 1) if self.class_specific else base
        if tuple(ctx.shape) != shape:
            raise ValueError(f"context has shape {tuple(ctx.shape)}, expected {shape} "
                             f"({'class-specific' if self.class_specific else 'class-shared'}, D={d})")
        self.ctx = nn.Parameter(ctx.detach().clone().float())
        ids_, mask = class_token_ids(model, names, self.n_ctx, class_suffix)
        self.register_buffer("token_ids", ids_, persistent=False)
        self.register_buffer("token_mask", mask, persistent=False)

    def forward(self, model) -> Tensor:
        """(C, embed_dim) normalised class embeddings of this learner's classes."""
        return encode_with_context(model, self.token_ids, self.token_mask, self.ctx)

    def embed_classes(self, model, classnames: Sequence[str]) -> Tensor:
        """(C', embed_dim) class embeddings for any class list (class-shared context), or for a subset of the
        trained classes (class-specific context).

        Raises:
            ValueError: class-specific context and a class it was not trained on.
        """
        names = [str(c) for c in classnames]
        if names == self.classnames:
            return self(model)
        if self.class_specific:
            unknown = [c for c in names if c not in self.classnames]
            if unknown:
                raise ValueError(f"class-specific CoOp context exists only for its {len(self.classnames)} trained "
                                 f"classes; no context for {unknown} (new classes need class_specific=false)")
            idx = torch.tensor([self.classnames.index(c) for c in names])
            return encode_with_context(model, self.token_ids[idx], self.token_mask[idx], self.ctx[idx])
        ids, mask = class_token_ids(model, names, self.n_ctx, self.class_suffix)
        return encode_with_context(model, ids.to(self.ctx.device), mask.to(self.ctx.device), self.ctx)


def coop_logits(image_emb: Tensor, class_emb: Tensor, scale: Tensor) -> Tensor:
    """(B, C) logits ``scale * cos(image_emb, class_emb)``; inputs (B, E) and (C, E), normalised inside."""
    return scale * F.normalize(image_emb, dim=-1) @ F.normalize(class_emb, dim=-1).t()


class CoOpModule(nn.Module):
    """Train module of ``strategy.kind: prompt_tuning`` (see :func:`mmtl.train.loop.make_train_module`): the frozen model as
    ``self.model`` (kept in eval mode: no head dropout, frozen BatchNorm) and ``self.prompt_learner``.

    ``forward(image_feat (B, D_v) cached image-tower features, label (B,) class indices)`` -> scalar
    cross-entropy of :func:`coop_logits` (mean over the micro-batch); :meth:`metrics` -> ``{"acc": ...}`` of the
    last micro-batch.
    """

    def __init__(self, model: nn.Module, prompt_learner: PromptLearner) -> None:
        super().__init__()
        self.model, self.prompt_learner = model, prompt_learner
        self._acc = math.nan
        self.model.eval()

    @classmethod
    def from_pipeline(cls, pipe, model) -> "CoOpModule":
        """Build from ``strategy.prompt``; the classes trained are ``base_classes`` or else ``classes``.

        Raises:
            ValueError: ``strategy.prompt.classes`` is not set (the driver resolves it before training).
        """
        p = pipe.strategy.prompt
        names = p.base_classes or p.classes
        if not names:
            raise ValueError("strategy.prompt.classes is empty: set it (or run through `mmtl run`, which resolves it)")
        return cls(model, PromptLearner(model, names, p.n_ctx, p.init, p.class_specific, p.class_suffix, p.init_std))

    def train(self, mode: bool = True) -> "CoOpModule":
        super().train(mode)
        self.model.eval()
        return self

    def logits(self, image_feat: Tensor) -> Tensor:
        """(B, D_v) tower features -> (B, C) logits over the learner's classes."""
        return coop_logits(self.model.project_image(image_feat), self.prompt_learner(self.model), self.model.scale())

    def forward(self, image_feat: Tensor, label: Tensor) -> Tensor:
        logits = self.logits(image_feat)
        label = label.long().reshape(-1)
        self._acc = float((logits.detach().argmax(dim=1) == label).float().mean())
        return F.cross_entropy(logits.float(), label)

    def metrics(self) -> dict:
        return {"acc": self._acc}
