"""evaluate/compare.py, metrics.py and user_fn.py without a model: bootstrap intervals, wins, loops, user functions."""
from __future__ import annotations

import math

import pytest


def _scored(values):
    from lorafit.evaluate.metrics import Scored

    return Scored(sum(values) / len(values), list(values))


def test_paired_bootstrap_interval_and_verdicts():
    from lorafit.evaluate.compare import compare_metric
    from lorafit.evaluate.metrics import parse_metrics

    rouge = parse_metrics(["rouge_l"])[0]
    base = [float(10 + (i * 37) % 50) for i in range(100)]
    same = compare_metric(rouge, _scored(base), _scored(base), 1000, 0)
    assert same["diff"] == same["low"] == same["high"] == 0 and same["verdict"] == "not significant"
    assert (same["wins"], same["losses"], same["ties"]) == (0, 0, 100)
    up = compare_metric(rouge, _scored([b + 5 + (i % 3) for i, b in enumerate(base)]), _scored(base), 1000, 0)
    assert up["verdict"] == "better" and 0 < up["low"] < up["diff"] < up["high"] and up["wins"] == 100
    noisy = [b + (8 if i % 2 else -8) + (0.5 if i % 5 == 0 else 0) for i, b in enumerate(base)]
    spread = compare_metric(rouge, _scored(noisy), _scored(base), 1000, 0)
    assert spread["low"] < 0 < spread["high"] and spread["verdict"] == "not significant"
    assert (spread["wins"], spread["losses"]) == (50, 50)
    down = compare_metric(rouge, _scored(base), _scored([b + 5 for b in base]), 1000, 0)
    assert down["verdict"] == "worse"
    assert compare_metric(rouge, _scored(noisy), _scored(base), 1000, 0) == spread  # fixed seed: same interval


def test_bleu_bootstrap_recomputes_the_corpus_score_on_resampled_sets():
    import numpy as np
    from sacrebleu.metrics import BLEU

    from lorafit.evaluate.compare import _resample, compare_metric
    from lorafit.evaluate.metrics import parse_metrics

    bleu = parse_metrics(["bleu"])[0]
    refs = [f"the {w} sat on the mat near the door" for w in ("cat", "dog", "bird", "fox", "cow", "owl")] * 3
    tuned = [r.replace("near", "by") for r in refs]
    base = [" ".join(r.split()[:4]) for r in refs]
    t, b = bleu.score(tuned, refs), bleu.score(base, refs)
    corpus = BLEU(effective_order=True)
    assert t.value == pytest.approx(corpus.corpus_score(tuned, [refs]).score, abs=1e-3)
    assert b.extra["brevity_penalty"] < 0.7  # half-length answers: BLEU says so
    rows = _resample(len(refs), 1, 3)[0]
    by_hand = corpus.corpus_score([tuned[i] for i in rows], [[refs[i] for i in rows]]).score
    assert bleu.value_at(t, rows) == pytest.approx(by_hand, abs=1e-6)
    c = compare_metric(bleu, t, b, 200, 3)
    assert c["low"] <= c["diff"] <= c["high"] and c["verdict"] == "better"
    assert c["diff"] == pytest.approx(t.value - b.value, abs=1e-3)
    assert np.isfinite([c["low"], c["high"]]).all()


def test_perplexity_difference_from_per_example_nll_sums():
    from lorafit.evaluate.compare import compare_perplexity

    base = [(2.0 * n, n) for n in range(5, 45)]
    tuned = [(1.5 * n, n) for n in range(5, 45)]
    c = compare_perplexity(tuned, base, 500, 0)
    assert c["diff"] == pytest.approx(math.exp(1.5) - math.exp(2.0), abs=1e-3)
    assert c["verdict"] == "better" and c["wins"] == 40 and c["high"] < 0
    assert compare_perplexity(base, base, 500, 0)["verdict"] == "not significant"
    assert compare_perplexity([None, *tuned[1:]], base, 500, 0)["n"] == 39  # a reply that did not fit is left out


