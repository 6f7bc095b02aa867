"""Pipeline schema (pydantic) and loader with dotted ``a.b.c=value`` overrides.

A pipeline is one YAML file with the sections ``data``, ``model``, ``strategy``, ``train``, ``eval`` and
``tracking`` (and, for ``mmtl retrain``, an optional ``retrain``). Unknown keys and bad values are errors that
name the field path and the offending value (:class:`PipelineError`).

Reading (:func:`read_yaml`): YAML 1.2 core scalars (``1e-12`` is a float, ``yes``/``no``/``on``/``off``, dates
and ``1:30`` are text, ``012`` is twelve); a key given twice in one mapping is an error naming the key path and
both lines. Free-form dicts passed to libraries (``model.config``, ``model.text.config``,
``model.vision.timm_kwargs``) get the coercion typed fields get: numeric text -> int/float, ``yes``/``no``/
``on``/``off``/``true``/``false`` text -> bool (:func:`coerce_freeform`).

Paths (:func:`_resolve_paths`): one rule for every path in a pipeline, including ``train.runs_root``,
``data.cache_dir``, ``retrain.manifest_dir`` and a relative ``sqlite:``/``file:`` ``tracking.uri``: a relative
path is relative to the project root (:func:`project_root_for`: the folder holding ``pipelines/`` when the file
is in such a folder, else the file's own folder), never to the current directory; ``~`` and ``$VAR`` are expanded
(an unset variable is an error). A relative
path that starts with the runs root as the pipeline file writes it (``runs/`` by default) points into the runs
root this run writes to (``train.runs_root`` after overrides). ``mmtl config`` lists them all
(:func:`mmtl.recipes.config_report.describe_paths`).

Names and worker settings (:func:`pipeline_problems`): ``train.name``, eval-set names, ``tracking.experiment`` and
``tracking.model_name`` are checked when the pipeline is loaded (length, ``/``, ``..``, glob and shell
characters, MLflow's rules); a run name derived from the file name is made safe instead. Settings that cannot
work on the chosen workers are refused (:mod:`mmtl.config.workers`).
"""
from __future__ import annotations

__all__ = ["PipelineError", "Pipeline", "DataConfig", "ModelConfig", "VisionTowerConfig", "TextTowerConfig",
           "DecoderConfig", "CaptionConfig", "StrategyConfig", "LoraConfig", "CrossAttentionConfig",
           "PromptTuningConfig", "SelfSupervisedConfig", "TrainConfig",
           "EvalConfig", "ZeroShotConfig", "TrackingConfig", "RetrainConfig", "build_pipeline", "load_pipeline",
           "apply_overrides", "parse_override", "pipeline_problems", "did_you_mean", "resolve_path",
           "project_root_for", "is_uri"]

import os
import re
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from mmtl.config import names
from mmtl.config.schema import (CaptionConfig, CrossAttentionConfig, DataConfig, DecoderConfig, EvalConfig,
                                LoraConfig, ModelConfig, Pipeline, PipelineError, PromptTuningConfig, RetrainConfig, SelfSupervisedConfig, StrategyConfig, TextTowerConfig,
                                TrackingConfig, TrainConfig, VisionTowerConfig, ZeroShotConfig)
from mmtl.config.yaml_io import YamlError, coerce_freeform, freeform_paths, read_yaml

def _section_at(loc: tuple) -> Optional[type]:
    """The schema class of the section at ``loc`` (a pydantic error location without its last item), or None
    when ``loc`` does not lead through sections (e.g. a free-form dict)."""
    import typing

    cls: Any = Pipeline
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        options = [a for a in (typing.get_args(ann) or (ann,)) if isinstance(a, type) and hasattr(a, "model_fields")]
        if not options:
            return None
        cls = options[0]
    return cls


def did_you_mean(loc: tuple) -> str:
    """``" (did you mean train.lr?)"`` for an unknown key at ``loc`` close to a known one (:mod:`difflib`),
    else the known keys of that section (``" (known: a, b, ...)"``), else ``""``."""
    import difflib

    if not loc or not isinstance(loc[-1], str):
        return ""
    section = _section_at(tuple(loc[:-1]))
    if section is None:
        return ""
    known = list(section.model_fields)
    prefix = ".".join(str(p) for p in loc[:-1])
    close = difflib.get_close_matches(loc[-1], known, n=2, cutoff=0.6)
    if close:
        return " (did you mean " + " or ".join(f"{prefix + '.' if prefix else ''}{c}" for c in close) + "?)"
    return f" (known keys{' of ' + prefix if prefix else ''}: {', '.join(known)})"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        val = e.get("input")
        shown = repr(val) if not isinstance(val, dict) else "{...}"
        if len(shown) > 120:
            shown = shown[:117] + "..."
        if e.get("type") == "extra_forbidden":
            lines.append(f"  {path}: unknown key{did_you_mean(tuple(e['loc']))} (got {shown})")
        else:
            lines.append(f"  {path}: {e['msg']} (got {shown})")
    return "invalid pipeline:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a","b","c"], value); the value is parsed as YAML (:func:`read_yaml`: YAML
    1.2 core scalars, repeated keys refused).

    Raises:
        PipelineError: when ``item`` has no ``=``, an empty key or a value that is not valid YAML.
    """
    if "=" not in item:
        hint = " (flags such as --json or --resume take no value)" if item.lower() in ("true", "false") else ""
        raise PipelineError(f"override {item!r} must look like a.b.c=value{hint}")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise PipelineError(f"override {item!r} has an empty key")
    try:
        value = read_yaml(raw, f"override {item!r}", ".".join(parts)) if raw.strip() != "" else ""
    except YamlError as exc:
        raise PipelineError(str(exc)) from None
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a raw (unvalidated) pipeline dict in place and return it."""
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise PipelineError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


