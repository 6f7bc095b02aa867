"""Minimal, tolerant tar header scanner (no data read, nothing extracted).

`tarfile` treats a corrupt or cut header in the middle of a file as a clean end of archive, so a
damaged shard cannot be told from a complete one; this scanner reports exactly how a file ended.
Supports ustar (prefix), GNU long names (L) and pax `path`/`size` records; regular files only.
"""
from __future__ import annotations

from typing import BinaryIO, NamedTuple, Optional

BLOCK = 512
_ZERO = bytes(BLOCK)


class Member(NamedTuple):
    name: str
    offset: int
    size: int


class Scan(NamedTuple):
    members: list[Member]
    end: str  # eof_blocks | no_eof_blocks | truncated | corrupt | not_tar | empty_file
    at: int  # byte offset where reading stopped
    cut_name: Optional[str]  # name of the member cut by the end of file, when known


def _num(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(hdr: bytes) -> bool:
    try:
        want = _num(hdr[148:156])
    except ValueError:
        return False
    blank = hdr[:148] + b" " * 8 + hdr[156:]
    if sum(blank) == want:
        return True
    return sum(b - 256 if b > 127 else b for b in blank) == want  # old signed-sum writers


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


def _header_name(hdr: bytes) -> str:
    name = _cstr(hdr[0:100])
    if hdr[257:265] == b"ustar\x0000" and hdr[345:500].strip(b"\0"):
        name = _cstr(hdr[345:500]) + "/" + name
    return name


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[sp + 1: pos + length].rstrip(b"\n").partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def scan_tar(f: BinaryIO, size: int) -> Scan:
    """List the regular-file members of the tar in seekable `f` (`size` bytes) without reading
    their data, and say how the file ended (see `Scan.end`). Never raises for bad data."""
    members: list[Member] = []
    pos, long_name, pax = 0, None, {}
    while True:
        f.seek(pos)
        hdr = f.read(BLOCK)
        if not hdr:
            return Scan(members, "no_eof_blocks" if pos else "empty_file", pos, None)
        if len(hdr) < BLOCK:
            cut = pax.get("path") or long_name or (_cstr(hdr[:100]) if len(hdr) >= 100 else None)
            return Scan(members, "truncated" if pos else "not_tar", pos, cut)
        if hdr == _ZERO:
            return Scan(members, "eof_blocks" if pos else "empty_file", pos, None)
        if not _checksum_ok(hdr):
            return Scan(members, "corrupt" if pos else "not_tar", pos, None)
        typ = hdr[156:157]
        try:  # a pax "size" record overrides the size of the member it precedes
            use_pax = "size" in pax and typ not in (b"L", b"K", b"x", b"g")
            msize = int(pax["size"]) if use_pax else _num(hdr[124:136])
        except ValueError:
            return Scan(members, "corrupt" if pos else "not_tar", pos, None)
        data_off = pos + BLOCK
        name = pax.get("path") or long_name or _header_name(hdr)
        if data_off + msize > size:
            return Scan(members, "truncated", pos, name if typ in (b"0", b"\0", b"7") else None)
        pos = data_off + (msize + BLOCK - 1) // BLOCK * BLOCK
        if typ in (b"L", b"x"):
            f.seek(data_off)
            data = f.read(msize)
            if typ == b"L":
                long_name = _cstr(data)
            else:
                pax = _pax(data)
            continue
        if typ in (b"0", b"\0", b"7"):
            members.append(Member(name, data_off, msize))
        long_name, pax = None, {}


def split_name(name: str) -> Optional[tuple[str, str]]:
    """Tar member name -> (key, lowercased extension), or None for members that are not sample
    parts (hidden files, names without a dot, __MACOSX/)."""
    while name.startswith("./"):
        name = name[2:]
    name = name.lstrip("/")
    if name.startswith("__MACOSX/"):
        return None
    folder, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


