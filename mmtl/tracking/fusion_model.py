"""A ``cross_attention`` export as an MLflow model (pyfunc) in the registry.

The MLflow model holds the export's ``model.safetensors`` + ``pipeline.yaml`` (so ``mmtl eval models:/NAME@ALIAS
--task vqa|itm`` resolves it like any mmtl model) and a pyfunc whose ``predict`` takes a DataFrame with an
``image`` column (encoded image bytes) and a ``text`` column (the question for VQA; the caption to match for
ITM) and returns, per row:

* ``task: vqa``: ``answer`` (str, the argmax of the answer vocabulary) and ``score`` (its sigmoid probability,
  0-1; the head is trained with binary cross-entropy on soft scores);
* ``task: itm``: ``match_prob`` (sigmoid of the match logit, 0-1).

Raises (predict): KeyError for a missing column; images that cannot be decoded raise the decoder's error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def predict_rows(module, pipe, images: list, texts: list[str]) -> dict[str, list]:
    """Score (PIL image, text) pairs with a loaded fusion module (:func:`mmtl.fusion.export.load_fusion_export`).

    Returns ``{"answer": [...], "score": [...]}`` (VQA) or ``{"match_prob": [...]}`` (ITM), one entry per pair.

    Raises:
        ValueError: ``images`` and ``texts`` differ in length.
    """
    import torch

    from mmtl.fusion.features import image_token_batch

    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    f = pipe.strategy.fusion
    if not images:
        return {"answer": [], "score": []} if f.task == "vqa" else {"match_prob": []}
    model = module.model
    tf = model.image_transform(train=False)
    with torch.no_grad():
        pixels = torch.stack([tf(im) for im in images])
        img = image_token_batch(model, f, pixels).float()
        tok = model.tokenize([str(t) for t in texts])
        txt = model.text_tokens(tok["input_ids"], tok["attention_mask"]).float()
        mask = tok["attention_mask"]
        if f.task == "vqa":
            prob = torch.sigmoid(module.answer_logits(img, txt, mask))
            best = prob.argmax(1)
            return {"answer": [f.answers[i] for i in best.tolist()],
                    "score": prob.gather(1, best[:, None])[:, 0].tolist()}
        return {"match_prob": torch.sigmoid(module.match_logits(img, txt, mask)).tolist()}


try:
    import mlflow.pyfunc
    import pandas as pd  # predict's type hint (a DataFrame hint: MLflow infers nothing, warns nothing)

    class MmtlFusionModel(mlflow.pyfunc.PythonModel):
        """pyfunc: DataFrame(image: bytes, text: str) -> DataFrame(answer, score) or DataFrame(match_prob)."""

        def load_context(self, context):
            from mmtl.fusion.export import load_fusion_export

            self.module, self.pipe = load_fusion_export(Path(context.artifacts["model"]).parent)

        def predict(self, context, model_input: pd.DataFrame, params=None):
            from mmtl.data.samples import decode_image, to_rgb

            images = [to_rgb(decode_image(bytes(b), self.pipe.data.max_image_pixels)) for b in model_input["image"]]
            out = {}
            for i in range(0, len(images), 64):
                part = predict_rows(self.module, self.pipe, images[i:i + 64], list(model_input["text"][i:i + 64]))
                for k, v in part.items():
                    out.setdefault(k, []).extend(v)
            return pd.DataFrame(out)
except ImportError:  # pragma: no cover
    MmtlFusionModel = None


def log_fusion_model(uri: str, run_id: str, export_dir: Path, task: str, model_name: Optional[str]) -> dict:
    """Log ``export_dir`` as the run's MLflow model ``model`` (pyfunc above) and register it under ``model_name``
    when given. Returns ``{"uri"}`` plus ``{"name", "version"}`` when registered."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from mmtl.tracking.registry import log_pyfunc

    outputs = ([ColSpec("string", "answer"), ColSpec("double", "score")] if task == "vqa"
               else [ColSpec("double", "match_prob")])
    sig = ModelSignature(inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "text")]),
                         outputs=Schema(outputs))
    return log_pyfunc(uri, run_id, export_dir, MmtlFusionModel, sig, model_name)
