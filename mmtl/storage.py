"""Runs roots on object storage (``train.runs_root=s3://bucket/prefix``, ``gs://...``) through ``pyarrow.fs``.

What lives where for a runs root URI ``ROOT`` and a run ``NAME``:

* ``ROOT/NAME/train/checkpoint_*`` and Ray Train's ``checkpoint_manager_snapshot.json``: written by Ray Train
  itself (``RunConfig(storage_path=..., storage_filesystem=...)``, :func:`ray_storage`); every rank uploads its
  own files, so no node needs a shared disk. A resume is restored by Ray Train from there.
* ``ROOT/NAME/{pipeline.yaml, run.json, summary.json, console.log, export/, adapter/, ...}``: mmtl's own run
  files. The driver writes them into a local *staging* folder (:func:`staging_root`, one per runs root:
  ``$MMTL_STAGING_DIR/<scheme>/<bucket>/<prefix>`` or ``~/.cache/mmtl/staging/...``) exactly as for a local runs
  root, and uploads them (:func:`upload_dir`) when the run starts and when it ends, finished or failed;
  ``summary.json`` is uploaded last, so a finished summary in the store means its export is there.
* ``ROOT/retrain/{manifest.json, retrain.lock}``: ``mmtl retrain``'s manifest and lock (the lock by S3
  conditional writes, :mod:`mmtl.jobs.object_lock`); its hash cache and warm-start copies stay in staging.
* the feature cache and a default (``sqlite``) MLflow store stay in the staging folder (local to the driver).

Each object is written by one PUT (an object store shows a whole object or none, so no temp-file rename is
needed). Endpoint, region and credentials come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``); no secret is ever put into an error message. ``file://`` and plain paths are local.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

SETTING = "train.runs_root"
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 20.0


class StorageError(RuntimeError):
    """A runs root URI cannot be used (missing bucket, refused credentials, unreachable endpoint ...); the
    message names the URI, the setting and the environment variable to fix."""


def is_remote(root: Optional[str]) -> bool:
    """True for an object-store URI (``s3://``, ``gs://`` ...); False for a local path or ``file://``."""
    return bool(root) and "://" in str(root) and not str(root).startswith("file://")


def split(uri: str) -> tuple[str, str]:
    """``"s3://bucket/a/b/"`` -> ``("s3", "bucket/a/b")`` (the path pyarrow's filesystem takes)."""
    scheme, _, rest = uri.partition("://")
    return scheme.lower(), rest.strip("/")


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/p", "run", "x.json")`` -> ``"s3://b/p/run/x.json"``."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def filesystem(uri: str):
    """``(pyarrow FileSystem, path)`` for ``uri``. S3: ``S3FileSystem`` with the endpoint of ``AWS_ENDPOINT_URL``
    (pyarrow reads it too), the region of ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, credentials from the default
    AWS chain (environment, profile, instance role; each process resolves its own, nothing secret is pickled),
    a 3 s connect timeout and 3 attempts. Other schemes: ``pyarrow.fs.FileSystem.from_uri``."""
    from pyarrow import fs as pafs

    scheme, path = split(uri)
    if scheme == "s3":
        kw = dict(connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kw["region"] = region
        if os.environ.get("AWS_ENDPOINT_URL"):
            kw["endpoint_override"] = os.environ["AWS_ENDPOINT_URL"]
        return pafs.S3FileSystem(**kw), path
    return pafs.FileSystem.from_uri(uri)


def ray_storage(run_uri: str) -> tuple[str, object]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig`` so that checkpoints go to ``run_uri``."""
    fs, path = filesystem(run_uri)
    return path, fs


def staging_root(root: str) -> Path:
    """The driver's local folder for the runs root URI ``root``: ``$MMTL_STAGING_DIR`` (default
    ``~/.cache/mmtl/staging``) / scheme / bucket / prefix."""
    scheme, path = split(root)
    base = Path(os.environ.get("MMTL_STAGING_DIR") or Path.home() / ".cache" / "mmtl" / "staging").expanduser()
    return base.resolve() / scheme / path


def local_root(root: str) -> str:
    """Where local-only files of a runs root go (feature cache, a default sqlite MLflow store): ``root`` itself
    when it is local, else its :func:`staging_root`."""
    return str(staging_root(root)) if is_remote(root) else root


def _explain(exc: BaseException, uri: str, setting: str, action: str) -> StorageError:
    """A :class:`StorageError` for a pyarrow / AWS error, naming the URI, the setting and what to fix."""
    text = str(exc)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
    bucket = split(uri)[1]
    bucket = bucket.split("/", 1)[0]
    if any(k in text for k in ("INVALID_ACCESS_KEY", "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH",
                               "SignatureDoesNotMatch", "ACCESS_DENIED", "AccessDenied", "Forbidden",
                               "HTTP response code: 403", "credentials", "CREDENTIALS")):
        why = (f"the store at {endpoint} refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
               f"(and AWS_SESSION_TOKEN) and that they may write to {bucket!r}")
    elif "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "bucket does not exist" in text:
        why = f"bucket {bucket!r} does not exist at {endpoint}: create it, or fix the bucket in {setting}"
    elif any(k in text for k in ("NETWORK_CONNECTION", "Could not connect", "curlCode", "Timeout", "timed out",
                                 "Couldn't resolve", "Connection refused")):
        why = f"cannot reach the endpoint {endpoint}: check AWS_ENDPOINT_URL and the network"
    else:
        why = text.splitlines()[0][:300] if text else type(exc).__name__
    return StorageError(f"{setting}={uri}: cannot {action}: {why}")


def preflight(uri: str, setting: str = SETTING) -> None:
    """Write, read back and delete a small probe object under ``uri`` (3 s connect timeout), before anything
    else uses it.

    Raises:
        StorageError: the bucket does not exist, the credentials are refused, the endpoint cannot be reached or
            the probe did not read back (the message names ``uri`` and ``setting``).
    """
    probe = join(uri, f".mmtl-probe-{uuid.uuid4().hex[:12]}")
    try:
        fs, path = filesystem(probe)
        data = b"mmtl probe"
        with fs.open_output_stream(path) as f:
            f.write(data)
        with fs.open_input_stream(path) as f:
            back = f.read()
        fs.delete_file(path)
    except (OSError, ValueError) as exc:  # pyarrow raises OSError for every AWS error
        raise _explain(exc, uri, setting, "write a probe object") from None
    if back != data:
        raise StorageError(f"{setting}={uri}: a probe object read back different bytes")


def read_bytes(uri: str) -> Optional[bytes]:
    """The object at ``uri``, or None when there is none."""
    from pyarrow.fs import FileType

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` as one object (appears whole or not at all)."""
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_dirs(uri: str) -> list[str]:
    """Names of the "folders" directly under ``uri`` (empty when there are none)."""
    from pyarrow.fs import FileSelector, FileType

    fs, path = filesystem(uri)
    infos = fs.get_file_info(FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == FileType.Directory)


def list_files(uri: str) -> dict[str, int]:
    """``{relative path: size}`` of every object under ``uri`` (recursive)."""
    from pyarrow.fs import FileSelector, FileType

    fs, path = filesystem(uri)
    infos = fs.get_file_info(FileSelector(path, allow_not_found=True, recursive=True))
    return {i.path[len(path):].lstrip("/"): i.size for i in infos if i.type == FileType.File}


def _skip(rel: str, exclude: Iterable[str]) -> bool:
    return any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude) or \
        any(part.startswith(".") and part.endswith(".tmp") for part in rel.split("/"))


