"""`lorafit chat`: a REPL over generate.py, with the exact prompt template the run trained with.

    lorafit chat --adapter_path DIR "What is 17 + 25?"   one answer, then exit
    lorafit chat --adapter_path DIR                       interactive (quit / exit / q / Ctrl-D)
    lorafit chat --adapter_path DIR --demo                built-in prompts
    lorafit chat --adapter_path DIR --base                the base model, same template

Answers stream to stdout token by token; status lines go to stderr, so `lorafit chat DIR "..." > a.txt`
captures only the answer. Chat templates (chatml, model) keep the conversation's history; the
instruction templates (alpaca, instruction, guanaco, raw) were trained on single turns, so each
prompt there stands alone. Sampling is seeded from `seed` (turn i uses seed + i), so the same
session replays the same answers.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lorafit.infer.generate import load_session, stream_text

if TYPE_CHECKING:
    from lorafit.config.schema import Config
    from lorafit.infer.generate import Session

QUIT = ("quit", "exit", "q", ":q", "/quit", "/exit")
RESET = ("/reset", "/clear")
MULTI_TURN_TEMPLATES = ("chatml", "model")

# Half from the built-in demo set's task families (exact answers, so tuning shows), half open-ended.
DEMO_PROMPTS = [
    "What is 17 + 25?",
    "Convert 3 kilometers to meters. Answer with the number only.",
    "Write the word 'garden' in capital letters.",
    "Sort these numbers from smallest to largest: 9, 2, 5",
    "Which city is mentioned in this sentence? Maria moved to Lisbon last spring.",
    "Give three tips for staying healthy.",
    "Explain what a LoRA adapter is in one sentence.",
]


def chat(run_dir: Path, cfg: Config, prompt: str | None = None, demo: bool = False, use_adapter: bool = True) -> None:
    """Answer `prompt` once, the demo prompts, or run the interactive loop on stdin."""

    run_dir = Path(run_dir)
    _status(f"loading {'base model' if not use_adapter else 'base + adapter'} from {run_dir} ...")
    session = load_session(run_dir, cfg, use_adapter=use_adapter)
    _status(f"{cfg.model.model} | template {session.template.name} | {_sampling(cfg)}")
    if prompt is not None:
        answer(session, cfg, [{"role": "user", "content": prompt}], seed=cfg.train.seed)
        return
    if demo:
        for i, p in enumerate(DEMO_PROMPTS):
            print(f">>> {p}", flush=True)
            answer(session, cfg, [{"role": "user", "content": p}], seed=cfg.train.seed + i)
            print(flush=True)
        return
    repl(session, cfg)


def repl(session: Session, cfg: Config) -> None:
    """Read prompts until quit / exit / q / Ctrl-D; Ctrl-C stops an answer, not the session."""
    multi_turn = session.template.name in MULTI_TURN_TEMPLATES
    hint = "multi-turn, /reset clears the history" if multi_turn else "each prompt stands alone"
    _status(f"chat ({hint}); type quit, exit or q (or Ctrl-D) to leave")
    history: list[dict] = []
    turn = 0
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (arrow keys and history in input())
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            print(flush=True)
            return
        except KeyboardInterrupt:
            print(flush=True)
            return
        text = line.strip()
        if not text:
            continue
        if text.lower() in QUIT:
            return
        if text.lower() in RESET:
            history = []
            _status("history cleared")
            continue
        messages = (history if multi_turn else []) + [{"role": "user", "content": text}]
        try:
            reply = answer(session, cfg, messages, seed=cfg.train.seed + turn)
        except KeyboardInterrupt:
            print("\n[stopped]", flush=True)
            continue
        turn += 1
        if multi_turn:
            history = messages + [{"role": "assistant", "content": reply}]


def answer(session: Session, cfg: Config, messages: list[dict], seed: int | None = None) -> str:
    """Stream one reply to stdout as it is generated; returns its text."""

    stream = stream_text(session.model, session.tokenizer, session.template, messages, cfg.generate, seed=seed)
    try:
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
    finally:
        stream.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    result = stream.result
    if result is not None and result.finish_reason == "length":
        _status(f"[cut at max_new_tokens={cfg.generate.max_new_tokens}]")
    return result.text.strip() if result is not None else ""


def _sampling(cfg: Config) -> str:
    """The decoding that applies, as the banner states it: greedy at temperature 0 (top_p/top_k do nothing)."""
    g = cfg.generate
    how = "greedy (temperature 0)" if g.temperature <= 0 else \
        f"sampling: temperature {g.temperature}, top_p {g.top_p}, top_k {g.top_k}"
    penalty = f"repetition_penalty {g.repetition_penalty}" if g.repetition_penalty != 1.0 else "no repetition penalty"
    return f"{how}, {penalty}, max_new_tokens {g.max_new_tokens}"


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
