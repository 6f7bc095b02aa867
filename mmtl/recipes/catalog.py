"""The bundled pipelines (``pipelines/*.yaml`` of the checkout mmtl runs from): ``mmtl pipelines list`` and
``mmtl pipelines copy NAME DEST [key=value ...]`` (after torchtune's ``tune ls`` / ``tune cp``).

A copy is standalone: every relative *input* path of the original (``data.*`` shards, weight files and folders,
``model.init_from``, ``strategy.fusion.answers_file``) is rewritten to the absolute path it resolves to in the
checkout, so the copy reads the same files from wherever it is put. Paths inside the runs root as the file
writes them (``runs/quickstart/export/...``) stay relative: they point into the copy's own runs root, like
``train.runs_root`` itself, the feature cache and a relative ``sqlite:`` tracking URI (outputs go next to the
copy). Overrides are written into the file; a relative input path given as an override is taken from the
current directory (as the shell reads it). Values are replaced in place, so comments and layout are kept; a
key the file does not have yet is added by rewriting the file from its parsed content (the header comment is
kept, inline comments are not).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from mmtl.config import (PipelineError, TrainConfig, is_uri, load_pipeline, parse_override, project_root_for,
                         read_yaml)

INPUT_FIELDS = ("data.train", "data.val", "data.test", "model.weights", "model.vision.weights", "model.text.path",
                "model.text.tokenizer_path", "model.init_from", "strategy.fusion.answers_file")
"""Dotted keys whose values are input paths (plus every ``data.extra_eval.<name>``)."""


def bundled_dir() -> Path:
    """The ``pipelines/`` folder next to the ``mmtl`` package (a source checkout or an editable install).

    Raises:
        FileNotFoundError: mmtl was installed without its checkout (no bundled pipelines).
    """
    import mmtl

    d = Path(mmtl.__file__).resolve().parent.parent / "pipelines"
    if not d.is_dir():
        raise FileNotFoundError(f"no bundled pipelines at {d}: install mmtl from its checkout (pip install -e .)")
    return d


def bundled(name: str) -> Path:
    """The bundled pipeline ``name`` (with or without ``.yaml``).

    Raises:
        FileNotFoundError: no such pipeline (the message lists the names).
    """
    d = bundled_dir()
    p = d / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not p.is_file():
        names = sorted(x.stem for x in d.glob("*.yaml"))
        raise FileNotFoundError(f"no bundled pipeline {name!r}; choose one of: {', '.join(names)}")
    return p


@dataclass
class Entry:
    """One row of ``mmtl pipelines list``: ``name``, ``use`` (first sentence of the header comment),
    ``family``, ``strategy``, ``gpu`` ("yes" when the file asks for GPU workers or bf16/fp16, else "no"),
    ``weights`` (where the pretrained weights come from) and ``needs`` (missing inputs, by field; empty: runs
    as is)."""

    name: str
    use: str
    family: str
    strategy: str
    gpu: str
    weights: str
    needs: list[str]


def _use(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    head = " ".join(lines)
    if ". " in head:
        head = head[: head.index(". ")]
    return head if len(head) <= 90 else head[:87] + "..."


def _weights(pipe) -> str:
    m = pipe.model
    # open_clip / hf name one weights file or dir (with an arch or config); the others build per-tower models
    specs = [m.weights] if (m.weights or m.arch or m.config) else [m.vision.weights, m.text.path]
    kinds = {"none" if s is None else "packaged" if s.startswith("package:") else
             "converted (mmtl weights get)" if s.startswith("weights:") else "URI" if is_uri(s) else "local file"
             for s in specs}
    out = "+".join(sorted(kinds))
    return out + (", init_from a run" if m.init_from else "")


def list_pipelines() -> list[Entry]:
    """Every bundled pipeline, loaded and checked (:func:`mmtl.recipes.config_report.missing_inputs`)."""
    from mmtl.recipes.config_report import missing_inputs

    out = []
    for p in sorted(bundled_dir().glob("*.yaml")):
        pipe = load_pipeline(p)
        needs = [m.split(":", 1)[0] for m in missing_inputs(pipe)]
        gpu = "yes" if pipe.train.use_gpu or pipe.train.precision != "fp32" else "no"
        out.append(Entry(p.stem, _use(p.read_text(encoding="utf-8")), pipe.model.family, pipe.strategy.kind, gpu,
                         _weights(pipe), needs))
    return out


# ------------------------------------------------------------------------------------------------ copy


def _leaves(node, prefix: str = ""):
    """(dotted key, scalar node) of every scalar under a composed YAML node (list items keep their parent key)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield from _leaves(v, f"{prefix}.{k.value}" if prefix else str(k.value))
    elif isinstance(node, yaml.SequenceNode) and node.flow_style:  # [a, b]: replaceable as a whole, too
        yield prefix + "[]", node
        for v in node.value:
            yield from _leaves(v, prefix)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            yield from _leaves(v, prefix)
    elif isinstance(node, yaml.ScalarNode):
        yield prefix, node


