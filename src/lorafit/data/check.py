"""`lorafit data`: load, template and tokenize a dataset as training would, then report on it; no model loads."""
from __future__ import annotations

import json
from typing import Any

from lorafit.config.schema import Config
from lorafit.data.encode import Loaded, load_data, prepare_loaded
from lorafit.data.pipeline import is_preference
from lorafit.data.preference import preference_warnings, prepare_preference
from lorafit.data.report import warnings_for
from lorafit.model.load import load_tokenizer


def data_command(cfg: Config, as_json: bool = False) -> int:
    """Load and check the data (before the tokenizer: an empty dataset stops here), then report."""

    if is_preference(cfg):
        report = prepare_preference(cfg, load_tokenizer(cfg)).report
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            print_preference_report(report)
        return 0
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
        ("steps per epoch (1 process)", (f"{report['steps_per_epoch']} of {report['records_per_step']} records"
                                         f"{' in rows of max_seq_length' if report['packing'] else ''}, padding-free")),
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


def _cut_line(report: dict) -> str:
    return (f"{report['truncated_share']:.1%} of sequences at {report['max_seq_length']} tokens "
            f"({report['prompts_cut']} prompts cut at their start, {report['replies_cut']} replies cut at their end, "
            f"{report['dropped']} dropped)")


def print_preference_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"lorafit data ({report['method']}): {report['dataset']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    unit = "completions" if report["format"] == "completions" else "pairs"
    rows = [
        (unit, f"{report['records']} ({report['train_examples']} train, {report['val_examples']} validation)"),
        ("template", report["template"]),
        ("prompt tokens", "  ".join(f"{k} {v}" for k, v in report["prompt_length_percentiles"].items())),
        ("reply tokens", "  ".join(f"{k} {v}" for k, v in report["reply_length_percentiles"].items())),
        ("longer than max_seq_length", _cut_line(report)),
        ("identical chosen/rejected", str(report["identical_pairs"])),
        ("empty replies", str(report["empty_replies"])),
        ("exact duplicates", f"{report['duplicates']}" + (" (dropped)" if report["dedup"] else "")),
        ("steps per epoch", f"{report['steps_per_epoch']} (padding-free passes: no pad tokens)"),
    ]
    if report["desirable"] is not None:
        rows.insert(1, ("desirable / undesirable", f"{report['desirable']} / {report['undesirable']}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    for w in preference_warnings(report):
        console.print(f"[yellow]warning:[/yellow] {w}")
