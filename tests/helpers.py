"""Plain helpers the test modules share (fixtures live in conftest.py; no test module imports another).

Training: `alpaca_file()` is a 48-record Alpaca JSON built from words the tiny tokenizer knows;
`train_args(model_dir, data, out, **fields)` is the flag dict of a small, fast run (rank 4, 64 tokens,
4 records per step, no trackers, no checkpoints unless asked); `run_train` / `cli_main` run it in this
process, `run_cli` in a child. Run directories: `make_run(tmp, model_dir, template)` writes what
`lorafit train` writes (adapter in PEFT format, config.yaml, template.json) with a LoRA update far from
zero, so base and tuned outputs differ, without training. Data: `make_cfg`, `shared_file`, `demo_tokenizer`.
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

import pytest

from lorafit.config.schema import Config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# dropout 0: each rank would otherwise draw other dropout masks than one process doing both micro-batches
DDP_COMMON = {"max_steps": 4, "per_device_train_batch_size": 2, "lora_dropout": 0, "val_size": 6,
              "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 2}
# FSDP (test_fsdp.py, test_fsdp_qlora.py): micro-batch 1 x 2 accumulation x 2 ranks == 1 x 4 in one process (4
# records a step either way); passes of at most 64 tokens (max_seq_length) put about one record in each, so FSDP's
# no-sync passes are exercised and a rank with fewer passes runs stand-ins to keep the gathers in step.
# max_grad_norm 0.5 sits below the ~0.7-1.0 norms.
FSDP_COMMON = {**DDP_COMMON, "per_device_train_batch_size": 1, "max_grad_norm": 0.5, "max_tokens_per_pass": 64}


# -- tiny tokenizer and models ---------------------------------------------------------------------

def corpus() -> list[str]:
    """The text the tiny BPE tokenizer is trained on (everyday words, digits, template markers)."""
    words = ["the", "a", "of", "to", "and", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with",
             "as", "I", "his", "they", "be", "at", "one", "have", "this", "from", "what", "how", "why", "convert",
             "sort", "reverse", "extract", "add", "sum", "number", "answer", "question", "instruction", "input",
             "response", "human", "assistant", "system", "user", "hello", "world", "apple", "banana", "cherry",
             "Monday", "Tuesday", "kilometers", "meters"]
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * k) % len(words)] for k in range(1, 12)) + f" {i} {i * 7 % 100}.")
    lines += ["### Instruction:", "### Response:", "### Human:", "### Assistant:", "Instruction: Input: Response:"]
    lines += ["0123456789 + - * / = , . : ; ! ? ( ) [ ] { } \" ' \n"]
    return lines


def build_tokenizer(out_dir: Path):
    """The tiny byte-level BPE tokenizer (600 tokens, ChatML template), saved to `out_dir` and read back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token=None, model_max_length=2048)
    tok.chat_template = CHATML_TEMPLATE
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


# -- training runs ----------------------------------------------------------------------------------------

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


def torchrun_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def val_losses(run: Path) -> dict[int, float]:
    from lorafit.train.log import read_metrics

    return {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}


def step_metric(run: Path, key: str) -> dict[int, float]:
    """One metric of each logged step (grad_norm, lr...) by step."""
    from lorafit.train.log import read_metrics

    return {r["step"]: r[key] for r in read_metrics(run) if key in r}


# -- hand-built run directories ---------------------------------------------------------------------

def make_config(model_dir: Path, run_dir: Path, **fields):
    from lorafit.config.checks import validate
    from lorafit.config.schema import Config

    cfg = Config()
    cfg.model.model = str(model_dir)
    cfg.train.output_dir = str(run_dir)
    cfg.lora.lora_r = 4
    cfg.lora.lora_alpha = 8
    cfg.lora.target_modules = "all-linear"
    cfg.eval.max_samples = 8
    cfg.eval.eval_max_new_tokens = 8
    cfg.generate.max_new_tokens = 16
    for key, value in fields.items():
        cfg.set(key, value)
    validate(cfg)
    return cfg


