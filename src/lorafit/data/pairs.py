"""Preference records: pairs (prompt, chosen reply, rejected reply) for DPO/ORPO, and labelled completions
(prompt, completion, desirable?) for KTO, read from the shapes public datasets use.

Pairs:
- strings: `{"prompt", "chosen", "rejected"}` (an optional `system`);
- message lists: `chosen` / `rejected` are whole conversations that share the prompt turns (UltraFeedback-
  binarized, `trl-lib/ultrafeedback_binarized`), or replies after a `prompt` that is itself a message list;
- full texts with a shared prefix (Anthropic-HH, `Anthropic/hh-rlhf`): the prompt is the longest common
  prefix that ends at an "Assistant:" turn, the replies are what follows it;
- `argilla/distilabel-intel-orca-dpo-pairs` names its prompt `input`; `question` is taken as well.
KTO: `{"prompt", "completion", "label"}` with label true (desirable) or false; pair data also serves KTO,
each pair read as a desirable chosen and an undesirable rejected completion (as TRL's `unpair_preference_dataset`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lorafit.data.formats import ROLES, apply_column_map
from lorafit.data.records import Conversation, text_field_of
from lorafit.data.sources import Record, load_records
from lorafit.errors import DataError

PROMPT_FIELDS = ("prompt", "question", "input")
"""Where a pair's prompt may be: TRL's name, then the names other public pair sets use."""
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_LABELS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass
class PrefRecord:
    prompt: Conversation
    """The conversation up to the reply (ends with a user turn)."""
    replies: tuple[str, ...]
    """(chosen, rejected) for a pair; (completion,) for KTO."""
    where: str
    label: bool | None = None
    """KTO: desirable (True) or undesirable (False) completion; None for pairs."""


def load_preference_records(source: str, split: str, column_map: dict[str, str], kto: bool) -> list[PrefRecord]:
    """Every record of `source` as pairs (kto False) or labelled completions; a DataError names a bad one."""
    records = apply_column_map(load_records(source, split), column_map)
    if not records:
        raise DataError(f"dataset '{source}' holds no records", fix="check the file or folder (and dataset_split)")
    if not kto:
        return [_pair(r) for r in records]
    out = []
    for r in records:
        if r.data.get("completion") is None and r.data.get("chosen") is not None:
            p = _pair(r)
            out += [PrefRecord(p.prompt, (p.replies[0],), r.where, True),
                    PrefRecord(p.prompt, (p.replies[1],), r.where, False)]
        else:
            out.append(_completion(r))
    return out


def _pair(r: Record) -> PrefRecord:
    d = r.data
    missing = [k for k in ("chosen", "rejected") if d.get(k) is None]
    if missing:
        fields = ", ".join(sorted(map(str, d))) or "none"
        raise DataError(f"record at {r.where} has no '{missing[0]}' (its fields: {fields}); preference training "
                        f"needs a chosen and a rejected reply per record",
                        fix="give each record prompt/chosen/rejected (or map fields onto them: "
                            "--column_map FIELD=chosen), or train with --method sft")
    chosen, rejected = d["chosen"], d["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _message_pair(d, chosen, rejected, r.where)
    if isinstance(chosen, list) or isinstance(rejected, list):
        raise DataError(f"record at {r.where}: 'chosen' and 'rejected' must both be text or both message lists")
    chosen, rejected = text_field_of(d, "chosen", r.where), text_field_of(d, "rejected", r.where)
    field = next((k for k in PROMPT_FIELDS if d.get(k) is not None), None)
    if field is None:
        return _shared_prefix_pair(chosen, rejected, r.where)
    prompt = d[field]
    turns = _messages(prompt, r.where, field) if isinstance(prompt, list) else \
        [{"role": "user", "content": text_field_of(d, field, r.where)}]
    return PrefRecord(_with_system(d, turns, r.where), (chosen, rejected), r.where)


def _message_pair(d: dict, chosen: list, rejected: list, where: str) -> PrefRecord:
    """Conversations sharing the prompt turns (or replies after a message-list / text prompt)."""
    c, rj = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
    head_c, reply_c = _split_last_reply(c, where, "chosen")
    head_r, reply_r = _split_last_reply(rj, where, "rejected")
    if head_c != head_r:
        raise DataError(f"record at {where}: 'chosen' and 'rejected' do not share the turns before their last reply",
                        fix="a pair's two conversations must differ only in the final assistant reply")
    field = next((k for k in PROMPT_FIELDS if d.get(k) is not None), None)
    prompt: Conversation = []
    if field is not None:
        p = d[field]
        prompt = _messages(p, where, field) if isinstance(p, list) else [{"role": "user", "content": str(p)}]
        if head_c[: len(prompt)] == prompt:  # UltraFeedback repeats the prompt inside chosen/rejected
            prompt = []
    turns = prompt + head_c
    if not turns or turns[-1]["role"] != "user":
        raise DataError(f"record at {where}: the pair has no user turn before its replies",
                        fix="put the prompt in 'prompt' or as the first turn of chosen and rejected")
    return PrefRecord(_with_system(d, turns, where), (reply_c, reply_r), where)


def _shared_prefix_pair(chosen: str, rejected: str, where: str) -> PrefRecord:
    """Anthropic-HH: both texts hold the whole dialogue; the prompt ends at the last shared 'Assistant:'."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind("\n\nAssistant:", 0, n)  # the last marker wholly inside the shared prefix
    if cut < 0:
        raise DataError(f"record at {where} has chosen and rejected texts but no prompt: no field "
                        f"{', '.join(PROMPT_FIELDS)} and no shared prefix ending at an 'Assistant:' turn",
                        fix="add a 'prompt' field, or map yours onto it: --column_map FIELD=prompt")
    end = cut + len("\n\nAssistant:")
    prompt = _hh_turns(chosen[:end], where)
    return PrefRecord(prompt, (chosen[end:].strip(), rejected[end:].strip()), where)


