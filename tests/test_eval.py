"""evaluate/: held-out examples, both baselines, reply perplexity, metrics, bootstrap intervals, eval.json/md/png."""
from __future__ import annotations

import json

import pytest
from helpers import make_run


@pytest.fixture(scope="module")
def report(llama_run):
    from lorafit.evaluate.run import evaluate
    from lorafit.run_dir import load_run_config

    return evaluate(llama_run, load_run_config(llama_run, {"max_samples": 6}))


def test_eval_writes_json_markdown_and_chart(llama_run, report, capsys):
    saved = json.loads((llama_run / "eval.json").read_text())
    assert saved["settings"]["samples"] == 6 and saved["settings"]["split"] == "held-out split"
    assert saved["settings"]["dataset"] == "demo" and saved["settings"]["seed"] == 42
    for which in ("base", "tuned"):
        m = saved[which]
        assert m["perplexity"] > 1 and 0 <= m["rouge_l"] <= 100 and 0 <= m["bleu"] <= 100
        assert m["exact_match_n"] == 6 and 0 <= m["exact_match"] <= 100  # demo answers are all short
    assert saved["base"]["perplexity"] != saved["tuned"]["perplexity"]
    assert len(saved["examples"]) == 6 and {"prompt", "reference", "base", "tuned"} <= set(saved["examples"][0])
    # chatml run, chatml tokenizer: the base's own chat template renders the same prompts, so one base
    assert saved["base_chat"] is None and "one base" in saved["settings"]["base_note"]
    for key in ("perplexity", "rouge_l", "bleu", "exact_match"):
        c = saved["comparisons"]["base"][key]
        assert c["low"] <= c["diff"] <= c["high"] and c["wins"] + c["losses"] + c["ties"] == c["n"] == 6
        assert c["verdict"] in ("better", "worse", "not significant")
    assert saved["verdict"].startswith("Gain that holds against the base:")
    md = (llama_run / "eval.md").read_text()
    assert "| Perplexity (lower is better) |" in md and "![base vs tuned](eval.png)" in md
    assert "[95% CI]" in md and "| Empty answers |" in md and "| Looping answers |" in md
    assert (llama_run / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_scores_only_held_out_examples(llama_run, report):
    from lorafit.data.encode import load_conversations, split_conversations
    from lorafit.data.templates import merged_content
    from lorafit.run_dir import load_run_config

    cfg = load_run_config(llama_run)
    train, val, _ = split_conversations(load_conversations(cfg)[0], cfg)
    held_out = {merged_content(c[0]) for c in val}
    trained = {merged_content(c[0]) for c in train}
    prompts = [e["prompt"] for e in report["examples"]]
    assert held_out.isdisjoint(trained)  # else a training prompt could pass the check below
    assert len(set(prompts)) == len(prompts) == 6 and set(prompts) <= held_out


def test_perplexity_is_over_reply_tokens(llama_run):
    import math

    import torch

    from lorafit.data.encode import encode_conversation
    from lorafit.evaluate.run import EvalExample, perplexity, reply_nll
    from lorafit.infer.generate import load_session
    from lorafit.run_dir import load_run_config

    cfg = load_run_config(llama_run)
    s = load_session(llama_run, cfg)
    ex = EvalExample([{"role": "user", "content": "What is 2 + 2?"}], "4")
    ids, labels = encode_conversation(s.template, ex.prompt + [{"role": "assistant", "content": "4"}], s.tokenizer,
                                      512, False, "truncate")
    with torch.no_grad():
        loss = s.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    assert perplexity(reply_nll(s, s.template, [ex], cfg)) == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_perplexity_passes_are_padding_free_and_token_weighted(llama_run):
    """Several answers concatenated in padding-free passes (two here) give the token-weighted mean NLL of the
    answers scored one by one."""
    import dataclasses
    import math

    import torch

    from lorafit.data.encode import encode_conversation
    from lorafit.evaluate.run import EvalExample, perplexity, reply_nll
    from lorafit.infer.generate import load_session
    from lorafit.run_dir import load_run_config

    cfg = load_run_config(llama_run)
    s = load_session(llama_run, cfg)
    exs = [EvalExample([{"role": "user", "content": q}], a)
           for q, a in (("What is 2 + 2?", "4"), ("Name a fruit.", "An apple, or a pear."), ("Say hi.", "hi there"))]
    each, sizes = [], []
    with torch.no_grad():
        for e in exs:
            ids, labels = encode_conversation(s.template, e.prompt + [{"role": "assistant", "content": e.reference}],
                                              s.tokenizer, 512, False, "truncate")
            k = sum(1 for t in labels[1:] if t != -100)
            each.append((float(s.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss) * k, k))
            sizes.append(len(ids))
    budget = max(sizes[0] + sizes[2], sizes[1])  # every answer fits, not all three in one pass
    assert budget < sum(sizes)
    small = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_tokens_per_pass=budget))
    got = reply_nll(s, s.template, exs, small)
    for (nll, k), (want, n) in zip(got, each, strict=True):  # summed per record by its document id
        assert k == n and nll == pytest.approx(want, rel=1e-4)
    total = sum(x for x, _ in each) / sum(k for _, k in each)
    assert perplexity(got) == pytest.approx(math.exp(total), rel=1e-4)