def make_run(run_dir: Path, model_dir: Path, template: str = "chatml", scale: float = 0.3, seed: int = 0,
             nan: bool = False, **fields) -> Path:
    """A run directory with a random non-zero adapter (NaN in one lora_B when `nan`)."""
    import torch

    from lorafit.data.templates import resolve_template
    from lorafit.model.load import load_base_model, load_tokenizer
    from lorafit.model.lora import apply_lora
    from lorafit.run_dir import save_config

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = make_config(model_dir, run_dir, template=template, **fields)
    tok = load_tokenizer(cfg)
    model = apply_lora(load_base_model(cfg, torch.device("cpu")), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        if nan:
            next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    model.save_pretrained(run_dir)
    save_config(run_dir, cfg)
    resolve_template(template, tok, "alpaca", cfg.data.system_prompt).save(run_dir)  # as training does
    return run_dir


# -- data ------------------------------------------------------------------------------------------------

def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared sample data {path} is absent")
    return path


def demo_tokenizer(chat_template: bool = True):
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


def make_cfg(dataset: str, **data) -> Config:
    cfg = Config()
    cfg.data.dataset = dataset
    for key, value in data.items():
        cfg.set(key, value)
    return cfg


# -- preference data (DPO/ORPO/KTO tests) -------------------------------------------------------

def pair_records(n: int = 24) -> list[dict]:
    """Pairs whose chosen reply is always 'apple ...' and rejected 'banana ...': one rule to learn."""
    return [{"prompt": f"{WORDS[i % 12]} {WORDS[(i * 5) % 12]} {i}",
             "chosen": "apple " + " ".join(WORDS[(i * k) % 12] for k in range(1, 3 + i % 3)),
             "rejected": "banana " + " ".join(WORDS[(i * k + 1) % 12] for k in range(1, 3 + i % 4))}
            for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def resume_in_one_process(run: Path, single: Path, tmp_path: Path) -> None:
    """`run` (2 ranks x 2 accumulation) resumed from its step-2 checkpoint as 1 process x 4 learns what `single` did."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    shutil.rmtree(copy / "checkpoints" / "step-000004")
    assert cli_main(["train", "--output_dir", str(copy), "--resume", "--gradient_accumulation_steps", "4"]) == 0
    assert losses(copy) == pytest.approx(losses(single), rel=1e-4)
    assert_same_adapter(copy, single, atol=1e-5)


def resume_under_fsdp(single: Path, tmp_path: Path, *flags: str) -> str:
    """`single` resumed from its step-2 checkpoint under `torchrun --nproc_per_node 2 ... --fsdp true` (2 x 2) learns
    what it did; returns the run's stderr for the caller's own checks."""
    copy = Path(shutil.copytree(single, tmp_path / "run"))
    shutil.rmtree(copy / "checkpoints" / "step-000004")
    proc = subprocess.run([*torchrun_cmd(), "--standalone", "--nproc_per_node", "2", "-m", "lorafit", "train",
                           "--output_dir", str(copy), "--resume", "--fsdp", "true", "--gradient_accumulation_steps",
                           "2", *flags], check=False, capture_output=True, text=True, timeout=400, cwd=REPO,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fsdp: FSDP2 over 2 processes (--fsdp true)" in proc.stderr
    assert "resuming from" in proc.stderr
    assert losses(copy) == pytest.approx(losses(single), rel=1e-4)
    assert_same_adapter(copy, single, atol=1e-5)
    return proc.stderr


# -- tiny PEFT models for the fused path's tests --------------------------------------------------------------

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def tiny_peft(model_type: str, targets=None, dropout=0.0, kv_heads=2):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        model_type, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=97, max_position_embeddings=128, pad_token_id=0,
        tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    lc = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets or TARGETS[model_type])
    pm = peft.get_peft_model(model, lc)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)   # non-zero so the B path and dA are exercised
    return pm


def lora_grads(pm):
    """Each trainable parameter's gradient, by name."""
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
