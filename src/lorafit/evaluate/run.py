"""`lorafit eval`: the base model against the fine-tuned one, on examples training never saw.

    lorafit eval --adapter_path DIR [--dataset X] [--max_samples N] [--seed 42] [--metrics rouge_l,bleu,...]
                 [--eval_max_new_tokens auto|N] [--eval_base_template both|run|chat] [--skip_base]

Which examples:
  * by default, the run's held-out split, recomputed from its config.yaml (same records, same
    split seed, same val_size), so no training example is scored;
  * with --dataset X different from the training data, all of X (capped at max_samples): none of
    it was trained on, so holding part of it out would only waste examples.
  --seed picks which max_samples examples are scored when there are more (and seeds the bootstrap);
  the held-out split itself always follows the training seed.

Which base: a run trained on "Instruction: / Response:" text changed two things, the weights and the
prompt format, and an instruct base never saw that format. So the base is scored twice when the two
prompt formats differ: through the run's template (what the adapter changed) and through its own chat
template (what a user of the base gets). Each base shares the tuned model's loaded weights with the
adapter switched off (PEFT's disable_adapter); the tuned model is scored last, with the adapter merged
into the weights (generate.merged_for_inference), so it generates as fast as the base.

Metrics (metrics.py): perplexity over reply tokens (teacher-forced, always) and --metrics
(default rouge_l, bleu, exact_match). Every difference tuned minus base carries a paired bootstrap
95% interval and per-example wins / losses / ties (compare.py). Answers: greedy, batched with left
padding, stopped at EOS / the template's stop strings, at most eval_max_new_tokens tokens (auto: from
the references' lengths, so the cap does not decide BLEU); empty, looping and capped answers are counted.

Writes DIR/eval.json ({"settings", "base", "base_chat", "tuned", "comparisons", "verdict", "examples"}),
DIR/eval.md, DIR/eval.png, and prints the table.
"""
from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.data.batching import concat_row, eval_pass_tokens, make_passes, packed_attention_mask
from lorafit.data.encode import encode_conversation, load_conversations, split_conversations
from lorafit.data.records import IGNORE_INDEX, last_reply
from lorafit.data.templates import Template, encode_prompt, merged_content, resolve_template
from lorafit.errors import UserError
from lorafit.evaluate.compare import compare_metric, compare_perplexity
from lorafit.evaluate.metrics import Metric, answer_health, parse_metrics
from lorafit.evaluate.report import BASES, NAMES, markdown_report, plot_report, print_table
from lorafit.infer.generate import eos_token_ids, generate_batch, load_session, merged_for_inference
from lorafit.run_dir import load_run_config, require_adapter, same_source, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from lorafit.config.schema import Config
    from lorafit.infer.generate import Session

AUTO_FACTOR, AUTO_QUANTILE, AUTO_MIN = 1.5, 95, 16


@dataclass
class EvalExample:
    prompt: list[dict]
    """The conversation up to the reply being scored."""
    reference: str
    """The reply the data holds."""


@dataclass
class Scoring:
    """One model through one template: its answers and their scores."""

    answers: list[str]
    finish: list[str]
    nll: list[tuple[float, int] | None]
    """Per example: (NLL summed over reply tokens, reply tokens), None when the reply did not fit."""
    scored: dict
    """metric name -> metrics.Scored"""
    seconds: float
    generated_tokens: int


