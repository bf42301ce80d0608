"""DPO / ORPO / KTO: loss math on fixed log-probs, ln 2 at step 1, learning a preference, eval, bad data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import cli_main, pair_records, run_train, train_args, write_jsonl

from lorafit.train.objectives.dpo import dpo_losses
from lorafit.train.objectives.kto import kl_baseline, kto_losses
from lorafit.train.objectives.orpo import orpo_losses


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_losses_by_hand():
    # chosen log-ratio +1, rejected -1: h = 2, beta h = 0.2
    pc, pr, rc, rr = _t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0)
    assert float(dpo_losses(pc, pr, rc, rr, 0.1, "sigmoid")) == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-12)
    assert float(dpo_losses(pc, pr, rc, rr, 0.1, "hinge")) == pytest.approx(0.8, abs=1e-12)
    assert float(dpo_losses(pc, pr, rc, rr, 0.1, "ipo")) == pytest.approx((2 - 5) ** 2, abs=1e-12)  # 1/(2 beta) = 5
    assert float(dpo_losses(pc, pr, rc, rr, 0.5, "hinge")) == pytest.approx(0.0)  # beta h = 1: no loss left
    assert float(dpo_losses(pc, pc, pc, pc, 0.1, "sigmoid")) == pytest.approx(math.log(2))


def test_orpo_loss_by_hand():
    # p_w = 0.5, p_l = 0.25 per token: log odds 0 and ln(1/3); the ratio term is -log sigmoid(ln 3) = ln(4/3)
    loss, nll, log_odds = orpo_losses(_t(math.log(0.5)), _t(math.log(0.25)), 0.1)
    assert float(log_odds) == pytest.approx(math.log(3), abs=1e-9)
    assert float(nll) == pytest.approx(math.log(2), abs=1e-12)
    assert float(loss) == pytest.approx(math.log(2) + 0.1 * math.log(4 / 3), abs=1e-9)


def test_kto_loss_by_hand():
    policy, ref = _t(-10.0, -10.0), _t(-12.0, -7.0)  # log-ratios +2 and -3
    desirable = torch.tensor([True, False])
    got = kto_losses(policy, ref, desirable, _t(0.5)[0], 0.1, 1.0, 2.0)
    def sig(x):
        return 1 / (1 + math.exp(-x))
    assert got.tolist() == pytest.approx([1 - sig(0.1 * (2 - 0.5)), 2 * (1 - sig(0.1 * (0.5 + 3)))], abs=1e-12)
    assert float(kl_baseline(_t(-5.0, -7.0), _t(-6.0, -5.0))) == 0.0  # mean -0.5 clamps to 0
    assert float(kl_baseline(_t(-5.0, -4.0), _t(-6.0, -6.0))) == pytest.approx(1.5)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_records(24))


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_starts_at_ln2_and_learns_the_preference(tiny_model_dir, pairs, tmp_path):
    """Policy = reference at step 1 (LoRA B = 0), so the loss is ln 2; 30 steps later the tuned model prefers
    the chosen reply on > 90% of the training pairs, where the base sits near chance."""
    from lorafit.evaluate.preference import reward_metrics, score_examples, summarize
    from lorafit.run_dir import load_run_config

    out = run_train(**train_args(tiny_model_dir("llama"), pairs, tmp_path / "run", method="dpo", max_steps=30,
                                 learning_rate=5e-3, lora_dropout=0, val_size=0))
    recs = [r for r in _metrics(out) if "loss" in r]
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert recs[0]["margin"] == 0.0 and recs[0]["rewards/chosen"] == 0.0
    assert sum(r["accuracy"] for r in recs[-5:]) / 5 > 0.9
    assert recs[-1]["loss"] < 0.6 < math.log(2)

    from lorafit.data.preference import prepare_preference
    from lorafit.infer.generate import load_session

    cfg = load_run_config(out)
    session = load_session(out, cfg, merge=False)  # the base is the adapter switched off
    data = prepare_preference(cfg, session.tokenizer)
    with session.model.disable_adapter():
        base = score_examples(session.model, data.train, cfg)
    tuned = score_examples(session.model, data.train, cfg)
    assert 20 <= summarize(base)["accuracy"] <= 80  # chance, give or take the replies' lengths
    assert reward_metrics(base, tuned, 0.1)["reward_accuracy"] > 90


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_train_and_log_their_metrics(tiny_model_dir, pairs, tmp_path, method):
    out = run_train(**train_args(tiny_model_dir("llama"), pairs, tmp_path / method, method=method, max_steps=3,
                                 eval_strategy="steps", eval_steps=3, preview_steps=3))
    recs = _metrics(out)
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    assert {"margin", "accuracy"} <= set(steps[0])
    assert ("nll" in steps[0]) == (method == "orpo") and ("kl" in steps[0]) == (method == "kto")
    if method == "kto":
        assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # r = z = 0: 1 - sigmoid(0) for every completion
    *_, val = [r for r in recs if "val_loss" in r]  # step 0 (the baseline) and the last step
    assert val["val_units"] == 4 and 0 <= val["val_accuracy"] <= 1 and "val_margin" in val  # held-out pairs
    assert (out / "adapter_model.safetensors").is_file()
    previews = [json.loads(x) for x in (out / "previews.jsonl").read_text().splitlines()]
    assert len(previews) == 2 and previews[0]["prompt"]  # the held-out pairs' prompts


def test_bad_pair_data_is_exit_2_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "q", "output": "a"}] * 4)
    args = train_args(tiny_model_dir("llama"), bad, tmp_path / "run", method="dpo")
    argv = ["train"] + [x for k, v in args.items() for x in (f"--{k}", v)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "has no 'chosen'" in err and "--method sft" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": "maybe"}] * 4)
    args = train_args(tiny_model_dir("llama"), kto, tmp_path / "run2", method="kto")
    assert cli_main(["train"] + [x for k, v in args.items() for x in (f"--{k}", v)]) == 2
    assert "'label' is 'maybe'" in capsys.readouterr().err


def test_ref_adapter_is_the_reference(tiny_model_dir, pairs, tmp_path):
    """DPO after another run: that adapter is the reference (step 1 is no longer ln 2), kept under reference/."""
    model = tiny_model_dir("llama")
    sft = run_train(**train_args(model, pairs, tmp_path / "first", method="orpo", max_steps=2, learning_rate=5e-2))
    out = run_train(**train_args(model, pairs, tmp_path / "dpo", method="dpo", max_steps=2, ref_adapter=sft))
    first = next(r for r in _metrics(out) if "loss" in r)
    assert math.isfinite(first["loss"]) and abs(first["loss"] - math.log(2)) > 1e-3
    assert (out / "reference" / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_resume_matches_a_straight_run(tiny_model_dir, pairs, tmp_path):
    """A resumed run recomputes the reference log-probs it has not cached (the same values) and lands on the
    straight run's losses and adapter."""
    import shutil

    from helpers import assert_same_adapter, losses

    common = {"method": "dpo", "max_steps": 4, "lora_dropout": 0, "save_strategy": "steps", "save_steps": 2,
              "learning_rate": 5e-3}
    straight = run_train(**train_args(tiny_model_dir("llama"), pairs, tmp_path / "straight", **common))
    run = Path(shutil.copytree(straight, tmp_path / "resumed"))
    shutil.rmtree(run / "checkpoints" / "step-000004")
    assert cli_main(["train", "--output_dir", str(run), "--resume"]) == 0
    assert losses(run) == pytest.approx(losses(straight), rel=1e-5)
    assert_same_adapter(run, straight, atol=1e-6)


def test_eval_on_a_preference_run(tiny_model_dir, pairs, tmp_path):
    """`lorafit eval` on a DPO run: held-out accuracy and margin for base and tuned, answers side by side."""
    out = run_train(**train_args(tiny_model_dir("llama"), pairs, tmp_path / "run", method="dpo", max_steps=2))
    assert cli_main(["eval", "--adapter_path", str(out), "--eval_max_new_tokens", "4"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["split"] == "held-out split" and report["settings"]["samples"] == 4
    assert report["base"]["pairs"] == 4 and 0 <= report["tuned"]["accuracy"] <= 100
    assert report["tuned"]["reward_accuracy"] is not None and "reward_margin" in report["tuned"]
    assert len(report["examples"]) == 4 and {"chosen", "rejected", "base", "tuned"} <= set(report["examples"][0])
    assert "| Preference accuracy % (log-prob) |" in (out / "eval.md").read_text()
