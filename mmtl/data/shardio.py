"""Shard lists and robust WebDataset tar reading, shared by training ingest and `mmtl shards inspect`.

Reading strategy (documented choice): a shard is first scanned header by header (seeking over the
member data, ~512 bytes read per member), which checks that members are grouped by key and finds
where a cut or corrupt tar ends, BEFORE any sample of that shard is yielded; the wanted members
are then read by offset. Local files are scanned in place; remote shards (s3://, gs://, ...) are
copied once into a spooled temporary file (memory up to 64 MiB, then local disk), gzip shards
are decompressed the same way. Nothing is ever unpickled: only image, caption and .json members
are read at all.

Tar handling: ustar, GNU long names and pax `path`/`size` records. A file that ends exactly at a
member boundary (no end-of-archive blocks) is read in full; a file cut inside a header or inside
member data keeps every sample completed before the cut and counts the cut sample as
`truncated_shard`; a 0-byte file or a tar without members counts `empty_shard`; a file that is not
a tar counts `corrupt_shard`. Each of those adds a warning. Keys follow WebDataset: the member path
up to the first dot of its base name (directory kept, leading "./" removed); the extension is the
rest, lowercased. Hidden files (".name") and names without a dot are ignored.
"""
from __future__ import annotations

import collections
import contextlib
import gzip
import logging
import os
import shutil
import tempfile
from typing import BinaryIO, Callable, Iterator, NamedTuple, Optional, Union

from . import shardlist
from .samples import (CAPTION_EXTS, IMAGE_EXTS, META_EXT, CleanOptions, Reject, Sample,
                      SampleRejected, clean_sample)
from .shardlist import (EmptyDatasetError, MissingShardsError, ShardError, UnsortedShardError,  # noqa: F401
                        local_path, resolve_shards, shard_ids)
from .tarscan import Member, scan_tar, split_name

log = logging.getLogger("mmtl.data")
WANTED_EXTS = frozenset(IMAGE_EXTS + CAPTION_EXTS + (META_EXT,))
SPOOL_BYTES = 64 << 20


# ---------------------------------------------------------------- opening

def open_shard(url: str) -> BinaryIO:
    """Open a shard for binary reading: a local file, or a pyarrow input stream for a URI.

    Raises MissingShardsError when it does not exist, ShardError for other I/O errors.
    """
    local = local_path(url)
    try:
        if local is not None:
            return open(local, "rb")
        fs, path = shardlist.filesystem(url)
        return fs.open_input_stream(path)
    except FileNotFoundError:
        raise MissingShardsError([url]) from None
    except OSError as e:
        raise ShardError(f"cannot open shard {url}: {e}") from None


@contextlib.contextmanager
def _open_seekable(url: str) -> Iterator[BinaryIO]:
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open_shard(url))
        if local_path(url) is None:  # remote: one sequential download, then random access
            spool = stack.enter_context(tempfile.SpooledTemporaryFile(SPOOL_BYTES))
            shutil.copyfileobj(f, spool, 1 << 20)
            f = spool
        f.seek(0)
        if f.read(2) == b"\x1f\x8b":
            f.seek(0)
            spool = stack.enter_context(tempfile.SpooledTemporaryFile(SPOOL_BYTES))
            try:
                shutil.copyfileobj(gzip.GzipFile(fileobj=f), spool, 1 << 20)
            except (EOFError, OSError):  # cut gzip: keep what decompressed; the tar scan sees the cut
                pass
            f = spool
        f.seek(0)
        yield f


# ---------------------------------------------------------------- reading

class _Group(NamedTuple):
    key: str
    members: dict[str, Member]
    duplicates: list[str]


def _group(members: list[Member], shard: str) -> list[_Group]:
    groups: list[_Group] = []
    closed: set[str] = set()
    for m in members:
        parts = split_name(m.name)
        if parts is None:
            continue
        key, ext = parts
        if not groups or groups[-1].key != key:
            if key in closed:
                raise UnsortedShardError(
                    f"shard {shard} is not grouped by sample key: member {m.name!r} (key {key!r}) comes "
                    "after members of other keys; rewrite it sorted (e.g. `tar --sort=name`) or with `mmtl shards build`")
            if groups:
                closed.add(groups[-1].key)
            groups.append(_Group(key, {}, []))
        g = groups[-1]
        if ext in g.members:
            g.duplicates.append(ext)
        else:
            g.members[ext] = m
    return groups


