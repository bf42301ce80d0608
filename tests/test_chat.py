"""chat.py: one answer, the interactive loop (history, reset, quit, Ctrl-D), --demo, --base."""
from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys

import pytest
from helpers import REPO, make_run


@pytest.fixture(scope="module")
def cfg(llama_run):
    from lorafit.run_dir import load_run_config

    return load_run_config(llama_run, {"temperature": 0, "max_new_tokens": 6})


@pytest.fixture(scope="module")
def session(llama_run, cfg):
    from lorafit.infer.generate import load_session

    return load_session(llama_run, cfg)


def test_one_prompt_answers_once(llama_run, cfg, session, capsys):
    from lorafit.infer.chat import chat
    from lorafit.infer.generate import generate_text

    chat(llama_run, cfg, prompt="hello world")
    out = capsys.readouterr()
    want = generate_text(session.model, session.tokenizer, session.template,
                         [{"role": "user", "content": "hello world"}], cfg.generate, seed=cfg.train.seed)
    assert out.out == want.text + "\n"
    assert "template chatml" in out.err  # status lines go to stderr, the answer alone to stdout


def test_base_answers_differ_from_tuned(llama_run, cfg, capsys):
    from lorafit.infer.chat import chat

    chat(llama_run, cfg, prompt="hello world")
    tuned = capsys.readouterr().out
    chat(llama_run, cfg, prompt="hello world", use_adapter=False)
    assert capsys.readouterr().out != tuned


def _repl(session, cfg, monkeypatch, stdin: str) -> list[list[dict]]:
    import lorafit.infer.chat as chat_mod

    seen: list[list[dict]] = []

    def fake_answer(s, c, messages, seed=None):
        seen.append([dict(m) for m in messages])
        return f"reply {len(seen)}"

    monkeypatch.setattr(chat_mod, "answer", fake_answer)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    chat_mod.repl(session, cfg)
    return seen


def test_chat_templates_keep_history_until_reset(session, cfg, monkeypatch):
    seen = _repl(session, cfg, monkeypatch, "first\n\nsecond\n/reset\nthird\nquit\nnever sent\n")
    assert [m["content"] for m in seen[1]] == ["first", "reply 1", "second"]
    assert [m["content"] for m in seen[2]] == ["third"]
    assert len(seen) == 3


def test_instruction_templates_are_single_turn(session, cfg, monkeypatch):
    from lorafit.data.templates import Template

    alpaca = dataclasses.replace(session, template=Template(name="alpaca", eos_token="<|im_end|>"))
    seen = _repl(alpaca, cfg, monkeypatch, "first\nsecond\n")  # ends with Ctrl-D (EOF), no quit
    assert [[m["content"] for m in msgs] for msgs in seen] == [["first"], ["second"]]


def test_demo_answers_every_built_in_prompt(llama_run, cfg, capsys):
    from lorafit.infer.chat import DEMO_PROMPTS, chat

    chat(llama_run, dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, max_new_tokens=2)), demo=True)
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith(">>> ")] == [f">>> {p}" for p in DEMO_PROMPTS]


def test_interactive_loop_over_stdin_via_main_py(llama_run, session, cfg):
    from lorafit.infer.generate import generate_text

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "chat", "--adapter_path", str(llama_run), "--max_new_tokens", "4",
         "--temperature", "0"],
        input="hello world\nwhat is the apple?\nexit\nnot read\n", check=False, capture_output=True, text=True,
        timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "greedy (temperature 0), no repetition penalty" in proc.stderr  # plain greedy, and the banner says so
    gen = dataclasses.replace(cfg.generate, temperature=0.0, max_new_tokens=4)
    first = [{"role": "user", "content": "hello world"}]
    a = generate_text(session.model, session.tokenizer, session.template, first, gen).text
    second = first + [{"role": "assistant", "content": a.strip()}, {"role": "user", "content": "what is the apple?"}]
    b = generate_text(session.model, session.tokenizer, session.template, second, gen).text
    assert proc.stdout == f"{a}\n{b}\n"  # two streamed answers, the second with the first turn as history


def test_banner_says_what_decoding_applies():
    from lorafit.config.schema import Config
    from lorafit.infer.chat import _sampling

    cfg = Config()
    assert cfg.generate.repetition_penalty == 1.0  # llama.cpp's and transformers' default: greedy is greedy
    assert "sampling: temperature 0.7, top_p 0.9, top_k 50, no repetition penalty" in _sampling(cfg)
    cfg.generate.temperature, cfg.generate.repetition_penalty = 0.0, 1.1
    assert _sampling(cfg).startswith("greedy (temperature 0), repetition_penalty 1.1")


def test_missing_adapter_path_is_a_user_error(tmp_path, capsys):
    from lorafit.cli import main

    assert main(["chat", "--adapter_path", str(tmp_path / "nope"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("train: {seed: 1}\n")
    assert main(["chat", "--adapter_path", str(tmp_path / "empty"), "hi"]) == 2
    assert "no trained adapter" in capsys.readouterr().err


def test_system_prompt_flag_overrides_the_trained_one(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`lorafit chat --system_prompt X` prompts with X; without the flag the trained system prompt stays."""

    import lorafit.infer.chat as chat_mod
    from lorafit.cli import main
    from lorafit.data.templates import render_prompt

    run = make_run(tmp_path / "run", tiny_model_dir("llama"), template="chatml", system_prompt="Be brief.")
    prompts: list[str] = []

    def fake_answer(session, cfg, messages, seed=None):
        prompts.append(render_prompt(session.template, messages, session.tokenizer))
        return ""

    monkeypatch.setattr(chat_mod, "answer", fake_answer)
    assert main(["chat", "--adapter_path", str(run), "--system_prompt", "Be a pirate.", "Hello"]) == 0
    assert main(["chat", "--adapter_path", str(run), "Hello"]) == 0
    assert main(["chat", "--adapter_path", str(run), "--system_prompt", "", "Hello"]) == 0
    assert "Be a pirate." in prompts[0] and "Be brief." not in prompts[0]
    assert "Be brief." in prompts[1]
    assert prompts[2] == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_decoding_asks_for_no_wordpiece_cleanup(session, cfg, monkeypatch):
    """The built-in SmolLM2 copy's tokenizer config said clean_up_tokenization_spaces=True: every chat and eval
    printed transformers' 'Ignoring clean_up_tokenization_spaces=True for BPE tokenizer'."""
    import logging

    from lorafit.infer.generate import eos_token_ids, generate_batch, generate_text

    said: list[str] = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: said.append(msg))
    monkeypatch.setattr(session.tokenizer, "clean_up_tokenization_spaces", True)
    tok, gen = session.tokenizer, dataclasses.replace(cfg.generate, max_new_tokens=3)
    generate_text(session.model, tok, session.template, [{"role": "user", "content": "hello"}], gen)
    generate_batch(session.model, tok, [tok("hello world")["input_ids"]], 3,
                   eos_token_ids(session.model, tok, session.template), [])
    assert not [m for m in said if "clean_up_tokenization_spaces" in m]
