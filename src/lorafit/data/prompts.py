"""Prompt datasets for GRPO: records -> prompts (tokenized with the run's template) and the columns rewards see.

Accepted records:
  {"prompt": "text", ...}                      a string prompt; every other field is a column for the rewards
  {"prompt": [{"role", "content"}, ...], ...}  a conversation so far (a trailing assistant turn is dropped)
  any SFT format (alpaca, messages, guanaco, oasst, prompt_completion...): the conversation up to its last
  reply is the prompt, and that reply is the column `reference` (an Alpaca record's instruction and input
  are the prompt, its output the reference); the record's own fields come along too.

Each prompt is one `Example` (its prompt ids as input_ids, nothing labelled), so the loop batches prompts as
it batches SFT examples; `PromptData.rows` finds a batch row's record back from its token ids. Prompts whose
tokens repeat another's keep the first one's columns (counted in the report); prompts longer than
max_seq_length are dropped (the completion adds max_completion_length on top).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorafit.data.encode import Example, PreparedData
from lorafit.data.formats import ROLES, apply_column_map, detect_format, to_conversations
from lorafit.data.records import IGNORE_INDEX
from lorafit.data.sources import Record, load_records
from lorafit.data.templates import encode_prompt, merged_content, resolve_template
from lorafit.errors import DataError

if TYPE_CHECKING:
    from lorafit.config.schema import Config


@dataclass
class PromptRow:
    messages: list[dict]
    """The prompt conversation, ending with a user turn."""
    prompt: Any
    """What reward functions get in `prompts`: the user's text, or the message list for multi-turn prompts."""
    columns: dict[str, Any]
    """The record's other fields (and `reference`), passed to the rewards by name."""


@dataclass
class PromptData(PreparedData):
    rows: dict[tuple[int, ...], PromptRow] = field(default_factory=dict)
    """Prompt token ids -> the record they came from."""


def load_prompt_rows(cfg: Config) -> tuple[list[PromptRow], str, str]:
    """(rows, format, digest of the records) of cfg.data.dataset; no tokenizer needed."""
    d = cfg.data
    records = apply_column_map(load_records(d.dataset, d.dataset_split, d.demo_size), d.column_map)
    if not records:
        raise DataError(f"dataset '{d.dataset}' holds no records", fix="check the file or folder (and dataset_split)")
    if d.dataset_format == "auto" and _is_prompt_only(records):
        fmt, rows = "prompt", [_prompt_row(r) for r in records]
    else:
        fmt = detect_format(records, d.dataset_text_field) if d.dataset_format == "auto" else d.dataset_format
        convs = to_conversations(records, fmt, d.dataset_text_field)
        aligned = len(convs) == len(records)  # oasst builds conversations from message trees
        rows = [_row_from_conversation(c, records[i].data if aligned else {}) for i, c in enumerate(convs)]
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.data, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8") + b"\n")
    return [r for r in rows if r is not None], fmt, h.hexdigest()


def _is_prompt_only(records: list[Record]) -> bool:
    head = records[:100]
    return all("prompt" in r.data and not isinstance(r.data["prompt"], dict) for r in head) \
        and not any(k in r.data for r in head for k in ("completion", "messages", "conversations"))


def _prompt_row(r: Record) -> PromptRow:
    value = r.data["prompt"]
    columns = {k: v for k, v in r.data.items() if k != "prompt"}
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"record at {r.where} has an empty 'prompt'", fix="remove empty records")
        return PromptRow([{"role": "user", "content": value}], value, columns)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise DataError(f"record at {r.where}: 'prompt' must be text or a list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    messages = []
    for i, m in enumerate(value):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role.lower() not in ROLES or not isinstance(content, str):
            raise DataError(f"record at {r.where}: prompt message {i} needs a role (system, user, assistant) and "
                            "text content")
        messages.append({"role": ROLES[role.lower()], "content": content})
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"record at {r.where}: the prompt has no user message")
    return PromptRow(messages, value, columns)


def _row_from_conversation(conv: list[dict], data: dict[str, Any]) -> PromptRow | None:
    """The conversation up to its last reply as the prompt, the reply as `reference`; None without a user turn."""
    last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=len(conv))
    messages = conv[:last]
    if not any(m["role"] == "user" for m in messages):
        return None
    reference = conv[last]["content"] if last < len(conv) else ""
    users = [m for m in messages if m["role"] != "system"]
    prompt = merged_content(users[0]) if len(users) == 1 else [dict(m) for m in messages]
    return PromptRow(messages, prompt, {**data, "reference": reference})


def prepare_prompts(cfg: Config, tokenizer: Any) -> PromptData:
    """Load, shuffle, cap and tokenize the prompts; every problem is a DataError."""
    d = cfg.data
    rows, fmt, digest = load_prompt_rows(cfg)
    template = resolve_template(d.template, tokenizer, "prompt_completion" if fmt == "prompt" else fmt,
                                d.system_prompt)
    order = list(range(len(rows)))
    if d.shuffle:
        random.Random(f"lorafit-split:{cfg.train.seed}").shuffle(order)
    if d.max_examples is not None:
        order = order[: d.max_examples]
    index: dict[tuple[int, ...], PromptRow] = {}
    train: list[Example] = []
    duplicates = too_long = 0
    for i in order:
        ids = encode_prompt(template, rows[i].messages, tokenizer)
        if len(ids) > d.max_seq_length:
            too_long += 1
        elif tuple(ids) in index:
            duplicates += 1
        else:
            index[tuple(ids)] = rows[i]
            train.append(Example(ids, [IGNORE_INDEX] * len(ids), rows[i].messages))
    if not train:
        raise DataError(f"dataset '{d.dataset}' yields no prompt of at most max_seq_length {d.max_seq_length} tokens "
                        f"({too_long} longer)", fix="raise max_seq_length (it bounds the prompt under --method grpo)")
    lengths = sorted(len(e.input_ids) for e in train)
    report = {"format": fmt, "template": template.name, "prompts": len(train), "duplicate_prompts": duplicates,
              "dropped_too_long": too_long, "columns": sorted(next(iter(index.values())).columns),
              "prompt_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]}}
    knobs = json.dumps({"data": cfg.to_dict()["data"], "seed": cfg.train.seed, "template": template.to_dict()},
                       sort_keys=True, default=str)
    report["fingerprint"] = hashlib.sha256((digest + knobs).encode("utf-8")).hexdigest()
    return PromptData(train, [], template, report, report["fingerprint"], rows=index)


def first_prompt(cfg: Config) -> PromptRow:
    """The first record's prompt and columns (for checking the reward functions before any model loads)."""
    rows, _, _ = load_prompt_rows(cfg)
    if not rows:
        raise DataError(f"dataset '{cfg.data.dataset}' holds no record with a user prompt")
    return rows[0]
