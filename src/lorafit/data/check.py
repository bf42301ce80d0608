"""`lorafit data`: load, template and tokenize a dataset as training would, then report on it; no model loads."""
from __future__ import annotations

import json
from typing import Any

from lorafit.config.schema import Config
from lorafit.data.encode import Loaded, load_data, prepare_loaded
from lorafit.data.report import warnings_for
from lorafit.model.load import load_tokenizer


def data_command(cfg: Config, as_json: bool = False) -> int:
    """Load and check the data (before the tokenizer: an empty dataset stops here), then report."""

    loaded = load_data(cfg)
    report = data_report(cfg, load_tokenizer(cfg), loaded)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def data_report(cfg: Config, tokenizer: Any, loaded: Loaded | None = None) -> dict:
    """The report's numbers for `cfg.data` with `tokenizer` (what `lorafit data --json` prints)."""

    return prepare_loaded(cfg, tokenizer, loaded or load_data(cfg)).report


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
    if report["val_examples"]:
        split = f"{report['train_examples']} train, {report['val_examples']} validation"
    else:  # val_size 0 (or --split none): a test file, or training on everything; a split would mean nothing
        split = f"{report['train_examples']} kept, no train/validation split"
    rows = [
        ("records", f"{report['records']} ({split})"),
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
