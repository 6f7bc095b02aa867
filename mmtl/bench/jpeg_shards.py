"""Large-JPEG copies of image-text shards, for measuring JPEG draft decoding (``data.jpeg_draft``) on real pictures.

The bundled emoji shards hold small PNGs (64 px), on which draft decoding does nothing. This writes the same
samples (same keys, captions and metadata, same split folders) with each image decoded as training decodes it
(:func:`mmtl.data.samples.decode_image`: RGB, alpha composited on white), resized to ``size`` x ``size`` px
(bicubic) and saved as a baseline JPEG of quality ``quality`` (4:2:0 chroma subsampling, Pillow's default):
a source well above the model input, the case draft decoding is for.

``python -m mmtl.bench.jpeg_shards mmtl/assets/emoji runs/emoji-jpeg512 --size 512`` (about 20 s for the
2,102 emoji images on one core) writes ``runs/emoji-jpeg512/{train,val,test,openmoji_test}/*.tar``.
"""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

from PIL import Image

from mmtl.data.samples import decode_image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")


def to_jpeg(data: bytes, size: int, quality: int) -> bytes:
    """Image bytes (any format Pillow reads) -> ``size`` x ``size`` RGB baseline JPEG bytes (quality ``quality``).
    Raises :class:`mmtl.data.samples.SampleRejected` for bytes that do not decode."""
    img = decode_image(data, 10**9).resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def convert_shard(src: Path, dst: Path, size: int, quality: int) -> int:
    """Copy one tar shard, image members re-encoded by :func:`to_jpeg` as ``<key>.jpg``, other members as they
    are, in the same order. Returns the number of images converted."""
    n = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            if not m.isfile():
                continue
            data = tin.extractfile(m).read()
            stem, _, ext = m.name.rpartition(".")
            name = m.name
            if ext.lower() in IMAGE_EXTS:
                data, name, n = to_jpeg(data, size, quality), f"{stem}.jpg", n + 1
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tout.addfile(info, io.BytesIO(data))
    return n


def convert_tree(src: Path, out: Path, size: int = 512, quality: int = 90) -> dict[str, int]:
    """Every ``*.tar`` under ``src`` -> the same relative path under ``out``. Returns images per split folder.
    Raises FileNotFoundError when ``src`` holds no shard."""
    shards = sorted(Path(src).rglob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shard under {src}")
    counts: dict[str, int] = {}
    for s in shards:
        rel = s.relative_to(src)
        k = str(rel.parent)
        counts[k] = counts.get(k, 0) + convert_shard(s, Path(out) / rel, size, quality)
    return counts


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmtl.bench.jpeg_shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="folder of shards (searched recursively)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=512, help="output side (px)")
    ap.add_argument("--quality", type=int, default=90)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    counts = convert_tree(a.src, a.out, a.size, a.quality)
    print(f"{sum(counts.values())} images -> {a.size}-px JPEG q{a.quality} under {a.out} "
          f"({counts}) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