def test_looping_empty_and_capped_answers():
    from lorafit.evaluate.metrics import answer_health, is_looping

    assert is_looping("1.1.1.1.1.1.1.1.1.1.1.1.1.1.1")
    assert is_looping("Here are tips. Drink water. Drink water. Drink water. Drink water. Drink water. Drink water.")
    assert not is_looping("Drink water, sleep well, walk every day and eat vegetables with most of your meals.")
    assert not is_looping("1 1 1")  # too short to call
    h = answer_health(["", "ok", "a b " * 20], ["stop", "stop", "length"])
    assert h == {"empty": 1, "looping": 1, "capped": 1, "capped_share": pytest.approx(1 / 3, abs=1e-3)}


def test_unknown_metric_fails_clearly():
    from lorafit.errors import UserError
    from lorafit.evaluate.metrics import parse_metrics

    with pytest.raises(UserError, match="unknown metric 'bleu4'") as e:
        parse_metrics(["rouge_l", "bleu4"])
    assert "file.py:function_name" in str(e.value)
    assert [m.name for m in parse_metrics(["chrf", "chrf", " bleu "])] == ["chrf", "bleu"]


def test_user_function_metric(tmp_path):
    from lorafit.evaluate.metrics import parse_metrics

    f = tmp_path / "my_metrics.py"
    f.write_text("def starts_same(predictions, references):\n"
                 "    return [float(p[:1] == r[:1]) for p, r in zip(predictions, references)]\n")
    m = parse_metrics([f"{f}:starts_same"])[0]
    s = m.score(["apple", "pear", "fig"], ["ant", "bee", "fox"])
    assert s.per_example == [1.0, 0.0, 1.0] and s.value == pytest.approx(2 / 3, abs=1e-4)
    assert m.label == "starts_same (my_metrics.py)"


@pytest.mark.parametrize("source, spec, message", [
    (None, "missing.py:f", "does not exist"),
    ("def f(:\n", "{path}:f", "importing .* failed: SyntaxError"),
    ("import not_a_module_xyz\n", "{path}:f", "failed: ModuleNotFoundError"),
    ("def g(p, r):\n    return [0.0] * len(p)\n", "{path}:f", "defines no 'f'.*\n  fix: use one of: g"),
    ("f = 3\n", "{path}:f", "is a int, not a function"),
    ("def f(p, r):\n    return 1.0\n", "{path}:f", "returned a float, not a list of 2 numbers"),
    ("def f(p, r):\n    return [1.0]\n", "{path}:f", "returned 1 values for 2 examples"),
    ("def f(p, r):\n    return ['a', 1.0]\n", "{path}:f", "returned 'a' for example 0"),
    ("def f(p, r):\n    return [float('nan'), 1.0]\n", "{path}:f", "returned nan for example 0"),
    ("def f(p, r):\n    return [1 / 0] * 2\n", "{path}:f", r"raised ZeroDivisionError: division by zero \(at m.py:2\)"),
])
def test_user_function_errors_name_the_file_and_the_fix(tmp_path, source, spec, message):
    from lorafit.errors import UserError
    from lorafit.user_fn import call_per_example, load_callable

    path = tmp_path / "m.py"
    if source is not None:
        path.write_text(source)
    spec = spec.format(path=path) if source is not None else str(tmp_path / spec)
    with pytest.raises(UserError, match=message) as e:
        fn = load_callable(spec, "metric")
        call_per_example(fn, f"metric '{spec}'", ["a", "b"], ["a", "c"])
    assert e.value.fix


def test_callable_spec_form():
    from lorafit.errors import UserError
    from lorafit.user_fn import is_callable_spec, load_callable

    assert is_callable_spec("rewards/len.py:score") and is_callable_spec("C:/x/y.py:f")
    assert not is_callable_spec("rouge_l") and not is_callable_spec("file.py") and not is_callable_spec("file.py:")
    with pytest.raises(UserError, match="not of the form path/to/file.py:function_name"):
        load_callable("reward_len", "reward")
