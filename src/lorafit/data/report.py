"""`lorafit data`: what training would see, before any training.

Records, format, template, token-length percentiles with the model's tokenizer, the share cut at
max_seq_length, the share of tokens trained on, records with no trained token, duplicates, the
padding share of the batches training would build, and one example with trained tokens marked.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lorafit.data.tokenize import IGNORE

if TYPE_CHECKING:
    from lorafit.config import Config
    from lorafit.data.templates import Template
    from lorafit.data.tokenize import Encoded, Example, Loaded

_PERCENTILES = (50, 90, 95, 99)
_EXAMPLES = 3  # locations of skipped records shown in the report


def data_command(cfg: Config, as_json: bool = False) -> int:
    """Load and check the data (before the tokenizer: an empty dataset stops here), then report."""
    from lorafit.data.tokenize import _load
    from lorafit.model import load_tokenizer

    loaded = _load(cfg)
    report = data_report(cfg, load_tokenizer(cfg), loaded)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def data_report(cfg: Config, tokenizer: Any, loaded: Loaded | None = None) -> dict:
    """The report's numbers for `cfg.data` with `tokenizer` (what `lorafit data --json` prints)."""
    from lorafit.data.tokenize import _load, prepare_loaded

    return prepare_loaded(cfg, tokenizer, loaded or _load(cfg)).report


def summarize(cfg: Config, tokenizer: Any, template: Template, loaded: Loaded, encoded: list[Encoded],
              train: list[Example], val: list[Example], duplicates: int) -> dict:
    from lorafit.data.batching import plan_batches, plan_padding_share

    d = cfg.data
    n = len(encoded)
    kept = [e for e in encoded if not e.dropped]
    tokens = sum(len(e.input_ids) for e in kept)
    trained = sum(sum(1 for t in e.labels if t != IGNORE) for e in kept)
    lengths = [len(e.input_ids) for e in train]
    plan = plan_batches(lengths, cfg.train.per_device_train_batch_size, packing=d.packing,
                        max_seq_length=d.max_seq_length, seed=cfg.train.seed, epoch=0,
                        group_by_length=d.group_by_length, shuffle=d.shuffle)
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
        "no_trained_token_records": sum(1 for e in kept if all(t == IGNORE for t in e.labels)),
        "empty_replies": sum(1 for c in loaded.conversations
                             if not any(m["content"].strip() for m in c if m["role"] == "assistant")),
        "empty_records": len(loaded.empty),
        "empty_record_examples": loaded.empty[:_EXAMPLES],
        "duplicates": duplicates,
        "dedup": d.dedup,
        "packing": d.packing,
        "padding_share": round(plan_padding_share(lengths, plan, d.max_seq_length), 4),
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
    return [[t, label != IGNORE] for t, label in zip(texts, example.labels)]


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
    if report["padding_share"] > 0.3 and not report["packing"]:
        out.append(f"{report['padding_share']:.0%} of batch positions are padding; --packing removes it")
    return out


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    table = Table(title=f"lorafit data: {report['dataset']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    pct = report["length_percentiles"]
    over = (f"{report['truncated_share']:.1%} of {report['max_seq_length']} tokens "
            f"({report['truncated']} truncated, {report['dropped']} dropped)")
    on_inputs = " (train_on_inputs)" if report["train_on_inputs"] else ""
    rows = [
        ("records", f"{report['records']} ({report['train_examples']} train, {report['val_examples']} validation)"),
        ("format / template", f"{report['format']} / {report['template']}"),
        ("tokens per example", "  ".join(f"{k} {v}" for k, v in pct.items())),
        ("longer than max_seq_length", over),
        ("tokens trained on", f"{report['trained_token_share']:.1%} of {report['tokens']}{on_inputs}"),
        ("records with no trained token", str(report["no_trained_token_records"])),
        ("empty records (skipped)", str(report["empty_records"])),
        ("exact duplicates", f"{report['duplicates']}" + (" (dropped)" if report["dedup"] else "")),
        ("padding share", f"{report['padding_share']:.1%} ({'packed' if report['packing'] else 'padded batches'})"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if report["example"]:
        text = Text()
        for token, trained in report["example"]:
            text.append(token, style="bold green" if trained else "dim")
        console.print(Text("One example (", style="bold") + Text("trained", style="bold green")
                      + Text(" / ", style="bold") + Text("masked", style="dim") + Text("):", style="bold"))
        console.print(text)
    for w in warnings_for(report):
        console.print(f"[yellow]warning:[/yellow] {w}")
