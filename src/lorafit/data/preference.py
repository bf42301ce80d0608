"""Preference data for DPO, ORPO and KTO: records (pairs.py) -> split -> template -> tokens -> batches.

Each record becomes one example: the prompt's tokens and one token list per reply (chosen, rejected; or the
one KTO completion). The prompt is rendered through the run's template with its generation header, the reply
is the text the template puts after it (reply, EOS or end-of-turn), tokenized on its own so chosen and
rejected continue the very same prompt tokens. A sequence is prompt + reply; only reply tokens are labelled.

Truncation (max_seq_length bounds each sequence, as TRL's max_length does): the replies keep their head (the
start of an answer is what separates good from bad) and the prompt keeps its tail (the question usually sits
at the end of a long context), taking no more than half the budget from a reply that would fit with it.

A pass holds whole examples: both sequences of a pair sit in one padding-free row as two documents (position
ids restart, doc ids 1, 2, ...; attention stays within each document), so one forward pass scores both; the
training loop plans steps and passes over the examples' total lengths, as for SFT (data/batching.py).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lorafit.data.batching import epoch_steps, make_passes
from lorafit.data.encode import PreparedData, split_conversations
from lorafit.data.pairs import PrefRecord, load_preference_records
from lorafit.data.records import IGNORE_INDEX
from lorafit.data.report import percentiles
from lorafit.data.templates import Template, resolve_template
from lorafit.errors import DataError

if TYPE_CHECKING:
    from lorafit.config.schema import Config

PREFERENCE_METHODS = ("dpo", "orpo", "kto")
CHOSEN, REJECTED, KL = 0, 1, 2
"""Kinds of sequence in a batch (`seq_kind`): a pair's chosen and rejected replies; KTO's desirable (0) and
undesirable (1) completions; KTO's mismatched prompt/completion sequences of the KL estimate (2)."""


@dataclass
class PrefExample:
    prompt_ids: list[int]
    replies: list[list[int]]
    """Token ids of each reply: [chosen, rejected], or [completion] for KTO."""
    messages: list[dict]
    """The prompt turns and the (chosen) reply; previews and eval read the prompt from it."""
    index: int
    """Position in its split: the key of its cached reference log-probs."""
    label: bool | None = None
    rejected: str = ""
    """The rejected reply's text (eval shows it)."""

    @property
    def input_ids(self) -> list[int]:
        """Every token the example puts in a row (its sequences one after another); plans count these."""
        out: list[int] = []
        for reply in self.replies:
            out += self.prompt_ids + reply
        return out


@dataclass
class _Cut:
    prompts: int = 0
    replies: int = 0
    dropped: int = 0
    lengths: list[int] = field(default_factory=list)


