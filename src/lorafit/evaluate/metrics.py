"""Task metrics for `lorafit eval`: what each answer scores, what the whole set scores, and which answers failed.

    metrics = parse_metrics(["rouge_l", "bleu", "my_metrics.py:keyword_hit"])   # UserError before any model loads
    scored = metrics[0].score(answers, references)   # Scored: headline value + one score per example

Built-ins, each on a 0-100 scale:
  exact_match  answer == reference after normalize(), on short-reference examples only (<= 5 words):
               on long references it is ~0 for every model and says nothing;
  contains     the normalized reference appears in the normalized answer (short-reference examples only);
  rouge_l      ROUGE-L F1 (rouge-score, Porter stemming), the mean over examples;
  bleu, chrf   sacrebleu's corpus scores (BLEU with effective order: a set of one-word answers has no 4-grams).
A corpus score is not the mean of sentence scores, so these keep sacrebleu's sentence statistics and
`value_at` recomputes the corpus score on any resampled set (as sacrebleu's own paired bootstrap does).
A user's `file.py:name` is called as name(predictions, references) and returns one float per example;
its headline value is the mean, on the scale it returns.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorafit.errors import UserError
from lorafit.user_fn import call_per_example, is_callable_spec, load_callable

SHORT_ANSWER_WORDS = 5
BUILTIN = ("exact_match", "contains", "rouge_l", "bleu", "chrf")
LABELS = {"exact_match": "Exact match %", "contains": "Contains reference %", "rouge_l": "ROUGE-L", "bleu": "BLEU",
          "chrf": "chrF"}
LOOP_MIN_TOKENS = 12
_WORDS = re.compile(r"\w+|[^\w\s]")


@dataclass
class Scored:
    """One model's answers under one metric."""

    value: float | None
    """The headline number (None when no example applies)."""
    per_example: list[float | None]
    """Each example's score, None where the metric does not apply (exact match on a long reference)."""
    stats: Any = None
    """Corpus metrics: sacrebleu's sentence statistics, (n, k) int array, for recomputing on resampled sets."""
    extra: dict = field(default_factory=dict)
    """What else the score says (BLEU's brevity penalty: < 1 when answers are shorter than references)."""

    @property
    def applies(self) -> list[int]:
        return [i for i, v in enumerate(self.per_example) if v is not None]


@dataclass
class Metric:
    name: str
    label: str
    example_fn: Callable[[list[str], list[str]], list[float]] | None = None
    sacrebleu: Callable[[], Any] | None = None
    """Factory of the sacrebleu metric object (bleu, chrf)."""
    short_only: bool = False
    _scorer: Any = field(default=None, repr=False)

    def score(self, answers: Sequence[str], references: Sequence[str]) -> Scored:
        if self.sacrebleu is not None:
            return self._corpus(list(answers), list(references))
        rows = [i for i, r in enumerate(references) if not self.short_only or is_short_answer(r)]
        values: list[float | None] = [None] * len(references)
        if rows:
            scores = self.example_fn([answers[i] for i in rows], [references[i] for i in rows])
            for i, v in zip(rows, scores, strict=True):
                values[i] = v
        scored = [v for v in values if v is not None]
        return Scored(round(sum(scored) / len(scored), 4) if scored else None, values)

    def value_at(self, scored: Scored, rows) -> float:
        """The headline value over the examples `rows` (with repeats: a bootstrap resample)."""
        if self.sacrebleu is not None:
            return float(self._metric()._compute_score_from_stats(scored.stats[rows].sum(0)).score)
        return sum(scored.per_example[i] for i in rows) / max(len(rows), 1)

    def _corpus(self, answers: list[str], references: list[str]) -> Scored:
        import numpy as np

        metric = self._metric()
        # sacrebleu's sentence statistics: what corpus_score sums, kept to recompute it on resampled sets
        stats = np.asarray(metric._extract_corpus_statistics(answers, [references]), dtype=np.int64)
        corpus = metric._compute_score_from_stats(stats.sum(0))
        sentence = [round(float(metric._compute_score_from_stats(row).score), 4) for row in stats]
        extra = {"brevity_penalty": round(float(corpus.bp), 4)} if hasattr(corpus, "bp") else {}
        return Scored(round(float(corpus.score), 4), sentence, stats, extra)

    def _metric(self):
        if self._scorer is None:
            self._scorer = self.sacrebleu()
        return self._scorer


