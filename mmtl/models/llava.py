"""``llava`` family: image tokens -> projector -> a causal LLM, the image tokens spliced into the chat prompt
(Liu et al. 2023, LLaVA; Liu et al. 2024, LLaVA-1.5's 2-layer MLP projector).

Three parts, read top to bottom (nanoVLM's split):

1. **image tower** (``model.vision``: the timm towers of the ``two_tower`` family, same weights and
   preprocessing): token features (:func:`mmtl.models.tokens.timm_image_tokens`, level
   ``model.decoder.image_layer``) -> (B, N, D_img);
2. **projector** (``model.decoder.projector``, :mod:`mmtl.models.projectors`): ``mlp2x_gelu`` = Linear(D_img,
   D_llm) -> GELU -> Linear(D_llm, D_llm) (LLaVA-1.5), or ``linear`` (LLaVA) -> (B, N, D_llm); or ``qformer``
   (BLIP-2's querying transformer, MiniGPT-4) -> (B, Q, D_llm), Q = ``model.decoder.num_queries``; newly
   initialised;
3. **LLM**: a transformers causal LM (``model.text.path``: e.g. ``weights:smollm2``, SmolLM2-135M-Instruct
   converted once by ``mmtl weights get smollm2``; or ``model.text.config``: a random-init Llama config for
   tests) with its tokenizer and chat template.

Sequence (one user turn, one assistant turn, the model's chat template; a tokenizer without a template gets
``"User: <image>\\n{prompt}\\nAssistant:"``)::

    [chat prefix up to <image>] [N image tokens] [rest of the user turn + assistant header] [caption] [eos]
     pre (given)                 projected         post (given)                             targets

The loss (:meth:`LlavaCaptioner.caption_loss`) is teacher-forced next-token cross-entropy over the caption and
its end token only (prompt and image positions ignored, as LLaVA masks the instruction). Training stages as
LLaVA: (a) ``strategy.kind: frozen`` trains the projector only (feature alignment on captions); (b)
``strategy.kind: lora`` adds LoRA in the LLM's attention and MLP (``strategy.lora.towers: [text]``),
warm-started from (a) with ``model.init_from``, on instruction-style prompts (``model.decoder.prompt``, e.g.
"What is this emoji called?").

Chat-format samples (LLaVA's ``conversations``, multi-turn, per-sample questions; ``strategy.caption.
conversations_field``): :mod:`mmtl.data.conversations` checks them, :mod:`mmtl.models.llava_chat` tokenizes them
with labels on the assistant turns, :meth:`LlavaCaptioner.chat_loss` trains on them.

Limits: timm image towers only; the Q-Former starts from random weights (no BLIP-2 pretraining).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmtl.config import DecoderConfig, ModelConfig, TextTowerConfig, VisionTowerConfig
from mmtl.models.offline import transformers_offline
from mmtl.models.projectors import build_projector, pixel_shuffle
from mmtl.models.tokens import timm_image_tokens, timm_token_dim
from mmtl.models.two_tower import (
    DEFAULT_TOKENIZER,
    build_vision_tower,
    make_image_transform,
    vision_mean_std,
)
from mmtl.models.weights import resolve_weights

#: LoRA targets of the LLM (``strategy.lora.text_targets: null``): attention projections and the MLP (Llama names)
LLM_LORA_TARGETS = ("re:.*\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",)
IMAGE_MARK = "<image>"
FALLBACK_TEMPLATE = "User: {user}\nAssistant:"


def build_llm(tcfg: TextTowerConfig):
    """``(causal LM in eval mode, tokenizer)`` from ``tcfg.path`` (a transformers folder, ``weights:NAME`` or
    ``package:DIST``) or ``tcfg.config`` (a random-init ``LlamaConfig``; tokenizer from ``tokenizer_path``).

    Raises:
        ValueError: both or neither of ``path`` / ``config``; a tokenizer larger than the LLM's vocabulary.
        WeightsError: the model dir cannot be found (``weights:NAME`` not fetched: the message has the command).
    """
    tf = transformers_offline()
    if bool(tcfg.path) == bool(tcfg.config):
        raise ValueError("model.text (the llava LLM): set exactly one of `path` and `config` "
                         f"(got path={tcfg.path!r}, config={tcfg.config!r})")
    tok_spec = tcfg.tokenizer_path or tcfg.path or DEFAULT_TOKENIZER
    tok = tf.AutoTokenizer.from_pretrained(str(resolve_weights(tok_spec, "model_dir")), local_files_only=True)
    if tcfg.path:
        mdir = resolve_weights(tcfg.path, "model_dir")
        llm = tf.AutoModelForCausalLM.from_pretrained(str(mdir), local_files_only=True, dtype=torch.float32)
    else:
        kw = {"vocab_size": len(tok), **dict(tcfg.config)}
        kw.pop("model_type", None)
        llm = tf.LlamaForCausalLM(tf.LlamaConfig(**kw))
    if len(tok) > llm.config.vocab_size:
        raise ValueError(f"tokenizer {tok_spec!r} has {len(tok)} tokens, the LLM's vocabulary {llm.config.vocab_size}")
    return llm.eval(), tok


def chat_parts(tok, prompt: str, system_prompt: Optional[str] = None) -> tuple[list[int], list[int]]:
    """Token ids of the chat text before and after the image for a user turn ``<image>\n{prompt}`` with the
    assistant header at the end (module docstring); the tokenizer's chat template (with a system message
    ``system_prompt`` unless None), else :data:`FALLBACK_TEMPLATE`."""
    user = f"{IMAGE_MARK}\n{prompt}" if prompt else IMAGE_MARK
    if getattr(tok, "chat_template", None):
        system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        text = tok.apply_chat_template([*system, {"role": "user", "content": user}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = ("" if system_prompt is None else f"System: {system_prompt}\n") + FALLBACK_TEMPLATE.format(user=user)
    before, after = text.split(IMAGE_MARK, 1)
    return (tok(before, add_special_tokens=False)["input_ids"], tok(after, add_special_tokens=False)["input_ids"])


class LlavaTokenize:
    """Picklable caption tokenizer: ``post`` prompt tokens + caption + eos, right padding to ``context_length``,
    truncation keeps the eos (so a long caption still ends)."""

    def __init__(self, tok, post_ids: list[int], eos_id: int, pad_id: int, context_length: int) -> None:
        self.tok, self.post_ids, self.eos_id, self.pad_id = tok, list(post_ids), int(eos_id), int(pad_id)
        self.context_length = int(context_length)
        if len(self.post_ids) + 2 > self.context_length:
            raise ValueError(f"model.context_length={context_length} leaves no room for a caption after the "
                             f"{len(self.post_ids)} prompt tokens")

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        """B captions -> ``dict(input_ids=(B, L) long, attention_mask=(B, L) long)``, L = context_length."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got one str")
        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            row = (self.post_ids + self.tok(t, add_special_tokens=False)["input_ids"])[: self.context_length - 1]
            row.append(self.eos_id)
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return {"input_ids": ids, "attention_mask": mask}

    def count(self, text: str) -> int:
        """Tokens of ``post + text + eos``, untruncated."""
        return len(self.post_ids) + len(self.tok(text, add_special_tokens=False)["input_ids"]) + 1