def evaluate(run_dir: Path, cfg: Config) -> dict:
    """Score the base (both ways) and the tuned model; write eval.json / .md / .png and print the table."""

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"adapter path '{run_dir}' does not exist", fix="train first, or pass the run directory")
    require_adapter(run_dir)
    metrics = parse_metrics(cfg.eval.metrics)  # a wrong name or metric file fails before the model loads
    examples, settings = eval_examples(run_dir, cfg)
    _status(f"evaluating on {len(examples)} examples ({settings['split']} of {settings['dataset']})")
    session = load_session(run_dir, cfg, merge=False)
    settings.update(answer_budget(session.tokenizer, examples, cfg))
    templates, settings["base_note"] = base_templates(session, cfg, examples)
    results: dict[str, Scoring] = {}
    for which, template in templates.items():
        with _adapter_off(session.model):
            results[which] = score_model(session, template, examples, metrics, cfg, settings["max_new_tokens"])
        _status(f"{NAMES[which]}: {_summary(results[which], metrics)}")
    session.model = merged_for_inference(session.model)  # after the bases: the merge rewrites the weights
    results["tuned"] = score_model(session, session.template, examples, metrics, cfg, settings["max_new_tokens"])
    _status(f"tuned: {_summary(results['tuned'], metrics)}")
    report = build_report(results, examples, metrics, settings, cfg, session.template)
    write_json_atomic(run_dir / "eval.json", report)
    plot_report(report, run_dir / "eval.png")
    write_text_atomic(run_dir / "eval.md", markdown_report(report, run_dir.name))
    print_table(report)
    _status(f"wrote {run_dir / 'eval.json'}, {run_dir / 'eval.md'}, {run_dir / 'eval.png'}")
    return report


# -- which examples, which bases, how long an answer ------------------------------------------------------

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


def base_templates(session: Session, cfg: Config, examples: list[EvalExample]) -> tuple[dict[str, Template], str]:
    """{which base: its template} for eval_base_template (both / run / chat), and a note on what was left out.

    The chat-template base is left out when the tokenizer has no chat template, or when it renders every
    prompt exactly as the run's template does (a run trained with template auto on an instruct model).
    """
    want = cfg.eval.eval_base_template
    if cfg.eval.skip_base:
        return {}, "The base was not scored (--skip_base). "
    out = {"base": session.template} if want in ("both", "run") else {}
    if want == "run":
        return out, ""
    if not getattr(session.tokenizer, "chat_template", None):
        if want == "chat":
            raise UserError("--eval_base_template chat: the base's tokenizer has no chat template",
                            fix="use --eval_base_template run")
        return out, "The base's tokenizer has no chat template, so the base is scored through the run's only. "
    own = resolve_template("model", session.tokenizer, cfg.data.dataset_format, cfg.data.system_prompt)
    same = all(encode_prompt(own, e.prompt, session.tokenizer) == encode_prompt(session.template, e.prompt,
                                                                                  session.tokenizer) for e in examples)
    if same and want == "both":
        return out, "The run's template renders every prompt as the base's own chat template does: one base. "
    out["base_chat"] = own
    return out, ""


def answer_budget(tokenizer, examples: list[EvalExample], cfg: Config) -> dict[str, Any]:
    """max_new_tokens for scoring, how it was chosen, and how many references are longer.

    auto: 1.5 x the 95th percentile of reference lengths in tokens, at least 16, at most max_seq_length. A cap
    below the references makes BLEU's brevity penalty, not the answers, decide the score (100 held-out records of
    the shared Alpaca file, SmolLM2 tokens: 50 references are longer than 128 tokens, the 95th percentile is 416).
    """
    import numpy as np

    lengths = [len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples]
    setting = cfg.eval.eval_max_new_tokens
    if setting == "auto":
        p95 = float(np.percentile(lengths, AUTO_QUANTILE))
        budget = min(max(math.ceil(AUTO_FACTOR * p95), AUTO_MIN), cfg.data.max_seq_length)
        rule = f"auto: 1.5 x the 95th-percentile reference length {p95:.0f}, >= 16, <= max_seq_length"
    else:
        budget, rule = int(setting), "eval_max_new_tokens"
    return {"max_new_tokens": budget, "max_new_tokens_rule": rule,
            "references_over_cap": sum(n > budget for n in lengths)}


# -- scoring ----------------------------------------------------------------------------------------------

