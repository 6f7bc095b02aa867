"""Deterministic WebDataset shard writer (img2dataset layout) and image format helpers.

Each sample is three tar members written in sorted name order: ``{key}.json`` (metadata),
``{key}.{jpg|png|webp}`` (the image bytes) and ``{key}.txt`` (the caption, UTF-8); unpaired samples lack the
``.txt`` (image-only) or the image member (text-only). Shards are named
``{prefix}-{i:06d}.tar``, ustar format. Output is deterministic: the same samples give byte-identical
shards (mtime 0, uid/gid 0, no user names, mode 0644, fixed member order, JSON with sorted keys).
:func:`mmtl.data.build.build_shards` builds shards from folders and tables with it.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Optional

IMAGE_EXTS = ("jpg", "png", "webp")
"""Image member extensions written to shards (original bytes are copied for these)."""
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def sniff_image_format(data: bytes) -> Optional[str]:
    """Image format from magic bytes: 'jpg', 'png', 'webp', 'gif', 'bmp', 'tiff', or None if unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def prepare_image(data: bytes) -> tuple[bytes, str, int, int, str]:
    """Check that ``data`` decodes and return ``(bytes, ext, width, height, original_format)``.

    JPEG/PNG/WebP bytes are returned unchanged; BMP/GIF (first frame)/TIFF are re-encoded to PNG.
    Raises ``ValueError`` for unknown formats and for images PIL cannot fully decode (truncated, corrupt,
    decompression bombs).
    """
    from PIL import Image

    fmt = sniff_image_format(data)
    if fmt is None:
        raise ValueError("unknown image format (magic bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
            if fmt in IMAGE_EXTS:
                return data, fmt, width, height, fmt
            if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue(), "png", width, height, fmt
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"cannot decode image: {e}") from e


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _tar_block_size(n: int) -> int:
    """Bytes a member of ``n`` data bytes takes in a tar: one 512-byte header plus padded data."""
    return 512 + (n + 511) // 512 * 512


def _tar_file_size(member_bytes: int) -> int:
    """Final tar file size for members taking ``member_bytes``: end blocks, padded to 10240-byte records."""
    return (member_bytes + 1024 + tarfile.RECORDSIZE - 1) // tarfile.RECORDSIZE * tarfile.RECORDSIZE


class ShardWriter:
    """Write samples to ``{out_dir}/{prefix}-{i:06d}.tar``, starting a new shard at either limit.

    Args:
        out_dir: folder for the shards (created if missing).
        prefix: shard file name prefix.
        max_samples_per_shard: at most this many samples per shard (>= 1).
        max_bytes_per_shard: a new shard starts before a sample that would push the shard's tar size
            (headers and padding included) past this many bytes; a single larger sample gets its own shard.

    Use as a context manager, or call :meth:`close`. Attributes after writing: ``shards`` (list of paths),
    ``samples`` (count), ``bytes`` (total bytes of the finished shard files). A shard is written to a
    ``.tmp`` name and renamed when complete. Keys must be unique per writer.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", *,
                 max_samples_per_shard: int = 10_000, max_bytes_per_shard: int = 1 << 30):
        if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
            raise ValueError("max_samples_per_shard and max_bytes_per_shard must be >= 1")
        if not prefix or "/" in prefix:
            raise ValueError(f"bad shard prefix {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_samples = int(max_samples_per_shard)
        self.max_bytes = int(max_bytes_per_shard)
        self.shards: list[Path] = []
        self.samples = 0
        self.bytes = 0
        self._tar: Optional[tarfile.TarFile] = None
        self._tmp: Optional[Path] = None
        self._n_in_shard = 0
        self._bytes_in_shard = 0
        self._keys: set[str] = set()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _open_next(self) -> None:
        self._finish()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = path.with_name(path.name + ".tmp")
        self._tar = tarfile.open(self._tmp, mode="w", format=tarfile.USTAR_FORMAT)
        self.shards.append(path)
        self._n_in_shard = 0
        self._bytes_in_shard = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.shards[-1]
        os.replace(self._tmp, final)
        self.bytes += final.stat().st_size
        self._tar = None
        self._tmp = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image_bytes: Optional[bytes], image_ext: Optional[str], caption: Optional[str],
              meta: Optional[dict[str, Any]] = None) -> None:
        """Write one sample: an image-text pair, or (unpaired data) an image only (``caption=None``: no
        ``.txt`` member) or a text only (``image_bytes=None``: no image member).

        Args:
            key: sample key: letters, digits, '_' or '-' (no dots, no '/'; at most 80 chars), unique within this writer.
            image_bytes: encoded image, written unchanged; None for a text-only sample.
            image_ext: 'jpg', 'png' or 'webp' (should match the bytes); ignored without an image.
            caption: caption (or the text of a text-only sample), written as ``{key}.txt`` in UTF-8; None for an
                image-only sample.
            meta: extra JSON-serialisable fields for ``{key}.json``; ``key``, ``caption`` (when given) and, with
                an image, (unless given) ``width``/``height`` (pixels, read from the image header), and
                ``source`` ("") are added.

        Raises:
            ValueError: bad or duplicate key, unsupported ``image_ext``, non-str caption, neither image nor caption.
            RuntimeError: the writer is closed.
        """
        if self._keys is None:
            raise RuntimeError("ShardWriter is closed")
        if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > 80:
            raise ValueError(f"bad sample key {key!r}: use letters, digits, '_' or '-' (no dots, no '/')")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if image_bytes is None and caption is None:
            raise ValueError(f"sample {key!r} has neither an image nor a caption")
        if image_bytes is not None and image_ext not in IMAGE_EXTS:
            raise ValueError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r}")
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"caption must be str, got {type(caption).__name__}")
        info = dict(meta or {})
        if image_bytes is not None and ("width" not in info or "height" not in info):
            info["width"], info["height"] = _image_size(image_bytes)
        info.setdefault("source", "")
        info["key"] = key
        if caption is not None:
            info["caption"] = caption
        members = {f"{key}.json": json.dumps(info, sort_keys=True, ensure_ascii=False).encode("utf-8")}
        if image_bytes is not None:
            members[f"{key}.{image_ext}"] = bytes(image_bytes)
        if caption is not None:
            members[f"{key}.txt"] = caption.encode("utf-8")
        size = sum(_tar_block_size(len(v)) for v in members.values())
        if (self._tar is None or self._n_in_shard >= self.max_samples
                or (self._n_in_shard > 0 and _tar_file_size(self._bytes_in_shard + size) > self.max_bytes)):
            self._open_next()
        for name in sorted(members):
            self._add(name, members[name])
        self._keys.add(key)
        self._n_in_shard += 1
        self._bytes_in_shard += size
        self.samples += 1

    def close(self) -> None:
        """Finish the open shard (idempotent)."""
        self._finish()
        self._keys = None  # type: ignore[assignment]


def remove_stale_shards(folder: str | os.PathLike, prefix: str, keep: list[Path]) -> list[Path]:
    """Delete ``{prefix}-NNNNNN.tar`` files in ``folder`` that are not in ``keep``; return what was deleted.

    Used after a rebuild so that an earlier, larger build's extra shards do not linger. Only file names that
    match the exact shard pattern are touched.
    """
    folder = Path(folder)
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    keep_set = {Path(p).resolve() for p in keep}
    removed = []
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if pattern.match(p.name) and p.resolve() not in keep_set:
                p.unlink()
                removed.append(p)
    return removed
