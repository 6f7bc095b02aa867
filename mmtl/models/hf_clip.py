"""``hf`` family: a transformers ``CLIPModel`` or ``SiglipModel`` from a local directory or a config dict.

Supports:
  * ``model.weights``: a local model dir (``config.json`` + ``*.safetensors`` / ``pytorch_model.bin``,
    ``save_pretrained`` layout, or ``package:<dist>``), or ``model.config``: a ``CLIPConfig`` /
    ``SiglipConfig`` kwargs dict with ``model_type`` ("clip" default, or "siglip"), ``text_config``,
    ``vision_config`` (random init, ``model.init_logit_scale``) -- exactly one of them.
  * Mapping onto :class:`MultimodalModel`: ``image_tower`` = :class:`HFImageTower` (``vision_model`` +
    ``visual_projection``; SigLIP: ``vision_model`` with its attention-pool head), ``text_tower`` =
    :class:`HFTextTower` (``text_model`` + ``text_projection``; SigLIP: ``text_model`` with its ``head``),
    heads ``nn.Identity`` (towers already project), ``logit_scale`` a (1,) parameter initialised from the
    model's (CLIP's is 0-dim in transformers; DeepSpeed cannot broadcast those). The model's own
    ``logit_scale`` / ``logit_bias`` parameters are not kept: :func:`mmtl.models.hf_keys.to_hf_state_dict` writes them back.
  * Tokenizer: ``model.text.tokenizer_path`` if set, else the model dir's tokenizer; for ``config`` the
    MiniLM package tokenizer (BERT vocab; ``text_config.vocab_size`` / ``eos``/``pad``/``bos_token_id``
    default to the tokenizer's, and ``vocab_size`` must cover it). Right padding to ``context_length``.
    CLIP pools at the first ``eos_token_id``; SigLIP at the last position and is fed without attention mask
    (as trained: pad to ``max_length``).
  * Image transform: mmtl's bicubic resize + center crop (train: RandomResizedCrop(0.8, 1)) at the vision
    config's ``image_size``; mean/std from ``model.vision.mean/std``, else the dir's
    ``preprocessor_config.json``, else CLIP's (OpenAI) for CLIP and 0.5 for SigLIP.

Consistency rules (see the open_clip family): ``model.embed_dim`` = the projection width, ``model.image_size``
= ``vision_config.image_size``, ``model.context_length`` <= ``text_config.max_position_embeddings``.
Limits: no network (``local_files_only``); other model types (ALIGN, BLIP, SigLIP2) are not supported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mmtl.config import ModelConfig
from mmtl.models.base import MultimodalModel, Which, fingerprint_of
from mmtl.models.family import ContextTextEncoder
from mmtl.models.offline import transformers_offline
from mmtl.models.tokens import hf_image_tokens, hf_token_dims
from mmtl.models.weights import dir_digest, params_digest, resolve_weights

_FP_VERSION = 1
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # default LoRA targets (CLIP / SigLIP attention)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")


# ---- config -------------------------------------------------------------------------------------------
def _check_source(cfg: ModelConfig) -> None:
    if bool(cfg.weights) == bool(cfg.config):
        raise ValueError("model (family hf): set exactly one of `weights` (a local CLIP/SigLIP model dir) and "
                         f"`config` (a CLIPConfig/SiglipConfig dict) (got weights={cfg.weights!r}, "
                         f"config={'{...}' if cfg.config else None})")
    if cfg.arch:
        raise ValueError(f"model.arch={cfg.arch!r} is for family open_clip; family hf uses weights or config")


def _model_dir(cfg: ModelConfig) -> Optional[Path]:
    return resolve_weights(cfg.weights, "model_dir") if cfg.weights else None


def _model_type(cfg: ModelConfig, mdir: Optional[Path]) -> str:
    if mdir is not None:
        mt = json.loads((mdir / "config.json").read_text()).get("model_type")
    else:
        mt = cfg.config.get("model_type", "clip")
    if mt not in ("clip", "siglip"):
        src = f"model.weights={cfg.weights}" if mdir else "model.config.model_type"
        raise ValueError(f"{src}: model_type {mt!r} is not supported (clip, siglip)")
    return mt


def _tokenizer_spec(cfg: ModelConfig, mdir: Optional[Path]) -> str:
    from mmtl.models.two_tower import DEFAULT_TOKENIZER

    if cfg.text.tokenizer_path:
        return cfg.text.tokenizer_path
    if mdir is not None:
        if not any((mdir / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(f"model.weights={cfg.weights} has no tokenizer files; set model.text.tokenizer_path")
        return str(mdir)
    return DEFAULT_TOKENIZER


def load_hf_tokenizer(cfg: ModelConfig, mdir: Optional[Path] = None):
    """(HFTokenize, identity) for the hf family (``tokenizer_path`` > model dir > MiniLM package)."""
    from mmtl.models.two_tower import load_tokenizer

    if mdir is None and cfg.weights:
        mdir = _model_dir(cfg)
    spec = _tokenizer_spec(cfg, mdir)
    return load_tokenizer(cfg.text.model_copy(update={"tokenizer_path": spec, "path": None}), cfg.context_length)


def hf_mean_std(cfg: ModelConfig, model_type: str, mdir: Optional[Path]) -> tuple[tuple, tuple]:
    """Normalisation: ``model.vision.mean/std`` > the dir's preprocessor_config.json > CLIP / SigLIP defaults."""
    mean, std = (CLIP_MEAN, CLIP_STD) if model_type == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    if mdir is not None and (mdir / "preprocessor_config.json").is_file():
        pp = json.loads((mdir / "preprocessor_config.json").read_text())
        mean, std = pp.get("image_mean", mean), pp.get("image_std", std)
    mean, std = cfg.vision.mean or mean, cfg.vision.std or std
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def make_hf_transform(cfg: ModelConfig, train: bool):
    """Picklable PIL RGB -> (3, image_size, image_size) transform for the hf family (no model build)."""
    from mmtl.models.two_tower import make_image_transform

    _check_source(cfg)
    mdir = _model_dir(cfg)
    mean, std = hf_mean_std(cfg, _model_type(cfg, mdir), mdir)
    return make_image_transform(cfg.image_size, mean, std, train)