class LlavaCaptioner(nn.Module):
    """Image tower -> projector -> causal LLM (module docstring).

    Attributes:
        image_tower, projector, llm; ``text_tower`` is the LLM (what strategies freeze or adapt);
        ``pre_ids`` (P,) buffer: chat tokens before the image; ``post_ids``: after it (with the prompt).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.family != "llava":
            raise ValueError(f"LlavaCaptioner needs model.family='llava', got {cfg.family!r}")
        self.cfg = cfg.model_copy(deep=True)
        self.image_size, self.context_length = cfg.image_size, cfg.context_length
        self.image_layer, self.prompt = cfg.decoder.image_layer, cfg.decoder.prompt
        self.shuffle, self.system_prompt = cfg.decoder.pixel_shuffle, cfg.decoder.system_prompt
        self.image_tower, _ = build_vision_tower(cfg.vision)
        self.llm, self.tok = build_llm(cfg.text)
        if self.shuffle > 1:  # the grid must split into s x s blocks: fail at build time, not at the first batch
            with torch.no_grad():
                self.image_tokens(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
        d_img = timm_token_dim(self.image_tower, self.image_layer) * self.shuffle ** 2
        d_llm = self.llm.config.hidden_size
        self.projector = build_projector(cfg.decoder.projector, d_img, d_llm, cfg.decoder.num_queries,
                                         cfg.decoder.qformer_layers)
        self.mean, self.std = vision_mean_std(cfg.vision)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        pre, post = chat_parts(self.tok, self.prompt, self.system_prompt)
        self.register_buffer("pre_ids", torch.tensor(pre, dtype=torch.long), persistent=False)
        self.post_ids = post
        self.tokenizer = LlavaTokenize(self.tok, post, self.eos_id, self.pad_id, cfg.context_length)

    @property
    def text_tower(self) -> nn.Module:
        """The LLM (the name the frozen / lora strategies address)."""
        return self.llm

    # ---- 1 + 2: image tokens in LLM width --------------------------------------------------------------
    def image_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, N, D_img) image-tower tokens (before the projector; with
        ``model.decoder.pixel_shuffle`` s: N / s^2 tokens of s^2 D_img, :func:`~mmtl.models.projectors.pixel_shuffle`)."""
        return pixel_shuffle(timm_image_tokens(self.image_tower, images, self.image_layer), self.shuffle)

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, N, D_llm) projected image tokens."""
        return self.projector(self.image_tokens(images))

    def _prefix(self, images: Tensor, post: Tensor) -> Tensor:
        """(B, P + N + len(post), D_llm) embeddings of ``pre + image + post``."""
        emb = self.llm.get_input_embeddings()
        b = images.shape[0]
        img = self.image_embeds(images)
        return torch.cat([emb(self.pre_ids).expand(b, -1, -1).to(img.dtype), img,
                          emb(post).expand(b, -1, -1).to(img.dtype)], dim=1)

    # ---- 3: LLM ---------------------------------------------------------------------------------------
    def caption_loss(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                     label_smoothing: float = 0.0) -> Tensor:
        """Teacher-forced next-token cross-entropy over the caption tokens and the end token (nats per token).

        Args:
            images: (B, 3, S, S); input_ids / attention_mask: (B, L) from :meth:`tokenize` (``post`` prompt tokens,
                caption, eos, right padding).
        Raises:
            ValueError: no caption token in the batch.
        """
        n = max(int(attention_mask.sum(dim=1).max()), 1)
        ids, mask = input_ids[:, :n], attention_mask[:, :n]
        emb = self.llm.get_input_embeddings()
        img = self.image_embeds(images)
        b, p = ids.shape[0], self.pre_ids.shape[0]
        x = torch.cat([emb(self.pre_ids).expand(b, -1, -1).to(img.dtype), img, emb(ids).to(img.dtype)], dim=1)
        full_mask = torch.cat([torch.ones(b, p + img.shape[1], dtype=mask.dtype, device=mask.device), mask], dim=1)
        hidden = self.llm.model(inputs_embeds=x, attention_mask=full_mask, use_cache=False).last_hidden_state
        start = p + img.shape[1]
        h = hidden[:, start - 1: start + n - 1]  # position t predicts token t + 1: h[:, j] predicts ids[:, j]
        target = ids.masked_fill(mask == 0, -100)
        target[:, : len(self.post_ids)] = -100  # the rest of the prompt is given, not predicted
        keep = target != -100
        if not keep.any():
            raise ValueError("caption_loss: the batch has no caption token to predict")
        logits = self.llm.lm_head(h[keep])  # (T, V)
        return F.cross_entropy(logits.float(), target[keep], label_smoothing=label_smoothing)

    def chat_loss(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                  label_smoothing: float = 0.0) -> Tensor:
        """Next-token cross-entropy over the supervised (assistant) tokens of chat samples (nats per token).

        Args:
            images: (B, 3, S, S); input_ids / attention_mask / labels: (B, L) from :meth:`tokenize_chats` (whole
                chat text with one :data:`~mmtl.models.llava_chat.IMAGE_ID` per row, labels -100 where not
                supervised). The IMAGE_ID position is replaced by the N projected image tokens: (B, L - 1 + N).
        Raises:
            ValueError: a row without exactly one image position, or no supervised token in the batch.
        """
        from mmtl.models.llava_chat import IMAGE_ID

        is_img = input_ids == IMAGE_ID
        if not bool((is_img.sum(dim=1) == 1).all()):
            raise ValueError("chat_loss: every row needs exactly one image position")
        n = max(int(attention_mask.sum(dim=1).max()), 1)
        ids, mask, lab, is_img = input_ids[:, :n], attention_mask[:, :n], labels[:, :n], is_img[:, :n]
        emb = self.llm.get_input_embeddings()
        img = self.image_embeds(images)  # (B, N, D)
        text = emb(ids.masked_fill(is_img, self.pad_id)).to(img.dtype)
        pos = is_img.float().argmax(dim=1).tolist()
        ones = torch.ones(img.shape[1], dtype=mask.dtype, device=mask.device)
        ignore = torch.full((img.shape[1],), -100, dtype=lab.dtype, device=lab.device)
        x = torch.stack([torch.cat([text[b, :p], img[b], text[b, p + 1:]]) for b, p in enumerate(pos)])
        m = torch.stack([torch.cat([mask[b, :p], ones, mask[b, p + 1:]]) for b, p in enumerate(pos)])
        y = torch.stack([torch.cat([lab[b, :p], ignore, lab[b, p + 1:]]) for b, p in enumerate(pos)])
        hidden = self.llm.model(inputs_embeds=x, attention_mask=m, use_cache=False).last_hidden_state
        target = y[:, 1:]
        keep = target != -100
        if not keep.any():
            raise ValueError("chat_loss: the batch has no supervised token")
        logits = self.llm.lm_head(hidden[:, :-1][keep])  # position t predicts token t + 1
        return F.cross_entropy(logits.float(), target[keep], label_smoothing=label_smoothing)

    def tokenize_chats(self, conversations) -> dict:
        """Checked conversations -> ``input_ids`` / ``attention_mask`` / ``labels`` (B, context_length) numpy
        arrays, ``kept`` and ``stats`` (:func:`mmtl.models.llava_chat.tokenize_chats`)."""
        from mmtl.models.llava_chat import tokenize_chats

        return tokenize_chats(self.tok, conversations, self.eos_id, self.pad_id, self.context_length,
                              self.system_prompt)

    @torch.no_grad()
    def generate(self, images: Tensor, prompt: Optional[str] = None, num_beams: int = 1,
                 max_new_tokens: int = 24) -> list[str]:
        """(B, 3, S, S) images -> B answers (the prompt not repeated), greedy or beam search through
        transformers' ``generate`` on ``inputs_embeds`` with the KV cache.

        Raises:
            ValueError: ``num_beams`` or ``max_new_tokens`` below 1.
        """
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError(f"num_beams={num_beams} and max_new_tokens={max_new_tokens} must be >= 1")
        post = self.post_ids
        if prompt is not None and prompt != self.prompt:
            pre, post = chat_parts(self.tok, prompt, self.system_prompt)
            if pre != self.pre_ids.tolist():
                raise ValueError("the chat text before the image depends on the prompt; not supported")
        x = self._prefix(images, torch.tensor(post, dtype=torch.long, device=images.device))
        out = self.llm.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long,
                                                                           device=x.device),
                                num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        return [t.strip() for t in self.tok.batch_decode(out, skip_special_tokens=True)]

    # ---- preprocessing (what the recipes and CLI need) ------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """B captions -> ``input_ids`` / ``attention_mask`` (B, context_length), see :class:`LlavaTokenize`."""
        return self.tokenizer(texts)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``post + text + eos`` untruncated (> context_length: the caption is truncated)."""
        return self.tokenizer.count(text)

    def image_transform(self, train: bool):
        """PIL RGB -> (3, S, S) normalised float (:func:`~mmtl.models.two_tower.make_image_transform`)."""
        return make_image_transform(self.image_size, self.mean, self.std, train)