_END_WARNINGS = {
    "no_eof_blocks": "has no end-of-archive blocks (cut at a member boundary?); all members read",
    "truncated": "is cut short at byte {at}",
    "corrupt": "has an invalid tar header at byte {at}; reading stopped there",
    "not_tar": "is not a tar file; skipped",
    "empty_file": "is empty (no members); skipped",
}


def iter_shard(url: str, opts: CleanOptions, stats: Optional[collections.Counter] = None,
               warnings: Optional[list[str]] = None, *, shard_id: Optional[str] = None,
               on_reject: Optional[Callable[[SampleRejected], None]] = None) -> Iterator[Sample]:
    """Yield the clean samples of one tar shard, in tar order.

    `stats` (updated in place) counts "samples_ok", one key per `Reject` value and
    "caption_truncated"; `warnings` receives one line per shard-level problem (also logged);
    `shard_id` prefixes uids (default: the shard stem); `on_reject` is called with every
    `SampleRejected`. Raises UnsortedShardError before yielding anything from an unsorted tar,
    MissingShardsError/ShardError when the shard cannot be opened.
    """
    stats = stats if stats is not None else collections.Counter()
    warnings = warnings if warnings is not None else []

    def warn(msg: str) -> None:
        warnings.append(msg)
        log.warning(msg)

    def reject(err: SampleRejected) -> None:
        stats[err.reason.value] += 1
        if on_reject is not None:
            on_reject(err)

    with _open_seekable(url) as f:
        size = f.seek(0, os.SEEK_END)
        scan = scan_tar(f, size)
        groups = _group(scan.members, url)  # raises UnsortedShardError before any yield
        cut_key: Optional[str] = None
        if scan.end in ("truncated", "corrupt"):
            parts = split_name(scan.cut_name) if scan.cut_name else None
            if groups and (parts is None or parts[0] == groups[-1].key):
                cut_key = groups.pop().key  # the sample in progress at the cut is incomplete
            elif parts is not None:
                cut_key = parts[0]
        if scan.end in _END_WARNINGS:
            detail = f"; sample {cut_key!r} dropped" if cut_key else ""
            warn(f"shard {url} " + _END_WARNINGS[scan.end].format(at=scan.at) + detail)
        if not groups and cut_key is None:
            reason = Reject.CORRUPT_SHARD if scan.end == "not_tar" else Reject.EMPTY_SHARD
            if scan.end not in ("not_tar", "empty_file"):
                warn(f"shard {url} has no sample members; skipped")
            reject(SampleRejected(reason, "", url, scan.end))
            return
        for g in groups:
            if g.duplicates:
                reject(SampleRejected(Reject.DUPLICATE_MEMBER, g.key, url,
                                      f"member(s) appear twice: {sorted(set(g.duplicates))}"))
                continue
            data = {}
            for ext, m in g.members.items():
                if ext in WANTED_EXTS:
                    f.seek(m.offset)
                    data[ext] = f.read(m.size)
            try:
                sample = clean_sample(g.key, data, url, opts, shard_id=shard_id)
            except SampleRejected as e:
                reject(e)
                continue
            stats["samples_ok"] += 1
            if sample.caption_truncated:
                stats["caption_truncated"] += 1
            yield sample
        if cut_key is not None:
            reject(SampleRejected(Reject.TRUNCATED_SHARD, cut_key, url, f"{scan.end} at byte {scan.at}"))


class KeyCollisions:
    """Counts samples whose key was already yielded by another shard (uids stay unique)."""

    def __init__(self) -> None:
        self.first_shard: dict[str, int] = {}
        self.count = 0
        self.shards: set[int] = set()

    def add(self, key: str, shard_index: int) -> None:
        first = self.first_shard.setdefault(key, shard_index)
        if first != shard_index:
            self.count += 1
            self.shards.update((first, shard_index))

    def warning(self) -> Optional[str]:
        if not self.count:
            return None
        return (f"{self.count} sample key(s) also appear in another shard ({len(self.shards)} shards "
                "involved); kept, with uids made unique by shard")


