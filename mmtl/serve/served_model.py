"""What one export can answer when served: :class:`ServedModel` loads it and says which routes it has.

An export is one of three kinds (:func:`export_kind`, from its ``pipeline.yaml`` alone, nothing built):

* ``embedding``: a two-tower / open_clip / hf model (any strategy but ``cross_attention``, family without
  text generation): ``/embed/*``, ``/search`` (with an index), ``/classify``; a ``prompt_tuning`` export also
  carries its learned CoOp context (``prompt.safetensors`` + ``prompt.json``), used by ``/classify`` (Zhou et
  al. 2022, CoOp);
* ``generative``: a family with the :class:`~mmtl.models.family.TextGeneration` capability (``blip``, ``llava``):
  ``/caption`` (a caption, or the answer to a question put in the prompt, by the family's ``generate``);
* ``fusion``: a ``cross_attention`` export (gated cross-attention + task head): ``/vqa`` (answer vocabulary,
  ``strategy.fusion.task: vqa``) or ``/itm`` (image-text match probability, ``task: itm``).

Export files travel to Ray replicas as bytes (:func:`export_files`: ``pipeline.yaml``, ``model.safetensors``
and the prompt files; safetensors / YAML / JSON only, nothing unpickled) and are loaded from a temporary folder.
"""
from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

#: Files of an export folder a replica needs (the other files of an export are other tools' formats).
SERVED_FILES = ("pipeline.yaml", "model.safetensors", "prompt.safetensors", "prompt.json")

#: Routes each kind of export answers (besides ``/``, ``/healthz``, ``/readyz``).
ROUTES = {"embedding": ("/embed/text", "/embed/image", "/search", "/classify", "/classes"),
          "generative": ("/caption",),
          "fusion": ()}  # /vqa or /itm, from the pipeline's fusion task


def export_kind(pipe) -> str:
    """``"embedding"``, ``"generative"`` or ``"fusion"`` for a loaded :class:`mmtl.config.Pipeline` (see module
    docstring). Raises KeyError for a family that is not registered."""
    from mmtl.models.family import TextGeneration, supports
    from mmtl.models.registry import get_family

    if pipe.strategy.kind == "cross_attention":
        return "fusion"
    return "generative" if supports(get_family(pipe.model.family), TextGeneration) else "embedding"


def read_export_pipeline(export_dir: str | Path):
    """The :class:`mmtl.config.Pipeline` of an export folder. Raises FileNotFoundError without ``pipeline.yaml``."""
    import yaml

    from mmtl.config import Pipeline

    p = Path(export_dir) / "pipeline.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{export_dir}: no pipeline.yaml (not an mmtl export)")
    return Pipeline.model_validate(yaml.safe_load(p.read_text()))


def export_files(export_dir: str | Path) -> dict[str, bytes]:
    """``{file name: bytes}`` of the :data:`SERVED_FILES` present in ``export_dir`` (bytes: shipped to replicas
    through Ray's object store)."""
    d = Path(export_dir)
    return {n: (d / n).read_bytes() for n in SERVED_FILES if (d / n).is_file()}


