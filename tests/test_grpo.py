"""GRPO: advantage and loss math on fixed numbers, prompt data, reward errors (exit 2), learning and exact resume."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import alpaca_records, assert_same_adapter, cli_main, losses, run_train

from lorafit.train.objectives.grpo import EPS, aggregate, count_units, group_advantages, per_token_loss

# -- the math, by hand ----------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    adv, std = group_advantages(rewards, 4, "group")
    s1 = math.sqrt(4 * 0.5 ** 2 / 3)  # unbiased std of (1, 0, 0, 1)
    s3 = math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 3)  # of (3, 0, 0, 0), mean 0.75
    want = [0.5 / (s1 + EPS), -0.5 / (s1 + EPS), -0.5 / (s1 + EPS), 0.5 / (s1 + EPS), 0, 0, 0, 0,
            2.25 / (s3 + EPS), -0.75 / (s3 + EPS), -0.75 / (s3 + EPS), -0.75 / (s3 + EPS)]
    assert adv.tolist() == pytest.approx(want, abs=1e-12)
    assert std.tolist() == pytest.approx([s1] * 4 + [0] * 4 + [s3] * 4, abs=1e-12)
    plain, _ = group_advantages(rewards, 4, "none")  # Dr. GRPO: no division
    assert plain.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 2.25, -0.75, -0.75, -0.75])
    batch, _ = group_advantages(rewards, 4, "batch", batch_std=2.0)
    assert batch.tolist() == pytest.approx([x / (2.0 + EPS) for x in plain.tolist()])


def test_clipped_loss_and_kl_by_hand():
    """Ratios 1.5 / 0.5 against advantages +1 / -1 with epsilon 0.2: the min picks the clipped side exactly when
    the ratio left the trust region in the advantage's direction; KL is k3 = e^d - d - 1, d = ref - logp."""
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)]], dtype=torch.float64,
                        requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    ref = torch.tensor([[0.0, -1.0, 1.0, 0.5]], dtype=torch.float64)
    loss, kl, clipped = per_token_loss(logp, old, ref, adv, epsilon=0.2, beta=0.0)
    # token 0: A>0, ratio 1.5 -> min(1.5, 1.2) = 1.2; token 1: A<0, ratio 0.5 -> min(-0.5, -0.8) = -0.8;
    # token 2: A<0, ratio 1.5 -> min(-1.5, -1.2) = -1.5 (unclipped); token 3: A>0, ratio 0.5 -> 0.5 (unclipped)
    assert loss.tolist()[0] == pytest.approx([-1.2, 0.8, 1.5, -0.5])
    assert clipped.tolist()[0] == [True, True, False, False]
    d = (ref - logp).detach()
    assert kl.tolist()[0] == pytest.approx((torch.exp(d) - d - 1).tolist()[0])
    assert kl.tolist()[0][0] == pytest.approx(math.exp(-math.log(1.5)) + math.log(1.5) - 1)
    loss.sum().backward()
    # clipped tokens pass no gradient; unclipped ones -A * ratio (d ratio / d logp = ratio)
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, 1.5, -0.5])
    with_kl, _, _ = per_token_loss(logp.detach(), old, ref, adv, epsilon=0.2, beta=0.5)
    assert (with_kl - loss.detach()).tolist()[0] == pytest.approx((0.5 * kl).tolist()[0])