def score_model(session: Session, template: Template, examples: list[EvalExample], metrics: list[Metric],
                cfg: Config, max_new_tokens: int) -> Scoring:
    """Answers and scores of the model as it is now (adapter on, off or merged), prompted through `template`."""
    started = time.perf_counter()
    results = generate_answers(session, template, examples, max_new_tokens, cfg.train.per_device_eval_batch_size,
                               cfg.data.max_seq_length)
    seconds = time.perf_counter() - started
    answers = [r.text.strip() for r in results]
    refs = [e.reference for e in examples]
    return Scoring(answers=answers, finish=[r.finish_reason for r in results],
                   nll=reply_nll(session, template, examples, cfg),
                   scored={m.name: m.score(answers, refs) for m in metrics}, seconds=seconds,
                   generated_tokens=sum(r.completion_tokens for r in results))


def generate_answers(session: Session, template: Template, examples: list[EvalExample], max_new_tokens: int,
                     batch_size: int, max_prompt_tokens: int):
    """Greedy GenerationResults, batched by similar prompt length (less padding), returned in input order."""

    s = session
    prompts = [encode_prompt(template, e.prompt, s.tokenizer)[-max_prompt_tokens:] for e in examples]
    eos = eos_token_ids(s.model, s.tokenizer, template)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        answers = generate_batch(s.model, s.tokenizer, [prompts[i] for i in rows], max_new_tokens, eos,
                                 template.stop_strings)
        for i, r in zip(rows, answers, strict=True):
            out[i] = r
    return out


def reply_nll(session: Session, template: Template, examples: list[EvalExample],
              cfg: Config) -> list[tuple[float, int] | None]:
    """Per example (NLL summed over reply tokens, their count), teacher-forced, in padding-free passes (records
    concatenated, each attending to itself: data/batching.py), summed per record by its document id."""
    import torch

    s = session
    rows = []
    for k, e in enumerate(examples):
        enc = encode_conversation(template, e.prompt + [{"role": "assistant", "content": e.reference}],
                                  s.tokenizer, cfg.data.max_seq_length, False, "truncate")
        if enc is not None and any(t != IGNORE_INDEX for t in enc[1][1:]):
            rows.append((k, *enc))
    out: list[tuple[float, int] | None] = [None] * len(examples)
    params = list(s.model.parameters())
    device = params[0].device
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    budget = eval_pass_tokens(cfg.train.max_tokens_per_pass, cfg.data.max_seq_length, device.type == "cuda")
    with torch.inference_mode():
        for records in make_passes(list(range(len(rows))), [len(rows[i][1]) for i in range(len(rows))], budget):
            row = concat_row([rows[i][1:] for i in records], cfg.data.max_seq_length)
            b = {k: v.to(device) for k, v in row.items()}
            mask = packed_attention_mask(b["doc_ids"], dtype)  # (1, 1, T, T), built once, shared by the layers
            logits = s.model(input_ids=b["input_ids"], attention_mask=mask, position_ids=b["position_ids"],
                             use_cache=False).logits[0, :-1].float()  # (T-1, V)
            target, doc = b["labels"][0, 1:], b["doc_ids"][0, 1:] - 1  # (T-1,): each target's record in the pass
            loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
            nll = torch.zeros(len(records), dtype=torch.float64, device=device).index_add_(0, doc, loss.double())
            counts = torch.zeros(len(records), dtype=torch.long, device=device).index_add_(
                0, doc, (target != IGNORE_INDEX).long())
            for i, total, n in zip(records, nll.tolist(), counts.tolist(), strict=True):
                out[rows[i][0]] = (total, int(n))
    return out


def reply_perplexity(session: Session, examples: list[EvalExample], cfg: Config) -> float | None:
    """Perplexity over the examples' reply tokens under the session's own template (export's cost check)."""
    return perplexity(reply_nll(session, session.template, examples, cfg))