def test_text_metrics_and_normalization():
    from lorafit.evaluate.metrics import is_short_answer, normalize, parse_metrics

    assert normalize("  Paris. ") == normalize("paris") == "paris"
    assert normalize("2,  5, 9!") == "2, 5, 9"
    assert is_short_answer("APPLE") and not is_short_answer("one two three four five six")
    em, bleu, rouge, contains = parse_metrics(["exact_match", "bleu", "rouge_l", "contains"])
    m = em.score(["Paris.", "42", "banana"], ["paris", "42", "apple"])
    assert m.value == pytest.approx(200 / 3, abs=0.01) and len(m.applies) == 3
    assert bleu.score(["Paris.", "42", "banana"], ["paris", "42", "apple"]).value > 0  # effective order
    assert contains.score(["It is Paris, France", "no"], ["paris", "yes"]).per_example == [100.0, 0.0]
    answers, refs = ["the cat sat on the mat today"], ["the cat sat on the mat and then slept all day"]
    assert em.score(answers, refs).value is None and em.score(answers, refs).applies == []
    assert 0 < rouge.score(answers, refs).value < 100


def test_other_dataset_is_evaluated_whole_and_skip_base(llama_run, tmp_path, capsys):
    from lorafit.cli import main

    data = tmp_path / "qa.jsonl"
    rows = [{"instruction": f"What number comes after {n}?", "input": "", "output": str(n + 1)} for n in range(5)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "template.json"):
        (run / f).write_bytes((llama_run / f).read_bytes())
    assert main(["eval", "--adapter_path", str(run), "--dataset", str(data), "--skip_base", "--seed", "1"]) == 0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["base"] is None and saved["tuned"]["exact_match_n"] == 5
    assert saved["settings"] | {"split": "all", "samples": 5, "seed": 1} == saved["settings"]
    assert "| base |" not in (run / "eval.md").read_text()


def test_missing_adapter_path_fails_clearly(tmp_path, capsys):
    from lorafit.cli import main

    assert main(["eval", "--adapter_path", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_other_dataset_is_read_in_its_own_format(tiny_model_dir, tmp_path):
    """A run trained on alpaca data (format, split and column_map saved) evaluates an instruction/response
    file: the saved source settings belong to the run's data, not to --dataset, unless given again."""

    from lorafit.cli import main
    from lorafit.run_dir import load_run_config

    trained_on = "someorg/alpaca-style"  # a hub dataset: its split name means something there
    run = make_run(tmp_path / "run", tiny_model_dir("llama"), template="chatml", dataset=trained_on,
                   dataset_format="alpaca", column_map="question=instruction", dataset_split="train_sft")
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"instruction": f"What comes after {n}?", "response": str(n + 1)} for n in range(3)]))

    cfg = load_run_config(run, {"dataset": str(other)})
    assert (cfg.data.dataset_format, cfg.data.column_map, cfg.data.dataset_split) == ("auto", {}, "train")
    assert cfg.data.template == "chatml"
    same = load_run_config(run, {"dataset": trained_on})
    assert (same.data.dataset_format, same.data.column_map, same.data.dataset_split) == \
        ("alpaca", {"question": "instruction"}, "train_sft")
    given = load_run_config(run, {"dataset_path": str(other), "dataset_format": "instruction"})
    assert given.data.dataset_format == "instruction"

    assert main(["eval", "--adapter_path", str(run), "--dataset", str(other), "--skip_base"]) == 0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["settings"]["samples"] == 3 and saved["examples"][0]["prompt"].startswith("What comes after")