def test_on_policy_gradient_is_the_policy_gradient():
    """One update per rollout: old = logp detached, ratio 1, so d loss / d logp = -A on every token."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv = torch.tensor([[0.7]])
    loss, _, clipped = per_token_loss(logp, logp.detach(), None, adv, 0.2, 0.0)
    loss.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([-0.7] * 3) and not clipped.any()


def test_aggregation_and_units_per_loss_type():
    loss = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    m = mask.float()
    assert float(aggregate(loss, m, "grpo")) == pytest.approx(2.0 + 4.0)  # per-completion means, summed
    assert count_units(mask, "grpo", 8) == 2
    assert float(aggregate(loss, m, "dapo")) == pytest.approx(10.0) and count_units(mask, "dapo", 8) == 4
    assert count_units(mask, "bnpo", 8) == 4
    assert float(aggregate(loss, m, "dr_grpo")) == pytest.approx(10.0) and count_units(mask, "dr_grpo", 8) == 16


def test_completion_mask_keeps_the_first_end_of_text():
    from lorafit.train.rollout import completion_mask_of

    c = torch.tensor([[5, 6, 2, 2], [5, 2, 7, 2], [5, 6, 7, 8]])
    assert completion_mask_of(c, {2}).tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_logps_do_not_depend_on_padding(tiny_model_dir):
    """A completion's log-probs in a left-padded, trimmed batch row equal those of the row alone (positions restart
    after the padding; the head runs on the completion tokens only), and sum to the model's own log-likelihood."""
    from transformers import AutoModelForCausalLM

    from lorafit.train.objectives.grpo import _slice, completion_logps
    from lorafit.train.rollout import Rollout

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    pad = 0
    ids = torch.tensor([[pad, pad, pad, 5, 6, 7, 20, 21, 2], [pad, 8, 9, 10, 11, 12, 22, 2, pad],
                        [pad, pad, 13, 14, 15, 16, 23, 24, 25]])
    prompt_mask = (torch.arange(6)[None, :] >= torch.tensor([[3], [1], [2]])).long()
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    roll = Rollout(ids, torch.cat([prompt_mask, completion_mask], dim=1), completion_mask, 6, ["", "", ""])
    b = _slice(roll, slice(0, 2))  # rows 0-1: one column of padding that both have goes
    assert b["input_ids"].shape == (2, 8) and b["completion_mask"].shape == (2, 3)
    with torch.no_grad():
        batched = completion_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"], 1.0)
        alone = completion_logps(model, torch.tensor([[5, 6, 7, 20, 21, 2]]), torch.ones(1, 6, dtype=torch.long),
                                 torch.tensor([[1, 1, 1]]), 1.0)
        logits = model(torch.tensor([[5, 6, 7, 20, 21, 2]])).logits[0, 2:5].log_softmax(-1)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    assert float(alone.sum()) == pytest.approx(float(logits[[0, 1, 2], [20, 21, 2]].sum()), abs=1e-5)
    assert float(batched[1, 2]) == 0.0  # past the end-of-text: masked


# -- rewards and prompt data ----------------------------------------------------------------------------


def test_builtin_rewards():
    from lorafit.train.rewards import build_rewards, score

    rw = build_rewards(["conciseness", "length", "exact_match", "contains:answer", "regex:^\\d+$"], [], max_words=3)
    got = score(rw, ["p", "p"], ["42", "it is 42 or so"], {"reference": ["42", "41"], "answer": ["42", "42"]}, 2)
    assert got[0] == [1.0, 3 / 5]  # within 3 words; 5 words -> 3/5
    assert got[1] == [-0.02, -0.14]
    assert got[2] == [1.0, 0.0] and got[3] == [1.0, 1.0] and got[4] == [1.0, 0.0]


def _cfg(dataset, **fields):
    from lorafit.config.load import build_config

    return build_config(None, {"dataset": str(dataset), "method": "grpo", "reward_funcs": "length",
                               "temperature": "1.0", **fields})


def test_prompt_rows_from_each_format(tmp_path):
    from lorafit.data.prompts import load_prompt_rows

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": "4"}) + "\n"
                 + json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "drop me"}], "answer": "x"}) + "\n")
    rows, fmt, _ = load_prompt_rows(_cfg(p))
    assert fmt == "prompt" and rows[0].prompt == "What is 2 + 2?" and rows[0].columns == {"answer": "4"}
    assert [m["role"] for m in rows[1].messages] == ["system", "user"]
    a = tmp_path / "a.json"
    a.write_text(json.dumps(alpaca_records(3)))
    rows, fmt, _ = load_prompt_rows(_cfg(a))
    rec = alpaca_records(3)[0]
    assert fmt == "alpaca" and rows[0].columns["reference"] == rec["output"]
    assert rows[0].prompt == f"{rec['instruction']}\n\n{rec['input']}"  # instruction and input as the prompt


