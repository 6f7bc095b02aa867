"""Retrieval-augmented captioning (SmallCap: Ramos et al. 2023, "SmallCap: Lightweight Image Captioning Prompted
with Retrieval Augmentation", CVPR): the decoder is prompted with the captions of the ``k`` training images
nearest to the input image, so it can copy and edit rare words it would not generate on its own.

The retrieval space is the nearest-neighbour caption baseline's (Devlin et al. 2015,
:func:`mmtl.eval.captioning.nearest_neighbour_captions`): cosine similarity of the L2-normalised mean image token
of the frozen pretrained image tower (:func:`pooled_features`, :func:`top_k_neighbours` are shared with it).

* :class:`CaptionRetriever`: the datastore (training captions + their (N, D) features) and the frozen tower that
  embeds queries; :meth:`~CaptionRetriever.prompts` fills ``strategy.caption.retrieval_prompt`` (``{captions}``:
  the k captions, nearest first, joined by ``". "``). Training prompts leave the query's own image out
  (``leave_out``), or the decoder would learn to copy its own caption.
* Export files (next to ``model.safetensors``): :data:`DATASTORE_FILE` (``captions`` (N,) str, ``features``
  (N, D) float32) and :data:`TOWER_FILE` (the frozen tower's state dict); :func:`attach_retriever` loads them
  onto a model whose pipeline has ``strategy.caption.retrieval_k > 0`` and fails clearly when they are missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: export file of the datastore (captions + normalised features)
DATASTORE_FILE = "retrieval.npz"
#: export file of the frozen image tower that embeds the queries
TOWER_FILE = "retrieval_tower.safetensors"


def pooled_features(image_tokens: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """(B, 3, S, S) normalised images -> (B, D) L2-normalised mean image token (``image_tokens``: images ->
    (B, N_tok, D)), float32."""
    return F.normalize(image_tokens(images).mean(dim=1).float(), dim=-1)


def top_k_neighbours(query: Tensor, keys: Tensor, k: int, leave_out: Optional[Sequence[str]] = None,
                     key_groups: Optional[Sequence[str]] = None, chunk: int = 1024) -> Tensor:
    """(Q, k) indices of the ``k`` keys most cosine-similar to each query, most similar first.

    Args:
        query: (Q, D) and keys: (N, D), both L2-normalised.
        leave_out: per query a group id (e.g. its image id); keys with the same id in ``key_groups`` (N ids) are
            never returned (leave-one-out when the queries are the keys themselves).
    Raises:
        ValueError: ``k`` < 1 or more than the keys left to a query.
    """
    n = keys.shape[0] - (1 if leave_out is not None else 0)
    if k < 1 or k > n:
        raise ValueError(f"retrieval needs 1 <= k <= {n} (datastore of {keys.shape[0]} captions"
                         f"{', less the query itself' if leave_out is not None else ''}), got k={k}")
    if leave_out is not None:
        if key_groups is None or len(leave_out) != query.shape[0] or len(key_groups) != keys.shape[0]:
            raise ValueError("leave_out needs one group id per query and key_groups one per key")
        codes = {g: i for i, g in enumerate(dict.fromkeys([*key_groups, *leave_out]))}
        kg = torch.tensor([codes[g] for g in key_groups], device=keys.device)
        qg = torch.tensor([codes[g] for g in leave_out], device=keys.device)
    out = [torch.zeros(0, k, dtype=torch.long, device=keys.device)]
    for s in range(0, query.shape[0], chunk):
        sim = query[s:s + chunk] @ keys.t()  # (q, N)
        if leave_out is not None:
            same = qg[s:s + chunk, None] == kg[None, :]
            if bool((same.sum(1) > keys.shape[0] - k).any()):
                raise ValueError(f"retrieval_k={k}: fewer than k captions are left once a query's own image is "
                                 "left out")
            sim = sim.masked_fill(same, float("-inf"))
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


class CaptionRetriever:
    """Datastore + frozen image tower (module docstring). Not an ``nn.Module``: its tower is not part of the
    captioner's state dict, strategies never see it, and it is saved in its own export files.

    Attributes:
        tower: the frozen timm image tower; ``image_layer``: its token level (``model.decoder.image_layer``);
        captions: N training captions; ``features``: (N, D) float32 L2-normalised; ``k``; ``template``: the
        prompt with ``{captions}``.
    """

    def __init__(self, tower: nn.Module, image_layer: int, captions: Sequence[str], features: Tensor, k: int,
                 template: str) -> None:
        if len(captions) != features.shape[0]:
            raise ValueError(f"datastore: {len(captions)} captions but {features.shape[0]} feature rows")
        if "{captions}" not in template:
            raise ValueError(f"strategy.caption.retrieval_prompt={template!r} has no {{captions}} field")
        self.tower, self.image_layer = tower.eval().requires_grad_(False), image_layer
        self.captions, self.features = list(captions), features.float()
        self.k, self.template = int(k), template
        top_k_neighbours(features[:0], features, self.k)  # k larger than the datastore: error now, not at use

    @torch.no_grad()
    def query_features(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, D) features in the datastore's space."""
        from mmtl.models.tokens import timm_image_tokens

        self.tower.to(images.device)
        return pooled_features(lambda x: timm_image_tokens(self.tower, x, self.image_layer), images.float())

    def prompts(self, query: Tensor, leave_out: Optional[Sequence[str]] = None,
                key_groups: Optional[Sequence[str]] = None) -> list[str]:
        """(Q, D) query features -> Q prompts: the template filled with the k nearest captions (nearest first)."""
        idx = top_k_neighbours(query.to(self.features.device), self.features, self.k, leave_out, key_groups)
        return [self.template.format(captions=". ".join(self.captions[j] for j in row)) for row in idx.tolist()]

    def prompts_for_images(self, images: Tensor) -> list[str]:
        """(B, 3, S, S) normalised images -> B prompts (inference: nothing is left out)."""
        return self.prompts(self.query_features(images).cpu())

    # ---- export files --------------------------------------------------------------------------------------
    def save(self, export_dir: Path) -> list[Path]:
        """Write :data:`DATASTORE_FILE` and :data:`TOWER_FILE` into ``export_dir``; returns their paths."""
        from safetensors.torch import save_file

        export_dir = Path(export_dir)
        store, tower = export_dir / DATASTORE_FILE, export_dir / TOWER_FILE
        np.savez(store, captions=np.array(self.captions, dtype=str), features=self.features.cpu().numpy())
        save_file({k: v.detach().cpu().contiguous() for k, v in self.tower.state_dict().items()}, str(tower))
        return [store, tower]

    @classmethod
    def load(cls, export_dir: Path, vision_cfg, image_layer: int, k: int, template: str) -> "CaptionRetriever":
        """The retriever saved in ``export_dir`` (tower architecture from ``vision_cfg``, weights from the file).

        Raises:
            FileNotFoundError: a file is missing (the message names it and the setting that needs it).
            ValueError: the datastore is smaller than ``k``.
        """
        from safetensors.torch import load_file

        from mmtl.models.two_tower import build_vision_tower

        export_dir = Path(export_dir)
        for name in (DATASTORE_FILE, TOWER_FILE):
            if not (export_dir / name).is_file():
                raise FileNotFoundError(f"{export_dir / name} is missing: the export's pipeline sets "
                                        f"strategy.caption.retrieval_k={k} (retrieval-augmented captioning), which "
                                        f"needs the datastore {DATASTORE_FILE} and the tower {TOWER_FILE} next to "
                                        "model.safetensors")
        with np.load(export_dir / DATASTORE_FILE) as z:
            captions, feats = [str(c) for c in z["captions"]], torch.from_numpy(z["features"].astype(np.float32))
        if len(captions) < k:
            raise ValueError(f"{export_dir / DATASTORE_FILE} holds {len(captions)} captions, fewer than "
                             f"strategy.caption.retrieval_k={k}")
        tower, _ = build_vision_tower(vision_cfg.model_copy(update={"weights": None}))
        tower.load_state_dict(load_file(str(export_dir / TOWER_FILE)), strict=True)
        return cls(tower, image_layer, captions, feats, k, template)


def attach_retriever(model: nn.Module, pipe, export_dir: Path) -> None:
    """Give an exported generative model its retriever when ``pipe.strategy.caption.retrieval_k > 0`` (else
    nothing changes). Raises FileNotFoundError / ValueError as :meth:`CaptionRetriever.load`."""
    c = pipe.strategy.caption
    if not c.retrieval_k:
        return
    if not hasattr(model, "retriever"):
        raise ValueError(f"strategy.caption.retrieval_k={c.retrieval_k} needs model.family: blip, got "
                         f"{pipe.model.family!r}")
    model.retriever = CaptionRetriever.load(export_dir, pipe.model.vision, pipe.model.decoder.image_layer,
                                            c.retrieval_k, c.retrieval_prompt)
