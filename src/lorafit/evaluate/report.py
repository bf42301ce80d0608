"""eval.md, eval.png and the printed table, all from the eval.json report (so they always agree).

The report holds up to three scored models: `base` (the base through the run's training template: what the
adapter changed), `base_chat` (the base through its own chat template: what a user of the base gets) and
`tuned`; `comparisons[base_key][metric]` holds tuned minus that base with its 95% interval (compare.py).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MD_EXAMPLES = 8
BASES = ("base", "base_chat")
NAMES = {"base": "base, run's template", "base_chat": "base, own chat template", "tuned": "tuned"}
SCORE_AXIS = ("rouge_l", "bleu", "chrf", "exact_match", "contains")  # the 0-100 metrics eval.png draws


def rows(report: dict) -> list[tuple[str, str]]:
    """(key, label) of every metric row, perplexity first."""
    labels = report["settings"]["metric_labels"]
    out = [("perplexity", "Perplexity (lower is better)")]
    for key in report["settings"]["metrics"]:
        n = (report["tuned"] or {}).get(f"{key}_n")
        out.append((key, labels[key] + (f" (n={n})" if n is not None else "")))
    return out


def models(report: dict) -> list[str]:
    return [m for m in (*BASES, "tuned") if report.get(m) is not None]


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else "inf"
    return str(value)


def change_cell(c: dict | None, sep: str = " ") -> str:
    """'+1.00 [-2.70, +4.40] not significant (41 W / 39 L / 20 T)' for one metric against one base."""
    if not c or not c.get("n"):
        return ""
    if not (math.isfinite(c["diff"]) and math.isfinite(c["low"]) and math.isfinite(c["high"])):
        return "—"
    verdict = {"better": "tuned better", "worse": "tuned worse"}.get(c["verdict"], c["verdict"])
    return (f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] {verdict}{sep}"
            f"({c['wins']} W / {c['losses']} L / {c['ties']} T)")


def health_rows(report: dict) -> list[tuple[str, list[str]]]:
    """Empty, looping and capped answers per model (what a single score hides)."""
    cap = report["settings"]["max_new_tokens"]
    keys = [("empty", "Empty answers"), ("looping", "Looping answers"), ("capped", f"Answers cut at {cap} tokens")]
    return [(label, [fmt(report[m].get(k)) for m in models(report)]) for k, label in keys]


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    ms = models(report)
    table = Table(title=f"eval: {s['samples']} examples ({s['split']} of {s['dataset']})", show_lines=True)
    table.add_column("metric")
    for m in ms:
        table.add_column(NAMES[m], justify="right")
    bases = [b for b in BASES if b in report.get("comparisons", {})]
    for b in bases:
        table.add_column(f"tuned − {NAMES[b]}\n[95% CI]", justify="right")
    for key, label in rows(report):
        cells = [fmt(report[m].get(key)) for m in ms]
        table.add_row(label, *cells, *[change_cell(report["comparisons"][b].get(key), "\n") for b in bases])
    for label, cells in health_rows(report):
        table.add_row(label, *cells, *[""] * len(bases))
    Console(width=160).print(table)
    if report.get("verdict"):
        Console(width=160).print(report["verdict"])


def markdown_report(report: dict, name: str) -> str:
    ms = models(report)
    bases = [b for b in BASES if b in report.get("comparisons", {})]
    lines = [f"# Evaluation of `{name}`", "", _intro(report), ""]
    if report.get("verdict"):
        lines += [f"**{report['verdict']}**", ""]
    head = ["metric", *[NAMES[m] for m in ms], *[f"tuned − {NAMES[b]} [95% CI]" for b in bases]]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key, label in rows(report):
        cells = [fmt(report[m].get(key)) for m in ms] + [change_cell(report["comparisons"][b].get(key)) for b in bases]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, cells in health_rows(report):
        lines.append(f"| {label} | " + " | ".join(cells + [""] * len(bases)) + " |")
    lines += ["", _notes(report), "", "![base vs tuned](eval.png)", "", "## Sample answers", ""]
    head = ["prompt", "reference", *[NAMES[m] for m in ms]]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for ex in report["examples"][:MD_EXAMPLES]:
        lines.append("| " + " | ".join(_md_cell(ex.get(c) or "") for c in ["prompt", "reference", *ms]) + " |")
    return "\n".join(lines) + "\n"


def _intro(report: dict) -> str:
    s = report["settings"]
    how = {"base": f"the run's `{s['template']}` template (what the adapter changed)",
           "base_chat": "its own chat template, `tokenizer.apply_chat_template` (what a user of the base gets)"}
    base = "; ".join(f"{NAMES[b]}: the base through {how[b]}" for b in BASES if report.get(b) is not None)
    return (f"{s['samples']} examples ({s['split']} of `{s['dataset']}`, seed {s['seed']}), greedy answers of at "
            f"most {s['max_new_tokens']} tokens ({s['max_new_tokens_rule']}). " + (f"Base models: {base}. " if base
                                                                                   else "") + s.get("base_note", ""))


def _notes(report: dict) -> str:
    s = report["settings"]
    bleu = {m: report[m].get("bleu_brevity_penalty") for m in models(report) if report[m].get("bleu") is not None}
    bp = ", ".join(f"{NAMES[m]} {v:.2f}" for m, v in bleu.items() if v is not None)
    return (f"Intervals: paired bootstrap, {s['bootstrap_samples']} resamples of the examples (seed {s['seed']}); "
            "'not significant' where the interval spans 0. W / L / T: examples where the tuned answer scores "
            "higher / lower / the same (BLEU and chrF per sentence, perplexity by mean reply NLL). Perplexity is over "
            "reply tokens, teacher-forced, each base through its own prompts. "
            f"{s['references_over_cap']} of {s['samples']} references are longer than the answer cap."
            + (f" BLEU brevity penalty: {bp}." if bp else ""))


def _md_cell(text: str, limit: int = 160) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def plot_report(report: dict, path: Path) -> None:
    """Grouped bars for the 0-100 scores, perplexity on its own axis (its scale differs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    ms = models(report)
    colors = {"base": "#9aa5b1", "base_chat": "#c9a227", "tuned": "#2f80ed"}
    scores = [k for k in report["settings"]["metrics"] if k in SCORE_AXIS]
    width = 0.8 / len(ms)
    for j, m in enumerate(ms):
        values = [report[m].get(k) or 0.0 for k in scores]
        xs = [i + (j - (len(ms) - 1) / 2) * width for i in range(len(scores))]
        bars = left.bar(xs, values, width, label=NAMES[m], color=colors[m])
        left.bar_label(bars, fmt="%.1f", fontsize=7)
        ppl = report[m].get("perplexity")
        if ppl is not None and math.isfinite(ppl):
            right.bar([j], [ppl], 0.6, color=colors[m])
            right.text(j, ppl, f"{ppl:.2f}", ha="center", va="bottom", fontsize=8)
    left.set_xticks(range(len(scores)), [report["settings"]["metric_labels"][k] for k in scores])
    left.set_ylim(0, 105)
    left.set_title("higher is better", fontsize=9)
    left.legend(loc="upper left", fontsize=7)
    right.set_xticks(range(len(ms)), [NAMES[m].replace(", ", "\n") for m in ms], fontsize=7)
    right.set_title("perplexity (lower is better)", fontsize=9)
    fig.suptitle(f"base vs tuned, {report['settings']['samples']} examples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
