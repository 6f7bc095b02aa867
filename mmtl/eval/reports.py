"""Report files of ``mmtl eval``: per-class CSV rows, confusion-matrix PNG, retrieval example grid PNG."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np


def write_csv(rows: list[dict], path: Path) -> Path:
    """``rows`` (dicts with the same keys) as a CSV file with a header; None values written empty."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    return path


def per_class_rows(cm: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One row per class from a confusion matrix (rows true, columns predicted)."""
    rows = []
    for i, c in enumerate(classes):
        support, correct, predicted = int(cm[i].sum()), int(cm[i, i]), int(cm[:, i].sum())
        off = cm[i].copy()
        off[i] = -1
        j = int(off.argmax()) if len(classes) > 1 else i
        rows.append({"index": i, "class": c, "support": support, "predicted": predicted, "correct": correct,
                     "recall": round(correct / support, 6) if support else None,
                     "precision": round(correct / predicted, 6) if predicted else None,
                     "most_confused_with": classes[j] if off[j] > 0 else "",
                     "most_confused_count": int(max(off[j], 0))})
    return rows


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def confusion_png(cm: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG (counts written in cells up to 30 classes)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return _confusion_png_pil(cm, classes, path, title)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = len(classes)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = min(4 + 0.45 * c, 40)
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(c), labels=list(classes), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(c), labels=list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path


def _confusion_png_pil(cm: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    from PIL import Image, ImageDraw

    c = len(classes)
    cell, font = max(18, min(40, 600 // max(c, 1))), _font(11)
    label_w = 8 + 7 * max((len(x) for x in classes), default=1)
    top = 30 + label_w
    img = Image.new("RGB", (label_w + c * cell + 10, top + c * cell + 10), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((5, 5), title, fill="black", font=font)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for i, name in enumerate(classes):
        d.text((4, top + i * cell + cell // 3), name, fill="black", font=font)
        col = Image.new("RGB", (label_w, 14), "white")
        ImageDraw.Draw(col).text((2, 0), name, fill="black", font=font)
        img.paste(col.rotate(90, expand=True), (label_w + i * cell + cell // 4, 28))
        for j in range(c):
            v = float(norm[i, j])
            shade = (int(255 - 200 * v), int(255 - 150 * v), 255)
            x0, y0 = label_w + j * cell, top + i * cell
            d.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=shade, outline=(200, 200, 200))
            if cm[i, j] and cell >= 18:
                d.text((x0 + 3, y0 + cell // 3), str(int(cm[i, j])), fill="white" if v > 0.5 else "black", font=font)
    img.save(path, format="PNG")
    return path


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width)[:6] or [""]


def retrieval_png(queries: list[dict], path: Path, thumb: int = 96) -> Path:
    """A grid: one row per text query (its caption and true image), then its top-K images with rank and cosine
    similarity, the true image framed green, others grey. ``queries``: dicts with ``caption``,
    ``image`` (PIL), ``hits`` [(PIL image, score, is_true)]."""
    from PIL import Image, ImageDraw

    font = _font(12)
    pad, text_w, label_h = 8, 220, 18
    k = max((len(q["hits"]) for q in queries), default=0)
    row_h = thumb + label_h + 2 * pad
    width = text_w + thumb + pad * 3 + k * (thumb + pad) + pad
    img = Image.new("RGB", (width, 24 + row_h * len(queries)), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 4), f"text -> image: top-{k} matches (green = true pair)", fill="black", font=font)

    def tile(im, x, y, color):
        t = im.convert("RGB")
        t.thumbnail((thumb, thumb), Image.NEAREST if max(t.size) < thumb else Image.BICUBIC)
        if max(t.size) < thumb:
            s = thumb / max(t.size)
            t = t.resize((max(1, round(t.width * s)), max(1, round(t.height * s))), Image.NEAREST)
        d.rectangle((x - 3, y - 3, x + thumb + 2, y + thumb + 2), outline=color, width=3)
        img.paste(t, (x + (thumb - t.width) // 2, y + (thumb - t.height) // 2))

    for r, q in enumerate(queries):
        y = 24 + r * row_h + pad
        for li, line in enumerate(_wrap(q["caption"], 30)):
            d.text((pad, y + li * 15), line, fill="black", font=font)
        x = text_w + pad
        tile(q["image"], x, y, (120, 120, 120))
        d.text((x, y + thumb + 4), "query's image", fill="black", font=font)
        for j, (im, score, true) in enumerate(q["hits"]):
            x = text_w + thumb + pad * 3 + j * (thumb + pad)
            tile(im, x, y, (30, 170, 30) if true else (190, 190, 190))
            d.text((x, y + thumb + 4), f"#{j + 1} {score:.3f}", fill="black", font=font)
    img.save(path, format="PNG")
    return path
