"""Record formats: detect which one a dataset uses and turn each record into a conversation.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`
ending with an assistant turn. An Alpaca user turn keeps its `input` apart under the key
"input", so the `alpaca`/`instruction` templates can print it on its own line; every other
template sees it appended to the content (see `templates.merged_content`).
"""
from __future__ import annotations

import re
from collections.abc import Callable

from lorafit.data.oasst import oasst_conversations
from lorafit.data.records import Conversation, last_reply, text_field_of
from lorafit.data.sources import Record, csv_columns
from lorafit.errors import DataError

FORMATS = ("alpaca", "instruction", "guanaco", "messages", "prompt_completion", "text", "oasst")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant",
         "prompter": "user", "bot": "assistant", "model": "assistant"}
_GUANACO_TURN = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


def apply_column_map(records: list[Record], column_map: dict[str, str]) -> list[Record]:
    if not column_map:
        return records
    return [Record({column_map.get(k, k): v for k, v in r.data.items()}, r.where) for r in records]


def detect_format(records: list[Record], text_field: str = "text") -> str:
    """The format the first records share, from their field names (and the text's markers)."""
    keys: set[str] = set()
    for r in records[:100]:
        keys.update(r.data)
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"message_id", "parent_id"} <= keys or ("prompt" in keys and isinstance(records[0].data.get("prompt"), dict)):
        return "oasst"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "instruction" in keys and "response" in keys:
        return "instruction"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if text_field in keys:
        texts = [r.data.get(text_field) for r in records[:100]]
        if any(isinstance(t, str) and _GUANACO_TURN.search(t) for t in texts):
            return "guanaco"
        return "text"
    shown = ", ".join(sorted(keys)[:12]) or "none"
    raise DataError(f"cannot tell the dataset's format from its fields ({shown})",
                    fix="set dataset_format (alpaca, instruction, guanaco, messages, prompt_completion, text, oasst)"
                        " or rename fields with column_map, e.g. --column_map question=instruction,answer=output")


def to_conversations(records: list[Record], fmt: str, text_field: str = "text") -> list[Conversation]:
    """Convert every record; the first bad one raises a DataError naming the record and field."""
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format '{fmt}'", fix=f"use auto or one of: {', '.join(FORMATS)}")
    if fmt == "oasst":

        return oasst_conversations(records)
    _check_csv_columns(records, fmt, text_field)
    convert: Callable[[dict, str], Conversation] = {
        "alpaca": _alpaca, "instruction": _instruction, "prompt_completion": _prompt_completion,
        "messages": _messages,
        "guanaco": lambda d, w: _guanaco(d, w, text_field), "text": lambda d, w: _text(d, w, text_field),
    }[fmt]
    return [convert(r.data, r.where) for r in records]


_REQUIRED = {"alpaca": ("instruction", "output"), "instruction": ("instruction", "response"),
             "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}


def _check_csv_columns(records: list[Record], fmt: str, text_field: str) -> None:
    columns = csv_columns(records)
    if columns is None:
        return
    required = _REQUIRED.get(fmt, (text_field,))
    for name in required:
        if name not in columns:
            source = records[0].where.split(" row ")[0]
            raise DataError(f"CSV file '{source}' has no column '{name}' (its columns: {', '.join(columns)})",
                            fix=f"add the column, or map one onto it: --column_map YOUR_COLUMN={name}")


def _alpaca(d: dict, where: str) -> Conversation:
    user = {"role": "user", "content": text_field_of(d, "instruction", where)}
    extra = text_field_of(d, "input", where, required=False)
    if extra.strip():
        user["input"] = extra
    conv = [user, {"role": "assistant", "content": text_field_of(d, "output", where)}]
    system = text_field_of(d, "system", where, required=False)
    return ([{"role": "system", "content": system}] if system.strip() else []) + conv


def _instruction(d: dict, where: str) -> Conversation:
    user = {"role": "user", "content": text_field_of(d, "instruction", where)}
    extra = text_field_of(d, "input", where, required=False) or text_field_of(d, "context", where, required=False)
    if extra.strip():
        user["input"] = extra
    return [user, {"role": "assistant", "content": text_field_of(d, "response", where)}]


def _prompt_completion(d: dict, where: str) -> Conversation:
    return [{"role": "user", "content": text_field_of(d, "prompt", where)},
            {"role": "assistant", "content": text_field_of(d, "completion", where)}]


def _text(d: dict, where: str, field: str) -> Conversation:
    text = text_field_of(d, field, where)
    if not text.strip():
        raise DataError(f"record at {where} has an empty '{field}'", fix="remove empty records")
    return [{"role": "assistant", "content": text}]


def _guanaco(d: dict, where: str, field: str) -> Conversation:
    """'### Human: q ### Assistant: a ### Human: ...' into alternating turns."""
    text = text_field_of(d, field, where)
    parts = _GUANACO_TURN.split(text)
    conv: Conversation = []
    if parts[0].strip():
        conv.append({"role": "system", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2], strict=False):
        conv.append({"role": "user" if speaker.lower() == "human" else "assistant", "content": content.strip()})
    return _finish(conv, where, "'### Assistant:' turn in its text")


def _messages(d: dict, where: str) -> Conversation:
    turns = d.get("messages", d.get("conversations"))
    if not isinstance(turns, list):
        got = "nothing" if turns is None else type(turns).__name__
        raise DataError(f"record at {where}: 'messages' must be a list of {{role, content}} objects, got {got}")
    conv: Conversation = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise DataError(f"record at {where}: message {i} is a {type(m).__name__}, not {{role, content}}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise DataError(f"record at {where}: message {i} has role {role!r}",
                            fix="use system, user or assistant")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise DataError(f"record at {where}: message {i} has no text 'content' (got {type(content).__name__})")
        conv.append({"role": ROLES[role.lower()], "content": content})
    return _finish(conv, where, "assistant message")


def _finish(conv: Conversation, where: str, what: str) -> Conversation:
    """Drop turns after the last assistant reply (nothing would train on them); require one reply."""
    last = last_reply(conv)
    if last < 0:
        raise DataError(f"record at {where} has no {what}, so nothing in it would train",
                        fix="every record needs at least one assistant reply")
    return conv[: last + 1]
