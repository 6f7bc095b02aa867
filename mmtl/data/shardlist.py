"""Shard list resolution: directory, glob, brace pattern, list, local path or URI -> shard list.

Also the shard-level exceptions (re-exported by `mmtl.data.shardio`). Remote URIs go through
`pyarrow.fs` (filesystems cached per bucket/host, existence checks batched); nothing is read.
"""
from __future__ import annotations

import collections
import fnmatch
import glob
import os
import urllib.parse
from typing import Optional, Union

from .samples import shard_stem

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardError(Exception):
    """A fatal problem with the shard set (raised; `inspect_shards` reports it in "errors")."""


class MissingShardsError(ShardError):
    """Named shards do not exist. `.missing` lists every one of them."""

    def __init__(self, missing: list[str]):
        self.missing = list(missing)
        super().__init__(f"{len(self.missing)} shard(s) missing: " + ", ".join(self.missing))


class UnsortedShardError(ShardError):
    """A tar whose members are not grouped by key (a key reappears after another key started)."""


class EmptyDatasetError(ShardError):
    """The shard spec matched no shard at all."""


# ---------------------------------------------------------------- resolving shard lists

def filesystem(uri: str):
    """(pyarrow FileSystem, path) for a URI; a module function so tests can replace it."""
    from pyarrow.fs import FileSystem

    return FileSystem.from_uri(uri)


def local_path(item: str) -> Optional[str]:
    """The local filesystem path of a shard spec item (plain path or ``file://`` URL), or None for a remote
    URL (``s3://``, ``gs://`` ...)."""
    if item.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(item).path)
    if "://" in item:
        return None
    return os.path.expanduser(item)


def _is_shard_name(name: str) -> bool:
    return name.endswith(SHARD_SUFFIXES)


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


class _Remote:
    """pyarrow filesystems cached per (scheme, host): `from_uri` may resolve an S3 region over the
    network, so it runs once per bucket, and existence checks are batched (a directory listing
    when many shards share a folder, otherwise one vector `get_file_info`)."""

    LIST_AT = 16

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str], tuple] = {}

    def fs_path(self, uri: str):
        u = urllib.parse.urlparse(uri)
        if (u.scheme, u.netloc) not in self.cache:
            fs, path = filesystem(uri)
            with_host = path.lstrip("/") == urllib.parse.unquote(u.netloc + u.path).lstrip("/")
            self.cache[u.scheme, u.netloc] = (fs, with_host)
        fs, with_host = self.cache[u.scheme, u.netloc]
        path = urllib.parse.unquote(u.netloc + u.path if with_host else u.path)
        prefix = f"{u.scheme}://" if with_host else f"{u.scheme}://{u.netloc}"
        return fs, path, prefix

    def listing(self, fs, folder: str, recursive: bool = False) -> list:
        from pyarrow.fs import FileSelector, FileType

        infos = fs.get_file_info(FileSelector(folder, recursive=recursive, allow_not_found=True))
        return [i for i in infos if i.type == FileType.File]

    def types(self, fs, paths: list[str]) -> dict:
        by_folder: dict[str, list[str]] = collections.defaultdict(list)
        for p in paths:
            by_folder[p.rsplit("/", 1)[0] if "/" in p else ""].append(p)
        out, single = {}, []
        for folder, ps in by_folder.items():
            if len(ps) >= self.LIST_AT and folder:
                out.update((i.path, i.type) for i in self.listing(fs, folder))
                single.extend(p for p in ps if p not in out)  # maybe directories
            else:
                single.extend(ps)
        if single:
            out.update((i.path, i.type) for i in fs.get_file_info(single))
        return out