def hf_config_from_dict(tf, cfg: ModelConfig, tok) -> Any:
    """CLIPConfig / SiglipConfig from ``model.config`` (``tf``: the transformers module, ``tok``: the
    :class:`~mmtl.models.two_tower.HFTokenize` of the model); text vocab size and eos/pad/bos ids default to the
    tokenizer's."""
    kw = dict(cfg.config)
    mt = kw.pop("model_type", "clip")
    text = dict(kw.pop("text_config", None) or {})
    vision = dict(kw.pop("vision_config", None) or {})
    t = tok.tokenizer
    text.setdefault("vocab_size", len(t))
    for name, tid in (("eos_token_id", t.sep_token_id if t.sep_token_id is not None else t.eos_token_id),
                      ("pad_token_id", t.pad_token_id),
                      ("bos_token_id", t.cls_token_id if t.cls_token_id is not None else t.bos_token_id)):
        if tid is not None:
            text.setdefault(name, int(tid))
    cls = tf.CLIPConfig if mt == "clip" else tf.SiglipConfig
    return cls(text_config=text, vision_config=vision, **kw)


# ---- towers -------------------------------------------------------------------------------------------
class HFImageTower(nn.Module):
    """``vision_model`` pooled output, then ``visual_projection`` when there is one: (B,3,S,S) -> (B, D).

    ``layers`` exposes ``vision_model.encoder.layers`` (not registered twice) for block lookups.
    """

    def __init__(self, vision_model: nn.Module, visual_projection: Optional[nn.Module]) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    @property
    def layers(self) -> nn.ModuleList:
        return self.vision_model.encoder.layers

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(x) if self.visual_projection is not None else x


class HFTextTower(nn.Module):
    """``text_model`` pooled output, then ``text_projection`` when there is one: ids (B,L) -> (B, D).

    ``use_mask=False`` (SigLIP) ignores the attention mask, as SigLIP was trained.
    """

    def __init__(self, text_model: nn.Module, text_projection: Optional[nn.Module], use_mask: bool) -> None:
        super().__init__()
        self.text_model = text_model
        self.text_projection = text_projection
        self.use_mask = bool(use_mask)

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.encoder.layers

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        mask = attention_mask if self.use_mask else None
        x = self.text_model(input_ids=input_ids, attention_mask=mask).pooler_output
        return self.text_projection(x) if self.text_projection is not None else x


