"""Typed run configuration: dataclasses, YAML loading, `--FIELD VALUE` overrides (checks: config_checks.py).

Field names follow Hugging Face's `TrainingArguments`, `LoraConfig` and `BitsAndBytesConfig`
(the names TRL scripts and tutorials use), so a recipe reads the same here as in a TRL script. Every field
name is unique across sections, so a YAML file may be flat (`lora_r: 16`) or sectioned
(`lora: {lora_r: 16}`) and every field is reachable as a flag of the same name.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import inspect
import itertools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from lorafit.errors import ConfigError

BUILTIN_MODEL = "smollm2-135m"
BUILTIN_DATASET = "demo"


@dataclass
class ModelArgs:
    model: str = BUILTIN_MODEL
    """Hub id, local folder, .gguf file, or the built-in short name `smollm2-135m`."""
    gguf_file: str | None = None
    """GGUF file inside `model` (a folder) to load with transformers' GGUF support."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless asked for: it executes the repo's code."""
    load_in_4bit: bool = False
    """Load the base in 4-bit through bitsandbytes (QLoRA)."""
    load_in_8bit: bool = False
    """Load the base in 8-bit through bitsandbytes."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type: nf4 (QLoRA's NormalFloat) or fp4."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.37 bits per parameter)."""
    bnb_4bit_compute_dtype: str = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for each product: bfloat16, float16 or float32."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager or flash_attention_2."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (costs about a third more compute)."""
    offload_activations: bool = True
    """Fused path with checkpointing: park each layer's activations in pinned CPU memory (the least GPU memory); false
    keeps only each layer's input, on the GPU. On an H200, Phi-3-mini dims, before CUDA graphs: one 3,584-token row
    15,166 vs 12,871 tok/s at +0.43 GiB (bench/bench.py); the recipe shape through the CLI 11,955 vs 11,851 at +0.65
    GiB. With graphs, 8 x 512 ran 22,440 vs 23,588 tok/s (slower) at +0.60 GiB."""
    cuda_graphs: bool = True
    """Fused path, SFT on one GPU: replay each pass's forward and backward as a CUDA graph, one per bucket of pass
    lengths (passes padded up to it, ~3% more tokens), so the step no longer waits on the host queueing ~3,500
    kernel launches (LoRA dropout and fp16 loss scaling included). Off by itself where it cannot apply (several
    processes, DPO/ORPO/KTO/GRPO, a sliding window under max_seq_length); the log says."""
    fast_kernels: str = "auto"
    """Fused Triton LoRA/QLoRA kernels: auto (on a CUDA GPU for supported architectures), on, off."""
    fp8_base: str = "off"
    """Fused path, GPUs of compute capability 8.9+ (Ada, Hopper, Blackwell): the frozen base's products on fp8 tensor
    cores, e4m3 with a scale per row of each operand. off; backward (the input-gradient products only); all (also the
    forward and the recomputation: fastest, but the forward's values move). The LoRA products, their gradients,
    attention, norms and the loss keep the compute dtype. Faster where the matrix work dominates (long rows, 7B+
    models); measured effect on the loss in the README's Speed section."""


@dataclass
class LoraArgs:
    lora_r: int = 16
    """LoRA rank r."""
    lora_alpha: float = 32
    """LoRA alpha; the update is scaled by alpha / r."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    target_modules: list[str] | str = "attention"
    """Preset (attention, mlp, all-linear) or a list of module names (q_proj, k_proj, ...)."""
    lora_bias: str = "none"
    """Train biases: none, all or lora_only."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r)."""