def _is_input(key: str) -> bool:
    return key in INPUT_FIELDS or key.startswith("data.extra_eval.")


def _relative_input(value: str) -> bool:
    return bool(value) and not is_uri(value) and not value.startswith(("/", "~", "$"))


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def copy_pipeline(name: str, dest: str | Path, overrides: Optional[list[str]] = None, force: bool = False,
                  cwd: Optional[Path] = None) -> dict:
    """Write bundled pipeline ``name`` to ``dest`` (a ``.yaml`` path, or a folder: ``dest/<name>.yaml``) with
    its input paths made absolute and ``overrides`` written in (module docstring), then load the copy to check it.

    Returns ``{"src", "dest", "rewritten": {key: path}, "overrides": [...], "comments_kept": bool,
    "missing": [...]}`` (``missing``: inputs still to provide, e.g. placeholders).

    Raises:
        FileNotFoundError: unknown ``name``. FileExistsError: ``dest`` exists and not ``force``.
        PipelineError: a bad override, or the copy does not validate (nothing is written then).
    """
    from mmtl.recipes.config_report import missing_inputs

    src = bundled(name)
    cwd = Path(cwd or os.getcwd())
    dest = Path(dest)
    if dest.is_dir() or str(dest).endswith(os.sep):
        dest = dest / src.name
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} exists: choose another name, or pass --force to overwrite it")
    text = src.read_text(encoding="utf-8")
    raw = read_yaml(text, str(src))
    root = project_root_for(src)
    written_runs = (raw.get("train") or {}).get("runs_root") or TrainConfig.model_fields["runs_root"].default
    runs_prefix = os.path.normpath(written_runs) + "/"
    parsed = [parse_override(o) for o in overrides or []]
    edits: dict[int, tuple[int, str]] = {}  # start index -> (end index, new text)
    rewritten: dict[str, str] = {}
    leaves = list(_leaves(yaml.compose(text, Loader=yaml.SafeLoader)))
    for key, node in leaves:
        v = node.value
        if _is_input(key) and node.tag.endswith(":str") and _relative_input(v) and not v.startswith(runs_prefix):
            new = os.path.normpath(root / v)
            edits[node.start_mark.index] = (node.end_mark.index, _scalar(new))
            rewritten[key] = new
    by_key: dict[str, list] = {}
    for key, node in leaves:
        by_key.setdefault(key, []).append(node)
    rest = []
    for item, (parts, value) in zip(overrides or [], parsed):
        key = ".".join(parts)
        if _is_input(key) and isinstance(value, (str, list)):  # typed in the shell: relative to the current dir
            fix = lambda v: os.path.normpath(cwd / v) if isinstance(v, str) and _relative_input(v) else v  # noqa: E731
            value = [fix(v) for v in value] if isinstance(value, list) else fix(value)
            rewritten[key] = value
        nodes = by_key.get(key + "[]" if isinstance(value, list) else key, [])
        if len(nodes) == 1 and not isinstance(value, dict):
            for n in by_key.get(key, []):  # items of a replaced list: no separate edits
                edits.pop(n.start_mark.index, None)
            edits[nodes[0].start_mark.index] = (nodes[0].end_mark.index, _scalar(value))
        else:
            rest.append((parts, value))
    for start in sorted(edits, reverse=True):
        end, new = edits[start]
        text = text[:start] + new + text[end:]
    if rest:  # keys the file does not have as a single value: rewrite from the parsed content, header kept
        data = read_yaml(text, str(src))
        for parts, value in rest:
            node = data
            for i, p in enumerate(parts[:-1]):
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
                if not isinstance(node, dict):
                    raise PipelineError(f"override {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
            node[parts[-1]] = value
        header = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            header.append(line + "\n")
        text = "".join(header) + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        pipe = load_pipeline(tmp)
    except PipelineError as exc:
        tmp.unlink()
        raise PipelineError(f"the copy would not validate: {str(exc).replace(str(tmp), str(dest))}") from None
    os.replace(tmp, dest)
    return {"src": str(src), "dest": str(dest), "rewritten": rewritten, "overrides": list(overrides or []),
            "comments_kept": not rest, "missing": missing_inputs(pipe)}
