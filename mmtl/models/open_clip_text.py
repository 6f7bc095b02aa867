"""open_clip text side for :mod:`mmtl.models.open_clip_family`: the picklable tokenizer wrapper and the text
towers (open_clip's ``encode_text`` as a module, for built-in and ``custom_text`` models).

Shapes: ``B`` batch, ``L`` context length, ``D`` the model's ``embed_dim``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmtl.config import ModelConfig


# ---- tokenizer ----------------------------------------------------------------------------------------
class OpenClipTokenize:
    """Picklable wrapper of open_clip's ``SimpleTokenizer``: ``texts -> dict(input_ids, attention_mask)``.

    Ids: ``[sot] + BPE + [eot]`` truncated to ``context_length`` (eot kept last), right-padded with 0 (same
    ids as ``SimpleTokenizer.__call__``). ``attention_mask`` is 1 on sot..eot. Pickles as its
    ``context_length`` only (the BPE tables are rebuilt on unpickling).
    """

    def __init__(self, context_length: int) -> None:
        self.context_length = int(context_length)
        self._build()

    def _build(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.tokenizer = SimpleTokenizer(context_length=self.context_length)

    def __getstate__(self) -> dict:
        return {"context_length": self.context_length}

    def __setstate__(self, state: dict) -> None:
        self.context_length = state["context_length"]
        self._build()

    def _ids(self, text: str) -> list[int]:
        t = self.tokenizer
        return [t.sot_token_id, *t.encode(text), t.eot_token_id]

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        """B strings -> ``dict(input_ids=(B,L) long, attention_mask=(B,L) long)``, L = context_length."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got one str")
        n, eot = self.context_length, self.tokenizer.eot_token_id
        ids = torch.zeros(len(texts), n, dtype=torch.long)
        mask = torch.zeros(len(texts), n, dtype=torch.long)
        for i, text in enumerate(texts):
            toks = self._ids(text)
            if len(toks) > n:
                toks = toks[:n]
                toks[-1] = eot
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def count(self, text: str) -> int:
        """Tokens in ``text`` including sot/eot, untruncated."""
        return len(self._ids(text))


def _needs_hf_tokenizer(cfg: ModelConfig, mc: dict) -> bool:
    return bool(mc["text_cfg"].get("hf_tokenizer_name")) or "siglip" in (cfg.arch or "").lower()


def load_open_clip_tokenizer(cfg: ModelConfig, mc: dict):
    """(tokenizer callable with ``.count``, identity dict) for an open_clip model config ``mc`` (from
    :func:`mmtl.models.open_clip_family.resolve_open_clip_config`).

    ``SimpleTokenizer`` unless the architecture needs a HuggingFace tokenizer: then ``model.text.tokenizer_path``
    (a local dir) is required. ``model.text.tokenizer_path`` always wins when set.

    Raises:
        ValueError: the architecture needs a HuggingFace tokenizer and ``model.text.tokenizer_path`` is unset.
    """
    if cfg.text.tokenizer_path:
        from mmtl.models.two_tower import load_tokenizer

        return load_tokenizer(cfg.text.model_copy(update={"path": None}), cfg.context_length)
    if _needs_hf_tokenizer(cfg, mc):
        raise ValueError(f"model: open_clip {cfg.arch or 'config'} uses a HuggingFace tokenizer "
                         f"({mc['text_cfg'].get('hf_tokenizer_name') or 'SigLIP'}); set model.text.tokenizer_path "
                         "to a local tokenizer directory (no downloads)")
    return OpenClipTokenize(cfg.context_length), {"tokenizer": "open_clip.SimpleTokenizer"}


# ---- towers -------------------------------------------------------------------------------------------
class OpenClipTextTower(nn.Module):
    """open_clip ``CLIP.encode_text`` as a module (CLIP layout): ids (B, L<=context) -> (B, embed_dim).

    Holds ``token_embedding``, ``positional_embedding``, ``transformer`` (``.resblocks``), ``ln_final``,
    ``text_projection`` (Parameter, Linear or None) and the causal ``attn_mask`` buffer (non-persistent).
    Inputs shorter than the context length use the first L positions (exact for causal masks).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)
        self.context_length = int(clip.context_length)
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    @property
    def causal(self) -> bool:
        return self.attn_mask is not None

    def forward(self, input_ids: Tensor) -> Tensor:
        from open_clip.transformer import text_global_pool

        n = input_ids.shape[1]
        if n > self.context_length:
            raise ValueError(f"text of {n} tokens > context length {self.context_length}")
        cast = self.transformer.get_cast_dtype()
        x = self.token_embedding(input_ids).to(cast) + self.positional_embedding[:n].to(cast)
        mask = self.attn_mask[:n, :n] if self.attn_mask is not None else None
        if mask is None and n != self.context_length:
            raise ValueError("non-causal open_clip text towers need full-length inputs")
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        x = text_global_pool(x, input_ids, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return x


class OpenClipCustomTextTower(nn.Module):
    """``CustomTextCLIP.text`` (an open_clip ``TextTransformer``) as ``text``: keys ``text.*`` as in open_clip.

    Inputs are right-padded with ``pad_id`` to the full context length (TextTransformer's mask is fixed).
    ``transformer`` is exposed (not registered twice) so block lookups find ``transformer.resblocks``.
    """

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text = text
        self.context_length = int(text.context_length)
        self.pool_type = getattr(text, "pool_type", "argmax")

    @property
    def transformer(self) -> nn.Module:
        return self.text.transformer

    @property
    def causal(self) -> bool:
        return False  # inputs are always padded to full length: no trimming

    def forward(self, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[1]
        if n < self.context_length:
            pad = getattr(self.text, "pad_id", 0)
            input_ids = torch.nn.functional.pad(input_ids, (0, self.context_length - n), value=pad)
        return self.text(input_ids)


# ---- weights ------------------------------------------------------------------------------------------
