"""Shared fixtures: a small offline BPE tokenizer and tiny random models of each architecture.

Everything here is built from configs on the CPU in a second or two; nothing touches a hub.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    words = ["the", "a", "of", "to", "and", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with", "as", "I", "his", "they", "be", "at", "one", "have", "this", "from", "what", "how", "why", "convert", "sort", "reverse", "extract", "add", "sum", "number", "answer", "question", "instruction", "input", "response", "human", "assistant", "system", "user", "hello", "world", "apple", "banana", "cherry", "Monday", "Tuesday", "kilometers", "meters"]
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * k) % len(words)] for k in range(1, 12)) + f" {i} {i * 7 % 100}.")
    lines += ["### Instruction:", "### Response:", "### Human:", "### Assistant:", "Instruction: Input: Response:"]
    lines += ["0123456789 + - * / = , . : ; ! ? ( ) [ ] { } \" ' \n"]
    return lines


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token=None, model_max_length=2048)
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def tiny_config(arch: str, vocab_size: int, eos_id: int, pad_id: int):
    """A ~100k-parameter model of `arch`: llama, mistral, qwen2 or phi3."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    common = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": None, "tie_word_embeddings": False}
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "phi3":
        return Phi3Config(**{**common, "num_key_value_heads": 4}, resid_pdrop=0.0, embd_pdrop=0.0,
                          attention_dropout=0.0, original_max_position_embeddings=512)
    raise ValueError(arch)


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


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
