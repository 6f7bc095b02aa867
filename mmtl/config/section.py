"""The base of every pipeline-schema section (:mod:`mmtl.config.schema`, :mod:`mmtl.config.generative`,
:mod:`mmtl.config.selfsup`): unknown keys are errors, assignments are validated."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