def test_config_checks():
    from lorafit.config.load import build_config
    from lorafit.errors import ConfigError

    base = {"method": "grpo", "reward_funcs": "length", "temperature": "1.0"}
    for bad, text in (({"reward_funcs": ""}, "needs at least one reward"), ({"num_generations": "1"}, ">= 2"),
                      ({"temperature": "0"}, "temperature 0"), ({"reward_weights": "1,2"}, "2 weights for 1"),
                      ({"packing": "true"}, "packing"), ({"loss_type": "ppo"}, "'loss_type' is 'ppo'")):
        with pytest.raises(ConfigError, match=text):
            build_config(None, {**base, **bad})


# -- reward errors through the CLI: exit 2, the function named, nothing written --------------------------

REWARD_FILE = '''
def wrong_length(prompts, completions, **kw):
    return [1.0]
def text(prompts, completions, **kw):
    return ["good"] * len(completions)
def boom(prompts, completions, **kw):
    return [1 / 0 if "banana" in p else 0.0 for p in prompts]
'''


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["instruction"], "answer": r["output"]}) + "\n"
                            for r in alpaca_records()))
    return path


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir, tmp_path_factory):
    """The tiny llama with its end-of-text made likely: every embedding shares a direction u that the EOS row of
    the head reads, so a random completion ends after ~20 tokens (the plain tiny model almost never ends)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = tiny_model_dir("llama"), tmp_path_factory.mktemp("tiny-eos")
    model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    u /= u.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight += 0.16 * u
        model.lm_head.weight[tok.eos_token_id] += 0.6 * u
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def grpo_args(model_dir, data, out, **fields) -> dict[str, str]:
    args = {"model": model_dir, "dataset": data, "output_dir": out, "method": "grpo", "reward_funcs": "length",
            "max_steps": 6, "per_device_train_batch_size": 4, "num_generations": 8, "max_completion_length": 32,
            "temperature": 1.0, "top_p": 1.0, "top_k": 0, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0,
            "target_modules": "all-linear", "learning_rate": 5e-3, "lr_scheduler_type": "constant",
            "max_seq_length": 64, "logging_steps": 100, "report_to": "none", "save_strategy": "no", "seed": 7}
    args.update(fields)
    return {k: str(v) for k, v in args.items()}


@pytest.mark.parametrize("spec,expected", [
    ("missing.py:fn", ["reward function 'missing.py:fn'", "does not exist"]),
    ("broken.py:fn", ["importing", "SyntaxError"]),
    ("rewards.py:nothing", ["defines no 'nothing'", "wrong_length"]),
    ("rewards.py:wrong_length", ["returned a list of 1 for 2 completions"]),
    ("rewards.py:text", ["returned 'good' among its rewards"]),
    ("exact_match:gold", ["column 'gold'", "its columns: answer"]),
    ("shortness", ["unknown reward function 'shortness'"]),
])
def test_reward_errors_exit_2_before_the_model_loads(spec, expected, tiny_model_dir, prompts_file, tmp_path, capsys,
                                                     monkeypatch):
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    (tmp_path / "broken.py").write_text("def fn(:\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    args = grpo_args(tiny_model_dir("llama"), prompts_file, out, reward_funcs=spec)
    assert cli_main(["train", *[x for k, v in args.items() for x in (f"--{k}", v)]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(e in err for e in expected), err
    assert not out.exists()


def test_reward_failing_mid_training_names_the_prompt(eos_model, prompts_file, tmp_path, capsys, monkeypatch):
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    monkeypatch.chdir(tmp_path)
    args = grpo_args(eos_model, prompts_file, tmp_path / "run", reward_funcs="rewards.py:boom", max_steps=20)
    assert cli_main(["train", *[x for k, v in args.items() for x in (f"--{k}", v)]]) == 2
    err = capsys.readouterr().err
    assert "reward function 'rewards.py:boom' raised ZeroDivisionError" in err, err
    assert "banana" in err.split("(on the prompt")[1], err


# -- training ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_length_reward_shortens_completions(eos_model, prompts_file, tmp_path):
    """A reward for short completions (-1 per 100 characters) lowers the mean completion length within 6 steps
    (measured: 21.6 tokens at step 1, 7.6 at step 6)."""
    from lorafit.train.log import read_metrics

    out = run_train(**grpo_args(eos_model, prompts_file, tmp_path / "run", report_to="tensorboard", preview_steps=3))
    recs = [r for r in read_metrics(out) if "reward" in r]
    first, last = recs[0], recs[-1]
    assert len(recs) == 6 and first["completion_length"] > 15
    assert last["completion_length"] < 0.6 * first["completion_length"], [r["completion_length"] for r in recs]
    assert last["reward"] > first["reward"]
    assert {"reward_std", "rewards/length/mean", "clip_ratio", "frac_reward_zero_std"} <= set(first)
    previews = [json.loads(x) for x in (out / "previews.jsonl").read_text().splitlines()]
    scored = [p for p in previews if "reward" in p]
    assert [p["step"] for p in scored] == [3] * 4 + [6] * 4
    assert scored[0]["reward"] == pytest.approx(-len(scored[0]["text"]) / 100)


def test_resume_is_exact(eos_model, prompts_file, tmp_path):
    """Steps 3-4 after resuming from step 2 sample the same completions and train the same adapter (beta > 0:
    the KL to the adapter-off base is in the loss)."""
    from lorafit.train.log import read_metrics

    common = {"max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "num_generations": 4,
              "save_strategy": "steps", "save_steps": 2, "beta": 0.04, "lora_dropout": 0.1}
    full = run_train(**grpo_args(eos_model, prompts_file, tmp_path / "full", **common))
    run = tmp_path / "resumed"
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    run_train(**grpo_args(eos_model, prompts_file, run, resume="true", **common))
    assert losses(run) == pytest.approx(losses(full), abs=1e-7)
    want = [(r["reward"], r["kl"], r["completion_length"]) for r in read_metrics(full) if "reward" in r]
    assert [(r["reward"], r["kl"], r["completion_length"]) for r in read_metrics(run) if "reward" in r] == want
    assert want[-1][1] > 0
    assert_same_adapter(run, full, atol=1e-7)


@pytest.mark.slow
def test_two_ranks(eos_model, prompts_file, tmp_path):
    """torchrun with 2 ranks (gloo): each samples its own prompts' groups, counts are summed for the logged means,
    only rank 0 writes; the run resumes on one process."""
    import subprocess

    from helpers import REPO, subprocess_env, to_argv, torchrun_cmd

    from lorafit.train.log import read_metrics

    args = grpo_args(eos_model, prompts_file, tmp_path / "ddp", max_steps=2, per_device_train_batch_size=2,
                     num_generations=4, save_strategy="steps", save_steps=1)
    proc = subprocess.run([*torchrun_cmd(), "--standalone", "--nproc_per_node", "2", "-m", "lorafit", "train",
                           *to_argv(args)], check=False, capture_output=True, text=True, timeout=400, cwd=REPO,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [r for r in read_metrics(tmp_path / "ddp") if "reward" in r]
    assert [r["step"] for r in recs] == [1, 2] and all(0 < r["completion_length"] <= 32 for r in recs)
    shutil.rmtree(tmp_path / "ddp" / "checkpoints" / "step-000002")
    assert cli_main(["train", "--output_dir", str(tmp_path / "ddp"), "--resume", "--gradient_accumulation_steps", "2",
                     "--max_steps", "3"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "ddp") if "reward" in r] == [1, 2, 3]
