"""`lorafit eval`: the base model against the fine-tuned one, on examples training never saw.

    lorafit eval --adapter_path DIR [--dataset X] [--max_samples N] [--seed 42] [--skip_base]

Which examples:
  * by default, the run's held-out split, recomputed from its config.yaml (same records, same
    split seed, same val_size), so no training example is scored;
  * with --dataset X different from the training data, all of X (capped at max_samples): none of
    it was trained on, so holding part of it out would only waste examples.
  --seed picks which max_samples examples are scored when there are more; the held-out split
  itself always follows the training seed (another seed would move training examples into it).

Metrics, per model, against each example's final assistant reply:
  perplexity   exp(mean NLL) over reply tokens only (the tokens training learned), teacher-forced;
  rouge_l      ROUGE-L F1 x 100 (rouge-score, Porter stemming) of the greedy answer;
  bleu         corpus BLEU (sacrebleu, effective order: one-word answers have no 4-grams);
  exact_match  % of answers equal after normalizing (strip, case-fold, trailing punctuation),
               on the short-answer examples only (reference <= 5 words); null when there are none.
Generation is greedy, batched with left padding, and stops at EOS / the template's stop strings.
The base is the same loaded model with the adapter switched off (PEFT's disable_adapter), so both
see identical weights, quantization and template, and the model loads once.

Writes DIR/eval.json ({"base", "tuned", "settings", "examples"}), DIR/eval.md (table, chart,
answers side by side) and DIR/eval.png, and prints the table.
"""
from __future__ import annotations

import contextlib
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.data.batching import concat_row, eval_pass_tokens, make_passes, packed_attention_mask
from lorafit.data.encode import encode_conversation, load_conversations, split_conversations
from lorafit.data.records import IGNORE_INDEX, last_reply
from lorafit.data.templates import encode_prompt, merged_content
from lorafit.errors import UserError
from lorafit.infer.generate import eos_token_ids, generate_batch, load_session
from lorafit.run_dir import load_run_config, require_adapter, same_source, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from lorafit.config.schema import Config
    from lorafit.infer.generate import Session

SHORT_ANSWER_WORDS = 5
MD_EXAMPLES = 8
METRICS = ("perplexity", "rouge_l", "bleu", "exact_match")
LABELS = {"perplexity": "Perplexity (lower is better)", "rouge_l": "ROUGE-L", "bleu": "BLEU",
          "exact_match": "Exact match %"}


@dataclass
class EvalExample:
    prompt: list[dict]
    """The conversation up to the reply being scored."""
    reference: str
    """The reply the data holds."""


def evaluate(run_dir: Path, cfg: Config) -> dict:
    """Score base and tuned on the held-out split (or all of --dataset); write eval.json / .md / .png."""

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"adapter path '{run_dir}' does not exist", fix="train first, or pass the run directory")
    require_adapter(run_dir)
    examples, settings = eval_examples(run_dir, cfg)
    _status(f"evaluating on {len(examples)} examples ({settings['split']} of {settings['dataset']})")
    session = load_session(run_dir, cfg)
    settings["max_new_tokens"] = _answer_budget(session.tokenizer, examples, cfg.eval.eval_max_new_tokens)
    report: dict[str, Any] = {"base": None, "tuned": None, "settings": settings}
    outputs: dict[str, list[str]] = {}
    for which in ("base", "tuned"):
        if which == "base" and cfg.eval.skip_base:
            continue
        with _adapter_off(session.model) if which == "base" else contextlib.nullcontext():
            started = time.perf_counter()
            metrics, outputs[which] = score_model(session, examples, cfg, settings["max_new_tokens"])
            metrics["seconds"] = round(time.perf_counter() - started, 2)
        report[which] = metrics
        _status(f"{which}: " + ", ".join(f"{k} {_fmt(metrics[k])}" for k in METRICS))
    report["examples"] = [{"prompt": merged_content(e.prompt[-1]), "reference": e.reference,
                           **{w: outputs[w][i] for w in outputs}} for i, e in enumerate(examples)]
    write_json_atomic(run_dir / "eval.json", report)
    plot_report(report, run_dir / "eval.png")
    write_text_atomic(run_dir / "eval.md", markdown_report(report, run_dir.name))
    print_table(report)
    _status(f"wrote {run_dir / 'eval.json'}, {run_dir / 'eval.md'}, {run_dir / 'eval.png'}")
    return report


# -- which examples ---------------------------------------------------------------------------------------

