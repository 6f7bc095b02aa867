"""A diagram question-answering set generated offline: rendered scenes + questions about count, colour,
position and relation, written as WebDataset shards.

Scenes (``image_size`` px, white background, a 3x3 grid of cells, one object per cell, jittered):
  * ``shapes`` (3 of 4 scenes): 1-5 objects, each a circle / square / triangle, red / green / blue / yellow,
    small or large.
  * ``arrows`` (1 of 4): 3 labelled boxes (letters A-H, coloured) and 1-3 arrows between them.

Questions (one of each type per image, so 4 samples per image; an object is named by the shortest unique
description: "circle", "red circle" or "small red circle"):
  * ``count``: "how many circles are there?", "how many red shapes are there?", "how many arrows are there?"
    -> "0" .. "5";
  * ``colour``: "what colour is the square?", "what colour is box B?" -> red / green / blue / yellow;
  * ``position``: "is the red circle on the left, in the middle or on the right?" -> left / middle / right, or
    "... at the top, in the middle or at the bottom?" -> top / middle / bottom (the object's grid column / row);
  * ``relation``: "is the circle left of the square?" -> yes / no (objects in different columns), "which box
    does the arrow from box A point to?" -> the letter.

Splits by layout: a scene's layout is its scene kind + the set of occupied grid cells; a layout goes to test
when ``sha256(layout)`` mod 100 < ``test_percent``, so no test image shares its arrangement with a train image.

Sample format (``{key}.png``, ``{key}.txt``, ``{key}.json``): the caption is the question; the json holds
``answers`` (a list with the one correct answer), ``question_type``, ``image_id`` (shared by the 4 questions of
an image), ``scene``, ``layout``, ``split`` and ``conversations`` (the question and answer as a LLaVA chat-format
conversation, for generative models: free-form VQA). ``<out>/answers.txt`` lists every answer; ``<out>/stats.json``
counts samples per split and type. Same arguments -> byte-identical shards.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

from mmtl.data.shardwriter import ShardWriter, remove_stale_shards

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.38}  # radius as a fraction of the cell side
LABELS = "ABCDEFGH"
COLS, ROWS = ("left", "middle", "right"), ("top", "middle", "bottom")
QTYPES = ("count", "colour", "position", "relation")


def layout_split(layout: str, test_percent: int) -> str:
    """"test" when ``sha256(layout) mod 100 < test_percent``, else "train"."""
    return "test" if int(hashlib.sha256(layout.encode()).hexdigest(), 16) % 100 < test_percent else "train"


DESC_KEYS = (("shape",), ("colour", "shape"), ("size", "colour", "shape"))
NO_COLOUR = (("shape",), ("size", "shape"))


def _desc(objs: list[dict], o: dict, options: tuple = DESC_KEYS) -> Optional[str]:
    """The shortest description of ``o`` (words from the ``options`` key tuples) that no other object shares."""
    for keys in options:
        if sum(all(p[k] == o[k] for k in keys) for p in objs) == 1:
            return " ".join(o[k] for k in keys)
    return None


def _centre(cell: int, side: float, rng: random.Random) -> tuple[float, float]:
    j = side * 0.08
    return ((cell % 3 + 0.5) * side + rng.uniform(-j, j), (cell // 3 + 0.5) * side + rng.uniform(-j, j))


def shapes_scene(rng: random.Random) -> dict:
    cells = rng.sample(range(9), rng.randint(1, 5))
    objs = [{"cell": c, "shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
             "size": rng.choice(list(SIZES))} for c in sorted(cells)]
    return {"scene": "shapes", "objects": objs}


def arrows_scene(rng: random.Random) -> dict:
    cells = sorted(rng.sample(range(9), 3))
    boxes = [{"cell": c, "label": lab, "colour": rng.choice(list(COLOURS))}
             for c, lab in zip(cells, rng.sample(LABELS, 3))]
    pairs = rng.sample([(0, 1), (0, 2), (1, 2)], rng.randint(1, 3))  # never both directions of one pair
    arrows = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]
    return {"scene": "arrows", "boxes": boxes, "arrows": arrows}


def render(scene: dict, size: int, rng: random.Random) -> Image.Image:
    """Draw ``scene`` on a ``size`` x ``size`` RGB image."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    side = size / 3
    if scene["scene"] == "shapes":
        for o in scene["objects"]:
            x, y = _centre(o["cell"], side, rng)
            r, fill = SIZES[o["size"]] * side, COLOURS[o["colour"]]
            if o["shape"] == "circle":
                d.ellipse((x - r, y - r, x + r, y + r), fill=fill)
            elif o["shape"] == "square":
                d.rectangle((x - r * 0.85, y - r * 0.85, x + r * 0.85, y + r * 0.85), fill=fill)
            else:
                d.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
        return img
    font = ImageFont.load_default(size=max(8, int(side * 0.35)))
    centres = [_centre(b["cell"], side, rng) for b in scene["boxes"]]
    hw, hh = side * 0.3, side * 0.22
    for a, b in scene["arrows"]:
        (x0, y0), (x1, y1) = centres[a], centres[b]
        dx, dy = x1 - x0, y1 - y0
        n = max((dx * dx + dy * dy) ** 0.5, 1e-6)
        ux, uy = dx / n, dy / n
        t = min(hw / max(abs(ux), 1e-6), hh / max(abs(uy), 1e-6)) + 2  # leave the box border
        sx, sy, ex, ey = x0 + ux * t, y0 + uy * t, x1 - ux * t, y1 - uy * t
        d.line((sx, sy, ex, ey), fill=(0, 0, 0), width=max(1, size // 80))
        h = side * 0.12
        d.polygon([(ex, ey), (ex - ux * h - uy * h / 2, ey - uy * h + ux * h / 2),
                   (ex - ux * h + uy * h / 2, ey - uy * h - ux * h / 2)], fill=(0, 0, 0))
    for box, (x, y) in zip(scene["boxes"], centres):
        d.rectangle((x - hw, y - hh, x + hw, y + hh), fill=COLOURS[box["colour"]], outline=(0, 0, 0))
        d.text((x, y), box["label"], fill=(0, 0, 0), font=font, anchor="mm")
    return img


def _where(o: dict, rng: random.Random, name: str) -> tuple[str, str]:
    if rng.random() < 0.5:
        return f"is {name} on the left, in the middle or on the right?", COLS[o["cell"] % 3]
    return f"is {name} at the top, in the middle or at the bottom?", ROWS[o["cell"] // 3]


def questions(scene: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """``[(question_type, question, answer)]``: one of each type in :data:`QTYPES` (when one exists)."""
    out = []
    if scene["scene"] == "arrows":
        boxes, arrows = scene["boxes"], scene["arrows"]
        out.append(("count", "how many arrows are there?", str(len(arrows))))
        b = rng.choice(boxes)
        out.append(("colour", f"what colour is box {b['label']}?", b["colour"]))
        b = rng.choice(boxes)
        out.append(("position", *_where(b, rng, f"box {b['label']}")))
        src = Counter(a for a, _ in arrows)
        a = rng.choice(sorted(s for s, n in src.items() if n == 1) or [None])
        if a is not None:
            dst = next(t for s, t in arrows if s == a)
            out.append(("relation", f"which box does the arrow from box {boxes[a]['label']} point to?",
                        boxes[dst]["label"]))
        return out
    objs = scene["objects"]
    if rng.random() < 0.5:
        s = rng.choice(SHAPES)
        out.append(("count", f"how many {s}s are there?", str(sum(o["shape"] == s for o in objs))))
    else:
        c = rng.choice(list(COLOURS))
        out.append(("count", f"how many {c} shapes are there?", str(sum(o["colour"] == c for o in objs))))
    plain = [(o, _desc(objs, o, NO_COLOUR)) for o in objs]  # named without their colour
    plain = [(o, n) for o, n in plain if n]
    if plain:
        o, n = rng.choice(plain)
        out.append(("colour", f"what colour is the {n}?", o["colour"]))
    named = [(o, _desc(objs, o)) for o in objs]
    named = [(o, n) for o, n in named if n]
    if named:
        o, n = rng.choice(named)
        out.append(("position", *_where(o, rng, f"the {n}")))
    pairs = [(a, b) for a in named for b in named if a[0]["cell"] % 3 != b[0]["cell"] % 3]
    if pairs:
        (a, na), (b, nb) = rng.choice(pairs)
        out.append(("relation", f"is the {na} left of the {nb}?", "yes" if a["cell"] % 3 < b["cell"] % 3 else "no"))
    return out


def _layout(scene: dict) -> str:
    items = scene["objects"] if scene["scene"] == "shapes" else scene["boxes"]
    return scene["scene"] + ":" + ",".join(str(o["cell"]) for o in sorted(items, key=lambda o: o["cell"]))


def build_diagrams(out: str | Path, train_images: int = 1000, test_images: int = 250, image_size: int = 160,
                   test_percent: int = 20, seed: int = 0, max_samples_per_shard: int = 2000) -> dict:
    """Generate the set into ``out/{train,test}`` (see module docstring); returns the stats dict.

    Raises:
        ValueError: non-positive counts, ``image_size`` < 32, ``test_percent`` outside 1..99.
    """
    if train_images < 1 or test_images < 1 or image_size < 32 or not 1 <= test_percent <= 99:
        raise ValueError(f"need train_images, test_images >= 1, image_size >= 32, 1 <= test_percent <= 99; got "
                         f"{train_images}, {test_images}, {image_size}, {test_percent}")
    out = Path(out)
    rng = random.Random(seed)
    want = {"train": train_images, "test": test_images}
    done: Counter = Counter()
    stats: dict = {"train": Counter(), "test": Counter()}
    answers: set[str] = set()
    writers = {s: ShardWriter(out / s, prefix=f"diagrams-{s}", max_samples_per_shard=max_samples_per_shard)
               for s in want}
    try:
        while any(done[s] < want[s] for s in want):
            scene = arrows_scene(rng) if rng.random() < 0.25 else shapes_scene(rng)
            layout = _layout(scene)
            split = layout_split(layout, test_percent)
            qs = questions(scene, rng)
            img = render(scene, image_size, rng)
            if done[split] >= want[split]:
                continue
            buf = io.BytesIO()
            img.save(buf, format="PNG", optimize=False)
            image_id = f"{split}-{done[split]:06d}"
            for j, (qtype, q, a) in enumerate(qs):
                meta = {"answers": [a], "question_type": qtype, "image_id": image_id, "scene": scene["scene"],
                        "layout": layout, "split": split,
                        "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
                writers[split].write(f"{image_id}-{j}", buf.getvalue(), "png", q, meta)
                stats[split][qtype] += 1
                answers.add(a)
            done[split] += 1
    finally:
        for w in writers.values():
            w.close()
    for s, w in writers.items():
        remove_stale_shards(out / s, f"diagrams-{s}", w.shards)
    (out / "answers.txt").write_text("".join(f"{a}\n" for a in sorted(answers)))
    result = {"images": dict(done), "samples": {s: sum(c.values()) for s, c in stats.items()},
              "per_type": {s: dict(sorted(c.items())) for s, c in stats.items()}, "image_size": image_size,
              "test_percent": test_percent, "seed": seed, "answers": len(answers)}
    (out / "stats.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
