"""Log an exported model as an MLflow model (pyfunc, with a signature) and register it.

The MLflow model holds ``model.safetensors`` + ``pipeline.yaml`` as artifacts; loading it rebuilds the
architecture from the pipeline (tower weights then come from the safetensors file, never from a pickle)
and ``predict`` embeds a DataFrame with a ``text`` column (captions) and/or an ``image`` column (encoded
image bytes) into (N, D) float32 L2-normalised embeddings.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from mmtl.models.exported import architecture_config, require_export_files

__all__ = ["architecture_config", "require_export_files", "model_from_export", "load_exported", "log_exported_model",
           "log_pyfunc"]

def model_from_export(pipeline_yaml: str, state_dict: dict):
    """Rebuild an exported model from its resolved pipeline YAML and its consolidated state dict.

    The architecture comes from the pipeline; every weight comes from ``state_dict`` (the original tower
    weight files and ``model.init_from`` are not read; an ``hf`` model keeps its directory, which holds its
    config and tokenizer). Returns ``(model in eval mode, pipeline)``.

    Raises:
        RuntimeError: the state dict does not match the architecture (strict load).
        ValueError: a ``cross_attention`` export (load it with :func:`mmtl.fusion.export.load_fusion_export`).
    """
    import yaml

    from mmtl.config import Pipeline
    from mmtl.models import build_model, fingerprint_loaded_content

    pipe = Pipeline.model_validate(yaml.safe_load(pipeline_yaml))
    if pipe.strategy.kind == "cross_attention":
        raise ValueError("this export is a cross_attention model (fusion + task head): evaluate it with "
                         f"`mmtl eval ... --task {pipe.strategy.fusion.task}`")
    model = build_model(architecture_config(pipe.model))
    model.load_state_dict({k: v for k, v in state_dict.items() if k != "logit_bias"}, strict=True)
    fingerprint_loaded_content(model)
    return model.eval(), pipe


def load_exported(export_dir: str | Path):
    """Rebuild a model from an export folder (``model.safetensors`` + ``pipeline.yaml``).

    A retrieval-augmented captioner (``strategy.caption.retrieval_k > 0``) gets its datastore and retrieval tower
    from the files next to the weights (:func:`mmtl.models.caption_retrieval.attach_retriever`).

    Returns ``(model, pipeline)``. Raises FileNotFoundError when a file is missing (for retrieval: naming the
    datastore file and the setting that needs it).
    """
    from safetensors.torch import load_file

    from mmtl.models.caption_retrieval import attach_retriever

    export_dir = Path(export_dir)
    require_export_files(export_dir)
    model, pipe = model_from_export((export_dir / "pipeline.yaml").read_text(),
                                    load_file(str(export_dir / "model.safetensors")))
    attach_retriever(model, pipe, export_dir)  # strategy.caption.retrieval_k > 0: the datastore files next to it
    return model, pipe


try:
    import mlflow.pyfunc
    import pandas as pd  # predict's type hint (a DataFrame hint: MLflow infers nothing, warns nothing)

    class MmtlEmbeddingModel(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper: DataFrame(text?: str, image?: bytes) -> (N, D) embeddings (image if given, else text)."""

        def load_context(self, context):
            self.model, self.pipe = load_exported(Path(context.artifacts["model"]).parent)
            self.tf = self.model.image_transform(train=False)

        def predict(self, context, model_input: pd.DataFrame, params=None):
            import torch

            from mmtl.data.samples import decode_image, to_rgb

            rows = []
            with torch.no_grad():
                for _, r in model_input.iterrows():
                    img = r.get("image") if "image" in model_input.columns else None
                    if img is not None and not (isinstance(img, float) and np.isnan(img)):
                        im = to_rgb(decode_image(bytes(img), self.pipe.data.max_image_pixels))
                        rows.append(self.model.encode_image(self.tf(im).unsqueeze(0))[0])
                    else:
                        tok = self.model.tokenize([str(r["text"])])
                        rows.append(self.model.encode_text(tok["input_ids"], tok["attention_mask"])[0])
            return torch.stack(rows).float().numpy()
except ImportError:  # pragma: no cover
    MmtlEmbeddingModel = None