def test_alpaca_run_scores_the_base_both_ways_with_named_metrics(tiny_model_dir, tmp_path):
    """An Instruction:/Response: run: the base through that template and through its own chat template, each
    compared with the tuned model; a user's metric function scored alongside; the answer cap from the references."""

    from lorafit.cli import main

    run = make_run(tmp_path / "run", tiny_model_dir("llama"), template="alpaca")
    fn = tmp_path / "length_metric.py"
    fn.write_text("def words(predictions, references):\n    return [len(p.split()) for p in predictions]\n")
    assert main(["eval", "--adapter_path", str(run), "--max_samples", "4", "--eval_max_new_tokens", "auto",
                 "--metrics", f"rouge_l,chrf,{fn}:words", "--bootstrap_samples", "200"]) == 0
    saved = json.loads((run / "eval.json").read_text())
    s = saved["settings"]
    assert s["template"] == "alpaca" and s["metrics"] == ["rouge_l", "chrf", f"{fn}:words"]
    assert s["max_new_tokens"] == 16 and s["max_new_tokens_rule"].startswith("auto")  # short demo answers: the floor
    assert saved["base"] and saved["base_chat"] and set(saved["comparisons"]) == {"base", "base_chat"}
    assert saved["base"]["perplexity"] != saved["base_chat"]["perplexity"]  # other prompts, other NLL
    for base in ("base", "base_chat"):
        assert set(saved["comparisons"][base]) == {"perplexity", "rouge_l", "chrf", f"{fn}:words"}
    words = [len(e["tuned"].split()) for e in saved["examples"]]
    assert saved["tuned"][f"{fn}:words"] == pytest.approx(sum(words) / 4, abs=0.01)
    assert saved["verdict"].startswith("Gain that holds against both bases:")
    md = (run / "eval.md").read_text()
    assert "| metric | base, run's template | base, own chat template | tuned |" in md
    assert "tuned − base, own chat template [95% CI]" in md and "words (length_metric.py)" in md


def test_bad_metric_fails_before_the_model_loads(llama_run, capsys, monkeypatch):
    import lorafit.evaluate.run
    from lorafit.cli import main

    monkeypatch.setattr(lorafit.evaluate.run, "load_session", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["eval", "--adapter_path", str(llama_run), "--metrics", "rouge_l,missing.py:f"]) == 2
    err = capsys.readouterr().err
    assert "metric 'missing.py:f': file 'missing.py' does not exist" in err and "Traceback" not in err
    assert main(["eval", "--adapter_path", str(llama_run), "--eval_max_new_tokens", "lots"]) == 2
    assert "'eval_max_new_tokens' must be a number or auto" in capsys.readouterr().err


def test_tuned_answers_come_from_the_merged_model(tiny_model_dir, tmp_path, monkeypatch):
    """The bases answer through the PeftModel with its adapter off; the tuned model through the merged weights (no
    LoRA layers per token: on SmolLM2-135M the unmerged adapter cost 1.19x the base's wall time, merged 1.00x)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    import lorafit.evaluate.run as run_mod
    from lorafit.run_dir import load_run_config

    seen = []
    real = run_mod.generate_answers

    def spy(session, template, *args):
        layers = [m for m in session.model.modules() if isinstance(m, BaseTunerLayer)]
        seen.append((isinstance(session.model, PeftModel), bool(layers) and all(m.disable_adapters for m in layers)))
        return real(session, template, *args)

    monkeypatch.setattr(run_mod, "generate_answers", spy)
    run = make_run(tmp_path / "run", tiny_model_dir("llama"), template="alpaca")
    run_mod.evaluate(run, load_run_config(run, {"max_samples": 2, "bootstrap_samples": 20, "eval_max_new_tokens": 4}))
    assert seen[:2] == [(True, True), (True, True)], "both bases: the PeftModel with its adapter switched off"
    assert seen[2:] == [(False, False)], "the tuned model must answer with its adapter merged in memory"
