"""Bytes -> clean sample: one RGB 8-bit image, one clean caption, or a reason for rejecting it.

Everything here is pure Python + Pillow + numpy (no Ray, no torch), so it runs the same in a
Ray Data task, in `mmtl shards inspect` and in unit tests.

Rules (each maps to a `Reject` reason, counted by the shard readers):
- images are identified by content (magic bytes), never by extension, and only through an
  allow-list of Pillow plugins (JPEG incl. MPO, PNG, WebP, BMP, GIF, TIFF): plugins that shell out
  (EPS -> Ghostscript) or are rarely exercised are never reached by untrusted bytes;
- the pixel count is checked from the header, before any pixel is decoded (decompression bombs);
- truncated images are rejected, never padded with grey (`LOAD_TRUNCATED_IMAGES` is not used);
- every mode ends as 8-bit RGB: EXIF orientation applied, 16-bit scaled (not clipped),
  transparency composited on white, CMYK/L/1/P converted;
- captions are decoded through a fallback chain (BOM, UTF-8, UTF-16 heuristics, cp1252, latin-1),
  NFC-normalised, control characters removed and whitespace collapsed.
"""
from __future__ import annotations

import enum
import io
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTS: tuple[str, ...] = ("txt", "caption", "text")
META_EXT = "json"
#: Pillow plugins allowed to open untrusted bytes (identification is by content among these;
#: multi-picture JPEGs (MPO) open through the JPEG plugin).
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_formats: Optional[tuple[str, ...]] = None


