"""`lorafit data`: what training would see, before any training.

Records, format, template, token-length percentiles with the model's tokenizer, the share cut at
max_seq_length, the share of tokens trained on, records with no trained token, duplicates, the
optimizer steps of one epoch on one process, and one example with trained tokens marked.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafit.data.batching import epoch_steps
from lorafit.data.records import IGNORE_INDEX

if TYPE_CHECKING:
    from lorafit.config.schema import Config
    from lorafit.data.encode import Encoded, Example, Loaded
    from lorafit.data.templates import Template

_PERCENTILES = (50, 90, 95, 99)
_EXAMPLES = 3  # locations of skipped records shown in the report


def summarize(cfg: Config, tokenizer: Any, template: Template, loaded: Loaded, encoded: list[Encoded],
              train: list[Example], val: list[Example], duplicates: int) -> dict:

    d = cfg.data
    n = len(encoded)
    kept = [e for e in encoded if not e.dropped]
    tokens = sum(len(e.input_ids) for e in kept)
    trained = sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in kept)
    lengths = [len(e.input_ids) for e in train]
    t = cfg.train
    steps = epoch_steps(lengths, t.per_device_train_batch_size * t.gradient_accumulation_steps, packing=d.packing,
                        max_seq_length=d.max_seq_length, seed=t.seed, epoch=0, group_by_length=d.group_by_length,
                        shuffle=d.shuffle) if lengths else []
    return {
        "dataset": d.dataset,
        "records": len(loaded.conversations),
        "format": loaded.format,
        "template": template.name,
        "examples": n,
        "train_examples": len(train),
        "val_examples": len(val),
        "max_seq_length": d.max_seq_length,
        "length_percentiles": percentiles([e.full_length for e in encoded]),
        "truncated_share": _share(sum(1 for e in encoded if e.full_length > d.max_seq_length), n),
        "truncated": sum(1 for e in encoded if e.truncated),
        "dropped": sum(1 for e in encoded if e.dropped),
        "tokens": tokens,
        "trained_token_share": _share(trained, tokens),
        "no_trained_token_records": sum(1 for e in kept if all(t == IGNORE_INDEX for t in e.labels)),
        "empty_replies": sum(1 for c in loaded.conversations
                             if not any(m["content"].strip() for m in c if m["role"] == "assistant")),
        "empty_records": len(loaded.empty),
        "empty_record_examples": loaded.empty[:_EXAMPLES],
        "duplicates": duplicates,
        "dedup": d.dedup,
        "packing": d.packing,
        "steps_per_epoch": len(steps),
        "records_per_step": round(len(lengths) / max(len(steps), 1), 2),
        "train_on_inputs": d.train_on_inputs,
        "example": example_tokens(train[0], tokenizer) if train else [],
    }


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles (p50, p90, p95, p99) and max, in tokens."""
    if not values:
        return {}
    s = sorted(values)
    out = {f"p{p}": s[min(len(s) - 1, max(0, -(-p * len(s) // 100) - 1))] for p in _PERCENTILES}
    out["max"] = s[-1]
    return out


def example_tokens(example: Example, tokenizer: Any) -> list[list]:
    """[[token text, trained?], ...] for one example, for display."""
    pieces = tokenizer.convert_ids_to_tokens(example.input_ids)
    texts = [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]
    return [[t, label != IGNORE_INDEX] for t, label in zip(texts, example.labels, strict=True)]


def warnings_for(report: dict) -> list[str]:
    """Problems worth a look before training, in plain words."""
    out = []
    if report["truncated_share"] > 0:
        what = "dropped" if report["dropped"] else "truncated"
        out.append(f"{report['truncated_share']:.1%} of examples are longer than max_seq_length "
                   f"{report['max_seq_length']} and are {what}; raise max_seq_length to keep them whole")
    if report["no_trained_token_records"]:
        out.append(f"{report['no_trained_token_records']} examples have no trained token (their reply is cut off or "
                   "empty); they are skipped")
    if report.get("empty_replies"):
        n = report["empty_replies"]
        out.append(f"{n} {'record has' if n == 1 else 'records have'} an empty reply: they teach the model to stop "
                   "at once (kept; drop them from the data if that is not what you want)")
    if report["empty_records"]:
        n = report["empty_records"]
        out.append(f"{n} {'record has' if n == 1 else 'records have'} no text in any turn (e.g. "
                   f"{', '.join(report['empty_record_examples'])}); they are skipped")
    if report["duplicates"] and not report["dedup"]:
        out.append(f"{report['duplicates']} exact duplicates; --dedup drops them")
    return out


