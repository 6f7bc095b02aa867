"""Image-caption sets for generative models, read once into memory (:func:`load_caption_set`).

A sample's target caption is ``meta[caption_field]`` (e.g. the emoji's CLDR name, ``description``), else its
``.txt`` caption; with ``keywords_field`` its keyword list is appended as ``"caption: kw1, kw2"`` (for the emoji
shards this is exactly the ``.txt``). Rules, with the counts kept in :attr:`CaptionSet.stats`:

* a sample without an image is an **error** naming the sample key and shard (a captioner cannot learn or be
  scored without its image) - :class:`ImagelessSampleError`;
* an empty caption (after whitespace cleaning), or a missing ``caption_field``, is **skipped and counted**
  (``empty_caption``; the shard reader's own rejects keep their reasons: ``undecodable_image`` ...);
* a caption longer than ``context_length`` tokens is **kept, truncated and counted** (``caption_truncated``).

With ``conversations_field`` (chat-format samples, :mod:`mmtl.data.conversations`) the target is the sample's
conversation: a bad one is skipped and counted by its reason (``unknown_role``, ``image_token_count`` ...), the
fixes are counted (``image_token_inserted``, ``trailing_user_turn``); :attr:`CaptionSet.captions` then holds each
first answer and :attr:`CaptionSet.prompts` each first question (what evaluation generates for).

Each sample also gets an image identity (:func:`image_id_of`: json ``image_id``, else a hash of the decoded
pixels) so that evaluation scores an image once against all its references (``mmtl.eval.caption_eval.by_image``).

Images are stored as uint8 (N, S, S, 3) after the model's evaluation geometry (bicubic resize of the short side +
center crop, :func:`mmtl.models.two_tower.make_image_transform` without its float steps), so the arrays are
4x smaller than float tensors; ``pixels / 255`` then normalised is exactly the eval transform's output.
"""
from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from mmtl.data.samples import CleanOptions, Reject, SampleRejected, clean_text


class ImagelessSampleError(ValueError):
    """A sample of a captioning set has no image member; the message names its key and shard."""


@dataclass
class CaptionSet:
    """Clean image-caption pairs of one shard set.

    Attributes:
        uids: N sample uids (``<shard>/<key>``); keys: N sample keys.
        pixels: (N, S, S, 3) uint8 images at the model's input size.
        captions: N target captions (untruncated text).
        stats: counts by reason (``samples_ok``, ``empty_caption``, ``caption_truncated``, reader rejects).
        conversations: N :class:`~mmtl.data.conversations.Conversation` (chat-format sets), else None.
        prompts: N first questions (chat-format sets), else None (the pipeline's ``model.decoder.prompt``).
        image_ids: N image identities (:func:`image_id_of`): the samples of one image (e.g. its 5 COCO
            references stored as 5 samples) share one, so evaluation can group their references.
        question_types: N json ``question_type`` strings (VQA sets: evaluation scores each type), else None.
    """

    uids: list[str]
    keys: list[str]
    pixels: np.ndarray
    captions: list[str]
    stats: dict[str, int] = field(default_factory=dict)
    conversations: Optional[list] = None
    prompts: Optional[list[str]] = None
    image_ids: Optional[list[str]] = None
    question_types: Optional[list[str]] = None

    def subset(self, keep: np.ndarray) -> "CaptionSet":
        """The rows where the (N,) bool ``keep`` is true (stats unchanged)."""
        idx = np.flatnonzero(keep)
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        return CaptionSet(pick(self.uids), pick(self.keys), self.pixels[idx], pick(self.captions), self.stats,
                          pick(self.conversations), pick(self.prompts), pick(self.image_ids),
                          pick(self.question_types))

    def __len__(self) -> int:
        return len(self.captions)


def caption_of(meta: dict, txt: str, caption_field: Optional[str], keywords_field: Optional[str]) -> str:
    """The target caption of one sample (module docstring); ``""`` when it has none."""
    if caption_field:
        value = meta.get(caption_field)
        text = clean_text(value) if isinstance(value, str) else ""
    else:
        text = txt
    if text and keywords_field:
        kws = meta.get(keywords_field)
        kws = [clean_text(str(k)) for k in (kws if isinstance(kws, list) else [kws] if kws else [])]
        kws = [k for k in kws if k]
        if kws:
            text = f"{text}: {', '.join(kws)}"
    return text


