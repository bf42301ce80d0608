"""`lorafit eval` on a DPO / ORPO / KTO run: held-out preference accuracy and margin, base against tuned, and
greedy answers side by side.

Per model (base = the same loaded model with the adapter switched off):
  accuracy   % of held-out pairs whose chosen reply has the higher summed log-prob;
  margin     mean log-prob difference, chosen minus rejected (nats);
and for the tuned model the implicit reward of DPO, beta * (tuned - base) log-ratio of chosen over rejected:
  reward_accuracy  % of pairs where it is positive;  reward_margin  its mean.
KTO runs score their held-out completions the same way when the data holds pairs; labelled completions are
scored as the share of desirable completions above, undesirable below, the base (reward_accuracy).

Writes DIR/eval.json ({"base", "tuned", "settings", "examples"}) and DIR/eval.md, and prints the table.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorafit.config.schema import beta_of
from lorafit.data.preference import CHOSEN, REJECTED, encode_examples, preference_passes, split_preference
from lorafit.errors import UserError
from lorafit.evaluate.report import _md_cell
from lorafit.evaluate.run import EvalExample, _adapter_off, _status, generate_answers
from lorafit.infer.generate import load_session
from lorafit.model.load import compute_dtype
from lorafit.run_dir import load_run_config, require_adapter, same_source, write_json_atomic, write_text_atomic
from lorafit.train.objectives.logprobs import sequence_logps

if TYPE_CHECKING:
    from lorafit.config.schema import Config

GENERATIONS = 8
"""Held-out prompts answered by both models in eval.md (greedy generation dominates eval's time on CPU)."""


def evaluate_preference(run_dir: Path, cfg: Config) -> dict:
    run_dir = Path(run_dir)
    require_adapter(run_dir)
    trained = load_run_config(run_dir)
    held_out = same_source(cfg.data.dataset, trained.data.dataset)
    _, _, (train, val, _) = split_preference(trained if held_out else cfg)
    records = val if held_out else train + val
    if not records:
        raise UserError(f"run '{run_dir}' trained without a held-out split (val_size {trained.data.val_size:g})",
                        fix="evaluate on other pairs with --dataset FILE")
    n = min(len(records), cfg.eval.max_samples or len(records))
    if n < len(records):
        records = random.Random(f"lorafit-eval:{cfg.train.seed}").sample(records, n)
    session = load_session(run_dir, cfg, merge=False)  # the base is the same model with its adapter off
    examples = encode_examples(session.template, records, session.tokenizer, cfg)
    started = time.perf_counter()
    with _adapter_off(session.model):
        base = score_examples(session.model, examples, cfg)
    tuned = score_examples(session.model, examples, cfg)
    report = {"base": summarize(base), "tuned": summarize(tuned), "settings": {
        "dataset": cfg.data.dataset, "split": "held-out split" if held_out else "all", "samples": len(examples),
        "method": trained.train.method, "beta": beta_of(trained), "seconds": 0.0}}
    report["tuned"].update(reward_metrics(base, tuned, beta_of(trained)))
    report["examples"] = side_by_side(session, examples, cfg)
    report["settings"]["seconds"] = round(time.perf_counter() - started, 2)
    write_json_atomic(run_dir / "eval.json", report)
    write_text_atomic(run_dir / "eval.md", markdown(report, run_dir.name))
    print_table(report)
    _status(f"wrote {run_dir / 'eval.json'}, {run_dir / 'eval.md'}")
    return report


def score_examples(model, examples: list, cfg: Config) -> dict[int, list[tuple[int, float]]]:
    """{example index: [(kind, summed reply log-prob), ...]} under the model as it is now (adapter on or off)."""
    device = next(model.parameters()).device
    batches = preference_passes(examples, 2 * cfg.data.max_seq_length * cfg.train.per_device_eval_batch_size)
    out: dict[int, list[tuple[int, float]]] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logps, _ = sequence_logps(model, batch, compute_dtype(cfg))  # SDPA wants the mask in the query's dtype
            kinds, indices = batch["seq_kind"].tolist(), batch["seq_example"].tolist()
            for kind, index, value in zip(kinds, indices, logps.tolist(), strict=True):
                out.setdefault(index, []).append((kind, value))
    model.train(was_training)
    return out


def summarize(scores: dict[int, list[tuple[int, float]]]) -> dict:
    diffs = [_pair_diff(s) for s in scores.values()]
    diffs = [x for x in diffs if x is not None]
    if not diffs:
        return {"accuracy": None, "margin": None, "pairs": 0}
    return {"accuracy": round(100 * sum(x > 0 for x in diffs) / len(diffs), 2),
            "margin": round(sum(diffs) / len(diffs), 4), "pairs": len(diffs)}


def reward_metrics(base: dict, tuned: dict, beta: float) -> dict:
    """DPO's implicit reward of the tuned model against the base; for lone completions, signed by the label."""
    rewards = []
    for index, seqs in tuned.items():
        ref = dict(base[index])
        got = dict(seqs)
        if CHOSEN in got and REJECTED in got:
            rewards.append(beta * ((got[CHOSEN] - ref[CHOSEN]) - (got[REJECTED] - ref[REJECTED])))
        else:
            kind, value = seqs[0]
            rewards.append(beta * (value - ref[kind]) * (1 if kind == CHOSEN else -1))
    if not rewards:
        return {"reward_accuracy": None, "reward_margin": None}
    return {"reward_accuracy": round(100 * sum(r > 0 for r in rewards) / len(rewards), 2),
            "reward_margin": round(sum(rewards) / len(rewards), 4)}


def _pair_diff(seqs: list[tuple[int, float]]) -> float | None:
    got = dict(seqs)
    return got[CHOSEN] - got[REJECTED] if CHOSEN in got and REJECTED in got else None


def side_by_side(session, examples: list, cfg: Config) -> list[dict]:
    """Greedy answers of base and tuned to the first held-out prompts, with the chosen (and rejected) reply."""
    shown = [EvalExample(e.messages[:-1], e.messages[-1]["content"]) for e in examples[:GENERATIONS]]
    if not shown:
        return []
    asked = cfg.eval.eval_max_new_tokens
    budget = asked if isinstance(asked, int) else cfg.generate.max_new_tokens
    bs, limit = cfg.train.per_device_eval_batch_size, cfg.data.max_seq_length
    with _adapter_off(session.model):
        base = [r.text for r in generate_answers(session, session.template, shown, budget, bs, limit)]
    tuned = [r.text for r in generate_answers(session, session.template, shown, budget, bs, limit)]
    return [{"prompt": e.prompt[-1]["content"], "chosen": e.reference, "rejected": x.rejected, "base": b, "tuned": t}
            for e, x, b, t in zip(shown, examples, base, tuned, strict=False)]


def _cell(value) -> str:
    return "—" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


ROWS = (("accuracy", "Preference accuracy % (log-prob)"), ("margin", "Log-prob margin chosen - rejected"),
        ("reward_accuracy", "Reward accuracy % (vs base)"), ("reward_margin", "Reward margin (vs base)"))


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"lorafit eval ({s['method']}): {s['samples']} pairs, {s['split']} of {s['dataset']}")
    for col in ("metric", "base", "tuned"):
        table.add_column(col)
    for key, label in ROWS:
        table.add_row(label, _cell(report["base"].get(key)), _cell(report["tuned"].get(key)))
    Console().print(table)


def markdown(report: dict, name: str) -> str:
    lines = [f"# Preference eval: {name}", "", "| metric | base | tuned |", "|---|---|---|"]
    lines += [f"| {label} | {_cell(report['base'].get(k))} | {_cell(report['tuned'].get(k))} |" for k, label in ROWS]
    lines += ["", "## Answers side by side", "", "| prompt | chosen | rejected | base | tuned |",
              "|---|---|---|---|---|"]
    lines += [f"| {_md_cell(x['prompt'])} | {_md_cell(x['chosen'])} | {_md_cell(x['rejected'])} | "
              f"{_md_cell(x['base'])} | {_md_cell(x['tuned'])} |" for x in report["examples"]]
    return "\n".join(lines) + "\n"