FREEFORM_FIELDS = tuple(freeform_paths(Pipeline))
"""Dotted paths of the free-form dicts (``model.config``, ``model.text.config``, ``model.vision.timm_kwargs``)
whose values :func:`mmtl.config.yaml_io.coerce_freeform` coerces."""
_SECTIONS = ("data", "model", "strategy", "train", "eval", "tracking")


def pipeline_problems(pipe: Pipeline) -> list[str]:
    """What :func:`build_pipeline` refuses beyond the schema, each naming its field: run, eval-set, experiment
    and model names (:mod:`mmtl.config.names`), settings that cannot work on the workers
    (:mod:`mmtl.config.workers`) and an unshareable tracking URI. Kept out of the pydantic validators so that
    exports written by an older mmtl still load (``Pipeline.model_validate``) for evaluation."""
    from mmtl.config.workers import worker_problems
    from mmtl.config.tracking_uri import check_tracking_uri

    out: list[str] = []

    def check(fn, *args) -> None:
        try:
            fn(*args)
        except ValueError as exc:
            out.append(str(exc))

    if pipe.train.name is not None:
        check(names.check_run_name, pipe.train.name)
    shadow = [k for k in pipe.data.extra_eval if k in ("test", "val")]
    if shadow:
        out.append(f"data.extra_eval names {shadow}, which would hide data.{shadow[0]}: set data.test / data.val "
                   "for those, or give the extra set another name")
    check(names.check_set_names, list(pipe.data.extra_eval), "data.extra_eval")
    dup = sorted({s for s in pipe.eval.sets if pipe.eval.sets.count(s) > 1})
    if dup:
        out.append(f"eval.sets lists {dup} more than once")
    check(names.check_set_names, pipe.eval.sets, "eval.sets")
    check(names.check_experiment_name, pipe.tracking.experiment)
    if pipe.tracking.model_name is not None:
        check(names.check_model_name, pipe.tracking.model_name)
    if pipe.tracking.uri is not None:
        check(check_tracking_uri, pipe.tracking.uri, "tracking.uri")
    return out + worker_problems(pipe.train)


def build_pipeline(raw: dict) -> Pipeline:
    """Validate a raw dict: empty sections mean defaults, free-form dicts are coerced
    (:data:`FREEFORM_FIELDS`), then the schema and :func:`pipeline_problems` (names, worker settings) are
    checked.

    Raises:
        PipelineError: naming each bad field path and value.
    """
    if not isinstance(raw, dict):
        raise PipelineError(f"pipeline must be a mapping of sections (data:, model:, strategy:, train:, eval:, "
                            f"tracking:), got a YAML {type(raw).__name__}")
    for sec in _SECTIONS:  # `eval:` with everything commented out is None: the defaults
        if sec in raw and raw[sec] is None and sec != "data":
            raw[sec] = {}
    try:
        coerce_freeform(raw, list(FREEFORM_FIELDS))
    except ValueError as exc:
        raise PipelineError(f"invalid pipeline:\n  {exc}") from None
    try:
        pipe = Pipeline.model_validate(raw)
    except ValidationError as err:
        raise PipelineError(_format_errors(err)) from None
    problems = pipeline_problems(pipe)
    if problems:
        raise PipelineError("invalid pipeline:\n" + "\n".join(f"  {p}" for p in problems))
    return pipe


def is_uri(spec: str) -> bool:
    """True for a URI (``scheme://...``), a weight-package reference (``package:NAME``) or converted weights
    (``weights:NAME``, ``mmtl weights get``): not a local path."""
    return "://" in spec or spec.startswith(("package:", "weights:"))


_UNSET_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def resolve_path(spec: str, base: Path, field: str = "path") -> str:
    """``spec`` as an absolute, normalised local path (``~`` and ``$VAR`` / ``${VAR}`` expanded, relative ones
    joined to ``base``); URIs (``s3://...``, ``package:...``) unchanged.

    Raises:
        ValueError: ``spec`` names an environment variable that is not set (it would become a literal folder
            name), naming ``field``.
    """
    if is_uri(spec):
        return spec
    path = os.path.expandvars(os.path.expanduser(spec))
    unset = _UNSET_VAR.search(path)
    if unset:
        raise ValueError(f"{field}={spec!r}: environment variable {unset.group(1).strip('{}')} is not set")
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(str(base), path))


