"""Shared fixtures: a small offline BPE tokenizer, tiny random models of each architecture, a run directory.

Everything here is built from configs on the CPU in a second or two; nothing touches a hub. The plain
functions behind them live in helpers.py, which test modules import (they never import each other).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import SHARED_DATA, build_tokenizer, demo_tokenizer, make_run, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tok(tiny_tokenizer):
    """The data tests' name for the tiny tokenizer (ChatML template)."""
    return tiny_tokenizer


@pytest.fixture(scope="session")
def plain_tok():
    """A tokenizer without a chat template (so 'auto' falls back to alpaca/guanaco/chatml)."""
    return demo_tokenizer(chat_template=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir, tiny_tokenizer):
    """Factory: tiny_model_dir('llama') -> folder with config, safetensors weights and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            d = tmp_path_factory.mktemp(f"tiny-{arch}")
            cfg = tiny_config(arch, len(tiny_tokenizer), tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg)
            model.save_pretrained(d, safe_serialization=True)
            tiny_tokenizer.save_pretrained(d)
            made[arch] = d
        return made[arch]

    return make


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A hand-built run directory over the tiny llama (ChatML template), built once per session."""
    return make_run(tmp_path_factory.mktemp("run-llama"), tiny_model_dir("llama"), template="chatml")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