def upload_dir(local: Path, uri: str, exclude: Iterable[str] = (), last: Iterable[str] = ()) -> list[str]:
    """Upload every file under ``local`` to ``uri`` (same relative paths), except paths under ``exclude`` and
    temporary ``.*.tmp`` files; a file whose object already holds the same bytes (same size; files up to 1 MiB
    also by sha256) is not uploaded again. ``last``: relative paths uploaded after all others
    (``summary.json``). Returns the uploaded relative paths."""
    local, exclude, last = Path(local), list(exclude), list(last)
    remote = list_files(uri)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    files = [f for f in files if not _skip(f, exclude)]
    files = [f for f in files if f not in last] + [f for f in last if f in files]
    fs, path = filesystem(uri)
    done = []
    for rel in files:
        src = local / rel
        if remote.get(rel) == src.stat().st_size and _same(fs, f"{path}/{rel}", src):
            continue
        with open(src, "rb") as fin, fs.open_output_stream(f"{path}/{rel}") as f:
            shutil.copyfileobj(fin, f, _CHUNK)  # streamed: an export of several GB is never held in memory
        done.append(rel)
    return done


_CHUNK = 8 << 20


def _same(fs, path: str, src: Path) -> bool:
    """Whether the object at ``path`` (same size as ``src``) holds ``src``'s bytes: files over 1 MiB (exports,
    written once) by size only, smaller ones by sha256."""
    if src.stat().st_size > 1 << 20:
        return True
    with fs.open_input_stream(path) as f:
        return hashlib.sha256(f.read()).digest() == hashlib.sha256(src.read_bytes()).digest()


def download_dir(uri: str, local: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Download every object under ``uri`` into ``local`` (same relative paths) except paths under ``exclude``;
    a local file of the same size is kept. Returns the downloaded relative paths."""
    local, exclude = Path(local), list(exclude)
    fs, path = filesystem(uri)
    done = []
    for rel, size in sorted(list_files(uri).items()):
        if _skip(rel, exclude):
            continue
        dst = local / rel
        if dst.is_file() and dst.stat().st_size == size:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        with fs.open_input_stream(f"{path}/{rel}") as f, open(tmp, "wb") as fout:
            shutil.copyfileobj(f, fout, _CHUNK)
        tmp.replace(dst)
        done.append(rel)
    return done


def fetch_file(uri: str, inside: Iterable[str] = ()) -> Optional[Path]:
    """The object ``uri``, or the first of ``inside`` (relative paths) under it, downloaded into the staging
    folder of its bucket (kept; downloaded again when the size differs); None when none exists."""
    from pyarrow.fs import FileType

    fs, _ = filesystem(uri)
    for cand in [uri, *(join(uri, rel) for rel in inside)]:
        info = fs.get_file_info(split(cand)[1])
        if info.type != FileType.File:
            continue
        dst = staging_root(cand)
        if not (dst.is_file() and dst.stat().st_size == info.size):
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp")
            with fs.open_input_stream(split(cand)[1]) as f, open(tmp, "wb") as fout:
                shutil.copyfileobj(f, fout, _CHUNK)
            tmp.replace(dst)
        return dst
    return None
