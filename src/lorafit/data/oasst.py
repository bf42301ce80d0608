"""OpenAssistant (oasst1) message trees turned into conversations along the best-ranked replies.

oasst1 on the hub is flat: one row per message with `message_id`, `parent_id`, `role`
(prompter/assistant), `text` and `rank` (0 = the replies' best, as ranked by volunteers;
None when unranked). The nested export (`{"prompt": {"text", "role", "replies": [...]}}`)
is read too. Each tree yields one conversation: from the root prompt, always follow the
best-ranked child, and stop after the last assistant reply.
"""
from __future__ import annotations

from typing import Any

from lorafit.data.records import Conversation, last_reply, text_field_of
from lorafit.data.sources import Record
from lorafit.errors import DataError

_ROLE = {"prompter": "user", "user": "user", "assistant": "assistant"}


def oasst_conversations(records: list[Record]) -> list[Conversation]:
    if records and isinstance(records[0].data.get("prompt"), dict):
        return [_from_nested(r) for r in records]
    return _from_flat(records)


def _rank_key(msg: dict[str, Any]) -> tuple[float, str]:
    rank = msg.get("rank")
    return (float(rank) if isinstance(rank, (int, float)) and not isinstance(rank, bool) else float("inf"),
            str(msg.get("message_id", "")))


def _role(d: dict, where: str) -> str:
    role = d.get("role")
    if not isinstance(role, str) or role not in _ROLE:        # a list or dict role is a data error too
        raise DataError(f"record at {where} has role {role!r}", fix="oasst roles are prompter and assistant")
    return _ROLE[role]


def _from_flat(records: list[Record]) -> list[Conversation]:
    children: dict[str, list[Record]] = {}
    roots: list[Record] = []
    first_of: dict[str, str] = {}
    for r in records:
        mid = text_field_of(r.data, "message_id", r.where)
        text_field_of(r.data, "text", r.where)
        # A repeated id can make a message its own ancestor: the walk below would never end.
        if (other := first_of.setdefault(mid, r.where)) != r.where:
            raise DataError(f"record at {r.where} repeats message_id {mid!r} of the record at {other}",
                            fix="every oasst message needs its own message_id; drop the duplicate")
        if r.data.get("deleted") is True:
            continue
        parent = r.data.get("parent_id")
        if parent is None or parent == "":
            roots.append(r)
        else:
            children.setdefault(str(parent), []).append(r)
    conversations = []
    for root in roots:
        conv: Conversation = []
        node: Record | None = root
        seen: set[str] = set()
        while node is not None and str(node.data["message_id"]) not in seen:
            seen.add(str(node.data["message_id"]))
            conv.append({"role": _role(node.data, node.where), "content": str(node.data["text"])})
            kids = children.get(str(node.data["message_id"]), [])
            node = min(kids, key=lambda k: _rank_key(k.data)) if kids else None
        conv = _trim(conv)
        if conv:
            conversations.append(conv)
    if records and not conversations:
        raise DataError("no oasst tree holds an assistant reply to its root prompt",
                        fix="check that the data holds whole trees (message_id / parent_id / role / text)")
    return conversations


def _from_nested(r: Record) -> Conversation:
    conv: Conversation = []
    node: Any = r.data["prompt"]
    while isinstance(node, dict):
        conv.append({"role": _role(node, r.where), "content": text_field_of(node, "text", r.where)})
        replies = [x for x in node.get("replies") or [] if isinstance(x, dict)]
        node = min(replies, key=_rank_key) if replies else None
    conv = _trim(conv)
    if not conv:
        raise DataError(f"oasst tree at {r.where} has no assistant reply")
    return conv


def _trim(conv: Conversation) -> Conversation:
    return conv[: last_reply(conv) + 1]