def _hh_turns(text: str, where: str) -> Conversation:
    """'\\n\\nHuman: q\\n\\nAssistant: a\\n\\nHuman: q2\\n\\nAssistant:' into turns ending with the user's."""
    parts = _HH_TURN.split(text)
    turns: Conversation = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=False):
        if content.strip() or speaker == "Human":
            turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if not turns or turns[-1]["role"] != "user":
        raise DataError(f"record at {where}: no 'Human:' turn before the shared 'Assistant:'")
    return turns


def _completion(r: Record) -> PrefRecord:
    d = r.data
    for name in ("completion", "label"):
        if d.get(name) is None:
            fields = ", ".join(sorted(map(str, d))) or "none"
            raise DataError(f"record at {r.where} has no '{name}' (its fields: {fields}); KTO needs a prompt, a "
                            "completion and a label (true: desirable, false: undesirable) per record",
                            fix="give each record prompt/completion/label, or map fields onto them: "
                                "--column_map FIELD=label")
    label = d["label"]
    if isinstance(label, str) and label.strip().lower() in _LABELS:
        label = _LABELS[label.strip().lower()]
    elif isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise DataError(f"record at {r.where}: 'label' is {d['label']!r}; it must be true or false")
    field = next((k for k in PROMPT_FIELDS if d.get(k) is not None), "prompt")
    prompt = d.get(field)
    turns = _messages(prompt, r.where, field) if isinstance(prompt, list) else \
        [{"role": "user", "content": text_field_of(d, field, r.where)}]
    completion = d["completion"]
    if isinstance(completion, list):  # TRL's conversational KTO shape: [{"role": "assistant", ...}]
        _, text = _split_last_reply(_messages(completion, r.where, "completion"), r.where, "completion")
    else:
        text = text_field_of(d, "completion", r.where)
    return PrefRecord(_with_system(d, turns, r.where), (text,), r.where, label)


def _messages(turns: list, where: str, field: str) -> Conversation:
    out: Conversation = []
    for i, m in enumerate(turns):
        role = m.get("role", m.get("from")) if isinstance(m, dict) else None
        content = m.get("content", m.get("value")) if isinstance(m, dict) else None
        if not isinstance(role, str) or role.lower() not in ROLES or not isinstance(content, (str, type(None))):
            raise DataError(f"record at {where}: message {i} of '{field}' is not a {{role, content}} object with "
                            f"role system, user or assistant (got {str(m)[:60]!r})")
        out.append({"role": ROLES[role.lower()], "content": content or ""})
    return out


def _split_last_reply(conv: Conversation, where: str, field: str) -> tuple[Conversation, str]:
    if not conv or conv[-1]["role"] != "assistant":
        raise DataError(f"record at {where}: '{field}' does not end with an assistant reply",
                        fix="the last message of chosen and rejected must be the assistant's reply")
    return conv[:-1], conv[-1]["content"]


def _with_system(d: dict, turns: Conversation, where: str) -> Conversation:
    system = text_field_of(d, "system", where, required=False)
    if system.strip() and not any(m["role"] == "system" for m in turns):
        return [{"role": "system", "content": system}] + turns
    return turns