def _resolve_remote(items: list[str], remote: _Remote, missing: list[str], unmatched: list[str]) -> list[list[str]]:
    from pyarrow.fs import FileType

    resolved = [(item, *remote.fs_path(item)) for item in items]  # (item, fs, path, uri prefix)
    by_fs: dict[int, list[str]] = collections.defaultdict(list)
    filesystems = {}
    for _, fs, path, _ in resolved:
        if not _has_glob(path):
            by_fs[id(fs)].append(path)
            filesystems[id(fs)] = fs
    kinds = {}
    for k, paths in by_fs.items():
        kinds.update(((k, p), t) for p, t in remote.types(filesystems[k], paths).items())
    out: list[list[str]] = []
    for item, fs, path, prefix in resolved:
        kind = kinds.get((id(fs), path))
        if _has_glob(path):
            head = path
            while _has_glob(head):
                head = head.rsplit("/", 1)[0] if "/" in head else ""
            recursive = "/" in path[len(head):].lstrip("/")
            found = sorted(i.path for i in remote.listing(fs, head, recursive) if fnmatch.fnmatchcase(i.path, path))
        elif kind == FileType.File:
            out.append([item])
            continue
        elif kind == FileType.Directory:
            found = sorted(i.path for i in remote.listing(fs, path) if _is_shard_name(i.base_name))
        else:
            missing.append(item)
            out.append([])
            continue
        if not found:
            unmatched.append(item)
        out.append([prefix + p for p in found])
    return out


def _resolve_local(item: str, local: str, missing: list[str], unmatched: list[str]) -> list[str]:
    if _has_glob(local):
        found = sorted(p for p in glob.glob(local) if os.path.isfile(p))
    elif os.path.isdir(local):
        found = sorted(os.path.join(local, n) for n in os.listdir(local)
                       if _is_shard_name(n) and os.path.isfile(os.path.join(local, n)))
    elif os.path.isfile(local):
        return [item]
    else:
        missing.append(item)
        return []
    if not found:
        unmatched.append(item)
    return found


def resolve_shards(spec: Union[str, os.PathLike, list]) -> list[str]:
    """Expand a shard spec into an ordered, de-duplicated list of shard paths/URIs.

    `spec`: a directory (its *.tar / *.tar.gz / *.tgz files, sorted), a glob, a brace pattern
    ("a-{000000..000009}.tar", expanded with `braceexpand`), a local path, a URI (s3://, gs://,
    hdfs://, ... via `pyarrow.fs.FileSystem.from_uri`; file:// is read locally), or a list of any
    of these. Only listings/metadata are read. Raises MissingShardsError naming every named shard
    that does not exist (and every pattern/folder that matched nothing when others did),
    EmptyDatasetError when nothing matches at all.
    """
    from braceexpand import braceexpand

    entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    missing: list[str] = []
    unmatched: list[str] = []
    found: dict[int, list[str]] = {}
    remote_items: list[tuple[int, str]] = []
    idx = 0
    for entry in entries:
        entry = os.fspath(entry).strip()
        if not entry:
            continue
        try:
            items = list(braceexpand(entry))
        except Exception:  # unbalanced braces: a literal name
            items = [entry]
        for item in items:
            local = local_path(item)
            if local is None:
                remote_items.append((idx, item))
            else:
                found[idx] = _resolve_local(item, local, missing, unmatched)
            idx += 1
    if remote_items:  # resolved together so that existence checks batch per filesystem
        per_item = _resolve_remote([item for _, item in remote_items], _Remote(), missing, unmatched)
        found.update((i, res) for (i, _), res in zip(remote_items, per_item))
    if missing:
        raise MissingShardsError(missing)
    out = list(dict.fromkeys(p for i in sorted(found) for p in found[i]))
    if not out:
        raise EmptyDatasetError(f"no shards match {spec!r}")
    if unmatched:
        raise MissingShardsError([f"{u} (matched nothing)" for u in unmatched])
    return out


def shard_ids(shards: list[str]) -> list[str]:
    """uid prefixes: the shard stem, or `stem~i` (i = position) when two shards share a stem."""
    stems = [shard_stem(s) for s in shards]
    counts = collections.Counter(stems)
    return [st if counts[st] == 1 else f"{st}~{i}" for i, st in enumerate(stems)]
