"""Unit tests of mmtl.data.samples: bytes -> clean RGB image + clean caption, or a reason."""
from __future__ import annotations

import io
import json
import pickle
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from mmtl.data.samples import (CleanOptions, Reject, SampleRejected, clean_sample, decode_caption,
                               decode_image, shard_stem, to_rgb)


def enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_1bit_zeros(w: int, h: int) -> bytes:
    """A w x h 1-bit PNG of zeros written with zlib: a few KB, no pixels held in memory."""
    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (w + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def reason_of(fn, *args) -> Reject:
    with pytest.raises(SampleRejected) as e:
        fn(*args)
    return e.value.reason


def rgb(img, xy):
    assert img.mode == "RGB"
    return img.getpixel(xy)


# ---------------------------------------------------------------- images

def test_png_with_jpg_extension_decodes_by_content():
    data = enc(Image.new("RGB", (8, 6), (1, 2, 3)), "PNG")
    s = clean_sample("k", {"jpg": data, "txt": b"cap"}, "/d/s-000.tar", CleanOptions())
    assert s.image.size == (8, 6) and rgb(s.image, (0, 0)) == (1, 2, 3)


def test_zero_byte_and_garbage_images():
    assert reason_of(decode_image, b"", 10**6) == Reject.EMPTY_IMAGE
    assert reason_of(decode_image, b"<html>404 not found</html>", 10**6) == Reject.UNDECODABLE_IMAGE


def test_eps_is_never_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert reason_of(decode_image, eps, 10**6) == Reject.UNDECODABLE_IMAGE


def test_truncated_png_and_jpeg():
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        data = enc(Image.fromarray(arr), fmt)
        assert reason_of(decode_image, data[: len(data) // 2], 10**6) == Reject.TRUNCATED_IMAGE


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp():
    img = decode_image(enc(Image.new("RGBA", (10, 10), (0, 0, 255, 255)), "WEBP", lossless=True), 10**6)
    assert img.size == (10, 10) and rgb(img, (5, 5)) == (0, 0, 255)


def test_exif_rotated_jpeg_is_rotated():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    out = decode_image(enc(img, "JPEG", exif=exif, quality=95), 10**6)
    assert out.size == (20, 40)
    top, bottom = rgb(out, (10, 5)), rgb(out, (10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_pixel_limit_checked_from_header_without_decoding(monkeypatch):
    def no_load(self):
        raise AssertionError("pixels decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    data = enc(Image.new("RGB", (16, 16)), "PNG")
    with pytest.raises(SampleRejected) as e:
        decode_image(data, max_pixels=255)
    assert e.value.reason == Reject.TOO_MANY_PIXELS and "16x16" in e.value.detail


def test_bomb_below_pillow_limit_rejected_fast():
    data = png_1bit_zeros(8000, 8000)  # 64 MPix: under Pillow's own limit, over the default 40 MPix
    assert len(data) < 100_000
    t = time.perf_counter()
    assert reason_of(decode_image, data, CleanOptions().max_image_pixels) == Reject.TOO_MANY_PIXELS
    assert time.perf_counter() - t < 0.5


def test_bomb_message_names_the_configured_limit_not_pillows():
    """Case 50's bomb (header declares 20000x20000): Pillow's own guard fires first; the reason still names
    data.max_image_pixels with the configured value (serving answers it 413), never Pillow's 178956970."""
    png = png_1bit_zeros(1, 1)  # swap in a 20000x20000 header; the pixels are never read
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
    head = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    data = png[:8] + head + png[8 + len(head):]
    for data, limit, want in ((data, 40_000_000, "400000000 px"), (png_1bit_zeros(8000, 8000), 1000, "8000x8000")):
        with pytest.raises(SampleRejected) as e:
            decode_image(data, max_pixels=limit)
        assert e.value.reason == Reject.TOO_MANY_PIXELS and want in e.value.detail
        assert f"data.max_image_pixels {limit}" in e.value.detail and "178956970" not in e.value.detail


def test_animated_gif_first_frame():
    frames = [Image.new("P", (4, 4), i) for i in (1, 2)]
    data = enc(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, 100).size == (4, 4)


# ---------------------------------------------------------------- modes

def test_modes_to_rgb():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    out = to_rgb(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((1, 0))
    assert r == 255 and abs(g - 127) <= 1 and g == b  # half red over white
    la = to_rgb(Image.new("LA", (1, 1), (10, 0)))
    assert la.getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([9, 9, 9, 0, 200, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255) and to_rgb(pal).getpixel((1, 0)) == (0, 200, 0)


def test_high_bit_depth_scaled_not_clipped():
    vals = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(vals)))  # I;16
    assert out[0, :, 0].tolist() == [0, 1, 128, 255] and out.dtype == np.uint8
    out32 = np.asarray(to_rgb(Image.fromarray(vals.astype(np.int32), "I")))
    assert out32[0, :, 0].tolist() == [0, 1, 128, 255]
    f = np.asarray(to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")))
    assert f[0, :, 1].tolist() == [0, 128, 255]


def test_16bit_png_roundtrip_via_decode():
    grad = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    out = np.asarray(decode_image(enc(Image.fromarray(grad), "PNG"), 100))
    assert out[0, :, 2].tolist() == [round(v / 257) for v in grad[0].tolist()]


# ---------------------------------------------------------------- captions

@pytest.mark.parametrize("data, want", [
    ("caf\u00e9 \u2713".encode("utf-8"), "caf\u00e9 \u2713"),
    ("\ufeffhello".encode("utf-8"), "hello"),
    ("the dog\u2019s".encode("cp1252"), "the dog\u2019s"),
    (b"caf\xe9 \x81", "caf\u00e9"),  # 0x81 is undefined in cp1252 -> latin-1; C1 control dropped
    ("kite \u00e9".encode("utf-16"), "kite \u00e9"),
    ("kite".encode("utf-16-le"), "kite"),
    ("kite".encode("utf-16-be"), "kite"),
    ("wide \u00fc".encode("utf-32"), "wide \u00fc"),
    ("e\u0301t\u00e9".encode("utf-8"), "\u00e9t\u00e9"),  # NFC
    (b"  a\tb\r\n\n c \x00 d ", "a b c d"),
    (b"\xef\xbb\xbf", ""),
    (b"\xef\xbb\xbf\n", ""),
    (b"", ""),
])
def test_decode_caption(data, want):
    assert decode_caption(data) == want


def test_emoji_sequences_survive():
    s = "family \U0001F468\u200D\U0001F469\u200D\U0001F467 \U0001F327\uFE0F"
    assert decode_caption(s.encode()) == s


# ---------------------------------------------------------------- clean_sample

IMG = enc(Image.new("RGB", (4, 4), (5, 6, 7)), "PNG")


def test_clean_sample_fields_and_uid():
    s = clean_sample("000123", {"png": IMG, "txt": b" a  cat ", "json": b'{"label": "cat"}'},
                     "s3://b/x/train-000000.tar", CleanOptions())
    assert (s.key, s.uid, s.caption, s.meta) == ("000123", "train-000000/000123", "a cat", {"label": "cat"})
    assert s.shard == "s3://b/x/train-000000.tar" and s.image.mode == "RGB" and not s.caption_truncated
    assert clean_sample("k", {"png": IMG, "txt": b"x"}, "a.tar", CleanOptions(), shard_id="a~3").uid == "a~3/k"


@pytest.mark.parametrize("members, reason", [
    ({"json": b"{}"}, Reject.MISSING_IMAGE),
    ({"txt": b"cap"}, Reject.MISSING_IMAGE),
    ({"png": IMG}, Reject.MISSING_CAPTION),
    ({"png": IMG, "txt": b"\xef\xbb\xbf"}, Reject.EMPTY_CAPTION),
    ({"png": IMG, "txt": b"\t \n"}, Reject.EMPTY_CAPTION),
    ({"jpg": b"", "txt": b"caption"}, Reject.EMPTY_IMAGE),
    ({"png": IMG, "txt": b"abc"}, Reject.SHORT_CAPTION),
])
def test_clean_sample_rejects(members, reason):
    with pytest.raises(SampleRejected) as e:
        clean_sample("k1", members, "/x/s.tar", CleanOptions(min_caption_chars=4))
    assert e.value.reason == reason and e.value.key == "k1" and e.value.shard == "/x/s.tar"


def test_image_preference_and_caption_exts():
    other = enc(Image.new("RGB", (2, 2)), "PNG")
    s = clean_sample("k", {"png": other, "jpg": IMG, "caption": b"c"}, "s.tar", CleanOptions())
    assert s.image.size == (4, 4)  # jpg is preferred over png (IMAGE_EXTS order)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"str"', b"\xff\xfe{"])
def test_bad_json_meta_is_empty(raw):
    assert clean_sample("k", {"png": IMG, "txt": b"c", "json": raw}, "s.tar", CleanOptions()).meta == {}


def test_caption_truncation_flag():
    opts = CleanOptions(context_length=5, count_tokens=lambda s: len(s.split()) + 2)
    ok = clean_sample("k", {"png": IMG, "txt": b"a b c"}, "s.tar", opts)  # 5 tokens: fits
    cut = clean_sample("k", {"png": IMG, "txt": b"a b c d"}, "s.tar", opts)
    assert not ok.caption_truncated and cut.caption_truncated and cut.caption == "a b c d"


def test_rejection_pickles_and_shard_stem():
    e = pickle.loads(pickle.dumps(SampleRejected(Reject.EMPTY_CAPTION, "k", "s", "d")))
    assert (e.reason, e.key, e.shard, e.detail) == (Reject.EMPTY_CAPTION, "k", "s", "d")
    assert Reject("too_many_pixels") is Reject.TOO_MANY_PIXELS and json.dumps(Reject.EMPTY_SHARD) == '"empty_shard"'
    assert [shard_stem(s) for s in ("a/b-01.tar", "s3://x/y.tar.gz", "c.tgz")] == ["b-01", "y", "c"]