def iter_samples(spec: Union[str, list], opts: CleanOptions, stats: Optional[collections.Counter] = None,
                 warnings: Optional[list[str]] = None, *,
                 on_reject: Optional[Callable[[SampleRejected], None]] = None) -> Iterator[Sample]:
    """Resolve `spec` now (see `resolve_shards`: MissingShardsError/EmptyDatasetError are raised by
    this call, before anything is read) and return an iterator over the samples of every shard in
    order (see `iter_shard`; UnsortedShardError comes from iteration). Keys repeated across
    shards are kept (their uids differ) and reported by one warning with the collision count when
    the iteration ends or is closed. Memory: one dict entry per distinct key.
    """
    shards = resolve_shards(spec)
    return _iter_resolved(shards, opts, stats, warnings if warnings is not None else [], on_reject)


def _iter_resolved(shards: list[str], opts: CleanOptions, stats: Optional[collections.Counter],
                   warnings: list[str], on_reject) -> Iterator[Sample]:
    ids = shard_ids(shards)
    keys = KeyCollisions()
    try:
        for i, (shard, sid) in enumerate(zip(shards, ids)):
            for sample in iter_shard(shard, opts, stats, warnings, shard_id=sid, on_reject=on_reject):
                keys.add(sample.key, i)
                yield sample
    finally:
        msg = keys.warning()
        if msg:
            warnings.append(msg)
            log.warning(msg)


# ---------------------------------------------------------------- what a shard holds

class UnpairedShardError(ValueError):
    """A shard holds image-only or text-only samples but the recipe reading it needs something else (e.g.
    image-text pairs). Attributes: ``shard``, ``found`` (modality of the shard), ``recipe``, ``needs``."""

    def __init__(self, shard: str, found: str, recipe: str, needs: str) -> None:
        self.shard, self.found, self.recipe, self.needs = shard, found, recipe, needs
        what = {"image": "image-only samples (no caption member)", "text": "text-only samples (no image member)",
                "pair": "image-text pairs"}
        super().__init__(f"shard {shard} holds {what[found]}, but recipe {recipe!r} reads {what[needs]}; "
                         + ("use strategy.kind: self_supervised for unpaired data, or build paired shards"
                            if needs == "pair" else f"give it shards of {what[needs]}"))


def shard_modality(url: str, max_keys: int = 8) -> Optional[str]:
    """What the first ``max_keys`` samples of a shard hold, from tar headers only (no member data read):
    ``"pair"`` (image and caption members), ``"image"`` (image, no caption), ``"text"`` (caption, no image),
    or None (no sample found, or the shard is unreadable: the reader counts that later). A key with both an
    image and a caption counts as a pair; a shard mixing kinds reports the first kind that is not a pair."""
    import tarfile

    kinds: list[str] = []
    cur: Optional[str] = None
    exts: set[str] = set()

    def close() -> None:
        if cur is not None:
            img, cap = bool(exts & set(IMAGE_EXTS)), bool(exts & set(CAPTION_EXTS))
            if img or cap:
                kinds.append("pair" if img and cap else "image" if img else "text")

    try:
        with open_shard(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                parts = split_name(m.name) if m.isfile() else None
                if parts is None:
                    continue
                if parts[0] != cur:
                    close()
                    if len(kinds) >= max_keys:
                        break
                    cur, exts = parts[0], set()
                exts.add(parts[1])
            else:
                close()
    except (tarfile.TarError, EOFError, OSError, ShardError):
        return None
    if not kinds:
        return None
    return next((k for k in kinds if k != "pair"), "pair")


def check_shard_modality(spec: Union[str, list], needs: str, recipe: str) -> None:
    """Raise :class:`UnpairedShardError` naming the first shard of ``spec`` whose samples are not what recipe
    ``recipe`` reads (``needs``: ``"pair"``, ``"image"`` or ``"text"``). An image-text pair serves an
    image-only or text-only reader too (the other member is ignored). Reads tar headers only
    (:func:`shard_modality`); unreadable shards pass (the reader counts them)."""
    for url in resolve_shards(spec):
        found = shard_modality(url)
        if found is None or found == needs or found == "pair":
            continue
        raise UnpairedShardError(url, found, recipe, needs)
