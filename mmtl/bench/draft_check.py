"""How far JPEG draft decoding (``data.jpeg_draft``) moves what a model sees, against the spread the training
augmentation already adds: for the first ``n`` JPEGs of a shard, the model's image transform and frozen image tower
(``image_features``, no heads) on a full decode vs a draft decode (eval transform: resize + center crop, so the
same geometry), and on two RandomResizedCrop draws of the same full decode (train transform).

``python -m mmtl.bench.draft_check SHARD [--n 256] [--pipeline pipelines/quickstart.yaml] [--image-size 128]``
prints one JSON object: decoded sizes, mean |pixel difference| (normalised input units) and mean / min cosine
similarity of the tower features for draft vs full, and the same for two augmentations of one image.
"""
from __future__ import annotations

import json
import math
import sys
import tarfile


def draft_distance(shard: str, pipeline: str = "pipelines/quickstart.yaml", image_size: int = 128, n: int = 256,
                   factor: float = 1.5) -> dict:
    """Draft-vs-full and augmentation distances on the first ``n`` ``.jpg`` members of ``shard`` (see the module
    docstring). Raises ValueError when the shard has no JPEG member."""
    import torch

    from mmtl.config import load_pipeline
    from mmtl.data.samples import decode_image
    from mmtl.models import build_image_transform, build_model

    torch.set_num_threads(1)
    pipe = load_pipeline(pipeline, [f"model.image_size={image_size}"])
    model = build_model(pipe.model).eval()
    ev, tr = build_image_transform(pipe.model, False), build_image_transform(pipe.model, True)
    px = math.ceil(factor * image_size)
    with tarfile.open(shard) as t:
        raw = [t.extractfile(m).read() for m in t if m.isfile() and m.name.endswith((".jpg", ".jpeg"))][:n]
    if not raw:
        raise ValueError(f"{shard} holds no .jpg member")
    full = [decode_image(d, 10**9) for d in raw]
    draft = [decode_image(d, 10**9, px) for d in raw]
    x_full, x_draft = torch.stack([ev(i) for i in full]), torch.stack([ev(i) for i in draft])
    torch.manual_seed(1)
    x_a = torch.stack([tr(i) for i in full])
    torch.manual_seed(2)
    x_b = torch.stack([tr(i) for i in full])

    def feats(x):
        with torch.inference_mode():
            f = torch.cat([model.image_features(x[i:i + 32]) for i in range(0, len(x), 32)])
        return torch.nn.functional.normalize(f.float(), dim=-1)

    f_full, f_draft, f_a, f_b = feats(x_full), feats(x_draft), feats(x_a), feats(x_b)
    cos_draft, cos_aug = (f_full * f_draft).sum(-1), (f_a * f_b).sum(-1)
    return {
        "images": len(raw), "draft_px": px, "decoded_size": {"full": list(full[0].size), "draft": list(draft[0].size)},
        "pixel_mean_abs_diff": {"draft_vs_full": float((x_full - x_draft).abs().mean()),
                                "two_augmentations": float((x_a - x_b).abs().mean())},
        "feature_cosine_mean": {"draft_vs_full": float(cos_draft.mean()), "two_augmentations": float(cos_aug.mean())},
        "feature_cosine_min": {"draft_vs_full": float(cos_draft.min()), "two_augmentations": float(cos_aug.min())},
    }


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmtl.bench.draft_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("shard")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--pipeline", default="pipelines/quickstart.yaml")
    ap.add_argument("--image-size", type=int, default=128)
    a = ap.parse_args(argv)
    print(json.dumps(draft_distance(a.shard, a.pipeline, a.image_size, a.n), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
