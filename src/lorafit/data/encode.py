"""From a config to tokenized, masked, split examples: `prepare_data` is the whole data pipeline.

load -> column_map -> detect format -> conversations -> dedup -> shuffle(seed) -> max_examples
-> validation split -> template -> tokenize with labels (-100 on everything but replies) -> report.

The split is decided before tokenizing, from the records and the seed alone, so `lorafit eval`
finds the same held-out examples whatever tokenizer or max_seq_length it runs with.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorafit.data.formats import FORMATS, apply_column_map, detect_format, to_conversations
from lorafit.data.records import IGNORE_INDEX
from lorafit.data.report import summarize
from lorafit.data.sources import load_records
from lorafit.data.templates import Template, resolve_template
from lorafit.errors import DataError

if TYPE_CHECKING:
    from lorafit.config.schema import Config

_BATCH = 512  # texts per tokenizer call: the fast tokenizer parallelizes inside a call


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    messages: list[dict]
    """The conversation; eval uses the final assistant message as the reference and the rest as the prompt."""


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    template: Template
    report: dict
    fingerprint: str
    """sha256 over the source records and the data settings."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    full_length: int
    """Tokens before truncation."""
    truncated: bool = False
    dropped: bool = False
    """Longer than max_seq_length with truncation 'drop': not trained on."""


@dataclass
class Loaded:
    conversations: list[list[dict]]
    format: str
    digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)
    """Where the records with no text in any user or assistant turn came from (left out of `conversations`)."""


# -- loading ------------------------------------------------------------------------------------

def load_conversations(cfg: Config) -> tuple[list[list[dict]], str]:
    """(conversations, detected_format) of `cfg.data.dataset`; no tokenizer needed."""
    loaded = load_data(cfg)
    return loaded.conversations, loaded.format


def load_data(cfg: Config) -> Loaded:

    d = cfg.data
    if d.dataset_format != "auto" and d.dataset_format not in FORMATS:
        raise DataError(f"unknown dataset format '{d.dataset_format}'", fix=f"use auto or one of: {', '.join(FORMATS)}")
    records = apply_column_map(load_records(d.dataset, d.dataset_split, d.demo_size), d.column_map)
    if not records:
        raise DataError(f"dataset '{d.dataset}' holds no records", fix="check the file or folder (and dataset_split)")
    fmt = detect_format(records, d.dataset_text_field) if d.dataset_format == "auto" else d.dataset_format
    conversations, empty = _drop_empty(to_conversations(records, fmt, d.dataset_text_field), records)
    if not conversations:
        raise DataError(f"dataset '{d.dataset}' yields no conversations"
                        + (f" (all {len(empty)} records are empty, e.g. {empty[0]})" if empty else ""),
                        fix="check the records' roles and replies")
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.data, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return Loaded(conversations, fmt, h.hexdigest(), empty=empty)


def _drop_empty(conversations: list[list[dict]], records: list) -> tuple[list[list[dict]], list[str]]:
    """(conversations with text in some user or assistant turn, where the others came from).

    An Alpaca record with a blank instruction and a blank output would train the end-of-text token alone,
    teaching the model to answer nothing; like the records with no trained token, such records are left
    out and counted in the data report, rather than stopping a large dataset over a few blank rows.
    """
    aligned = len(conversations) == len(records)  # oasst builds its conversations from message trees
    kept, empty = [], []
    for i, conv in enumerate(conversations):
        if any(m["content"].strip() or m.get("input", "").strip() for m in conv if m["role"] != "system"):
            kept.append(conv)
        else:
            empty.append(records[i].where if aligned else f"conversation {i}")
    return kept, empty


def split_conversations(conversations: list[list[dict]], cfg: Config) -> tuple[list[list[dict]], list[list[dict]], int]:
    """(train, val, duplicates): dedup, shuffle with the seed, cap at max_examples, hold out val_size."""
    d = cfg.data
    keys = [json.dumps(c, sort_keys=True, ensure_ascii=False) for c in conversations]
    duplicates = len(keys) - len(set(keys))
    if d.dedup:
        seen: set[str] = set()
        kept = []
        for key, conv in zip(keys, conversations, strict=True):
            if key not in seen:
                seen.add(key)
                kept.append(conv)
        conversations = kept
    order = list(range(len(conversations)))
    if d.shuffle:
        random.Random(f"lorafit-split:{cfg.train.seed}").shuffle(order)
    if d.max_examples is not None:
        order = order[: d.max_examples]
    n_val = val_count(len(order), d.val_size)
    val = [conversations[i] for i in order[:n_val]]
    train = [conversations[i] for i in order[n_val:]]
    return train, val, duplicates


def val_count(n: int, val_size: float) -> int:
    if val_size <= 0 or n < 2:
        return 0
    count = int(val_size) if val_size >= 1 else max(1, round(n * val_size))
    if count >= n:
        raise DataError(f"val_size {val_size:g} holds out all {n} examples", fix="use a smaller val_size")
    return count


# -- tokenizing ---------------------------------------------------------------------------------

