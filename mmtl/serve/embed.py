"""One exported model in memory for serving and index building: :class:`Embedder` encodes texts and untrusted
image bytes into L2-normalised float32 embeddings; :func:`model_fingerprint` names the weights.

Image bytes are decoded exactly as training decodes shard members (:func:`mmtl.data.samples.decode_image`: by
content, through an allow-list of Pillow formats, the pixel count checked from the header against the pipeline's
``data.max_image_pixels`` before any pixel is decoded). Nothing is unpickled: weights come from safetensors.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def model_fingerprint(export_dir: str | Path) -> str:
    """sha256 (hex) of the export's ``model.safetensors``: two exports with equal weights share it (whatever URI
    named them); any retraining changes it. Raises FileNotFoundError when the file is missing."""
    h = hashlib.sha256()
    with open(Path(export_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 matrix products run natively on ``device``: CUDA, or a CPU where oneDNN has bf16 kernels
    (AVX512-BF16 / AMX; ``torch.ops.mkldnn._is_mkldnn_bf16_supported``). Elsewhere bf16 is emulated and slower."""
    if device == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Embedder:
    """An exported two-tower model ready to embed.

    Args:
        model: a :class:`mmtl.models.base.MultimodalModel` (eval mode).
        pipe: its pipeline (``data.max_image_pixels`` bounds decoded images).
        threads: torch intra-op threads while encoding (None: unchanged).
        text_precision: ``"fp32"``, ``"bf16"`` (the text tower runs under bf16 autocast) or ``"auto"`` (bf16
            where :func:`native_bf16` says the hardware has it).

    Attributes:
        dim: embedding width D.
        text_bf16: whether texts are encoded under bf16 autocast. device: the weights' device type (``"cpu"``, ``"cuda"``).
    """

    def __init__(self, model, pipe, threads: Optional[int] = None, text_precision: str = "fp32") -> None:
        if text_precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"text_precision must be auto, fp32 or bf16, got {text_precision!r}")
        self.model, self.pipe, self.threads = model.eval(), pipe, threads
        self.device = next(iter(model.parameters())).device.type
        self.text_bf16 = text_precision == "bf16" or (text_precision == "auto" and native_bf16(self.device))
        self.model.to(memory_format=torch.channels_last)  # once for the model's life (not per request)
        self.tf = model.image_transform(train=False)
        self.dim = int(model.embed_dim)
        self.max_pixels = int(pipe.data.max_image_pixels)
        self.trim_padding = self._trimming_is_exact()

    @classmethod
    def from_export(cls, export_dir: str | Path, threads: Optional[int] = None,
                    text_precision: str = "fp32") -> "Embedder":
        """Load ``export_dir`` (``model.safetensors`` + ``pipeline.yaml``; FileNotFoundError / ValueError /
        RuntimeError from :func:`mmtl.tracking.registry.load_exported`)."""
        from mmtl.tracking.registry import load_exported

        model, pipe = load_exported(export_dir)
        return cls(model, pipe, threads, text_precision)

    @classmethod
    def from_bytes(cls, pipeline_yaml: str, weights: bytes, threads: Optional[int] = None) -> "Embedder":
        """Rebuild from the pipeline YAML text and the safetensors bytes (what Ray actors receive)."""
        from safetensors.torch import load as load_safetensors

        from mmtl.tracking.registry import model_from_export

        model, pipe = model_from_export(pipeline_yaml, load_safetensors(weights))
        return cls(model, pipe, threads)

    def decode(self, data: bytes):
        """Untrusted image bytes -> RGB PIL image. Raises :class:`mmtl.data.samples.SampleRejected` (reason
        ``empty_image``, ``too_many_pixels``, ``truncated_image`` or ``undecodable_image``)."""
        from mmtl.data.samples import decode_image, to_rgb

        return to_rgb(decode_image(bytes(data), self.max_pixels))

    def _run(self, fn, bf16: bool = False):
        from mmtl.data.encode_pool import fast_inference

        with fast_inference(self.model, self.threads, convert=False), \
                torch.autocast(self.device, dtype=torch.bfloat16, enabled=bf16):
            return F.normalize(fn().float(), dim=-1).cpu().numpy().astype(np.float32)

    def encode_images(self, images: Sequence) -> np.ndarray:
        """B RGB PIL images -> (B, D) float32, L2-normalised (B may be 0: shape (0, D))."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        x = torch.stack([self.tf(im) for im in images])
        return self._run(lambda: self.model.encode_image(x))

    def encode_texts(self, texts: Sequence[str], trim: Optional[bool] = None) -> np.ndarray:
        """B strings -> (B, D) float32, L2-normalised (tokenizer truncates to the model's context length).

        ``trim`` (default: :attr:`trim_padding`) drops the padding columns after the batch's longest text before
        the forward pass (the tokenizer pads to the full context length): a 10-token query then costs a tenth
        of a 64-token pass. Used only when :meth:`_trimming_is_exact` found equal embeddings for this model."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tok = self.model.tokenize(list(texts))
        ids, mask = tok["input_ids"], tok["attention_mask"]
        if self.trim_padding if trim is None else trim:
            n = max(1, int(mask.sum(1).max()))
            ids, mask = ids[:, :n].contiguous(), mask[:, :n].contiguous()
        return self._run(lambda: self.model.encode_text(ids, mask), bf16=self.text_bf16)

    def _trimming_is_exact(self) -> bool:
        """Whether trimming padding leaves text embeddings unchanged (max abs difference <= 1e-5) for two probe
        texts of different lengths: true for mean-pooled / masked towers; a tower that reads fixed positions or
        fails on shorter inputs keeps the full context length."""
        probe = ["a", "a longer probe text, with several more tokens than the first one"]
        try:
            bf16, self.text_bf16 = self.text_bf16, False  # trimming is checked in fp32 (bf16 rounding would hide it)
            try:
                full = self.encode_texts(probe, trim=False)
                cut = np.concatenate([self.encode_texts(probe[:1], trim=True), self.encode_texts(probe[1:], trim=True)])
            finally:
                self.text_bf16 = bf16
        except Exception:  # noqa: BLE001 (any failure means: do not trim)
            return False
        return bool(np.abs(full - cut).max() <= 1e-5)

    def class_weights(self, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """Zero-shot classifier (CLIP, Radford et al. 2021, sec. 3.1.4: prompt ensembling): for each class the
        mean of its L2-normalised template embeddings, renormalised. Returns (C, D) float32."""
        prompts = [t.replace("{}", c) for c in classes for t in templates]
        emb = self.encode_texts(prompts).reshape(len(classes), len(templates), self.dim).mean(1)
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)

    def logit_scale(self) -> float:
        """exp(logit_scale), the model's inverse temperature (clamped as in training)."""
        return float(self.model.scale().detach()[0])
