"""What an export folder is, for every family: ``model.safetensors`` (every weight) + ``pipeline.yaml`` (the
resolved pipeline that rebuilds the architecture). Shared by the embedding pyfunc (:mod:`mmtl.tracking.registry`)
and the fusion export loader (:mod:`mmtl.fusion.export`)."""
from __future__ import annotations

from pathlib import Path


def architecture_config(model_cfg):
    """A copy of a pipeline's ``model`` section that builds the architecture only: no ``init_from``, and no tower
    weight files per the family's export format (``architecture_config`` of
    :class:`mmtl.models.family.ExportFormat`; an export's ``model.safetensors`` holds every weight).

    Raises:
        ValueError: unknown ``model.family``.
    """
    from mmtl.models.family import ExportFormat, capability
    from mmtl.models.registry import get_family

    cfg = model_cfg.model_copy(deep=True)
    cfg.init_from = None
    fmt = capability(get_family(cfg.family), ExportFormat)
    return fmt.architecture_config(cfg) if fmt is not None else cfg


def require_export_files(export_dir: Path) -> None:
    """Raise FileNotFoundError unless ``export_dir`` holds ``model.safetensors`` and ``pipeline.yaml``."""
    for f in ("model.safetensors", "pipeline.yaml"):
        if not (export_dir / f).exists():
            raise FileNotFoundError(f"{export_dir / f} not found: not an mmtl export")