@dataclass
class DataArgs:
    dataset: str = BUILTIN_DATASET
    """Hub id, local file or folder (json, jsonl, csv, parquet), or `demo` (built-in)."""
    dataset_split: str = "train"
    """Split to read from a hub dataset or a local dataset folder."""
    dataset_format: str = "auto"
    """Record format: auto, alpaca, instruction, guanaco, messages, prompt_completion, text, oasst."""
    dataset_text_field: str = "text"
    """Column with raw text for the guanaco/text formats."""
    column_map: dict[str, str] = field(default_factory=dict)
    """Rename columns before format detection, e.g. {question: instruction, answer: output}."""
    template: str = "auto"
    """Prompt template: auto, alpaca, instruction, guanaco, chatml, model (the tokenizer's own), raw."""
    system_prompt: str | None = None
    """System message put before every conversation (templates that have one)."""
    max_seq_length: int = 512
    """Longest sequence in tokens; longer examples are truncated or dropped (see `truncation`)."""
    truncation: str = "truncate"
    """What to do with over-long examples: truncate or drop."""
    packing: bool = False
    """A step takes rows of max_seq_length filled with several records, not single records (a different step:
    more records per step, fewer steps per epoch). Either way every pass is padding-free."""
    group_by_length: bool = False
    """Put items of similar length in the same optimizer step (whole steps are sorted, then shuffled)."""
    train_on_inputs: bool = False
    """Also train on prompt tokens (by default only responses, EOS included, are trained)."""
    val_size: float = 0.05
    """Held-out validation split: a fraction (< 1) or a count (>= 1) of examples."""
    max_examples: int | None = None
    """Use at most this many examples (after shuffling), e.g. 32000."""
    shuffle: bool = True
    """Shuffle before splitting and capping."""
    dedup: bool = False
    """Drop exact duplicate records."""
    demo_size: int = 1200
    """Records generated for the built-in `demo` dataset."""


