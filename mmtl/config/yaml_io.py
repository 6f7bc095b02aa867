"""Reading pipeline YAML so that it means what it says.

* :func:`read_yaml`: YAML 1.2 core scalars instead of PyYAML's YAML 1.1 ones: ``1e-12`` / ``1E5`` are floats
  (YAML 1.1 reads them as text), ``yes``/``no``/``on``/``off``, dates and ``1:30`` stay text (typed bool fields
  still accept ``yes``/``no``), ``012`` is twelve (``0o12`` is octal). A key given twice in one mapping is an
  error naming the key path and both lines (PyYAML keeps the last one silently).
* :func:`coerce_freeform`: values inside free-form dicts that mmtl passes on to libraries (``model.config``,
  ``model.text.config``, ``model.vision.timm_kwargs``) are coerced as a typed field would be: numeric text ->
  int / float, ``true``/``false``/``yes``/``no``/``on``/``off`` text -> bool; keys must be text and values plain
  YAML data (else an error naming the field path).
"""
from __future__ import annotations

import re
from typing import Any, Optional

import yaml


class YamlError(ValueError):
    """The YAML text is malformed or repeats a key; the message names the source, key path and lines."""


_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                    r"|\.(?:nan|NaN|NAN))$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")


class CoreLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the YAML 1.2 core schema's implicit scalar types (null, bool, int, float)."""


CoreLoader.yaml_implicit_resolvers = {}
for _tag, _regexp, _first in (
    ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", _BOOL, list("tTfF")),
    ("tag:yaml.org,2002:int", _INT, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789")),
    ("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"]),
):
    CoreLoader.add_implicit_resolver(_tag, _regexp, _first)


def _construct_int(loader: CoreLoader, node) -> int:
    value = loader.construct_scalar(node)
    if not _INT.match(value):  # an explicit !!int tag on other text
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    if value.startswith("0o"):
        return int(value[2:], 8)
    if value.startswith("0x"):
        return int(value[2:], 16)
    return int(value, 10)


def _construct_bool(loader: CoreLoader, node) -> bool:
    value = loader.construct_scalar(node)
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    return yaml.SafeLoader.construct_yaml_bool(loader, node)


CoreLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
CoreLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


def _key_text(node) -> Optional[str]:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def duplicate_keys(node, path: str = "") -> list[tuple[str, list[int]]]:
    """``[(key path, [1-based lines])]`` of every key repeated inside one mapping of the composed ``node`` tree
    (``<<`` merge keys are not duplicates; anchors are visited once)."""
    found: list[tuple[str, list[int]]] = []
    seen_nodes: set[int] = set()

    def walk(n, p: str) -> None:
        if id(n) in seen_nodes:
            return
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            lines: dict[str, list[int]] = {}
            for k, v in n.value:
                key = _key_text(k)
                if key is None or k.tag == "tag:yaml.org,2002:merge":
                    continue
                lines.setdefault(key, []).append(k.start_mark.line + 1)
                walk(v, f"{p}.{key}" if p else key)
            found.extend((f"{p}.{k}" if p else k, ls) for k, ls in lines.items() if len(ls) > 1)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, f"{p}[{i}]")

    walk(node, path)
    return found


def read_yaml(text: str, source: str = "<yaml>", path: str = "") -> Any:
    """Parse ``text`` with :class:`CoreLoader` (YAML 1.2 core scalars) and refuse repeated keys.

    Args:
        source: where the text comes from (a file name or ``override 'a.b=...'``), for messages.
        path: key path of the text's root inside the pipeline (an override's value), for messages.
    Raises:
        YamlError: not valid YAML, or a key given twice in one mapping (every such key path with its lines).
    """
    loader = CoreLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        dups = duplicate_keys(node, path)
        if dups:
            where = "; ".join(f"{k} on lines {', '.join(map(str, ls))}" for k, ls in dups)
            raise YamlError(f"{source}: key given more than once in the same mapping (YAML would silently keep the "
                            f"last one): {where}; keep one of each")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise YamlError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_NUM_TEXT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")


def coerce_scalar(value: Any, path: str) -> Any:
    """One free-form value coerced as a typed field would be (see module docstring); containers recurse.

    Raises:
        ValueError: a non-text key, or a value that is not plain data (the message names ``path``).
    """
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: key {k!r} is a {type(k).__name__}; keys must be text (quote it)")
            out[k] = coerce_scalar(v, f"{path}.{k}")
        return out
    if isinstance(value, list):
        return [coerce_scalar(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[text.lower()]
        if _NUM_TEXT.match(text):
            if re.match(r"^[-+]?[0-9]+$", text):
                return int(text)
            return float(text)
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise ValueError(f"{path}: {type(value).__name__} value {value!r} is not plain YAML data (text, number, bool, "
                     "null, list or mapping)")


def freeform_paths(model_cls, prefix: str = "") -> list[str]:
    """Dotted paths of every free-form ``dict[str, Any]`` field under the pydantic ``model_cls``."""
    import typing

    from pydantic import BaseModel

    out = []
    for name, field in model_cls.model_fields.items():
        ann = field.annotation
        args = [ann, *typing.get_args(ann)]
        if any(typing.get_origin(a) is dict and typing.get_args(a)[1:] == (Any,) for a in args):
            out.append(prefix + name)
            continue
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                out.extend(freeform_paths(a, f"{prefix}{name}."))
    return out


def coerce_freeform(raw: dict, paths: list[str]) -> dict:
    """Coerce, in place, the free-form dicts at dotted ``paths`` of the raw pipeline dict (absent ones skipped).

    Raises:
        ValueError: naming the field path (see :func:`coerce_scalar`).
    """
    for dotted in paths:
        node = raw
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        else:
            if isinstance(node.get(parts[-1]), dict):
                node[parts[-1]] = coerce_scalar(node[parts[-1]], dotted)
    return raw