def _rebase(path: str, written_root: Optional[str], runs_root: str) -> str:
    """A path inside the runs root as the file writes it, moved into the runs root the run writes to."""
    if written_root is None or written_root == runs_root or is_uri(path):
        return path
    rel = os.path.relpath(path, written_root)
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        return path
    if is_uri(runs_root):  # a runs root on object storage: the same place inside the bucket
        return runs_root.rstrip("/") + "/" + rel.replace(os.sep, "/")
    return os.path.normpath(os.path.join(runs_root, rel))


def _resolve_paths(pipe: Pipeline, base: Path, written_runs_root: Optional[str] = None) -> Pipeline:
    """Make every local path in ``pipe`` absolute against ``base`` (see the module docstring: one rule for all,
    runs root included); relative paths inside ``written_runs_root`` (the runs root as the pipeline file writes
    it, before overrides) are moved into the effective ``train.runs_root`` (absolute, ``~`` and ``$VAR`` paths
    are explicit locations and never moved); a relative ``sqlite:``/``file:``
    ``tracking.uri`` is made absolute the same way."""
    from mmtl.config.tracking_uri import absolute_tracking_uri

    pipe.train.runs_root = resolve_path(pipe.train.runs_root, base, "train.runs_root")
    runs_root = pipe.train.runs_root
    try:
        written = resolve_path(written_runs_root, base) if written_runs_root else None
    except ValueError:  # the file's own runs root names an unset variable that an override replaced
        written = None

    def fix(spec, field: str):
        if spec is None:
            return None
        if isinstance(spec, list):
            return [fix(s, f"{field}[{i}]") for i, s in enumerate(spec)]
        resolved = resolve_path(spec, base, field)
        if os.path.isabs(spec) or spec.startswith(("~", "$")):  # an explicit location: never moved
            return resolved
        return _rebase(resolved, written, runs_root)

    d = pipe.data
    d.train = fix(d.train, "data.train")
    d.val, d.test = fix(d.val, "data.val"), fix(d.test, "data.test")
    d.extra_eval = {k: fix(v, f"data.extra_eval.{k}") for k, v in d.extra_eval.items()}
    if d.cache_dir:
        d.cache_dir = fix(d.cache_dir, "data.cache_dir")
    m = pipe.model
    m.weights = fix(m.weights, "model.weights")
    m.vision.weights = fix(m.vision.weights, "model.vision.weights")
    m.text.path = fix(m.text.path, "model.text.path")
    m.text.tokenizer_path = fix(m.text.tokenizer_path, "model.text.tokenizer_path")
    m.init_from = fix(m.init_from, "model.init_from")
    pipe.strategy.fusion.answers_file = fix(pipe.strategy.fusion.answers_file, "strategy.fusion.answers_file")
    if pipe.retrain is not None and pipe.retrain.manifest_dir:
        pipe.retrain.manifest_dir = fix(pipe.retrain.manifest_dir, "retrain.manifest_dir")
    if pipe.tracking.uri:
        pipe.tracking.uri = absolute_tracking_uri(pipe.tracking.uri, base)
    pipe._project_root = str(base)
    return pipe


def project_root_for(path: Path) -> Path:
    """The directory relative paths in a pipeline refer to: the parent of ``pipelines/`` if the file is
    in such a folder, else the file's own directory."""
    path = path.resolve()
    return path.parent.parent if path.parent.name == "pipelines" else path.parent


def load_pipeline(path: str | Path, overrides: Optional[list[str]] = None) -> Pipeline:
    """Load a pipeline YAML (:func:`mmtl.config.yaml_io.read_yaml`), apply ``a.b.c=value`` overrides, validate and
    resolve relative paths against :func:`project_root_for` (see the module docstring). A run name taken from
    the file name is made safe (:func:`mmtl.config.names.safe_run_name`).

    Raises:
        PipelineError: missing file, bad YAML, a repeated key, unknown key, bad value or name, settings that
            cannot work on the chosen workers (messages name the field path).
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline file not found: {path}")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8-sig"), str(path)) or {}
    except YamlError as exc:
        raise PipelineError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text: {exc}") from None
    written_root = None
    if isinstance(raw, dict):
        train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
        written_root = train.get("runs_root", TrainConfig.model_fields["runs_root"].default)
        written_root = written_root if isinstance(written_root, str) and written_root else None
    try:
        raw = apply_overrides(raw, overrides or []) if isinstance(raw, dict) else raw
        pipe = build_pipeline(raw)
    except PipelineError as exc:  # name the file: the error may come from it or from an override
        raise PipelineError(f"{path}: {exc}") from None
    if pipe.train.name is None:
        pipe.train.name = names.safe_run_name(path.stem)
    try:
        return _resolve_paths(pipe, project_root_for(path), written_root)
    except ValueError as exc:
        raise PipelineError(f"{path}: invalid pipeline:\n  {exc}") from None
