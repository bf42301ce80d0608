"""Shared helpers for the data tests: an offline tokenizer, the shared sample data, configs.

The `tok` fixture uses conftest's `tiny_tokenizer` when the lead's conftest provides it, and
otherwise builds the same kind of tokenizer here (byte-level BPE trained on a synthetic corpus).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lorafit.config.schema import Config

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def shared_data_dir() -> Path:
    """../shared/data next to the repository root (the repo is tests/..)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    path = shared_data_dir() / name
    if not path.is_file():
        pytest.skip(f"shared sample data {path} is absent")
    return path


def build_tokenizer(chat_template: bool = True):
    """A small byte-level BPE PreTrainedTokenizerFast, trained offline in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorafit.data.demo import demo_records

    corpus = []
    for r in demo_records(600):
        corpus += [r["instruction"], r["input"], r["output"]]
    corpus += ["### Instruction:", "### Response:", "### Human:", "### Assistant:", "Instruction: Input: Response:",
               "The quick brown fox jumps over the lazy dog. Describe a process of making crepes."] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None)
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tok(request):
    try:
        return request.getfixturevalue("tiny_tokenizer")
    except pytest.FixtureLookupError:
        return build_tokenizer()


@pytest.fixture(scope="session")
def plain_tok():
    """The same tokenizer without a chat template (so 'auto' falls back to alpaca/guanaco/chatml)."""
    return build_tokenizer(chat_template=False)


def make_cfg(dataset: str, **data) -> Config:
    cfg = Config()
    cfg.data.dataset = dataset
    for key, value in data.items():
        cfg.set(key, value)
    return cfg
