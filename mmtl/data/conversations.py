"""Chat-format samples (LLaVA's instruction data): a ``conversations`` list in the sample's ``{key}.json``.

Format (Liu et al. 2023, LLaVA; the layout of ``llava_instruct_150k.json``), one image per sample::

    {"conversations": [{"from": "human", "value": "<image>\\nWhat colour is the square?"},
                       {"from": "gpt",   "value": "Yellow."},
                       {"from": "human", "value": "And its shape?"},
                       {"from": "gpt",   "value": "A square."}]}

Roles: ``human`` / ``user`` -> user, ``gpt`` / ``assistant`` -> assistant, ``system`` (first turn only). Turns may
also use the chat-message keys ``{"role", "content"}`` (the documented alias). :func:`parse_conversation` returns
the messages ``[{"role", "content"}]`` or raises :class:`ConversationRejected` with one of these reasons (the
counts a reader keeps):

* ``bad_conversation_format``: not a list of turn objects (e.g. a JSON *string*), a turn without ``from``/``value``
  (or ``role``/``content``), a non-string value (``null``);
* ``unknown_role``: a role other than the above (e.g. ``tool``) - never rendered into the chat template as-is;
* ``roles_out_of_order``: turns must be [system], user, assistant, user, assistant, ... ;
* ``no_assistant_turn`` / ``empty_assistant_turn``: nothing (or an empty answer) to train on;
* ``image_token_count``: more than one ``<image>`` placeholder (the sample has one image);
* ``image_token_in_assistant`` / ``image_token_in_system``: a placeholder outside the user turns.

Counted, not rejected (:attr:`Conversation.notes`): ``image_token_inserted`` (no placeholder: ``<image>\\n`` is put
at the start of the first user turn, so the image is never silently unused) and ``trailing_user_turn`` (a final
user turn without an answer is dropped). The placeholder is exactly ``<image>``; ``<Image>`` is plain text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_MARK = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
REASONS = ("bad_conversation_format", "unknown_role", "roles_out_of_order", "no_assistant_turn",
           "empty_assistant_turn", "image_token_count", "image_token_in_assistant", "image_token_in_system")


class ConversationRejected(ValueError):
    """A conversation gives nothing (or the wrong thing) to train on; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Conversation:
    """A checked conversation: ``messages`` ``[{"role": "system"|"user"|"assistant", "content": str}]`` (exactly one
    ``<image>`` in the user turns) and ``notes`` (counted fixes: ``image_token_inserted``, ``trailing_user_turn``)."""

    messages: list[dict]
    notes: list[str] = field(default_factory=list)

    def first_exchange(self) -> tuple[str, str]:
        """``(first user turn without the placeholder, first assistant answer)``: the question / reference pair
        that evaluation generates for (one turn)."""
        user = next(m["content"] for m in self.messages if m["role"] == "user")
        answer = next(m["content"] for m in self.messages if m["role"] == "assistant")
        return user.replace(IMAGE_MARK, "").strip(), answer.strip()


def _turn(t: object, i: int, fld: str) -> tuple[str, str]:
    if not isinstance(t, dict):
        raise ConversationRejected("bad_conversation_format", f"{fld}[{i}] is {type(t).__name__}, not an object")
    if "from" in t or "value" in t:
        role, value = t.get("from"), t.get("value")
    elif "role" in t or "content" in t:
        role, value = t.get("role"), t.get("content")
    else:
        raise ConversationRejected("bad_conversation_format", f"{fld}[{i}] has keys {sorted(t)}; expected "
                                                              "'from'/'value' (or 'role'/'content')")
    if not isinstance(role, str) or not isinstance(value, str):
        raise ConversationRejected("bad_conversation_format", f"{fld}[{i}]: role {role!r} and value of type "
                                                              f"{type(value).__name__}; both must be strings")
    if role.strip().lower() not in ROLES:
        raise ConversationRejected("unknown_role", f"{fld}[{i}] has role {role!r}; known: {sorted(ROLES)}")
    return ROLES[role.strip().lower()], value


def parse_conversation(value: object, field_name: str = "conversations") -> Conversation:
    """Check one sample's conversation (module docstring) and return it normalised.

    Args:
        value: the sample json's ``field_name`` value.
    Raises:
        ConversationRejected: with the reason (module docstring) and a detail naming the turn.
    """
    if not isinstance(value, list) or not value:
        raise ConversationRejected("bad_conversation_format", f"{field_name} is {type(value).__name__}"
                                   f"{' (empty)' if isinstance(value, list) else ''}; expected a list of turns")
    msgs = [dict(zip(("role", "content"), _turn(t, i, field_name))) for i, t in enumerate(value)]
    notes: list[str] = []
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ConversationRejected("roles_out_of_order", f"turn {i + len(msgs) - len(body)} is {m['role']}, "
                                       f"expected {want} ([system], user, assistant, user, ...)")
    if body and body[-1]["role"] == "user" and len(body) > 1:
        body = body[:-1]
        notes.append("trailing_user_turn")
    if not any(m["role"] == "assistant" for m in body):
        raise ConversationRejected("no_assistant_turn", f"{field_name} has no answer to train on")
    if any(not m["content"].strip() for m in body if m["role"] == "assistant"):
        raise ConversationRejected("empty_assistant_turn", "an assistant turn is empty")
    msgs = msgs[:1] + body if msgs[0]["role"] == "system" else body
    for m in msgs:
        if m["role"] != "user" and IMAGE_MARK in m["content"]:
            raise ConversationRejected(f"image_token_in_{m['role']}", f"{IMAGE_MARK} inside a {m['role']} turn")
    found = sum(m["content"].count(IMAGE_MARK) for m in msgs)
    if found > 1:
        raise ConversationRejected("image_token_count", f"{found} {IMAGE_MARK} placeholders for 1 image")
    if found == 0:
        first = next(m for m in msgs if m["role"] == "user")
        first["content"] = f"{IMAGE_MARK}\n{first['content']}"
        notes.append("image_token_inserted")
    return Conversation(msgs, notes)