def eval_examples(run_dir: Path, cfg: Config) -> tuple[list[EvalExample], dict]:
    """The examples to score and a description of how they were chosen."""

    trained = load_run_config(run_dir)
    held_out = same_source(cfg.data.dataset, trained.data.dataset)
    if held_out:
        conversations, _ = load_conversations(trained)
        _, convs, _ = split_conversations(conversations, trained)
        if not convs:
            raise UserError(f"run '{run_dir}' trained without a held-out split (val_size {trained.data.val_size:g})",
                            fix="evaluate on other data with --dataset FILE")
    else:
        convs, _ = load_conversations(cfg)
    examples = [e for e in (_to_example(c) for c in convs) if e is not None]
    if not examples:
        raise UserError("no example to evaluate has an assistant reply", fix="check the dataset's format")
    total = len(examples)
    n = min(total, cfg.eval.max_samples or total)
    if n < total:
        examples = random.Random(f"lorafit-eval:{cfg.train.seed}").sample(examples, n)
    settings = {"dataset": cfg.data.dataset, "split": "held-out split" if held_out else "all",
                "samples": len(examples), "available": total, "seed": cfg.train.seed,
                "split_seed": trained.train.seed if held_out else None}
    if held_out and cfg.train.seed != trained.train.seed:
        _status(f"note: the held-out split follows the training seed ({trained.train.seed}); "
                f"seed {cfg.train.seed} only picks which {n} of its {total} examples are scored")
    return examples, settings


def _to_example(messages: list[dict]) -> EvalExample | None:
    last = last_reply(messages)
    if last <= 0 or not messages[last]["content"].strip():
        return None
    return EvalExample(prompt=messages[:last], reference=messages[last]["content"])


# -- scoring ----------------------------------------------------------------------------------------------

def score_model(session: Session, examples: list[EvalExample], cfg: Config, max_new_tokens: int):
    """(metrics, answers) of the model as it is now (adapter on or off)."""
    answers = generate_answers(session, examples, max_new_tokens, cfg.train.per_device_eval_batch_size,
                               cfg.data.max_seq_length)
    refs = [e.reference for e in examples]
    metrics = {"perplexity": reply_perplexity(session, examples, cfg), **text_metrics(answers, refs)}
    return metrics, answers


def generate_answers(session: Session, examples: list[EvalExample], max_new_tokens: int, batch_size: int,
                     max_prompt_tokens: int) -> list[str]:
    """Greedy answers, batched by similar prompt length (less padding), returned in input order."""

    s = session
    prompts = [encode_prompt(s.template, e.prompt, s.tokenizer)[-max_prompt_tokens:] for e in examples]
    eos = eos_token_ids(s.model, s.tokenizer, s.template)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        results = generate_batch(s.model, s.tokenizer, [prompts[i] for i in rows], max_new_tokens, eos,
                                 s.template.stop_strings)
        for i, r in zip(rows, results):
            answers[i] = r.text.strip()
    return answers


def reply_perplexity(session: Session, examples: list[EvalExample], cfg: Config) -> float | None:
    """exp(mean NLL) over reply tokens (labels != IGNORE_INDEX), teacher-forced, in padding-free passes
    (records concatenated, each attending to itself: data/batching.py)."""
    import torch

    s = session
    rows = []
    for e in examples:
        enc = encode_conversation(s.template, e.prompt + [{"role": "assistant", "content": e.reference}],
                                  s.tokenizer, cfg.data.max_seq_length, False, "truncate")
        if enc is not None and any(t != IGNORE_INDEX for t in enc[1][1:]):
            rows.append(enc)
    if not rows:
        return None
    nll, count = 0.0, 0
    params = list(s.model.parameters())
    device = params[0].device
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    budget = eval_pass_tokens(cfg.train.max_tokens_per_pass, cfg.data.max_seq_length, device.type == "cuda")
    with torch.inference_mode():
        for records in make_passes(list(range(len(rows))), [len(ids) for ids, _ in rows], budget):
            b = {k: v.to(device) for k, v in concat_row([rows[i] for i in records], cfg.data.max_seq_length).items()}
            mask = packed_attention_mask(b["doc_ids"], dtype)  # (1, 1, T, T), built once, shared by the layers
            logits = s.model(input_ids=b["input_ids"], attention_mask=mask, position_ids=b["position_ids"],
                             use_cache=False).logits[:, :-1].float()  # (1, T-1, V)
            target = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
            nll += float(loss)
            count += int((target != IGNORE_INDEX).sum())
    mean = nll / max(count, 1)
    return round(math.exp(mean), 4) if mean < 700 else float("inf")


