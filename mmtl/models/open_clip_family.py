"""``open_clip`` family: an open_clip CLIP model (built-in architecture name or a model-config dict).

Supports:
  * ``model.arch``: an open_clip built-in name (``ViT-B-16``, ``RN50``, ``convnext_base``, ...), or
    ``model.config``: an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, optional
    ``quick_gelu``, ``custom_text``, ``preprocess_cfg``) -- exactly one of them.
  * ``model.weights``: null (random init, ``model.init_logit_scale``) or a local ``.safetensors`` /
    ``.pt`` / ``.pth`` / ``.bin`` state dict (torch pickles read with ``weights_only=True``; a ``state_dict``
    wrapper and a ``module.`` prefix are removed) in open_clip / OpenAI key naming, or an mmtl export
    (``image_tower.*`` / ``text_tower.*`` keys). open_clip's own fixes are applied: MobileCLIP conversion,
    old text layout, 0-dim vs (1,) ``logit_scale``, position-embedding resizing. ``package:<dist>`` works.
  * Mapping onto :class:`MultimodalModel`: ``image_tower`` = open_clip's ``visual`` (its output is already
    projected to ``embed_dim``), ``text_tower`` = :class:`OpenClipTextTower` (token/positional embedding,
    transformer, ``ln_final``, ``text_projection``: open_clip's ``encode_text``), heads are ``nn.Identity``
    (``project_*`` only L2-normalise), ``logit_scale`` = the model's own parameter, shape (1,)
    (built with ``nonscalar_logit_scale=True``: DeepSpeed cannot broadcast 0-dim parameters).
  * Tokenizer: open_clip's ``SimpleTokenizer`` (BPE, 49408 ids, sot/eot) padded with 0 to
    ``model.context_length``; ``attention_mask`` marks sot..eot (id 0 is also the BPE token "!", so the mask
    is built from lengths, not from ``ids != 0``). Architectures needing a HuggingFace tokenizer (SigLIP,
    ``hf_tokenizer_name``) need ``model.text.tokenizer_path`` = a local tokenizer dir.
  * Image transform: open_clip's ``image_transform`` with the config's ``preprocess_cfg`` (default OpenAI
    mean/std, bicubic, shortest-side resize + center crop); ``model.vision.mean/std`` override mean/std.
  * Export: :func:`to_open_clip_state_dict` maps an mmtl state dict back to open_clip keys.

Consistency rules (the data pipeline reads ``model.image_size`` / ``context_length`` and the registry
``model.embed_dim`` without building the model): ``model.embed_dim`` and ``model.image_size`` must equal the
architecture's; ``model.context_length`` must be <= the architecture's (equal for ``custom_text`` models).
Limits: no network (``pretrained=None``, hub offline); ``.npz`` big_vision weights, CoCa and HF-hub text towers
(``hf_model_name``, their base weights would download) are not supported; the pretrained ``logit_bias`` of
SigLIP-style checkpoints is not kept (the SigLIP loss has its own bias).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from mmtl.config import ModelConfig
from mmtl.models.base import MultimodalModel, Which, fingerprint_of
from mmtl.models.family import POINTWISE_AND_LINEAR
from mmtl.models.offline import open_clip_offline
from mmtl.models.open_clip_text import OpenClipTokenize  # noqa: F401  (re-exported)
from mmtl.models.open_clip_text import OpenClipCustomTextTower, OpenClipTextTower, load_open_clip_tokenizer
from mmtl.models.tokens import open_clip_image_tokens, open_clip_text_tokens, open_clip_token_dims
from mmtl.models.weights import WeightsError, file_digest, load_state_dict_file, params_digest, resolve_weights

_FP_VERSION = 1  # bump when feature semantics change (invalidates frozen-feature caches)
LORA_MLP_TARGETS = ("c_fc", "c_proj")  # default LoRA targets: resblock MLPs ...
LORA_ATTN_TARGETS = ("attn",)  # ... and attention (nn.MultiheadAttention: not under ZeRO-3)


# ---- config -------------------------------------------------------------------------------------------
def resolve_open_clip_config(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip model config (a deep copy) of ``model.arch`` or ``model.config``.

    Returns:
        dict with ``embed_dim``, ``vision_cfg``, ``text_cfg`` and possibly ``quick_gelu``, ``custom_text``,
        ``preprocess_cfg``, ``init_logit_bias``.
    Raises:
        ValueError: both or neither of ``arch`` / ``config``; unknown arch; a config missing keys.
    """
    if bool(cfg.arch) == bool(cfg.config):
        raise ValueError("model (family open_clip): set exactly one of `arch` (an open_clip model name) and "
                         f"`config` (an open_clip model config dict) (got arch={cfg.arch!r}, config={cfg.config!r})")
    oc = open_clip_offline()
    if cfg.arch:
        if ":" in cfg.arch:
            raise ValueError(f"model.arch={cfg.arch!r}: hub/local-dir schemas are not supported; use a built-in "
                             "name or model.config, and model.weights for the weights file")
        mc = oc.get_model_config(cfg.arch)
        if mc is None:
            known = oc.list_models()
            raise ValueError(f"model.arch={cfg.arch!r} is not an open_clip model name "
                             f"({len(known)} known, e.g. {known[:6]})")
    else:
        mc = copy.deepcopy(dict(cfg.config))
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in mc]
        if missing:
            raise ValueError(f"model.config (open_clip) lacks {missing}; it needs embed_dim, vision_cfg, text_cfg")
    if "multimodal_cfg" in mc:
        raise ValueError(f"model.{'arch' if cfg.arch else 'config'}: CoCa models (multimodal_cfg) are not supported")
    if mc["text_cfg"].get("hf_model_name"):
        raise ValueError("model: open_clip text towers from HuggingFace (text_cfg.hf_model_name) are not supported "
                         "offline; use family 'hf' or a native text_cfg")
    return mc