# ---- the model ----------------------------------------------------------------------------------------
class HFClipModel(MultimodalModel):
    """transformers CLIP / SigLIP behind :class:`MultimodalModel` (see module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.family != "hf":
            raise ValueError(f"HFClipModel needs model.family='hf', got {cfg.family!r}")
        _check_source(cfg)
        tf = transformers_offline()
        mdir = _model_dir(cfg)
        mt = _model_type(cfg, mdir)
        tok, tok_id = load_hf_tokenizer(cfg, mdir)
        cls = tf.CLIPModel if mt == "clip" else tf.SiglipModel
        identity: dict[str, Any] = {"v": _FP_VERSION, "family": "hf", "model_type": mt, "weights": cfg.weights}
        if mdir is not None:
            log = tf.utils.logging
            verbosity = log.get_verbosity()
            log.set_verbosity_error()
            try:
                hf = cls.from_pretrained(str(mdir), local_files_only=True)
            finally:
                log.set_verbosity(verbosity)
            identity["weights_digest"] = dir_digest(mdir)
        else:
            hf = cls(hf_config_from_dict(tf, cfg, tok))
            identity["config"] = cfg.config
        hf = hf.float().eval()
        conf = hf.config
        tconf, vconf = conf.text_config, conf.vision_config
        if mt == "clip":
            d = int(conf.projection_dim)
        else:
            d = int(vconf.hidden_size)
            td = int(getattr(tconf, "projection_size", None) or tconf.hidden_size)
            if td != d:
                raise ValueError(f"SigLIP text projection_size {td} != vision hidden_size {d}")
        src = f"model.weights={cfg.weights}" if mdir else "model.config"
        if d != cfg.embed_dim:
            raise ValueError(f"model.embed_dim={cfg.embed_dim} but {src} projects to {d}: set model.embed_dim: {d}")
        if int(vconf.image_size) != cfg.image_size:
            raise ValueError(f"model.image_size={cfg.image_size} but {src} takes {vconf.image_size}-px images: "
                             f"set model.image_size: {vconf.image_size}")
        if cfg.context_length > int(tconf.max_position_embeddings):
            raise ValueError(f"model.context_length={cfg.context_length} > {src} text max_position_embeddings="
                             f"{tconf.max_position_embeddings}")
        if int(tconf.vocab_size) < len(tok.tokenizer):
            raise ValueError(f"{src}: text vocab_size {tconf.vocab_size} < tokenizer size {len(tok.tokenizer)}")
        if mt == "clip" and tconf.eos_token_id not in (2, None) and tconf.eos_token_id not in tok.tokenizer.all_special_ids:
            raise ValueError(f"{src}: text eos_token_id {tconf.eos_token_id} is not a special token of the tokenizer "
                             f"{tok_id['tokenizer']} (CLIP pools at that token)")
        super().__init__(image_dim=d, text_dim=d, embed_dim=d, head="linear", init_logit_scale=cfg.init_logit_scale,
                         max_logit_scale=cfg.max_logit_scale, image_size=cfg.image_size,
                         context_length=cfg.context_length, head_dropout=cfg.head_dropout)
        self.cfg = cfg.model_copy(deep=True)
        self.model_type = mt
        self.image_head, self.text_head = nn.Identity(), nn.Identity()
        self.image_tower = HFImageTower(hf.vision_model, getattr(hf, "visual_projection", None))
        self.text_tower = HFTextTower(hf.text_model, getattr(hf, "text_projection", None), use_mask=mt == "clip")
        if mdir is not None:
            self.logit_scale.data.copy_(hf.logit_scale.detach().reshape(1).float())
        self.tokenizer = tok
        self.mean, self.std = hf_mean_std(cfg, mt, mdir)
        if mdir is None:
            img_w = {"params_digest": params_digest(self.image_tower)}
            txt_w = {"params_digest": params_digest(self.text_tower)}
        else:
            img_w, txt_w = {}, {}
        self._fingerprints = {
            "image": fingerprint_of({**identity, "tower": "image", **img_w, "image_size": self.image_size,
                                     "mean": self.mean, "std": self.std}),
            "text": fingerprint_of({**identity, "tower": "text", **txt_w, **tok_id,
                                    "context_length": self.context_length}),
        }

    def image_features(self, images: Tensor) -> Tensor:
        """(B,3,S,S) normalised float -> (B, D) projected pooled vision features (not normalised)."""
        return self.image_tower(images)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,L) right-padded ids + mask -> (B, D) projected pooled text features (not normalised).

        CLIP: the batch is trimmed to its longest sequence (causal mask: same result). SigLIP: full length.
        """
        if self.model_type == "clip":
            n = max(int(attention_mask.sum(dim=1).max()), 1)
            input_ids, attention_mask = input_ids[:, :n], attention_mask[:, :n]
        return self.text_tower(input_ids, attention_mask)

    def text_features_from_embeddings(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """CLIP only: (B, L, D_w) token embeddings + (B, L) right-padded mask -> (B, D) projected features, as
        :meth:`text_features` for ids with those embeddings (causal mask, final layer norm, pooled at the last
        attended token = EOS, ``text_projection``). Used by CoOp (:class:`HFClipFamily`)."""
        from transformers.masking_utils import create_causal_mask

        tm = self.text_tower.text_model
        h = tm.embeddings(inputs_embeds=inputs_embeds)
        am = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=attention_mask, cache=None)
        h = tm.final_layer_norm(tm.encoder(inputs_embeds=h, attention_mask=am, is_causal=True).last_hidden_state)
        pooled = h[torch.arange(h.shape[0], device=h.device), attention_mask.sum(dim=1) - 1]
        proj = self.text_tower.text_projection
        return proj(pooled) if proj is not None else pooled

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """B strings -> ``dict(input_ids=(B,L) long, attention_mask=(B,L) long)``, L = context_length."""
        return self.tokenizer(texts)

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` incl. special tokens, untruncated."""
        return self.tokenizer.count(text)

    def image_transform(self, train: bool):
        """PIL RGB -> (3, image_size, image_size) float, normalised (picklable)."""
        from mmtl.models.two_tower import make_image_transform

        return make_image_transform(self.image_size, self.mean, self.std, train)

    def fingerprint(self, which: Which) -> str:
        """24-hex hash: model type, weights dir digest (or config + random-init parameter digest), image size +
        mean/std or context length + tokenizer."""
        try:
            return self._fingerprints[which]
        except KeyError:
            raise ValueError(f"fingerprint(which) must be 'image' or 'text', got {which!r}") from None

    def tower_blocks(self, which: Which) -> list[nn.Module]:
        """``vision_model.encoder.layers`` / ``text_model.encoder.layers``, input to output."""
        tower = self.image_tower if which == "image" else self.text_tower
        return list(tower.layers)


class HFClipFamily:
    """``hf`` (:class:`HFClipModel`, CLIP / SigLIP). Capabilities: token features (``last_hidden_state``; padding
    trimmable for CLIP only), LoRA defaults, CoOp context encoding (CLIP only), export format."""

    name = "hf"

    def build(self, cfg: ModelConfig) -> HFClipModel:
        """:class:`HFClipModel` of ``cfg`` (ValueError / WeightsError as its constructor)."""
        return HFClipModel(cfg)

    def tokenizer(self, cfg: ModelConfig):
        """:func:`load_hf_tokenizer`'s :class:`~mmtl.models.two_tower.HFTokenize`."""
        return load_hf_tokenizer(cfg)[0]

    def image_transform(self, cfg: ModelConfig, train: bool):
        """:func:`make_hf_transform`."""
        return make_hf_transform(cfg, train)

    def image_tokens(self, model: HFClipModel, images: Tensor, layer: int = -1) -> Tensor:
        """(B, 3, S, S) -> (B, N, hidden) (:func:`~mmtl.models.tokens.hf_image_tokens`)."""
        return hf_image_tokens(model.image_tower.vision_model, images, layer)

    def text_tokens(self, model: HFClipModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) -> (B, L, hidden) ``text_model`` states (the mask is ignored for SigLIP, as trained)."""
        mask = attention_mask if model.text_tower.use_mask else None
        return model.text_tower.text_model(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def token_dims(self, model: HFClipModel, layer: int = -1) -> tuple[int, int]:
        """Hidden sizes of both towers (:func:`~mmtl.models.tokens.hf_token_dims`)."""
        return hf_token_dims(model.image_tower.vision_model, model.text_tower.text_model, layer)

    def text_tokens_trimmable(self, model: HFClipModel) -> bool:
        """True for CLIP (masked), False for SigLIP (fed without mask at full length)."""
        return bool(model.text_tower.use_mask)

    def lora_default_targets(self, model: HFClipModel, which: str,
                             zero_stage: Optional[int] = None) -> tuple[tuple[str, ...], ...]:
        """``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (CLIP / SigLIP attention) in both towers."""
        return (LORA_TARGETS,)

    def context_text_encoder(self, model: HFClipModel) -> Optional[ContextTextEncoder]:
        """CLIP: its token embedding + :meth:`HFClipModel.text_features_from_embeddings`; SigLIP: None."""
        emb = model.text_tower.text_model.embeddings.token_embedding
        return ContextTextEncoder(emb, model.text_features_from_embeddings) if model.model_type == "clip" else None

    def architecture_config(self, cfg: ModelConfig) -> ModelConfig:
        """Unchanged: ``weights`` is a model dir that also holds the config and the tokenizer."""
        return cfg


def tiny_hf_clip_config(**overrides: Any) -> ModelConfig:
    """A random-init transformers CLIP config for fast tests: ViT (hidden 32, 2 layers, patch 8, 32 px) + text
    (hidden 32, 2 layers, 16 positions) with the MiniLM package tokenizer (vocab filled in), projection 16."""
    layer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    base: dict[str, Any] = dict(
        family="hf",
        config=dict(model_type="clip", projection_dim=16,
                    text_config=dict(layer, max_position_embeddings=16),
                    vision_config=dict(layer, image_size=32, patch_size=8)),
        embed_dim=16, image_size=32, context_length=16,
    )
    base.update(overrides)
    return ModelConfig(**base)
