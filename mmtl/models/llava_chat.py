"""Multi-turn chat samples for the ``llava`` family: conversations -> token ids with the image's place marked and
labels on the assistant turns only (Liu et al. 2023, LLaVA: "we only compute the loss on the assistant's answers").

A checked conversation (:func:`mmtl.data.conversations.parse_conversation`) is rendered with the tokenizer's chat
template turn by turn: for the k-th assistant message, the template of the messages before it with the generation
prompt gives the unsupervised part, and the template of the messages up to it adds the answer and its end-of-turn
token (e.g. ``Yellow.<|im_end|>``), which are supervised; whitespace after the end token is not. A tokenizer
without a chat template gets the fallback ``System: s\\nUser: u\\nAssistant: a<eos>\\n``. The single ``<image>`` is
replaced by one :data:`IMAGE_ID` position, which :meth:`mmtl.models.llava.LlavaCaptioner.chat_loss` replaces by
the N projected image tokens.
"""
from __future__ import annotations

import collections
from typing import Optional, Sequence

import numpy as np

from mmtl.models.llava import IMAGE_MARK

#: the image's place in ``input_ids`` (LLaVA's ``IMAGE_TOKEN_INDEX``); never a vocabulary id
IMAGE_ID = -200


def _segments(tok, messages: list[dict], eos_id: int) -> list[tuple[list[int], bool]]:
    """``[(token ids, supervised)]`` of one conversation (module docstring); the ``<image>`` of a user turn becomes
    one :data:`IMAGE_ID`. Raises ValueError when the chat template is not prefix-stable (rendering a turn changes
    the text before it)."""
    def ids(text: str) -> list[int]:
        if IMAGE_MARK in text:
            before, after = text.split(IMAGE_MARK, 1)
            return ids(before) + [IMAGE_ID] + ids(after)
        return tok(text, add_special_tokens=False)["input_ids"] if text else []

    segs: list[tuple[list[int], bool]] = []
    if not getattr(tok, "chat_template", None):
        pending = ""
        for m in messages:
            if m["role"] == "system":
                pending += f"System: {m['content']}\n"
            elif m["role"] == "user":
                pending += f"User: {m['content']}\nAssistant:"
            else:
                segs += [(ids(pending), False), (ids(" " + m["content"].strip()) + [eos_id], True)]
                pending = "\n"
        return segs
    prev = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages[:k + 1], tokenize=False)
        if not head.startswith(prev) or not full.startswith(head):
            raise ValueError("the tokenizer's chat template is not prefix-stable; multi-turn labels cannot be cut")
        answer = full[len(head):]
        core = answer.rstrip()
        segs += [(ids(head[len(prev):]), False), (ids(core), True)]
        if answer[len(core):]:
            segs.append((ids(answer[len(core):]), False))
        prev = full
    return segs


def tokenize_chats(tok, conversations: Sequence, eos_id: int, pad_id: int, context_length: int,
                   system_prompt: Optional[str] = None) -> dict:
    """Conversations -> right-padded arrays for training.

    Args:
        conversations: :class:`mmtl.data.conversations.Conversation` objects (exactly one ``<image>`` each).
        context_length: most text positions per sample (the image position counts as one).
        system_prompt: the system message put first in a conversation without one (None: none added, the chat
            template's default applies).
    Returns:
        ``{"input_ids": (B, L) int64 with one IMAGE_ID per row, "attention_mask": (B, L) int64, "labels": (B, L)
        int64 (-100 except supervised positions), "kept": (B,) bool, "stats": {reason: count}}`` with L =
        ``context_length``. A longer conversation is cut at ``context_length`` and counted
        (``conversation_truncated``); one whose cut leaves no image or no supervised token is not kept
        (``conversation_too_long``: its row is all padding, ``kept`` False).
    """
    n = len(conversations)
    ids = np.full((n, context_length), pad_id, dtype=np.int64)
    mask = np.zeros((n, context_length), dtype=np.int64)
    labels = np.full((n, context_length), -100, dtype=np.int64)
    kept = np.zeros(n, dtype=bool)
    stats: collections.Counter = collections.Counter()
    for i, conv in enumerate(conversations):
        row, sup = [], []
        messages = conv.messages
        if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        for seg, supervised in _segments(tok, messages, eos_id):
            row += seg
            sup += [supervised] * len(seg)
        if row.count(IMAGE_ID) != 1:
            raise ValueError(f"conversation {i}: {row.count(IMAGE_ID)} image positions after tokenization, not 1")
        if len(row) > context_length:
            stats["conversation_truncated"] += 1
            row, sup = row[:context_length], sup[:context_length]
        if IMAGE_ID not in row or not any(sup):
            stats["conversation_too_long"] += 1
            continue
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
        labels[i, :len(row)] = np.where(sup, row, -100)
        kept[i] = True
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "kept": kept, "stats": dict(stats)}
