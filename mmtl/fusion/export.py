"""Load a ``cross_attention`` export: the train module (frozen towers + fusion + task head) back from
``model.safetensors`` + ``pipeline.yaml``.

``model.safetensors`` holds the towers under their model keys plus ``fusion.*`` / ``head.*`` / ``itc_*``;
``pipeline.yaml`` holds the answer vocabulary in ``strategy.fusion.answers``. Used by the fusion recipe (after
training), ``mmtl eval --task vqa|itm`` (:mod:`mmtl.eval.fusion_eval`) and the MLflow pyfunc
(:mod:`mmtl.tracking.fusion_model`).
"""
from __future__ import annotations

from pathlib import Path

OWN_PREFIXES = ("fusion.", "head.", "itc_")


def split_state_dict(sd: dict) -> dict:
    """Export keys -> :class:`~mmtl.fusion.task.FusionTaskModule` keys (``model.`` added to the towers')."""
    return {(k if k.startswith(OWN_PREFIXES) else f"model.{k}"): v for k, v in sd.items()}


def load_fusion_export(export_dir: str | Path):
    """``(FusionTaskModule in eval mode, pipeline)`` from an export folder.

    Raises:
        FileNotFoundError: a file is missing; ValueError: the export is not a cross_attention model.
        RuntimeError: weights do not match (strict load).
    """
    import yaml
    from safetensors.torch import load_file

    from mmtl.config import Pipeline
    from mmtl.fusion.task import FusionTaskModule
    from mmtl.models import build_model
    from mmtl.models.exported import architecture_config, require_export_files

    d = Path(export_dir)
    require_export_files(d)
    pipe = Pipeline.model_validate(yaml.safe_load((d / "pipeline.yaml").read_text()))
    if pipe.strategy.kind != "cross_attention":
        raise ValueError(f"{d} was trained with strategy.kind={pipe.strategy.kind!r}, not cross_attention")
    module = FusionTaskModule.from_pipeline(pipe, build_model(architecture_config(pipe.model)))
    module.load_state_dict(split_state_dict(load_file(str(d / "model.safetensors"))), strict=True)
    return module.eval(), pipe
