"""A generative (``blip``) export as an MLflow model (pyfunc) in the registry.

The MLflow model holds the export's ``model.safetensors`` + ``pipeline.yaml`` (so ``mmtl eval models:/NAME/1
--task captioning`` resolves it like any mmtl model) and a pyfunc whose ``predict`` takes a DataFrame with an
``image`` column (encoded image bytes) and an optional ``prompt`` column (text the caption continues; default
``model.decoder.prompt``; with ``strategy.caption.retrieval_k`` it follows the image's retrieval prompt, from the
datastore logged with the model) and returns a DataFrame with ``text`` (the generated caption, beam search with the
pipeline's ``strategy.caption.num_beams`` / ``max_new_tokens``).

Raises (predict): KeyError for a missing ``image`` column; undecodable images raise the decoder's error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def caption_images(model, pipe, images: list, prompt: Optional[str] = None, num_beams: Optional[int] = None,
                   max_new_tokens: Optional[int] = None) -> list[str]:
    """Captions of PIL RGB ``images`` with a loaded generative model (:func:`mmtl.tracking.registry.load_exported`);
    ``None`` settings take the pipeline's ``strategy.caption`` / ``model.decoder.prompt``."""
    import torch

    from mmtl.models.family import TextGeneration, capability
    from mmtl.models.registry import family_of

    gen = capability(family_of(model), TextGeneration)
    if gen is None:
        raise ValueError(f"model.family={pipe.model.family!r} does not generate text")
    c = pipe.strategy.caption
    tf = model.image_transform(train=False)
    with torch.no_grad():
        batch = torch.stack([tf(im) for im in images])
        return gen.generate(model.eval(), batch, prompt, num_beams or c.num_beams, max_new_tokens or c.max_new_tokens)


try:
    import mlflow.pyfunc
    import pandas as pd  # predict's type hint (a DataFrame hint: MLflow infers nothing, warns nothing)

    class MmtlCaptionModel(mlflow.pyfunc.PythonModel):
        """pyfunc: DataFrame(image: bytes, prompt?: str) -> DataFrame(text)."""

        def load_context(self, context):
            from mmtl.tracking.registry import load_exported

            self.model, self.pipe = load_exported(Path(context.artifacts["model"]).parent)

        def predict(self, context, model_input: pd.DataFrame, params=None):
            from mmtl.data.samples import decode_image, to_rgb

            prompts = (list(model_input["prompt"]) if "prompt" in model_input.columns
                       else [None] * len(model_input))
            texts = []
            for b, p in zip(model_input["image"], prompts):
                img = to_rgb(decode_image(bytes(b), self.pipe.data.max_image_pixels))
                texts += caption_images(self.model, self.pipe, [img], p if isinstance(p, str) else None)
            return pd.DataFrame({"text": texts})
except ImportError:  # pragma: no cover
    MmtlCaptionModel = None


def log_caption_model(uri: str, run_id: str, export_dir: Path, model_name: Optional[str]) -> dict:
    """Log ``export_dir`` as the run's MLflow model ``model`` (pyfunc above, logged as code: nothing pickled),
    registered under ``model_name`` when given; a retrieval-augmented export's datastore and retrieval tower
    (:mod:`mmtl.models.caption_retrieval`) ride along next to the weights. Returns ``{"uri"}`` plus
    ``{"name", "version"}`` when registered."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from mmtl.models.caption_retrieval import DATASTORE_FILE, TOWER_FILE
    from mmtl.tracking.registry import log_pyfunc

    extra = tuple(n for n in (DATASTORE_FILE, TOWER_FILE) if (Path(export_dir) / n).is_file())
    sig = ModelSignature(inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "prompt", required=False)]),
                         outputs=Schema([ColSpec("string", "text")]))
    return log_pyfunc(uri, run_id, export_dir, MmtlCaptionModel, sig, model_name, extra)