def _arch_image_size(mc: dict) -> int:
    size = mc["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"open_clip vision_cfg.image_size={size}: only square inputs are supported")
        size = size[0]
    return int(size)


def _arch_context_length(mc: dict) -> int:
    return int(mc["text_cfg"].get("context_length", 77))


def check_consistency(cfg: ModelConfig, mc: dict) -> None:
    """Raise ValueError when ``model.embed_dim/image_size/context_length`` disagree with the architecture."""
    name = cfg.arch or "model.config"
    if int(mc["embed_dim"]) != cfg.embed_dim:
        raise ValueError(f"model.embed_dim={cfg.embed_dim} but open_clip {name} has embed_dim {mc['embed_dim']}: "
                         f"set model.embed_dim: {mc['embed_dim']}")
    size = _arch_image_size(mc)
    if size != cfg.image_size:
        raise ValueError(f"model.image_size={cfg.image_size} but open_clip {name} takes {size}-px images: "
                         f"set model.image_size: {size} (or change vision_cfg.image_size in model.config)")
    ctx = _arch_context_length(mc)
    custom = bool(mc.get("custom_text"))
    if cfg.context_length > ctx or (custom and cfg.context_length != ctx):
        raise ValueError(f"model.context_length={cfg.context_length} but open_clip {name} has context length {ctx}"
                         f" (must be {'==' if custom else '<='} {ctx})")


def preprocess_of(cfg: ModelConfig, mc: dict) -> dict[str, Any]:
    """open_clip ``PreprocessCfg`` fields for this model: defaults < ``preprocess_cfg`` < ``model.vision``."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    from dataclasses import asdict

    pp = merge_preprocess_dict(asdict(PreprocessCfg()), mc.get("preprocess_cfg") or {})
    if cfg.vision.mean is not None:
        pp["mean"] = tuple(cfg.vision.mean)
    if cfg.vision.std is not None:
        pp["std"] = tuple(cfg.vision.std)
    pp["size"] = cfg.image_size
    pp["mean"], pp["std"] = tuple(float(x) for x in pp["mean"]), tuple(float(x) for x in pp["std"])
    return pp


def make_open_clip_transform(cfg: ModelConfig, train: bool):
    """open_clip's (picklable) ``image_transform`` for ``cfg``: PIL image -> (3, S, S) float normalised.

    eval: resize (shortest side, bicubic) + center crop; train: ``RandomResizedCrop(scale=(0.9, 1))``.
    """
    oc = open_clip_offline()
    pp = preprocess_of(cfg, resolve_open_clip_config(cfg))
    return oc.image_transform(pp["size"], is_train=train, mean=pp["mean"], std=pp["std"],
                              resize_mode=pp["resize_mode"], interpolation=pp["interpolation"],
                              fill_color=pp["fill_color"])


def to_open_clip_state_dict(sd: dict, nonscalar_logit_scale: bool = False) -> dict:
    """Map an mmtl ``MultimodalModel.state_dict()`` of the open_clip family to open_clip's own keys.

    ``image_tower.X`` -> ``visual.X``; ``text_tower.X`` -> ``X`` (CLIP layout: ``token_embedding.*``,
    ``positional_embedding``, ``transformer.*``, ``ln_final.*``, ``text_projection``; custom-text layout:
    ``text.*``); ``logit_scale`` -> ``logit_scale`` reshaped to 0-dim (open_clip's default) unless
    ``nonscalar_logit_scale``; ``image_head.*`` / ``text_head.*`` (Identity: none) and ``logit_bias`` are dropped.

    Load with ``open_clip.create_model(arch).load_state_dict(mapped)`` (strict).
    Raises:
        ValueError: a key that belongs to no known part.
    """
    out: dict = {}
    for k, v in sd.items():
        if k.startswith("image_tower."):
            out["visual." + k[len("image_tower."):]] = v
        elif k.startswith("text_tower."):
            out[k[len("text_tower."):]] = v
        elif k == "logit_scale":
            out[k] = v.reshape(1) if nonscalar_logit_scale else v.reshape(())
        elif k == "logit_bias" or k.startswith(("image_head.", "text_head.")):
            continue
        else:
            raise ValueError(f"to_open_clip_state_dict: unexpected key {k!r} (not an open_clip-family state dict)")
    return out


def _load_weights(model: nn.Module, spec: str) -> Path:
    """Load ``spec`` into the open_clip model (strict); returns the resolved file path."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    path = resolve_weights(spec, "file")
    if path.suffix in (".npz", ".npy"):
        raise WeightsError(f"model.weights={spec}: big_vision .npz weights are not supported")
    sd = dict(load_state_dict_file(path))
    if next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith(("image_tower.", "text_tower.")) for k in sd):
        sd = to_open_clip_state_dict(sd)
    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    if "logit_scale" in sd:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    if getattr(model, "logit_bias", None) is None:
        sd.pop("logit_bias", None)
    sd.pop("text.transformer.embeddings.position_ids", None)
    try:
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"model.weights={spec} ({path.name}) does not fit the architecture: {exc}") from exc
    if missing or unexpected:
        raise WeightsError(f"model.weights={spec} ({path.name}) does not fit the architecture: "
                           f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    return path


def create_open_clip_model(cfg: ModelConfig, mc: Optional[dict] = None) -> tuple[nn.Module, dict, Optional[Path]]:
    """Instantiate the open_clip ``CLIP`` / ``CustomTextCLIP`` (fp32, CPU, ``nonscalar_logit_scale=True``) and
    load ``model.weights``. Returns (model, model config used, weights path or None)."""
    oc = open_clip_offline()
    mc = copy.deepcopy(mc if mc is not None else resolve_open_clip_config(cfg))
    mc.pop("preprocess_cfg", None)
    mc.pop("init_logit_bias", None)  # the SigLIP loss has its own bias
    custom = bool(mc.pop("custom_text", False))
    vc = mc["vision_cfg"]
    if vc.get("timm_model_name"):
        vc["timm_model_pretrained"] = False  # never download base weights
    cls = oc.model.CustomTextCLIP if custom else oc.model.CLIP
    init = cfg.init_logit_scale
    model = cls(**mc, init_logit_scale=init, nonscalar_logit_scale=True)
    path = _load_weights(model, cfg.weights) if cfg.weights else None
    return model.float().eval(), mc, path


# ---- the model ----------------------------------------------------------------------------------------
class OpenClipModel(MultimodalModel):
    """An open_clip CLIP behind :class:`MultimodalModel` (see module docstring). Build with ``OpenClipModel(cfg)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.family != "open_clip":
            raise ValueError(f"OpenClipModel needs model.family='open_clip', got {cfg.family!r}")
        mc = resolve_open_clip_config(cfg)
        check_consistency(cfg, mc)
        tok, tok_id = load_open_clip_tokenizer(cfg, mc)
        clip, used_cfg, wpath = create_open_clip_model(cfg, mc)
        d = int(mc["embed_dim"])
        super().__init__(image_dim=d, text_dim=d, embed_dim=d, head="linear", init_logit_scale=cfg.init_logit_scale,
                         max_logit_scale=cfg.max_logit_scale, image_size=cfg.image_size,
                         context_length=cfg.context_length, head_dropout=cfg.head_dropout)
        self.cfg = cfg.model_copy(deep=True)
        self.image_head, self.text_head = nn.Identity(), nn.Identity()  # towers already project to embed_dim
        self.image_tower = clip.visual
        self.text_tower = (OpenClipCustomTextTower(clip.text) if hasattr(clip, "text")
                           else OpenClipTextTower(clip))
        self.logit_scale = clip.logit_scale  # (1,), nonscalar
        self.tokenizer = tok
        self.preprocess = preprocess_of(cfg, mc)
        vision_id = {k: v for k, v in used_cfg.items() if k != "text_cfg"}
        text_id = {k: v for k, v in used_cfg.items() if k != "vision_cfg"}
        common: dict[str, Any] = {"v": _FP_VERSION, "family": "open_clip", "arch": cfg.arch,
                                  "custom_text": hasattr(clip, "text"), "weights": cfg.weights}
        if wpath is not None:
            common["weights_digest"] = file_digest(wpath)
            img_w, txt_w = {}, {}
        else:
            img_w = {"params_digest": params_digest(self.image_tower)}
            txt_w = {"params_digest": params_digest(self.text_tower)}
        self._fingerprints = {
            "image": fingerprint_of({**common, "tower": "image", "model_cfg": vision_id, **img_w,
                                     "image_size": self.image_size, "preprocess": self.preprocess}),
            "text": fingerprint_of({**common, "tower": "text", "model_cfg": text_id, **txt_w, **tok_id,
                                    "context_length": self.context_length}),
        }
        self.image_tower.eval()
        self.text_tower.eval()

    def image_features(self, images: Tensor) -> Tensor:
        """(B,3,S,S) normalised float -> (B, D) open_clip ``visual`` output (already projected, not normalised)."""
        return self.image_tower(images)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,L) ids + mask -> (B, D) open_clip ``encode_text`` output (projected, not normalised).

        With a causal text tower and eot/argmax/first pooling the batch is trimmed to its longest sequence
        (same result, less compute).
        """
        tower = self.text_tower
        if tower.causal and tower.pool_type in ("argmax", "eos", "first"):
            n = max(int(attention_mask.sum(dim=1).max()), 1)
            input_ids = input_ids[:, :n]
        return tower(input_ids)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """B strings -> ``dict(input_ids=(B,L) long, attention_mask=(B,L) long)``, L = context_length."""
        return self.tokenizer(texts)

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` incl. sot/eot, untruncated."""
        return self.tokenizer.count(text)

    def image_transform(self, train: bool):
        """open_clip's picklable preprocess: PIL image -> (3, image_size, image_size) float, normalised."""
        return make_open_clip_transform(self.cfg, train)

    def fingerprint(self, which: Which) -> str:
        """24-hex hash: model config of the tower, weights file content digest (or the random-init parameters'
        digest), image size + preprocessing or context length + tokenizer."""
        try:
            return self._fingerprints[which]
        except KeyError:
            raise ValueError(f"fingerprint(which) must be 'image' or 'text', got {which!r}") from None

    def tower_blocks(self, which: Which) -> list[nn.Module]:
        """Main blocks, input to output: ViT / text ``transformer.resblocks``, ModifiedResNet
        ``layer1..layer4``, timm ``trunk.blocks`` / ``trunk.stages``. ValueError when none is found."""
        tower = self.image_tower if which == "image" else self.text_tower
        for path in ("transformer.resblocks", "trunk.blocks", "trunk.stages"):
            obj = tower
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, (nn.ModuleList, nn.Sequential)) and len(obj) > 0:
                return list(obj)
        if all(hasattr(tower, f"layer{i}") for i in range(1, 5)):
            return [getattr(tower, f"layer{i}") for i in range(1, 5)]
        raise ValueError(f"{which} tower {type(tower).__name__} has no recognised block list")


class OpenClipFamily:
    """``open_clip`` (:class:`OpenClipModel`). Capabilities: token features (ViT patch tokens, text states after
    ``ln_final``; padding not trimmable), LoRA defaults, export format. No CoOp context encoding."""

    name = "open_clip"

    def build(self, cfg: ModelConfig) -> OpenClipModel:
        """:class:`OpenClipModel` of ``cfg`` (ValueError / WeightsError as its constructor)."""
        return OpenClipModel(cfg)

    def tokenizer(self, cfg: ModelConfig):
        """:func:`load_open_clip_tokenizer` after :func:`check_consistency` (ValueError on a mismatch)."""
        mc = resolve_open_clip_config(cfg)
        check_consistency(cfg, mc)
        return load_open_clip_tokenizer(cfg, mc)[0]

    def image_transform(self, cfg: ModelConfig, train: bool):
        """:func:`make_open_clip_transform`."""
        return make_open_clip_transform(cfg, train)

    def image_tokens(self, model: OpenClipModel, images: Tensor, layer: int = -1) -> Tensor:
        """(B, 3, S, S) -> (B, N, width) (:func:`~mmtl.models.tokens.open_clip_image_tokens`; ViT towers only)."""
        return open_clip_image_tokens(model.image_tower, images, layer)

    def text_tokens(self, model: OpenClipModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) -> (B, L, width) (:func:`~mmtl.models.tokens.open_clip_text_tokens`; the mask is not used)."""
        return open_clip_text_tokens(model.text_tower, input_ids)

    def token_dims(self, model: OpenClipModel, layer: int = -1) -> tuple[int, int]:
        """Transformer widths of both towers (:func:`~mmtl.models.tokens.open_clip_token_dims`)."""
        return open_clip_token_dims(model.image_tower, model.text_tower, layer)

    def text_tokens_trimmable(self, model: OpenClipModel) -> bool:
        """False: text towers are fed at their trained length."""
        return False

    def lora_default_targets(self, model: OpenClipModel, which: str,
                             zero_stage: Optional[int] = None) -> tuple[tuple[str, ...], ...]:
        """MLP ``c_fc``, ``c_proj`` and the ``attn`` ``nn.MultiheadAttention`` (left out when ``zero_stage == 3``);
        towers without them (timm trunk) fall back to the pointwise-conv + ``nn.Linear`` rule."""
        return (LORA_MLP_TARGETS + (LORA_ATTN_TARGETS if zero_stage != 3 else ()), (POINTWISE_AND_LINEAR,))

    def architecture_config(self, cfg: ModelConfig) -> ModelConfig:
        """Drops ``weights`` (a state-dict file the export replaces); ``arch`` / ``config`` stay."""
        cfg.weights = None
        return cfg


def tiny_open_clip_config(**overrides: Any) -> ModelConfig:
    """A random-init open_clip config for fast tests: ViT (width 32, 2 layers, patch 8, 32 px) + text
    transformer (width 32, 2 layers, context 16, the full 49408-id BPE vocab), embed_dim 16."""
    base: dict[str, Any] = dict(
        family="open_clip",
        config=dict(
            embed_dim=16,
            vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
        ),
        embed_dim=16, image_size=32, context_length=16,
    )
    base.update(overrides)
    return ModelConfig(**base)
