"""What a model family is: a small required protocol plus optional capabilities.

A *family* (``model.family`` in the pipeline) is an object that knows how to build one kind of model from a
:class:`~mmtl.config.ModelConfig`. The registry (:mod:`mmtl.models.registry`) maps names to family objects;
the rest of mmtl asks a family for what it needs instead of comparing family names.

Required of every family (:class:`ModelFamily`): ``name``, ``build(cfg)``, ``tokenizer(cfg)``,
``image_transform(cfg, train)``. Nothing in it assumes two towers, heads or a logit scale: an encoder-decoder
captioner or an image -> LLM model is a family too.

Optional capabilities, each a runtime-checkable protocol; a family has one when it defines all its methods:

* :class:`TokenFeatures`: ``image_tokens``, ``text_tokens``, ``token_dims``, ``text_tokens_trimmable``
  (asked by :mod:`mmtl.models.tokens`, i.e. ``model.image_tokens(...)``, and by fusion feature extraction);
* :class:`LoraDefaults`: ``lora_default_targets`` (:mod:`mmtl.strategies.lora`, when targets are ``null``);
* :class:`ContextTextEncoding`: ``context_text_encoder`` (CoOp, :mod:`mmtl.prompting.coop`);
* :class:`ExportFormat`: ``architecture_config`` (rebuilding an export, :mod:`mmtl.tracking.registry`);
* :class:`TextGeneration`: ``recipe_name``, ``new_parameters``, ``generate`` (generative families such as
  ``blip``: the recipe that trains them, the newly initialised parameters every strategy trains, decoding).

Ask with :func:`supports` (bool) or :func:`capability` (the family typed as the capability, or ``None``).
Shapes: ``B`` batch, ``L`` tokens, ``N`` image tokens, ``D_v`` / ``D_t`` tower widths, ``D_w`` token-embedding
width, ``C`` class prompts.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol, TypeVar, runtime_checkable

from torch import Tensor, nn

from mmtl.config import ModelConfig

#: LoRA target rule token (a group of its own in :meth:`LoraDefaults.lora_default_targets`): every 1x1
#: ``conv_pw`` / ``conv_pwl`` ``nn.Conv2d`` (EfficientNet, MobileNet) and every ``nn.Linear`` of the tower
#: (timm models). The string is also the rule's description in the recorded target spec.
POINTWISE_AND_LINEAR = "conv_pw,conv_pwl,<nn.Linear>"


@runtime_checkable
class ModelFamily(Protocol):
    """The required part of a model family (see the module docstring).

    Attributes:
        name: the ``model.family`` value that selects it (unique in the registry).
    """

    name: str

    def build(self, cfg: ModelConfig) -> nn.Module:
        """The model of ``cfg`` in eval mode (without ``cfg.init_from``: :func:`mmtl.models.build_model` applies
        it). Raises ValueError / :class:`~mmtl.models.weights.WeightsError` naming the bad ``model.*`` field."""
        ...

    def tokenizer(self, cfg: ModelConfig) -> Callable[[list[str]], dict[str, Tensor]]:
        """A picklable ``texts -> dict(input_ids=(B, L) long, attention_mask=(B, L) long)`` callable with
        ``.count(text) -> int``, identical to the built model's ``tokenize`` (no model is built)."""
        ...

    def image_transform(self, cfg: ModelConfig, train: bool) -> Callable[[Any], Tensor]:
        """A picklable PIL RGB image -> (3, S, S) float transform (S = ``cfg.image_size``), identical to the built
        model's ``image_transform(train)`` (no model is built)."""
        ...