def parse_metrics(names: Sequence[str]) -> list[Metric]:
    """The metrics `--metrics` names, in order, without repeats; a wrong name or file is a UserError now."""
    out: list[Metric] = []
    for name in dict.fromkeys(str(n).strip() for n in names if str(n).strip()):
        out.append(_metric_named(name))
    return out


def _metric_named(name: str) -> Metric:
    if is_callable_spec(name):
        fn = load_callable(name, "metric")
        label = f"{name.rpartition(':')[2]} ({name.rpartition(':')[0].rsplit('/', 1)[-1]})"
        return Metric(name, label, example_fn=lambda a, r: call_per_example(fn, f"metric '{name}'", a, r))
    if name == "perplexity":
        raise UserError("perplexity is always reported", fix="leave it out of --metrics")
    if name not in BUILTIN:
        raise UserError(f"unknown metric '{name}'",
                        fix=f"use {', '.join(BUILTIN)} or a Python function as path/to/file.py:function_name")
    if name == "bleu":
        return Metric(name, LABELS[name], sacrebleu=_bleu)
    if name == "chrf":
        return Metric(name, LABELS[name], sacrebleu=_chrf)
    fns = {"exact_match": _exact_match, "contains": _contains, "rouge_l": _rouge_l}
    return Metric(name, LABELS[name], example_fn=fns[name], short_only=name in ("exact_match", "contains"))


def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)


def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def _exact_match(answers: list[str], references: list[str]) -> list[float]:
    return [100.0 * (normalize(a) == normalize(r)) for a, r in zip(answers, references, strict=True)]


def _contains(answers: list[str], references: list[str]) -> list[float]:
    return [100.0 * (normalize(r) in normalize(a)) for a, r in zip(answers, references, strict=True)]


def _rouge_l(answers: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [round(100 * scorer.score(r, a)["rougeL"].fmeasure, 4) for a, r in zip(answers, references, strict=True)]


def normalize(text: str) -> str:
    """Strip, case-fold, collapse spaces, drop trailing punctuation: '  Paris. ' == 'paris'."""
    text = re.sub(r"\s+", " ", text.strip().casefold())
    return re.sub(r"[\s.!?,;:'\"]+$", "", text)


def is_short_answer(reference: str) -> bool:
    return 0 < len(normalize(reference).split()) <= SHORT_ANSWER_WORDS


# -- answers that went wrong ------------------------------------------------------------------------------

def is_looping(text: str) -> bool:
    """True when the second half of the answer (>= 12 word/punctuation tokens) is one n-gram repeated,
    e.g. '1.1.1.1...' or a sentence said over and over until the length cap."""
    tokens = _WORDS.findall(text)
    tail = tokens[len(tokens) // 2:]
    if len(tokens) < LOOP_MIN_TOKENS or len(tail) < 4:
        return False
    return any(all(tail[i] == tail[i - n] for i in range(n, len(tail))) for n in range(1, len(tail) // 2 + 1))


def answer_health(answers: Sequence[str], finish_reasons: Sequence[str]) -> dict[str, Any]:
    """Counts of empty, looping and length-capped answers (a capped answer may be cut mid-sentence)."""
    n = max(len(answers), 1)
    capped = sum(f == "length" for f in finish_reasons)
    return {"empty": sum(not a.strip() for a in answers), "looping": sum(is_looping(a) for a in answers),
            "capped": capped, "capped_share": round(capped / n, 4)}
