"""Arguments of ``mmtl eval``: class names, prompt templates, and the data set's short name."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Optional


class EvalError(ValueError):
    """Bad eval arguments (task, classes, templates, labels); the message says what to fix."""


def parse_classes(classes: Optional[str]) -> Optional[list[str]]:
    """Class names from a file (one per line; blank lines and lines starting with ``#`` skipped) or a comma
    list. None -> None. Raises EvalError for fewer than 2 names, duplicates, or a missing ``*.txt`` file."""
    if classes is None:
        return None
    text = str(classes)
    p = Path(text).expanduser()
    if p.is_file():
        names = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        where = f"classes file {p}"
    elif "," not in text and (text.endswith((".txt", ".csv", ".lst")) or os.sep in text):
        raise EvalError(f"classes file {text!r} not found (give a file with one class name per line, or a comma list)")
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
        where = f"classes {text!r}"
    if len(names) < 2:
        raise EvalError(f"{where}: need at least 2 class names, got {names}")
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise EvalError(f"{where}: duplicate class names {dup}")
    return names


def check_template(t: str, where: str) -> str:
    """``t`` when it is a usable prompt template (one ``{}`` or ``{c}`` placeholder for the class name);
    raises EvalError naming ``where`` (e.g. "--templates") otherwise."""
    if "{}" not in t and "{c}" not in t:
        raise EvalError(f"{where}: template {t!r} has no {{}} placeholder for the class name")
    try:
        (t.replace("{c}", "x").format("x") if "{}" in t else t.replace("{c}", "x"))
    except (IndexError, KeyError, ValueError) as e:
        raise EvalError(f"{where}: template {t!r} is not a valid format string ({e}); use one {{}}") from None
    return t


def parse_templates(templates: Optional[str]) -> Optional[list[str]]:
    """Prompt templates from a file (one per line with ``{}``; blank lines skipped) or one literal template
    containing ``{}``. None -> None. Raises EvalError for a missing file or a template without ``{}``."""
    if templates is None:
        return None
    p = Path(str(templates)).expanduser()
    if p.is_file():
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
        out = [check_template(ln, f"templates file {p}") for ln in lines if ln]
        if not out:
            raise EvalError(f"templates file {p} is empty")
        return out
    if "{}" in str(templates) or "{c}" in str(templates):
        return [check_template(str(templates), "--templates")]
    raise EvalError(f"templates {templates!r} is neither a file nor a template with {{}} (give a file with one "
                    "template per line, each with {}, or one such template)")


def data_name(data: str) -> str:
    """A short, MLflow-safe name (at most 60 characters of ``[A-Za-z0-9._-]``) of a shard spec: its folder or
    file name (a tar's parent folder), e.g. ``/data/coco/val/`` -> ``val``; "data" when nothing is left."""
    p = Path(str(data).rstrip("/"))
    name = p.name if p.suffix not in (".tar", ".gz", ".tgz") else p.parent.name
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
    return name or "data"