def perplexity(nll: list[tuple[float, int] | None]) -> float | None:
    """exp(total NLL / total reply tokens)."""
    pairs = [p for p in nll if p is not None]
    count = sum(n for _, n in pairs)
    if not count:
        return None
    mean = sum(x for x, _ in pairs) / count
    return round(math.exp(mean), 4) if mean < 700 else float("inf")


@contextlib.contextmanager
def _adapter_off(model):
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


# -- the report -------------------------------------------------------------------------------------------

def build_report(results: dict[str, Scoring], examples: list[EvalExample], metrics: list[Metric], settings: dict,
                 cfg: Config, template: Template) -> dict[str, Any]:
    """eval.json's content: per-model scores, comparisons against each base, a verdict and every answer."""
    settings |= {"metrics": [m.name for m in metrics], "metric_labels": {m.name: m.label for m in metrics},
                 "bootstrap_samples": cfg.eval.bootstrap_samples, "template": template.name}
    report: dict[str, Any] = {"settings": settings, **{b: None for b in BASES}, "tuned": None}
    for which, r in results.items():
        report[which] = _model_summary(r, metrics)
    tuned = results["tuned"]
    seed, samples = cfg.train.seed, cfg.eval.bootstrap_samples
    report["comparisons"] = {
        b: {"perplexity": compare_perplexity(tuned.nll, results[b].nll, samples, seed),
            **{m.name: compare_metric(m, tuned.scored[m.name], results[b].scored[m.name], samples, seed)
               for m in metrics}}
        for b in BASES if b in results}
    report["verdict"] = verdict(report["comparisons"], settings["metric_labels"])
    report["examples"] = [
        {"prompt": merged_content(e.prompt[-1]), "reference": e.reference,
         **{w: results[w].answers[i] for w in results},
         "scores": {w: {m.name: results[w].scored[m.name].per_example[i] for m in metrics} for w in results}}
        for i, e in enumerate(examples)]
    return report


def _model_summary(r: Scoring, metrics: list[Metric]) -> dict[str, Any]:
    out: dict[str, Any] = {"perplexity": perplexity(r.nll)}
    for m in metrics:
        scored = r.scored[m.name]
        out[m.name] = None if scored.value is None else round(scored.value, 2)
        if m.short_only:
            out[f"{m.name}_n"] = len(scored.applies)
        out |= {f"{m.name}_{k}": v for k, v in scored.extra.items()}
    out |= answer_health(r.answers, r.finish)
    out |= {"generation_seconds": round(r.seconds, 2), "generated_tokens": r.generated_tokens}
    return out


def verdict(comparisons: dict[str, dict], labels: dict[str, str]) -> str:
    """Which gains hold (significant against every base scored), then each base's better / worse / n.s."""
    if not comparisons:
        return ""
    names = {"perplexity": "perplexity", **labels}
    keys = list(next(iter(comparisons.values())))
    held = [names[k] for k in keys if all(comparisons[b][k].get("verdict") == "better" for b in comparisons)]
    against = "both bases" if len(comparisons) > 1 else "the base"
    parts = [f"Gain that holds against {against}: {', '.join(held) if held else 'none'}."]
    for b, comp in comparisons.items():
        groups = {v: [names[k] for k in keys if comp[k].get("verdict", "not significant") == v]
                  for v in ("better", "worse", "not significant")}
        said = "; ".join(f"{v} on {', '.join(ks)}" for v, ks in groups.items() if ks)
        parts.append(f"Against the {NAMES[b]}: tuned {said}.")
    return " ".join(parts)


def _summary(r: Scoring, metrics: list[Metric]) -> str:
    scores = ", ".join(f"{m.name} {r.scored[m.name].value:.2f}" for m in metrics if r.scored[m.name].value is not None)
    ppl = perplexity(r.nll)
    return f"perplexity {ppl if ppl is None else f'{ppl:.2f}'}, {scores} ({r.seconds:.1f} s generating)"


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
