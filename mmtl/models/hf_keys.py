"""Key mapping of the ``hf`` family's exports back to transformers ``CLIPModel`` / ``SiglipModel`` names, so
an mmtl export loads into transformers directly."""
from __future__ import annotations


def to_hf_state_dict(sd: dict) -> dict:
    """Map an mmtl ``MultimodalModel.state_dict()`` of the hf family to ``CLIPModel`` / ``SiglipModel`` keys.

    ``image_tower.X`` -> ``X`` (``vision_model.*``, ``visual_projection.*``), ``text_tower.X`` -> ``X``,
    ``logit_scale`` -> 0-dim for CLIP (detected by ``visual_projection``), (1,) for SigLIP; ``logit_bias``
    (the SigLIP loss's, if saved) is kept for SigLIP and dropped for CLIP; Identity heads have no keys.
    A SigLIP state dict without ``logit_bias`` needs ``load_state_dict(..., strict=False)``.

    Raises:
        ValueError: a key that belongs to no known part.
    """
    is_clip = any(k.startswith("image_tower.visual_projection.") for k in sd)
    out: dict = {}
    for k, v in sd.items():
        if k.startswith("image_tower."):
            out[k[len("image_tower."):]] = v
        elif k.startswith("text_tower."):
            out[k[len("text_tower."):]] = v
        elif k == "logit_scale":
            out[k] = v.reshape(()) if is_clip else v.reshape(1)
        elif k == "logit_bias":
            if not is_clip:
                out[k] = v.reshape(1)
        elif k.startswith(("image_head.", "text_head.")):
            continue
        else:
            raise ValueError(f"to_hf_state_dict: unexpected key {k!r} (not an hf-family state dict)")
    return out