def encode_conversation(template: Template, messages: list[dict], tokenizer: Any, max_seq_length: int,
                        train_on_inputs: bool, truncation: str) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels): labels are -100 except on assistant replies and the EOS / end-of-turn after
    each; None when the example is longer than max_seq_length and truncation is 'drop'."""
    enc = encode_many(template, [messages], tokenizer, max_seq_length, train_on_inputs, truncation)[0]
    return None if enc.dropped else (enc.input_ids, enc.labels)


def encode_many(template: Template, conversations: list[list[dict]], tokenizer: Any, max_seq_length: int,
                train_on_inputs: bool, truncation: str) -> list[Encoded]:
    if truncation not in ("truncate", "drop"):
        raise DataError(f"'truncation' is {truncation!r}; it must be truncate or drop")
    out: list[Encoded] = []
    for start in range(0, len(conversations), _BATCH):
        chunk = conversations[start: start + _BATCH]
        segments = [template.segments(m, tokenizer) for m in chunk]
        for ids, trained in _tokenize(segments, tokenizer, template.add_special_tokens):
            labels = list(ids) if train_on_inputs else [t if keep else IGNORE_INDEX
                                                         for t, keep in zip(ids, trained, strict=True)]
            if labels:
                labels[0] = IGNORE_INDEX  # never a target: nothing precedes it (keeps packed rows exact)
            enc = Encoded(list(ids), labels, len(ids))
            if len(ids) > max_seq_length:
                cut = Encoded(enc.input_ids[:max_seq_length], enc.labels[:max_seq_length], len(ids), truncated=True)
                enc = Encoded([], [], len(ids), dropped=True) if truncation == "drop" else cut
            out.append(enc)
    return out


def _tokenize(segments: list[list[tuple[str, bool]]], tokenizer: Any, add_special: bool):
    """Yield (ids, trained flags) per conversation: tokenized whole, flags from character offsets."""
    texts = ["".join(s for s, _ in segs) for segs in segments]
    if not getattr(tokenizer, "is_fast", False):
        yield from _tokenize_by_segment(segments, tokenizer, add_special)
        return
    enc = tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=True)
    for text, segs, ids, offsets in zip(texts, segments, enc["input_ids"], enc["offset_mapping"], strict=True):
        mask = bytearray(len(text) + 1)
        pos = 0
        for s, trained in segs:
            if trained:
                mask[pos: pos + len(s)] = b"\x01" * len(s)
            pos += len(s)
        yield ids, [bool(mask[min(a, len(text))]) for a, _ in offsets]


def _tokenize_by_segment(segments, tokenizer, add_special: bool):
    """Slow tokenizers have no offsets: tokenize each piece on its own (same text, maybe other merges)."""
    prefix = tokenizer("", add_special_tokens=True)["input_ids"] if add_special else []
    for segs in segments:
        ids, flags = list(prefix), [False] * len(prefix)
        for s, trained in segs:
            piece = tokenizer(s, add_special_tokens=False)["input_ids"]
            ids += piece
            flags += [trained] * len(piece)
        yield ids, flags


# -- the pipeline -------------------------------------------------------------------------------

def prepare_data(cfg: Config, tokenizer: Any) -> PreparedData:
    """Load, check, split and tokenize `cfg.data.dataset`; every problem is a DataError."""
    return prepare_loaded(cfg, tokenizer, load_data(cfg))


def prepare_loaded(cfg: Config, tokenizer: Any, loaded: Loaded) -> PreparedData:

    d = cfg.data
    template = resolve_template(d.template, tokenizer, loaded.format, d.system_prompt)
    train_convs, val_convs, duplicates = split_conversations(loaded.conversations, cfg)
    settings = (tokenizer, d.max_seq_length, d.train_on_inputs, d.truncation)
    train_enc = encode_many(template, train_convs, *settings)
    val_enc = encode_many(template, val_convs, *settings)
    train = _keep_trainable(train_enc, train_convs)
    val = _keep_trainable(val_enc, val_convs)
    report = summarize(cfg, tokenizer, template, loaded, train_enc + val_enc, train, val, duplicates)
    if not train:
        raise DataError(f"no training example of '{d.dataset}' keeps a trained token "
                        f"({report['no_trained_token_records']} have none, {report['dropped']} dropped for length)",
                        fix="raise max_seq_length, use truncation truncate, or check that replies are not empty")
    knobs = json.dumps({"data": cfg.to_dict()["data"], "seed": cfg.train.seed, "template": template.to_dict()},
                          sort_keys=True, default=str)
    fingerprint = hashlib.sha256((loaded.digest + knobs).encode("utf-8")).hexdigest()
    report["fingerprint"] = fingerprint
    return PreparedData(train, val, template, report, fingerprint)


def _keep_trainable(encoded: list[Encoded], conversations: list[list[dict]]) -> list[Example]:
    return [Example(e.input_ids, e.labels, conv) for e, conv in zip(encoded, conversations, strict=True)
            if not e.dropped and any(t != IGNORE_INDEX for t in e.labels)]