def text_metrics(answers: list[str], references: list[str]) -> dict[str, Any]:
    """ROUGE-L F1, corpus BLEU and short-answer exact match, each on a 0-100 scale."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)]
    # effective_order: a corpus of one-word answers has no 4-grams, and plain BLEU would score it 0.
    bleu = BLEU(effective_order=True).corpus_score(answers, [references]).score
    short = [(a, r) for a, r in zip(answers, references) if is_short_answer(r)]
    em = 100 * sum(normalize(a) == normalize(r) for a, r in short) / len(short) if short else None
    return {"rouge_l": round(100 * sum(rouge) / max(len(rouge), 1), 2), "bleu": round(bleu, 2),
            "exact_match": None if em is None else round(em, 2), "exact_match_n": len(short)}


def normalize(text: str) -> str:
    """Strip, case-fold, collapse spaces, drop trailing punctuation: '  Paris. ' == 'paris'."""
    text = re.sub(r"\s+", " ", text.strip().casefold())
    return re.sub(r"[\s.!?,;:'\"]+$", "", text)


def is_short_answer(reference: str) -> bool:
    return 0 < len(normalize(reference).split()) <= SHORT_ANSWER_WORDS


def _answer_budget(tokenizer, examples: list[EvalExample], cap: int) -> int:
    """eval_max_new_tokens, lowered to twice the longest reference + 16: an answer past that scores no
    exact match and barely moves ROUGE-L, and on CPU a rambling base would otherwise set the pace of
    every batch (with the demo data: ~30 tokens instead of 128, about 4x faster)."""
    longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
    return max(1, min(cap, 2 * longest + 16))


@contextlib.contextmanager
def _adapter_off(model):
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


# -- reports ----------------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else "inf"
    return str(value)


def _delta(base: Any, tuned: Any) -> str:
    if not isinstance(base, (int, float)) or not isinstance(tuned, (int, float)):
        return ""
    if not (math.isfinite(base) and math.isfinite(tuned)):
        return ""
    return f"{tuned - base:+.2f}"


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    base, tuned = report["base"] or {}, report["tuned"] or {}
    s = report["settings"]
    table = Table(title=f"eval: {s['samples']} examples ({s['split']} of {s['dataset']})")
    table.add_column("metric")
    if report["base"] is not None:
        table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    if report["base"] is not None:
        table.add_column("change", justify="right")
    for key in METRICS:
        label = LABELS[key] + (f" (n={tuned.get('exact_match_n')})" if key == "exact_match" else "")
        if report["base"] is not None:
            table.add_row(label, _fmt(base.get(key)), _fmt(tuned.get(key)), _delta(base.get(key), tuned.get(key)))
        else:
            table.add_row(label, _fmt(tuned.get(key)))
    Console(width=100).print(table)


def markdown_report(report: dict, name: str) -> str:
    s = report["settings"]
    has_base = report["base"] is not None
    intro = (f"{s['samples']} examples ({s['split']} of `{s['dataset']}`, seed {s['seed']}), greedy answers of at "
             f"most {s['max_new_tokens']} tokens. Perplexity is over reply tokens; exact match counts the "
             f"{report['tuned'].get('exact_match_n', 0)} short-answer examples.")
    lines = [f"# Evaluation of `{name}`", "", intro, ""]
    lines += ["| metric | base | tuned | change |" if has_base else "| metric | tuned |",
              "|---|---:|---:|---:|" if has_base else "|---|---:|"]
    for key in METRICS:
        tuned = report["tuned"].get(key)
        if has_base:
            base = report["base"].get(key)
            lines.append(f"| {LABELS[key]} | {_fmt(base)} | {_fmt(tuned)} | {_delta(base, tuned)} |")
        else:
            lines.append(f"| {LABELS[key]} | {_fmt(tuned)} |")
    lines += ["", "![base vs tuned](eval.png)", "", "## Sample answers", ""]
    lines += ["| prompt | reference | base | tuned |" if has_base else "| prompt | reference | tuned |",
              "|---|---|---|---|" if has_base else "|---|---|---|"]
    for ex in report["examples"][:MD_EXAMPLES]:
        cells = [ex["prompt"], ex["reference"]] + ([ex["base"]] if has_base else []) + [ex["tuned"]]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _md_cell(text: str, limit: int = 160) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def plot_report(report: dict, path: Path) -> None:
    """Grouped bars for the 0-100 scores, perplexity on its own axis (its scale differs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    models = [m for m in ("base", "tuned") if report[m] is not None]
    colors = {"base": "#9aa5b1", "tuned": "#2f80ed"}
    scores = ["rouge_l", "bleu", "exact_match"]
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        values = [report[m].get(k) or 0.0 for k in scores]
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(scores))]
        bars = left.bar(xs, values, width, label=m, color=colors[m])
        left.bar_label(bars, fmt="%.1f", fontsize=8)
        ppl = report[m].get("perplexity")
        if ppl is not None and math.isfinite(ppl):
            right.bar([j], [ppl], 0.6, color=colors[m])
            right.text(j, ppl, f"{ppl:.2f}", ha="center", va="bottom", fontsize=8)
    left.set_xticks(range(len(scores)), [LABELS[k] for k in scores])
    left.set_ylim(0, 105)
    left.set_title("higher is better", fontsize=9)
    left.legend(loc="upper left", fontsize=8)
    right.set_xticks(range(len(models)), models)
    right.set_title("perplexity (lower is better)", fontsize=9)
    fig.suptitle(f"base vs tuned, {report['settings']['samples']} examples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
