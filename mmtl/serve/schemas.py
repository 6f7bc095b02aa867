"""Request and response bodies of the serving API (pydantic; they make the OpenAPI docs at ``/docs``).

Images inside JSON bodies are base64 text (decoded with :func:`base64.b64decode` ``validate=True``, then by
content through the training decoder); nothing in a request is ever unpickled.
"""
from __future__ import annotations

import base64
import binascii
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Limits enforced by the models (the service also applies its config's limits, which default to these).
MAX_TEXT_BYTES = 10_000


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _text_ok(t: str) -> str:
    if not t.strip():
        raise ValueError("empty text query")
    if len(t.encode("utf-8")) > MAX_TEXT_BYTES:
        raise ValueError(f"text query of {len(t.encode('utf-8'))} bytes; at most {MAX_TEXT_BYTES}")
    return t


def b64_image(s: str) -> bytes:
    """base64 text (optionally a ``data:...;base64,`` URL) -> bytes. Raises ValueError when not base64."""
    if s.startswith("data:") and "," in s:
        s = s.split(",", 1)[1]
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is not valid base64") from None


class EmbedTextIn(_In):
    texts: list[str] = Field(..., min_length=1, max_length=64, description="1..64 texts to embed")

    @field_validator("texts")
    @classmethod
    def _check(cls, v: list[str]) -> list[str]:
        return [_text_ok(t) for t in v]


class EmbeddingsOut(BaseModel):
    dim: int
    embeddings: list[list[float]] = Field(..., description="(N, dim) L2-normalised")


class SearchIn(_In):
    text: Optional[str] = Field(None, description="Text query (any language the model's text tower knows)")
    image: Optional[str] = Field(None, description="Image query: base64 of the encoded image bytes")
    vector: Optional[list[float]] = Field(None, max_length=65536,
                                          description="Embedding query of the index's width (e.g. from /embed/text); "
                                                      "normalised here; NaN, infinite or all-zero is refused")
    top_k: int = Field(10, description="Results to return, 1..index size")
    thumbnails: bool = Field(False, description="Include each result's JPEG thumbnail as a data: URL")

    @field_validator("text")
    @classmethod
    def _check(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _text_ok(v)


class Hit(BaseModel):
    rank: int
    score: float = Field(..., description="cosine similarity of query and image embeddings")
    key: str
    uid: str
    caption: str
    shard: str
    thumbnail: Optional[str] = None


class SearchOut(BaseModel):
    query: str = Field(..., description="'text', 'image' or 'vector'")
    top_k: int
    index_size: int
    results: list[Hit]


class ClassifyIn(_In):
    image: str = Field(..., description="base64 of the encoded image bytes")
    classes: Union[list[str], str] = Field(..., description="class names, or the name of a class list the index "
                                                            "knows (GET /classes)")
    templates: list[str] = Field(["{}"], min_length=1, max_length=32,
                                 description="prompt templates, each with one '{}' for the class name")
    prompt: Optional[Literal["learned", "templates"]] = Field(
        None, description="'learned': the model's learned CoOp context (a prompt_tuning export); 'templates': the "
                          "templates above; default: learned when the model has one")

    @field_validator("templates")
    @classmethod
    def _tmpl(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t.count("{}") != 1]
        if bad:
            raise ValueError(f"each template needs exactly one '{{}}': {bad[:3]}")
        return v


class ClassScore(BaseModel):
    label: str
    prob: float
    score: float = Field(..., description="cosine similarity of image and class embeddings")


class ClassifyOut(BaseModel):
    labels: list[ClassScore] = Field(..., description="every class, most probable first")
    prompt: str = Field("templates", description="'learned' or 'templates': how the class embeddings were made")


class CaptionIn(_In):
    image: str = Field(..., description="base64 of the encoded image bytes")
    prompt: Optional[str] = Field(None, max_length=1000, description="text the output continues (a question for "
                                                                    "a chat model); default model.decoder.prompt")
    num_beams: int = Field(1, ge=1, le=8, description="1: greedy; N: beam search with N beams")
    max_new_tokens: int = Field(24, ge=1, le=128, description="most tokens to generate")


class CaptionOut(BaseModel):
    text: str


class PairIn(_In):
    image: str = Field(..., description="base64 of the encoded image bytes")
    text: str = Field(..., description="the question (/vqa) or the caption to match (/itm)")

    @field_validator("text")
    @classmethod
    def _check(cls, v: str) -> str:
        return _text_ok(v)


class VqaOut(BaseModel):
    answer: str = Field(..., description="the most probable answer of the trained answer vocabulary")
    score: float = Field(..., description="its sigmoid probability, 0-1")


class ItmOut(BaseModel):
    match_prob: float = Field(..., description="probability that the text describes the image, 0-1")