class ServedModel:
    """An export loaded for serving.

    Args:
        export_dir: folder with ``pipeline.yaml`` + ``model.safetensors`` (+ prompt files).
        threads: torch intra-op threads while encoding (None: unchanged).
        text_precision: the embedder's text-tower precision (:class:`mmtl.serve.embed.Embedder`).

    Attributes:
        kind: see :func:`export_kind`. pipe: the pipeline. routes: the model routes it answers.
        embedder: :class:`mmtl.serve.embed.Embedder` (``embedding`` kind) or None.
        prompt: the learned CoOp :class:`~mmtl.prompting.coop.PromptLearner` or None; prompt_classes: its
            default classes ([] without one).
        generator: ``(model, pipe)`` of a ``generative`` export, else None.
        fusion: the :class:`~mmtl.fusion.task.FusionTaskModule` of a ``fusion`` export, else None.

    Raises:
        FileNotFoundError / RuntimeError / ValueError: from the loaders (missing files, weights that do not match).
    """

    def __init__(self, export_dir: str | Path, threads: Optional[int] = None, text_precision: str = "fp32") -> None:
        self.pipe = read_export_pipeline(export_dir)
        self.kind = export_kind(self.pipe)
        self.embedder = self.prompt = self.generator = self.fusion = None
        self.prompt_classes: list[str] = []
        self.threads = threads
        self._lock = threading.Lock()  # generate / fusion forward: one request at a time per replica
        if self.kind == "fusion":
            from mmtl.fusion.export import load_fusion_export

            self.fusion, self.pipe = load_fusion_export(export_dir)
            self.routes: tuple = (f"/{self.pipe.strategy.fusion.task}",)
        elif self.kind == "generative":
            from mmtl.tracking.registry import load_exported

            self.generator = load_exported(export_dir)
            self.routes = ROUTES["generative"]
        else:
            from mmtl.prompting.artifact import LoadedPrompt, find_prompt
            from mmtl.serve.embed import Embedder

            self.embedder = Embedder.from_export(export_dir, threads=threads, text_precision=text_precision)
            if find_prompt(export_dir) is not None:
                loaded = LoadedPrompt(export_dir)
                self.prompt = loaded.learner(self.embedder.model)
                self.prompt_classes = loaded.default_classes()
            self.routes = ROUTES["embedding"]
        self.max_pixels = int(self.pipe.data.max_image_pixels)

    @classmethod
    def from_files(cls, files: dict[str, bytes], threads: Optional[int] = None,
                   text_precision: str = "fp32") -> "ServedModel":
        """Load from :func:`export_files` bytes (what a replica receives); the temporary folder is removed."""
        with tempfile.TemporaryDirectory(prefix="mmtl-serve-") as tmp:
            for name, data in files.items():
                if name not in SERVED_FILES:
                    raise ValueError(f"unexpected export file {name!r}; expected some of {SERVED_FILES}")
                (Path(tmp) / name).write_bytes(data)
            return cls(tmp, threads, text_precision)

    def decode(self, data: bytes):
        """Untrusted image bytes -> RGB PIL image, as training decodes them. Raises
        :class:`mmtl.data.samples.SampleRejected` (reason ``empty_image``, ``too_many_pixels``, ...)."""
        from mmtl.data.samples import decode_image, to_rgb

        return to_rgb(decode_image(bytes(data), self.max_pixels))

    def learned_class_weights(self, classes: Sequence[str]):
        """(C, D) float32 L2-normalised class embeddings from the learned CoOp context for ``classes``.

        Raises:
            LookupError: this model has no learned prompt.
            ValueError: class-specific context and a class it was not trained on.
        """
        import numpy as np

        if self.prompt is None:
            raise LookupError("this model has no learned prompt (train one with strategy.kind: prompt_tuning)")
        with self._lock, torch.inference_mode():
            w = self.prompt.embed_classes(self.embedder.model, list(classes)).float()
        w = torch.nn.functional.normalize(w, dim=-1)
        return w.cpu().numpy().astype(np.float32)

    def caption(self, image, prompt: Optional[str], num_beams: int, max_new_tokens: int) -> str:
        """Generate text for one RGB PIL ``image`` (continuing ``prompt``; None: ``model.decoder.prompt``)."""
        from mmtl.tracking.caption_model import caption_images

        model, pipe = self.generator
        with self._lock, torch.inference_mode():
            return caption_images(model, pipe, [image], prompt, num_beams, max_new_tokens)[0]

    def fusion_predict(self, image, text: str) -> dict:
        """One (image, text) pair through the fusion model: ``{"answer", "score"}`` (vqa) or ``{"match_prob"}``
        (itm); see :func:`mmtl.tracking.fusion_model.predict_rows`."""
        from mmtl.tracking.fusion_model import predict_rows

        with self._lock, torch.inference_mode():
            out = predict_rows(self.fusion, self.pipe, [image], [text])
        return {k: v[0] for k, v in out.items()}

    def describe(self) -> dict:
        """What ``/readyz`` shows about the model's abilities."""
        out = {"kind": self.kind, "family": self.pipe.model.family, "strategy": self.pipe.strategy.kind,
               "routes": list(self.routes)}
        if self.embedder is not None:
            out["text_precision"] = "bf16" if self.embedder.text_bf16 else "fp32"
        if self.prompt is not None:
            out["learned_prompt"] = {"classes": len(self.prompt_classes),
                                     "class_specific": bool(self.prompt.class_specific)}
        if self.fusion is not None and self.pipe.strategy.fusion.task == "vqa":
            out["answers"] = len(self.pipe.strategy.fusion.answers)
        return out
