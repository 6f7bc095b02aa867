"""What an export folder is, for every family: ``model.safetensors`` (every weight) + ``pipeline.yaml`` (the
resolved pipeline that rebuilds the architecture), plus the family's native format where it has one
(:func:`write_native_formats`: ``open_clip_model.safetensors`` + ``open_clip_config.json`` for open_clip runs).
Shared by the embedding pyfunc (:mod:`mmtl.tracking.registry`), the fusion export loader
(:mod:`mmtl.fusion.export`), the run's export copy (:func:`mmtl.train.fit.copy_export`) and ``mmtl export``."""
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


def write_native_formats(export_dir: Path, require: str | None = None) -> list[str]:
    """Write, next to an mmtl export (``model.safetensors`` + ``pipeline.yaml`` in ``export_dir``), the formats
    of the tools its family belongs to: today the open_clip format for ``open_clip``-family runs
    (:func:`mmtl.models.open_clip_export.write_open_clip_format`). Runs with no such form get nothing, unless
    ``require`` names the format: then that is an error. Returns the file names written.

    Raises:
        ValueError: ``require`` is not a known format (``"open_clip"``), or (:class:`OpenClipFormatError`) the
            run cannot be expressed in it / its weights do not fit.
    """
    import yaml

    from mmtl.config import Pipeline
    from mmtl.models.open_clip_export import open_clip_blocker, write_open_clip_format

    if require not in (None, "open_clip"):
        raise ValueError(f"unknown export format {require!r} (known: mmtl, open_clip)")
    export_dir = Path(export_dir)
    pipe = Pipeline.model_validate(yaml.safe_load((export_dir / "pipeline.yaml").read_text()))
    if require is None and open_clip_blocker(pipe.model.family, pipe.strategy.kind):
        return []
    return write_open_clip_format(export_dir, pipe)
