"""Shared helpers for the training, checkpoint, reliability and distributed tests (imported by them).

`alpaca_file()` is a 48-record Alpaca JSON built from words the tiny tokenizer knows;
`train_args(model_dir, data, out, **fields)` is the flag dict of a small, fast run
(rank 4, 64 tokens, 4 sequences per step, no trackers, no checkpoints unless asked).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "apple", "banana", "cherry", "sort", "reverse", "convert", "number", "answer", "hello", "world",
         "Monday"]


def alpaca_records(n: int = 48) -> list[dict]:
    return [{"instruction": f"{WORDS[i % 12]} {WORDS[(i * 5) % 12]} {i}", "input": "" if i % 3 else f"{i * 7}",
             "output": " ".join(WORDS[(i * k) % 12] for k in range(1, 4 + i % 9))} for i in range(n)]


@functools.cache
def alpaca_file() -> Path:
    """The 48-record Alpaca file, written once per test process (a function, not a fixture: no F811 noise)."""
    folder = Path(tempfile.mkdtemp(prefix="lorafit-alpaca-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "alpaca.json"
    path.write_text(json.dumps(alpaca_records()), encoding="utf-8")
    return path


def train_args(model_dir: Path, data: Path, out: Path, **fields) -> dict[str, str]:
    args = {"model": model_dir, "dataset": data, "output_dir": out, "max_steps": 5, "lora_r": 4, "lora_alpha": 8,
            "max_seq_length": 64, "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": "none",
            "eval_strategy": "no", "save_strategy": "no", "max_new_tokens": 8, "val_size": 4, "seed": 7}
    args.update(fields)
    return {k: str(v) for k, v in args.items()}


def to_argv(args: dict[str, str]) -> list[str]:
    return [x for k, v in args.items() for x in (f"--{k}", v)]


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one intra-op thread (x3-10 on a busy 2-core box); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_train(**args):
    """Train in this process through the config builder the CLI uses; returns the run directory."""
    from lorafit.config.load import build_config
    from lorafit.train.loop import train

    with one_thread():
        return train(build_config(None, args))


def cli_main(argv: list[str]) -> int:
    """`lorafit ARGV` in this process (exit code returned, as the console script would exit with)."""
    from lorafit.cli import main

    with one_thread():
        return main(argv)


def losses(run_dir: Path) -> dict[int, float]:
    from lorafit.train.log import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def adapter_tensors(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-6) -> None:
    import torch

    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=1e-5, msg=k)


def lorafit_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lorafit", *argv]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO / "src"))
    env.update(extra)
    return env


def run_cli(*argv: str, timeout: float = 180, **env) -> subprocess.CompletedProcess:
    return subprocess.run(lorafit_cmd(*argv), check=False, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env), cwd=REPO)


def test_alpaca_records_are_distinct():
    recs = alpaca_records()
    assert len({json.dumps(r) for r in recs}) == len(recs)