def log_exported_model(uri: str, run_id: str, export_dir: Path, model_name: Optional[str]) -> Optional[dict]:
    """Log ``export_dir`` as the run's MLflow model ``model`` and register it under ``model_name``.

    Returns ``{"name", "version", "uri"}`` when registered, else ``{"uri"}``.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from mmtl.models import build_model  # noqa: F401  (fail early if mmtl is broken)

    dim = _embed_dim(export_dir)
    sig = ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False)]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, dim))]),
    )
    return log_pyfunc(uri, run_id, export_dir, MmtlEmbeddingModel, sig, model_name)


def log_pyfunc(uri: str, run_id: str, export_dir: Path, model_class: type, signature,
               model_name: Optional[str], extra_files: tuple[str, ...] = ()) -> dict:
    """Log the pyfunc ``model_class`` (a ``PythonModel`` subclass from mmtl) with the export's ``model.safetensors``
    + ``pipeline.yaml`` as artifacts as the run's MLflow model ``model``, registered under ``model_name`` when given.

    Nothing is pickled: the model is logged as MLflow "models from code" (a two-line ``pyfunc_model.py`` that
    imports ``model_class`` and calls ``mlflow.models.set_model``). The model stands alone
    (:mod:`mmtl.tracking.standalone`): the ``mmtl`` source rides along as code paths and the pip requirements are
    pinned to the running versions plus the weight packages the pipeline names, so ``mlflow models serve`` or a
    fresh virtualenv loads it without mmtl installed. Model folders given by a local path in the pipeline are not
    copied (logged as a warning).

    ``extra_files``: more files of ``export_dir`` logged next to the weights (e.g. a retrieval datastore).

    Returns ``{"uri"}`` plus ``{"name", "version"}`` when registered.
    """
    import logging
    import tempfile

    import mlflow
    import yaml

    from mmtl.tracking.standalone import code_snapshot, local_model_paths, pip_requirements

    model_section = yaml.safe_load((Path(export_dir) / "pipeline.yaml").read_text()).get("model") or {}
    for path in local_model_paths(model_section):
        logging.getLogger(__name__).warning(
            "the MLflow model reads %s at load time (a local path in model.*): it loads only where that path exists",
            path)
    with mlflow_uris(uri), tempfile.TemporaryDirectory(prefix="mmtl-code-") as tmp, \
            mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input_example.*", category=UserWarning)
        code_file = Path(tmp) / "pyfunc_model.py"
        code_file.write_text(f"from mlflow.models import set_model\n\nfrom {model_class.__module__} import "
                             f"{model_class.__name__}\n\nset_model({model_class.__name__}())\n")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(code_file), signature=signature,
            pip_requirements=pip_requirements(model_section), code_paths=[str(code_snapshot(Path(tmp)))],
            artifacts={"model": str(export_dir / "model.safetensors"), "pipeline": str(export_dir / "pipeline.yaml"),
                       **{name: str(export_dir / name) for name in extra_files}},
            registered_model_name=model_name, metadata={"mmtl_version": _mmtl_version()},
        )
    out = {"uri": info.model_uri}
    if model_name:
        out.update(name=model_name, version=str(info.registered_model_version))
    return out


@contextlib.contextmanager
def kept_mlflow_uris():
    """Inside the block MLflow's global tracking / registry URIs may change; afterwards they are put back, with the
    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` environment variables that ``mlflow.set_tracking_uri`` /
    ``set_registry_uri`` also set for subprocesses (so one logged model does not redirect later runs or workers of
    the same process)."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def mlflow_uris(uri: str):
    """Use ``uri`` as MLflow's tracking and registry URI inside the block (the fluent API needs them: register in
    the same store, whatever ``$MLFLOW_REGISTRY_URI`` says), then put back what was there (:func:`kept_mlflow_uris`)."""
    import mlflow

    with kept_mlflow_uris():
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield


def _mmtl_version() -> str:
    import mmtl

    return mmtl.__version__


def _embed_dim(export_dir: Path) -> int:
    import yaml

    return int(yaml.safe_load((Path(export_dir) / "pipeline.yaml").read_text())["model"]["embed_dim"])