@dataclass
class TrainArgs:
    output_dir: str = "runs/lorafit"
    """Run directory: adapter, checkpoints, logs, resolved config. `adapter_path` is an alias."""
    method: str = "sft"
    """Training objective: sft (supervised fine-tuning on replies), dpo, orpo or kto (preference data), grpo
    (reward-driven; see the grpo section)."""
    dpo_loss: str = "sigmoid"
    """DPO loss: sigmoid (the DPO paper), ipo or hinge."""
    beta: float | None = None
    """Strength of the pull towards the reference: DPO/KTO's implicit-reward temperature (default 0.1), GRPO's KL
    weight (default 0: no reference forward), as TRL names and defaults them."""
    ref_adapter: str | None = None
    """DPO/KTO reference: this adapter (a run directory or PEFT folder, e.g. an SFT run) instead of the bare base."""
    orpo_alpha: float = 0.1
    """ORPO: weight of the odds-ratio term added to the chosen replies' NLL (the paper's lambda, 0.1)."""
    kto_desirable_weight: float = 1.0
    """KTO: loss weight of desirable (label true) completions."""
    kto_undesirable_weight: float = 1.0
    """KTO: loss weight of undesirable (label false) completions."""
    num_train_epochs: float = 3.0
    """Passes over the training split (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; > 0 overrides num_train_epochs."""
    per_device_train_batch_size: int = 4
    """Records per device per micro-batch: with accumulation and processes it says how many records make one
    optimizer step; the passes that compute them are cut by max_tokens_per_pass, so the split changes nothing."""
    per_device_eval_batch_size: int = 8
    """Prompts generated together by `lorafit eval` (loss passes are sized by max_tokens_per_pass)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (records per step = this x per_device_train_batch_size x processes)."""
    max_tokens_per_pass: int | None = None
    """Most tokens in one padding-free forward/backward pass (>= max_seq_length; a memory knob with no effect on
    the result). Default: from free GPU memory and the model's size, capped at 16384 (4096 on the reference path); 512
    on a CPU."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler_type: str = "cosine"
    """cosine, linear or constant (each after warmup)."""
    warmup_ratio: float = 0.0
    """Share of optimizer steps spent warming up."""
    warmup_steps: int = 0
    """Warmup steps; > 0 overrides warmup_ratio."""
    weight_decay: float = 0.0
    """AdamW weight decay on LoRA weights."""
    optim: str = "adamw_torch"
    """adamw_torch, adamw_torch_fused (torch's fused AdamW), paged_adamw_32bit, paged_adamw_8bit or adamw_8bit
    (bitsandbytes)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    bf16: bool | None = None
    """bfloat16 compute. Default: on where the GPU supports it, off on CPU."""
    fp16: bool = False
    """float16 compute with loss scaling."""
    logging_steps: int = 10
    """Log loss and lr every N optimizer steps."""
    eval_strategy: str = "steps"
    """When to compute validation loss: steps, epoch or no."""
    eval_steps: int | None = None
    """Validation every N optimizer steps, and at step 0 (default: total_steps // 10, so ~10 points per run)."""
    save_strategy: str = "steps"
    """When to checkpoint: steps, epoch or no."""
    save_steps: int = 500
    """Checkpoint every N optimizer steps."""
    save_total_limit: int | None = 3
    """Keep at most this many checkpoints (oldest removed first)."""
    early_stopping_patience: int | None = None
    """Stop after this many validations without a lower validation loss."""
    preview_steps: int = 0
    """Generate previews for `preview_prompts` every N optimizer steps (0: off)."""
    preview_prompts: list[str] = field(default_factory=list)
    """Prompts for previews (default: two held-out prompts)."""
    seed: int = 42
    """Seed for data order, split, LoRA init and dropout."""
    resume: bool = False
    """Resume from the latest good checkpoint in output_dir."""
    nan_policy: str = "stop"
    """On a non-finite loss or gradient: stop, or skip the step."""
    auto_find_batch_size: bool = False
    """Before training, halve max_tokens_per_pass until a pass of the longest records fits in memory."""
    fsdp: bool = False
    """Shard weights, gradients and optimizer state over the processes (FSDP2); on under
    `accelerate launch --use_fsdp`."""
    fsdp_offload: bool = False
    """Under FSDP, keep the sharded parameters, gradients and optimizer state in CPU memory (accelerate's
    --fsdp_offload_params)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Loggers besides metrics.jsonl: tensorboard, wandb, mlflow, none."""
    push_to_hub: str | None = None
    """Upload the adapter to this hub repo (user/name) when training ends; false/none: no upload."""
    overwrite_output_dir: bool = False
    """Train into an output_dir that already holds an adapter."""


@dataclass
class EvalArgs:
    max_samples: int | None = 200
    """Held-out examples to evaluate (None: all)."""
    eval_max_new_tokens: int | str = "auto"
    """Tokens per answer when scoring (auto: 1.5 x the 95th-percentile reference length, >= 16, <= max_seq_length)."""
    metrics: list[str] = field(default_factory=lambda: ["rouge_l", "bleu", "exact_match"])
    """Task metrics: exact_match, contains, rouge_l, bleu, chrf, or file.py:function (perplexity is always on)."""
    eval_base_template: str = "both"
    """Prompts for the base: both (the run's template and the base's own chat template, when they differ), run, chat."""
    bootstrap_samples: int = 1000
    """Paired bootstrap resamples for the 95% intervals of tuned minus base."""
    skip_base: bool = False
    """Only evaluate the tuned model."""


@dataclass
class GenerateArgs:
    temperature: float = 0.7
    """Sampling temperature (0: greedy)."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    top_k: int = 50
    """Sample among the k likeliest tokens (0: off)."""
    max_new_tokens: int = 256
    """Tokens to generate at most."""
    repetition_penalty: float = 1.0
    """Penalty > 1 discourages repeating tokens (1.0: off, as in llama.cpp, so temperature 0 is plain greedy)."""


@dataclass
class GrpoArgs:
    """GRPO (--method grpo): sampled completions scored by reward functions; names as TRL's GRPOConfig."""

    reward_funcs: list[str] = field(default_factory=list)
    """Rewards: file.py:function, or built-ins conciseness, length, exact_match[:column], contains[:column],
    regex:PATTERN."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward function (default: 1 each); the total reward is the weighted sum."""
    num_generations: int = 8
    """Completions sampled per prompt (the group whose rewards are normalized together)."""
    max_completion_length: int = 256
    """Tokens sampled per completion at most."""
    epsilon: float = 0.2
    """Clip range of the policy ratio: [1 - epsilon, 1 + epsilon]."""
    loss_type: str = "dapo"
    """grpo (mean per completion), dapo / bnpo (mean per completion token of the step), dr_grpo (sum over
    completions x max_completion_length)."""
    scale_rewards: str = "group"
    """Divide advantages by the reward std of the prompt's group (group), of the step's batch (batch), or not (none)."""
    max_words: int = 100
    """Word limit of the built-in conciseness reward."""
    min_completion_length: int = 0
    """Sample at least this many tokens (end-of-text suppressed before): fixed-length timing in bench/grpo_bench.py."""
    rollout_weights: str = "merged"
    """Sample from merged weights (W + scaling * B @ A in the compute dtype, rebuilt each step; much faster) or
    through the adapter as trained; merged falls back to adapter, with a log line, where it cannot run."""


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    generate: GenerateArgs = field(default_factory=GenerateArgs)
    grpo: GrpoArgs = field(default_factory=GrpoArgs)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def set(self, key: str, value: Any) -> None:
        """Set one field by its flat name, coercing strings (from flags) to the field's type."""
        key = canonical_key(key)
        if key == "do_sample":  # transformers' switch: false means greedy decoding, which is temperature 0 here
            if not _coerce(key, bool, value):
                self.generate.temperature = 0.0
            return
        section = _owner(key)
        if section is None:
            raise ConfigError(f"unknown config key '{key}'", fix=_suggest(key))
        f = _FIELDS[key]
        setattr(getattr(self, section), key, _coerce(key, f.type, value))

    def get(self, key: str) -> Any:
        key = canonical_key(key)
        return getattr(getattr(self, _owner(key)), key)


SECTIONS = [f.name for f in dataclasses.fields(Config)]
_SECTION_TYPES = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
_HINTS = {name: typing.get_type_hints(cls) for name, cls in _SECTION_TYPES.items()}
_FIELDS: dict[str, dataclasses.Field] = {}
_SECTION_OF: dict[str, str] = {}
for _section, _cls in _SECTION_TYPES.items():
    for _f in dataclasses.fields(_cls):
        _f.type = _HINTS[_section][_f.name]
        _FIELDS[_f.name] = _f
        _SECTION_OF[_f.name] = _section

# Names that TRL scripts, tutorials and peer tools use for the same settings.
ALIASES = {
    "adapter_path": "output_dir",
    "model_name": "model",
    "model_name_or_path": "model",
    "model_id": "model",
    "base_model": "model",
    "dataset_name": "dataset",
    "dataset_path": "dataset",
    "use_4bit": "load_in_4bit",
    "use_nested_quant": "bnb_4bit_use_double_quant",
    "max_length": "max_seq_length",
    "lora_rank": "lora_r",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "lr": "learning_rate",
    "evaluation_strategy": "eval_strategy",
    "lora_target_modules": "target_modules",
    "base_model_name": "model",
    "custom_dataset_path": "dataset",
    "num_epochs": "num_train_epochs",
    "use_fp16": "fp16",
    "use_bf16": "bf16",
}


def canonical_key(key: str) -> str:
    """The field a key names: itself, an alias, or the same name in lower case / with '-' for '_'
    (Python-constant spellings, NUM_EPOCHS = 3, and dashed flags, --learning-rate)."""
    for k in (key, key.replace("-", "_"), key.replace("-", "_").lower()):
        if k in _FIELDS or k in ALIASES or k == "do_sample":
            return ALIASES.get(k, k)
    return key


def field_names() -> list[str]:
    return list(_FIELDS)


def field_help(key: str) -> str:
    """The one-line docstring of a field (read from this file's source once)."""
    return _field_docs().get(key, "")


def _owner(key: str) -> str | None:
    return _SECTION_OF.get(key)


def _suggest(key: str) -> str:
    names = list(_FIELDS) + list(ALIASES)
    close = difflib.get_close_matches(key.replace("-", "_").lower(), names, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "see `lorafit train --help` for the list of fields"


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Turn `value` (often a string from the command line) into the field's type or explain why not."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if key == "push_to_hub":  # `push_to_hub: False` (TRL's boolean) means no upload; true needs a repo name
        if value is False or (isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0", "")):
            return None
        if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1")):
            raise ConfigError("'push_to_hub' names the hub repo to upload to, not a yes/no",
                              fix="pass the repo id, e.g. --push_to_hub your-name/phi3-alpaca-lora")
    if origin in (typing.Union, types.UnionType):
        if (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))) and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, arg, value)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isfinite(number):  # nan passes every `<` range check unnoticed
            return number
        raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_coerce(key, args[0], v) for v in value]
    if origin is dict:
        if isinstance(value, str):
            pairs = [p for p in value.split(",") if p.strip()]
            try:
                value = dict(p.split("=", 1) if "=" in p else p.split(":", 1) for p in pairs)
            except ValueError:
                raise ConfigError(f"'{key}' must be a mapping like a=b,c=d, got {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return {str(k).strip(): str(v).strip() for k, v in value.items()}
    return value


_DOCS: dict[str, str] | None = None


def _field_docs() -> dict[str, str]:
    """Field docstrings (the string under each field), parsed from this module's source."""
    global _DOCS
    if _DOCS is None:

        tree = ast.parse(inspect.getsource(inspect.getmodule(Config)))
        docs: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                body = node.body
                for a, b in itertools.pairwise(body):
                    if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                            and isinstance(getattr(b, "value", None), ast.Constant)):
                        docs[a.target.id] = str(b.value.value)
        _DOCS = docs
    return _DOCS


def beta_of(cfg: Config) -> float:
    """`beta` as the method reads it: the value given, else TRL's default (DPO/KTO 0.1, GRPO 0)."""
    if cfg.train.beta is not None:
        return cfg.train.beta
    return 0.0 if cfg.train.method == "grpo" else 0.1