def image_id_of(meta: dict, image) -> str:
    """The image identity of a sample: its json ``image_id`` (COCO's field) when present, else ``sha1:`` of the
    decoded pixels (size + RGB bytes), so the same image stored under several keys is one image."""
    if meta.get("image_id") is not None and str(meta["image_id"]).strip():
        return str(meta["image_id"]).strip()
    h = hashlib.sha1(f"{image.size}".encode())
    h.update(image.tobytes())
    return "sha1:" + h.hexdigest()


def pil_geometry(transform) -> Callable:
    """The PIL-to-PIL steps of a torchvision ``Compose`` (everything before ``ToTensor``): the geometry whose
    uint8 output, divided by 255 and normalised, equals the whole transform's output."""
    from torchvision import transforms as T

    steps = []
    for t in transform.transforms:
        if isinstance(t, T.ToTensor):
            return T.Compose(steps)
        steps.append(t)
    raise ValueError("the image transform has no ToTensor step")


def load_caption_set(spec, geometry: Callable, count_tokens: Callable[[str], int], context_length: int,
                     caption_field: Optional[str] = None, keywords_field: Optional[str] = None,
                     max_image_pixels: int = 40_000_000, limit: Optional[int] = None,
                     conversations_field: Optional[str] = None) -> CaptionSet:
    """Read the shards of ``spec`` into a :class:`CaptionSet`.

    Args:
        spec: shard spec (folder, glob, brace pattern, list, URI).
        geometry: PIL RGB -> PIL RGB at (S, S) (the eval transform's resize + crop).
        count_tokens: caption -> tokens as the model will see it (prompt and special tokens included).
        context_length: the model's ``context_length`` (longer captions are counted as truncated).
        limit: read at most this many clean samples (tests, galleries).
        conversations_field: sample json key of chat-format conversations (module docstring), or None.
    Raises:
        ImagelessSampleError: a sample has no image (names the sample); MissingShardsError / EmptyDatasetError:
            the shards; ValueError: no usable sample at all.
    """
    from mmtl.data.conversations import ConversationRejected, parse_conversation
    from mmtl.data.shardio import iter_samples

    stats: collections.Counter = collections.Counter()

    def on_reject(err: SampleRejected) -> None:
        if err.reason == Reject.MISSING_IMAGE:
            raise ImagelessSampleError(f"sample {err.key!r} in {err.shard} has no image ({err.detail}): a "
                                       "captioning model needs one image per sample; add it or remove the sample")

    opts = CleanOptions(max_image_pixels=max_image_pixels, min_caption_chars=1)
    uids, keys, pixels, caps, convs, prompts, image_ids, qtypes = [], [], [], [], [], [], [], []
    for s in iter_samples(spec, opts, stats, on_reject=on_reject):
        if conversations_field:
            try:
                conv = parse_conversation(s.meta.get(conversations_field), conversations_field)
            except ConversationRejected as e:
                stats[e.reason] += 1
                stats["samples_ok"] -= 1
                continue
            stats.update(conv.notes)
            prompt, cap = conv.first_exchange()
            convs.append(conv)
            prompts.append(prompt)
        else:
            cap = caption_of(s.meta, s.caption, caption_field, keywords_field)
        if not cap:
            stats["empty_caption"] += 1
            stats["samples_ok"] -= 1
            continue
        if not conversations_field and count_tokens(cap) > context_length:
            stats["caption_truncated"] += 1
        uids.append(s.uid)
        keys.append(s.key)
        image_ids.append(image_id_of(s.meta, s.image))
        qtype = s.meta.get("question_type")
        qtypes.append(qtype if isinstance(qtype, str) and qtype else None)
        pixels.append(np.asarray(geometry(s.image), dtype=np.uint8))
        caps.append(cap)
        if limit is not None and len(caps) >= limit:
            break
    if not caps:
        raise ValueError(f"no usable image-caption sample in {spec!r} (counts: {dict(stats)})")
    return CaptionSet(uids, keys, np.stack(pixels), caps, dict(stats), convs if conversations_field else None,
                      prompts if conversations_field else None, image_ids,
                      qtypes if all(q is not None for q in qtypes) else None)