@runtime_checkable
class TokenFeatures(Protocol):
    """Token-level tower outputs (fusion modules), per family; ``model`` is a model this family built."""

    def image_tokens(self, model: nn.Module, images: Tensor, layer: int = -1) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, N, D_v) image tokens of level ``layer`` (-1: final, -k: an
        intermediate stage / block, :mod:`mmtl.models.tokens`). Raises ValueError: no tokens, bad ``layer``."""
        ...

    def text_tokens(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids + mask -> (B, L, D_t) text token states aligned with ``attention_mask``."""
        ...

    def token_dims(self, model: nn.Module, layer: int = -1) -> tuple[int, int]:
        """``(D_v, D_t)`` of :meth:`image_tokens` (level ``layer``) and :meth:`text_tokens`, without a forward
        pass. Raises ValueError like :meth:`image_tokens`."""
        ...

    def text_tokens_trimmable(self, model: nn.Module) -> bool:
        """True when cutting right padding off ``input_ids`` never changes the real tokens' states (masked
        encoders), so a batch may be trimmed to its longest text before :meth:`text_tokens`."""
        ...


@runtime_checkable
class LoraDefaults(Protocol):
    """Default LoRA targets of a family (used when ``strategy.lora.<tower>_targets`` is ``null``)."""

    def lora_default_targets(self, model: nn.Module, which: str,
                             zero_stage: Optional[int] = None) -> tuple[tuple[str, ...], ...]:
        """Candidate target groups for the ``which`` (``"image"`` / ``"text"``) tower, in priority order: the
        first group matching an adaptable module is used. A group holds module names (PEFT matching) or is
        ``(POINTWISE_AND_LINEAR,)`` (the timm rule). ``zero_stage`` 3 must leave out ``nn.MultiheadAttention``."""
        ...


class ContextTextEncoder(NamedTuple):
    """CoOp's "text with learned context" encoder of one model.

    Attributes:
        token_embedding: the text tower's token-embedding table (vocab, D_w).
        features: ``(inputs_embeds (C, L, D_w), attention_mask (C, L)) -> (C, D_t)`` pooled text features
            (before the model's ``project_text``), computed as the tower would for token ids with those
            embeddings (right-padded sequences).
    """

    token_embedding: nn.Embedding
    features: Callable[[Tensor, Tensor], Tensor]


@runtime_checkable
class ContextTextEncoding(Protocol):
    """Text encoding from token embeddings (CoOp prompt tuning)."""

    def context_text_encoder(self, model: nn.Module) -> Optional[ContextTextEncoder]:
        """The encoder of ``model``, or ``None`` when this model variant has none (e.g. hf SigLIP)."""
        ...


@runtime_checkable
class ExportFormat(Protocol):
    """How a family's export (``model.safetensors`` + ``pipeline.yaml``) is rebuilt."""

    def architecture_config(self, cfg: ModelConfig) -> ModelConfig:
        """``cfg`` (a copy the caller owns; may be changed in place) without the family's weight-file fields
        that an export's ``model.safetensors`` replaces; fields naming folders that also hold the config or
        tokenizer are kept. Returns the config to build the architecture from."""
        ...


@runtime_checkable
class TextGeneration(Protocol):
    """A family whose models write text about an image (captioner, image -> LLM)."""

    def recipe_name(self) -> str:
        """The recipe (:data:`mmtl.recipes.RECIPES`) that trains this family's models, whatever the strategy."""
        ...

    def new_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """``{model-level name: parameter}`` of the newly initialised parts (projector, cross-attention, ...):
        trained in full by every strategy (frozen towers, LoRA), since they have no pretrained values to keep."""
        ...

    def generate(self, model: nn.Module, images: Tensor, prompt: Optional[str] = None, num_beams: int = 1,
                 max_new_tokens: int = 24) -> list[str]:
        """(B, 3, S, S) normalised images (+ an optional prompt) -> B generated texts (greedy or beam search)."""
        ...


Cap = TypeVar("Cap")


def supports(family: object, cap: type) -> bool:
    """Whether ``family`` has capability ``cap`` (one of the protocols above: all its methods defined)."""
    return family is not None and isinstance(family, cap)


def capability(family: object, cap: type[Cap]) -> Optional[Cap]:
    """``family`` typed as capability ``cap`` when it has it, else ``None`` (``family`` may be ``None``)."""
    return family if supports(family, cap) else None  # type: ignore[return-value]