class LlavaFamily:
    """The ``llava`` model family (registry entry). Capabilities: ``LoraDefaults``, ``TextGeneration``,
    ``ExportFormat``."""

    name = "llava"

    def build(self, cfg: ModelConfig) -> LlavaCaptioner:
        """:class:`LlavaCaptioner` of ``cfg`` in eval mode. Raises ValueError / WeightsError naming the field."""
        for field in ("arch", "config", "weights"):
            if getattr(cfg, field) is not None:
                raise ValueError(f"model.{field} is for open_clip/hf; llava uses model.vision / model.text")
        return LlavaCaptioner(cfg).eval()

    def tokenizer(self, cfg: ModelConfig) -> LlavaTokenize:
        """The caption tokenizer of a built model of ``cfg`` (loads only the tokenizer)."""
        tf = transformers_offline()
        spec = cfg.text.tokenizer_path or cfg.text.path or DEFAULT_TOKENIZER
        tok = tf.AutoTokenizer.from_pretrained(str(resolve_weights(spec, "model_dir")), local_files_only=True)
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        return LlavaTokenize(tok, chat_parts(tok, cfg.decoder.prompt, cfg.decoder.system_prompt)[1], eos, pad,
                             cfg.context_length)

    def image_transform(self, cfg: ModelConfig, train: bool):
        """As the two_tower family's for ``cfg.vision``."""
        mean, std = vision_mean_std(cfg.vision)
        return make_image_transform(cfg.image_size, mean, std, train)

    def lora_default_targets(self, model: LlavaCaptioner, which: str,
                             zero_stage: Optional[int] = None) -> tuple[tuple[str, ...], ...]:
        """image: the timm rule (pointwise convs + Linear); text: :data:`LLM_LORA_TARGETS`."""
        from mmtl.models.family import POINTWISE_AND_LINEAR

        return ((POINTWISE_AND_LINEAR,),) if which == "image" else (LLM_LORA_TARGETS,)

    def architecture_config(self, cfg: ModelConfig) -> ModelConfig:
        """Drops ``vision.weights`` (a file the export replaces); keeps ``text.path`` (config + tokenizer)."""
        cfg.vision.weights = None
        return cfg

    def recipe_name(self) -> str:
        """``captioning`` (:mod:`mmtl.recipes.captioning`)."""
        return "captioning"

    def new_parameters(self, model: LlavaCaptioner) -> dict[str, nn.Parameter]:
        """The projector's parameters (trained by every strategy; stage (a) trains only these)."""
        return {f"projector.{n}": p for n, p in model.projector.named_parameters()}

    def generate(self, model: LlavaCaptioner, images: Tensor, prompt: Optional[str] = None, num_beams: int = 1,
                 max_new_tokens: int = 24) -> list[str]:
        """:meth:`LlavaCaptioner.generate`."""
        return model.generate(images, prompt, num_beams, max_new_tokens)


def tiny_llava_config(**overrides: Any) -> ModelConfig:
    """A random-init llava config for fast tests: timm ``test_efficientnet`` at 32 px, a 2-layer Llama (hidden 32,
    4 heads, 2 KV heads) with the MiniLM package tokenizer (no chat template: the fallback format), context 24."""
    base = dict(
        family="llava",
        vision=VisionTowerConfig(timm_name="test_efficientnet", weights=None),
        text=TextTowerConfig(path=None, tokenizer_path=DEFAULT_TOKENIZER, config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True)),
        decoder=DecoderConfig(image_layer=-3, prompt="What is this?"), image_size=32, context_length=24,
    )
    base.update(overrides)
    return ModelConfig(**base)
