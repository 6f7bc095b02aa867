"""``mmtl generate MODEL --image PATH``: caption images (or continue a prompt) with a generative model once."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from mmtl.cli.common import fail


def generate_cmd(
    model: str = typer.Argument(..., help="Run directory, export folder, runs:/<id>/model or models:/<name>/<v>"),
    image: List[Path] = typer.Option(..., "--image", help="Image file (repeat for several)."),
    prompt: Optional[str] = typer.Option(None, help="Text the output continues; default model.decoder.prompt "
                                         "(with strategy.caption.retrieval_k: after the retrieval prompt)."),
    num_beams: int = typer.Option(1, "--num-beams", min=1, help="1: greedy; N: beam search with N beams."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, help="Most tokens to generate."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI for runs:/ and models:/ specs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Generate text for each image with transformers' generate (KV cache), greedy or beam search.

    Example:

    \b
        mmtl generate runs/emoji-captioning-lora --image heart.png --num-beams 3
    """
    from mmtl.data.samples import SampleRejected, decode_image, to_rgb
    from mmtl.eval.resolve import ModelSpecError, resolve_export
    from mmtl.tracking.caption_model import caption_images
    from mmtl.tracking.registry import load_exported

    images = []
    for p in image:
        if not p.is_file():
            fail(f"--image {p}: no such file")
        try:
            images.append(to_rgb(decode_image(p.read_bytes(), 40_000_000)))
        except SampleRejected as exc:
            fail(f"--image {p}: {exc}")
    try:
        res = resolve_export(model, tracking_uri)
    except ModelSpecError as exc:
        fail(str(exc))
    try:
        net, pipe = load_exported(res.export_dir)
        texts = caption_images(net, pipe, images, prompt, num_beams, max_new_tokens)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc), 1)
    finally:
        res.cleanup()
    if as_json:
        print(json.dumps({"model": model, "num_beams": num_beams, "max_new_tokens": max_new_tokens,
                          "outputs": [{"image": str(p), "text": t} for p, t in zip(image, texts)]}, indent=2))
        return
    for p, t in zip(image, texts):
        print(f"{p}\t{t}")