def _open_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow build can open (WebP may be compiled out)."""
    global _formats
    if _formats is None:
        Image.init()
        _formats = tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)
    return _formats
WHITE = (255, 255, 255)


class Reject(str, enum.Enum):
    """Why a sample (or a shard) produced no training sample. Values are the stats keys."""

    TRUNCATED_IMAGE = "truncated_image"
    EMPTY_IMAGE = "empty_image"
    UNDECODABLE_IMAGE = "undecodable_image"
    MISSING_IMAGE = "missing_image"
    MISSING_CAPTION = "missing_caption"
    TOO_MANY_PIXELS = "too_many_pixels"
    EMPTY_CAPTION = "empty_caption"
    SHORT_CAPTION = "short_caption"  # non-empty but shorter than CleanOptions.min_caption_chars
    DUPLICATE_MEMBER = "duplicate_member"
    TRUNCATED_SHARD = "truncated_shard"  # sample cut by the end (or a corrupt header) of its tar
    EMPTY_SHARD = "empty_shard"  # counted once per shard with no sample at all
    CORRUPT_SHARD = "corrupt_shard"  # counted once per file that is not a tar at all
    TOO_FEW_TOKENS = "too_few_tokens"  # text-only samples: fewer tokens than CleanOptions.min_text_tokens


class SampleRejected(Exception):
    """A sample is unusable. `reason` is a `Reject`; `key`/`shard` may be empty when raised by
    `decode_image`/`decode_caption` and are filled in by `clean_sample`."""

    def __init__(self, reason: Reject, key: str = "", shard: str = "", detail: str = ""):
        self.reason = Reject(reason)
        self.key = key
        self.shard = shard
        self.detail = detail
        where = f"{shard}:{key}" if shard or key else ""
        super().__init__(f"{self.reason.value}{' ' + where if where else ''}{': ' + detail if detail else ''}")

    def __reduce__(self):  # picklable across Ray workers
        return (SampleRejected, (self.reason, self.key, self.shard, self.detail))

    def located(self, key: str, shard: str) -> "SampleRejected":
        """The same rejection with `key` and `shard` set."""
        return SampleRejected(self.reason, key, shard, self.detail)


@dataclass
class CleanOptions:
    """How samples are cleaned.

    max_image_pixels: width*height above this is rejected (`too_many_pixels`), checked from the
        header. Pillow's own hard cap (2 * `PIL.Image.MAX_IMAGE_PIXELS`, ~179 MPix) still applies.
    min_caption_chars: captions shorter than this (after cleaning) are rejected.
    draft_px: JPEG draft decoding target (shorter side, pixels), see `decode_image`; None decodes in full.
    context_length / count_tokens: when both are set, `count_tokens(caption)` (tokens including
        special tokens) > `context_length` marks the sample `caption_truncated` (not a rejection;
        the tokenizer truncates later).
    modality: what a sample must hold: "pair" (image and caption, the default), "image" (image-only
        samples: a caption member is not needed; one that is present is kept) or "text" (text-only samples:
        the caption member is the text; an image member, if any, is neither needed nor decoded).
    min_text_tokens: with `count_tokens`, a text with fewer tokens than this (special tokens excluded,
        assumed 2: [CLS]/[SEP]) is rejected as `too_few_tokens` (e.g. too short for masked-LM masking).
    """

    max_image_pixels: int = 40_000_000
    min_caption_chars: int = 1
    draft_px: Optional[int] = None
    context_length: Optional[int] = None
    count_tokens: Optional[Callable[[str], int]] = None
    modality: str = "pair"
    min_text_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"CleanOptions.modality must be one of {MODALITIES}, got {self.modality!r}")


MODALITIES: tuple[str, ...] = ("pair", "image", "text")
"""What a sample holds: an image-text pair, an image only, or a text only (:class:`CleanOptions`)."""


@dataclass
class Sample:
    """One clean sample: an image-text pair, or (unpaired data) an image with ``caption == ""`` or a text with
    ``image is None``. `uid` = f"{shard_stem}/{key}" is unique across shards."""

    key: str
    uid: str
    shard: str
    image: Optional[Image.Image]
    caption: str
    caption_truncated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def decode_image(data: bytes, max_pixels: int, draft_px: Optional[int] = None) -> Image.Image:
    """Decode image bytes by content into a loaded 8-bit RGB `PIL.Image.Image`.

    `max_pixels` is a pixel count (width * height) checked from the header before decoding.
    `draft_px`: when set, a JPEG whose shorter side is at least twice this is decoded at the smallest libjpeg
    DCT scale (1/2, 1/4 or 1/8; Pillow's `Image.draft`) that keeps its shorter side >= `draft_px`: less
    decode work, and pixels close to (not equal to) a full decode followed by a resize. Other formats and
    smaller JPEGs decode in full.
    Animated images give their first frame. Raises `SampleRejected` (with empty key/shard) with
    reason EMPTY_IMAGE (0 bytes), TOO_MANY_PIXELS, TRUNCATED_IMAGE or UNDECODABLE_IMAGE.
    """
    if not data:
        raise SampleRejected(Reject.EMPTY_IMAGE, detail="0-byte image (an empty file or upload)")
    try:
        img = Image.open(io.BytesIO(data), formats=_open_formats())  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own guard (> 2x its MAX_IMAGE_PIXELS), from the header
        n = re.search(r"\((\d+) pixels\)", str(e))
        raise SampleRejected(Reject.TOO_MANY_PIXELS, detail=f"{n.group(1) if n else 'too many'} px (from the header) "
                                                           f"> data.max_image_pixels {max_pixels}") from None
    except UnidentifiedImageError:
        raise SampleRejected(Reject.UNDECODABLE_IMAGE, detail=f"unknown image format (starts {data[:8]!r})") from None
    except Exception as e:  # corrupt header
        raise SampleRejected(Reject.UNDECODABLE_IMAGE, detail=f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise SampleRejected(Reject.UNDECODABLE_IMAGE, detail=f"bad size {w}x{h}")
    if w * h > max_pixels:
        raise SampleRejected(Reject.TOO_MANY_PIXELS, detail=f"{w}x{h} = {w * h} px (from the header) > "
                                                           f"data.max_image_pixels {max_pixels}")
    if draft_px and img.format == "JPEG" and min(w, h) >= 2 * draft_px:
        k = draft_px / min(w, h)  # requested box: shorter side = draft_px, aspect kept (rounded up)
        try:
            img.draft(None, (math.ceil(w * k), math.ceil(h * k)))
        except Exception:  # noqa: BLE001 - drafting is an optimisation: decode in full instead
            pass
    try:
        img.load()
    except OSError as e:
        reason = Reject.TRUNCATED_IMAGE if "truncated" in str(e).lower() else Reject.UNDECODABLE_IMAGE
        raise SampleRejected(reason, detail=f"{img.format}: {e}") from None
    except Exception as e:  # SyntaxError, ValueError, zlib.error, struct.error ... from plugins
        raise SampleRejected(Reject.UNDECODABLE_IMAGE, detail=f"{img.format}: {type(e).__name__}: {e}") from None
    try:
        return to_rgb(img)
    except Exception as e:
        raise SampleRejected(Reject.UNDECODABLE_IMAGE, detail=f"{img.format} {img.mode}: {e}") from None


def _scale_to_u8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Linearly map integer/float pixels to 0..255 (never clips a valid range)."""
    if mode.startswith("I;16") or (arr.dtype.kind in "iu" and arr.size and arr.min() >= 0 and arr.max() <= 65535):
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    arr = arr.astype(np.float64)
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0 and mode == "F":
        return np.rint(arr * 255.0).astype(np.uint8)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _on_white(rgba: Image.Image) -> Image.Image:
    bg = Image.new("RGB", rgba.size, WHITE)
    bg.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return bg


def to_rgb(img: Image.Image) -> Image.Image:
    """Return `img` as an 8-bit "RGB" image.

    EXIF orientation is applied; 16/32-bit integer and float modes are scaled linearly to 8 bits
    (16-bit: 65535 -> 255); modes with alpha or a transparency key (RGBA, LA, PA, P/L/RGB with
    tRNS, premultiplied RGBa/La) are composited on white; CMYK, YCbCr, L, 1, P convert directly.
    Raises ValueError for a mode that cannot be converted.
    """
    try:
        if img.getexif().get(0x0112, 1) != 1:  # orientation tag; exif_transpose would copy anyway
            img = ImageOps.exif_transpose(img)  # also drops the tag
    except Exception:  # malformed EXIF must not lose the sample
        pass
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBa", "La"):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        return _on_white(img.convert("RGBA"))
    if mode in ("P", "L", "1", "RGB") and "transparency" in img.info:
        return _on_white(img.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_u8(np.asarray(img), mode)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("CMYK", "YCbCr", "L", "1", "P", "HSV"):
        return img.convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        return ImageCms.applyTransform(img, ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"))
    return img.convert("RGB")  # raises ValueError for unknown modes


_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)
_WS = re.compile(r"\s+")


def _sniff_utf16(data: bytes) -> Optional[str]:
    """Guess BOM-less UTF-16 from where the NUL bytes sit (ASCII-heavy text)."""
    if len(data) < 2 or len(data) % 2 or b"\x00" not in data:
        return None
    even = data[0::2].count(0)
    odd = data[1::2].count(0)
    half = len(data) // 2
    if odd >= 0.3 * half and even < 0.1 * half:
        return "utf-16-le"
    if even >= 0.3 * half and odd < 0.1 * half:
        return "utf-16-be"
    return None


def _decode_text(data: bytes) -> str:
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(enc)
            except UnicodeDecodeError:
                break
    guess = _sniff_utf16(data)
    if guess:
        try:
            return data.decode(guess)
        except UnicodeDecodeError:
            pass
    for enc in ("utf-8", "cp1252"):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")  # total: every byte maps to a code point


def clean_text(text: str) -> str:
    """NFC-normalise, drop BOMs (U+FEFF), control chars -> space, collapse whitespace, strip."""
    text = unicodedata.normalize("NFC", text.replace("\ufeff", ""))
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return _WS.sub(" ", text).strip()


def decode_caption(data: bytes) -> str:
    """Decode caption bytes to a clean `str` (possibly empty); never raises.

    Chain: BOM-detected UTF-32/UTF-8/UTF-16, BOM-less UTF-16 guessed from NUL bytes, UTF-8,
    cp1252, latin-1. Then BOMs removed, NFC, control characters -> space, whitespace runs
    collapsed to one space, stripped.
    """
    return clean_text(_decode_text(data))


def _pick(members: dict[str, bytes], exts: tuple[str, ...]) -> Optional[str]:
    for ext in exts:
        if ext in members:
            return ext
    return None


def _parse_meta(data: Optional[bytes]) -> dict[str, Any]:
    if not data:
        return {}
    try:
        obj = json.loads(_decode_text(data))
    except (ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def shard_stem(shard: str) -> str:
    """'s3://b/x/train-000001.tar' -> 'train-000001' (also strips .tar.gz / .tgz)."""
    name = shard.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    for suffix in (".tar.gz", ".tar.zst", ".tar.bz2", ".tar.xz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def clean_sample(key: str, members: dict[str, bytes], shard: str, opts: CleanOptions,
                 *, shard_id: Optional[str] = None) -> Sample:
    """Build a `Sample` from the members of one key (extension, lowercased -> bytes).

    The image is the first of `IMAGE_EXTS` present (decoded by content), the caption the first
    of `CAPTION_EXTS`, `meta` the `.json` member when it is a JSON object. `shard_id` (default:
    `shard_stem(shard)`) prefixes the uid. `opts.modality` says which members are required ("pair": both;
    "image": the image; "text": the caption, the image is not decoded). Raises `SampleRejected` with key
    and shard set; checks run cheapest first: missing image, missing caption, empty/short caption, too few
    tokens (text-only), then image decoding.
    """
    img_ext = _pick(members, IMAGE_EXTS)
    cap_ext = _pick(members, CAPTION_EXTS)
    if img_ext is None and opts.modality != "text":
        raise SampleRejected(Reject.MISSING_IMAGE, key, shard, f"members: {sorted(members)}")
    if cap_ext is None and opts.modality != "image":
        raise SampleRejected(Reject.MISSING_CAPTION, key, shard, f"members: {sorted(members)}")
    caption = decode_caption(members[cap_ext]) if cap_ext is not None else ""
    if opts.modality != "image":
        if not caption:
            raise SampleRejected(Reject.EMPTY_CAPTION, key, shard, f"{len(members[cap_ext])} bytes")
        if len(caption) < opts.min_caption_chars:
            raise SampleRejected(Reject.SHORT_CAPTION, key, shard, f"{len(caption)} < {opts.min_caption_chars} chars")
    n_tokens = opts.count_tokens(caption) if opts.count_tokens is not None and caption else None
    if opts.modality == "text" and opts.min_text_tokens and n_tokens is not None and n_tokens - 2 < opts.min_text_tokens:
        raise SampleRejected(Reject.TOO_FEW_TOKENS, key, shard, f"{n_tokens - 2} < {opts.min_text_tokens} tokens")
    image = None
    if opts.modality != "text":
        try:
            image = decode_image(members[img_ext], opts.max_image_pixels, opts.draft_px)
        except SampleRejected as e:
            raise e.located(key, shard) from None
    truncated = False
    if opts.context_length is not None and n_tokens is not None:
        truncated = n_tokens > opts.context_length
    sid = shard_id if shard_id is not None else shard_stem(shard)
    return Sample(key=key, uid=f"{sid}/{key}", shard=shard, image=image, caption=caption,
                  caption_truncated=truncated, meta=_parse_meta(members.get(META_EXT)))