def prepare_preference(cfg: Config, tokenizer: Any) -> PreparedData:
    """Load, check, split and tokenize preference data; every problem is a DataError (before the model loads)."""
    d = cfg.data
    if d.dataset == "demo":
        raise DataError(f"--method {cfg.train.method} trains on preference data; the built-in demo set has none",
                        fix="pass pairs ({prompt, chosen, rejected}) or, for KTO, {prompt, completion, label} records")
    records, rows, (train_rows, val_rows, duplicates) = split_preference(cfg)
    template = resolve_template(d.template, tokenizer, "messages", d.system_prompt)
    cut = _Cut()
    train = encode_examples(template, train_rows, tokenizer, cfg, cut)
    # indices run on from train's: they key the reference log-probs cached for both splits
    val = encode_examples(template, val_rows, tokenizer, cfg, cut, start=len(train))
    if not train:
        raise DataError(f"no training example of '{d.dataset}' is left ({cut.dropped} dropped for length)",
                        fix="raise max_seq_length or use truncation truncate")
    report = preference_report(cfg, template, records, train, val, duplicates, cut)
    h = hashlib.sha256()
    for x in rows:
        h.update(json.dumps(x, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    knobs = json.dumps({"data": cfg.to_dict()["data"], "method": cfg.train.method, "seed": cfg.train.seed,
                        "template": template.to_dict()}, sort_keys=True, default=str)
    report["fingerprint"] = hashlib.sha256((h.hexdigest() + knobs).encode("utf-8")).hexdigest()
    return PreparedData(train, val, template, report, report["fingerprint"])


def split_preference(cfg: Config) -> tuple[list[PrefRecord], list[dict],
                                           tuple[list[PrefRecord], list[PrefRecord], int]]:
    """(records, their JSON rows, (train, val, duplicates)): dedup, shuffle, cap and hold out as SFT does
    (`split_conversations`), so eval finds the same held-out pairs from the run's config."""
    d = cfg.data
    records = load_preference_records(d.dataset, d.dataset_split, d.column_map, cfg.train.method == "kto")
    rows = [{"prompt": r.prompt, "replies": list(r.replies), "label": r.label} for r in records]
    train, val, duplicates = split_conversations(rows, cfg)
    back = [[PrefRecord(x["prompt"], tuple(x["replies"]), "", x["label"]) for x in part] for part in (train, val)]
    return records, rows, (back[0], back[1], duplicates)


def encode_examples(template: Template, records: list[PrefRecord], tokenizer: Any, cfg: Config,
                    cut: _Cut | None = None, start: int = 0) -> list[PrefExample]:
    """Tokenize and truncate; `cut` counts what was cut. Order follows `records`; `index` counts from `start`."""
    cut = cut or _Cut()
    limit = cfg.data.max_seq_length
    prompts, replies = [], []
    for r in records:
        prompts.append(template.render(r.prompt, tokenizer, add_generation_prompt=True))
        replies += [reply_text(template, r.prompt, text, prompts[-1], tokenizer) for text in r.replies]
    prompt_ids = tokenizer(prompts, add_special_tokens=template.add_special_tokens)["input_ids"] if prompts else []
    reply_ids = tokenizer(replies, add_special_tokens=False)["input_ids"] if replies else []
    out, k = [], 0
    for i, r in enumerate(records):
        p, rs = list(prompt_ids[i]), [list(x) for x in reply_ids[k: k + len(r.replies)]]
        k += len(r.replies)
        cut.lengths += [len(p) + len(x) for x in rs]
        if len(p) + max(len(x) for x in rs) > limit:
            if cfg.data.truncation == "drop":
                cut.dropped += 1
                continue
            p, rs = truncate(p, rs, limit, cut)
        messages = r.prompt + [{"role": "assistant", "content": r.replies[0]}]
        out.append(PrefExample(p, rs, messages, start + len(out), r.label, r.replies[1] if len(r.replies) > 1 else ""))
    return out


def reply_text(template: Template, prompt: list[dict], reply: str, rendered_prompt: str, tokenizer: Any) -> str:
    """What the template writes after the generation prompt for this reply (its EOS / end-of-turn included)."""
    full = template.render(prompt + [{"role": "assistant", "content": reply}], tokenizer, add_generation_prompt=False)
    if full.startswith(rendered_prompt):
        return full[len(rendered_prompt):].rstrip() if template.end_of_turn else full[len(rendered_prompt):]
    # A template that renders the prompt differently once a reply follows: the reply's trained span.
    segments = template.segments(prompt + [{"role": "assistant", "content": reply}], tokenizer)
    return [s for s, trained in segments if trained][-1] if any(t for _, t in segments) else reply


def truncate(prompt: list[int], replies: list[list[int]], limit: int, cut: _Cut) -> tuple[list[int], list[list[int]]]:
    """Prompt keeps its tail, each reply its head; the prompt gives way first, down to half the budget."""
    longest = max(len(x) for x in replies)
    keep = min(len(prompt), max(limit - longest, limit // 2))
    if keep < len(prompt):
        cut.prompts += 1
        prompt = prompt[len(prompt) - keep:]
    room = limit - len(prompt)
    if longest > room:
        cut.replies += 1
    return prompt, [x[:room] for x in replies]


# -- batches ------------------------------------------------------------------------------------

def collate_preference(examples: list[PrefExample], kl_pairs: bool = False) -> dict[str, torch.Tensor]:
    """One padding-free pass (1, T) of the examples' sequences: input_ids, labels, attention_mask, position_ids,
    doc_ids; seq_index (1, T): which sequence a token belongs to; seq_kind (S,) (CHOSEN, REJECTED or KL),
    seq_example (S,): the example's index, seq_reply (S,): whose reply a KL sequence holds. `kl_pairs` (KTO):
    each completion also appears after the next example's prompt (the mismatched pairs KTO estimates its KL
    baseline from)."""
    return _collate([examples], pad_token_id=0, kl_pairs=kl_pairs)


def preference_passes(examples: list[PrefExample], budget: int,
                      kl_pairs: bool = False) -> list[dict[str, torch.Tensor]]:
    """Every example once, in order, in padding-free passes of at most `budget` tokens (eval, tests)."""
    lengths = [len(e.input_ids) * (2 if kl_pairs else 1) for e in examples]
    return [collate_preference([examples[i] for i in p], kl_pairs) for p in
            make_passes(list(range(len(examples))), lengths, budget)]


def _sequences(rows: list[list[PrefExample]], kl_pairs: bool) -> list[list[tuple[list[int], list[int], int, int, int]]]:
    """Per row: (prompt ids, reply ids, kind, example index, reply owner index) of each sequence."""
    flat = [e for row in rows for e in row]
    nxt = {id(e): flat[(k + 1) % len(flat)] for k, e in enumerate(flat)}
    out = []
    for row in rows:
        seqs = []
        for e in row:
            if e.label is None:
                seqs += [(e.prompt_ids, e.replies[0], CHOSEN, e.index, e.index),
                         (e.prompt_ids, e.replies[1], REJECTED, e.index, e.index)]
                continue
            seqs.append((e.prompt_ids, e.replies[0], CHOSEN if e.label else REJECTED, e.index, e.index))
            if kl_pairs:
                other = nxt[id(e)]  # a batch of one has no other completion and pairs with its own
                seqs.append((e.prompt_ids, other.replies[0], KL, e.index, other.index))
        out.append(seqs)
    return out


def _collate(rows: list[list[PrefExample]], pad_token_id: int, kl_pairs: bool) -> dict[str, torch.Tensor]:
    seqs = _sequences(rows, kl_pairs)
    width = max(sum(len(p) + len(r) for p, r, *_ in row) for row in seqs)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.zeros(shape, dtype=torch.long)
    seq_index = torch.full(shape, -1, dtype=torch.long)
    kinds, owners, replies = [], [], []
    for b, row in enumerate(seqs):
        pos = 0
        for k, (p, r, kind, owner, reply_owner) in enumerate(row, start=1):
            n = len(p) + len(r)
            input_ids[b, pos: pos + n] = torch.tensor(p + r)
            labels[b, pos + len(p): pos + n] = torch.tensor(r, dtype=torch.long)
            labels[b, pos] = IGNORE_INDEX  # a document's first token is never a target
            attention_mask[b, pos: pos + n] = 1
            position_ids[b, pos: pos + n] = torch.arange(n)
            doc_ids[b, pos: pos + n] = k
            seq_index[b, pos: pos + n] = len(kinds)
            kinds.append(kind)
            owners.append(owner)
            replies.append(reply_owner)
            pos += n
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids,
            "doc_ids": doc_ids, "seq_index": seq_index, "seq_kind": torch.tensor(kinds, dtype=torch.long),
            "seq_example": torch.tensor(owners, dtype=torch.long), "seq_reply": torch.tensor(replies, dtype=torch.long)}


# -- report -------------------------------------------------------------------------------------

def preference_report(cfg: Config, template: Template, records: list[PrefRecord], train: list[PrefExample],
                      val: list[PrefExample], duplicates: int, cut: _Cut) -> dict:
    """What `lorafit data` prints for preference data (and what the run directory keeps)."""
    d = cfg.data
    kto = cfg.train.method == "kto"
    lengths = [len(e.input_ids) for e in train]
    t = cfg.train
    steps = epoch_steps(lengths, t.per_device_train_batch_size * t.gradient_accumulation_steps, packing=d.packing,
                        max_seq_length=2 * d.max_seq_length, seed=t.seed, epoch=0,
                        group_by_length=d.group_by_length, shuffle=d.shuffle) if lengths else []
    n_seq = max(len(cut.lengths), 1)
    return {
        "dataset": d.dataset, "method": cfg.train.method, "format": "completions" if kto else "pairs",
        "template": template.name, "records": len(records), "train_examples": len(train), "val_examples": len(val),
        "max_seq_length": d.max_seq_length,
        "prompt_length_percentiles": percentiles([len(e.prompt_ids) for e in train + val]),
        "reply_length_percentiles": percentiles([len(x) for e in train + val for x in e.replies]),
        "length_percentiles": percentiles(cut.lengths),
        "truncated_share": round(sum(1 for n in cut.lengths if n > d.max_seq_length) / n_seq, 4),
        "prompts_cut": cut.prompts, "replies_cut": cut.replies, "dropped": cut.dropped,
        "identical_pairs": 0 if kto else sum(1 for r in records if r.replies[0].strip() == r.replies[1].strip()),
        "empty_replies": sum(1 for r in records for x in r.replies if not x.strip()),
        "desirable": sum(1 for r in records if r.label) if kto else None,
        "undesirable": sum(1 for r in records if r.label is False) if kto else None,
        "duplicates": duplicates, "dedup": d.dedup, "packing": d.packing,
        "steps_per_epoch": len(steps),
        "example_prompt": train[0].messages[-2]["content"][:200] if train and len(train[0].messages) > 1 else "",
    }


def preference_warnings(report: dict) -> list[str]:
    out = []
    if report["prompts_cut"] or report["replies_cut"]:
        out.append(f"{report['prompts_cut']} prompts lost their start and {report['replies_cut']} examples had a "
                   f"reply cut at max_seq_length {report['max_seq_length']}; raise it to keep them whole")
    if report["dropped"]:
        out.append(f"{report['dropped']} examples are longer than max_seq_length and are dropped")
    if report["identical_pairs"]:
        out.append(f"{report['identical_pairs']} pairs have identical chosen and rejected replies: they carry no "
                   "preference (their DPO gradient is zero); drop them from the data")
    if report["empty_replies"]:
        out.append(f"{report['empty_replies']} replies are empty (only the end-of-turn token is scored)")
    if report["duplicates"] and not report["dedup"]:
        out.append(f"{report['duplicates']} exact duplicates; --dedup drops them")
    if report["desirable"] is not None and not (report["desirable"] and report["undesirable"]):
        out.append("KTO data with only one label: it needs desirable and undesirable completions to learn from")
    return out
