"""Every range and combination check of a run configuration, in one place, before any model or data loads.

User mistakes end as one ConfigError (exit 2) naming the field and the fix."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lorafit.errors import ConfigError

if TYPE_CHECKING:
    from lorafit.config.schema import Config

CHOICES = {
    "bnb_4bit_quant_type": ("nf4", "fp4"),
    "bnb_4bit_compute_dtype": ("bfloat16", "float16", "float32"),
    "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "fast_kernels": ("auto", "on", "off"),
    "lora_bias": ("none", "all", "lora_only"),
    "dataset_format": ("auto", "alpaca", "instruction", "guanaco", "messages", "prompt_completion", "text", "oasst"),
    "template": ("auto", "alpaca", "instruction", "guanaco", "chatml", "model", "raw"),
    "truncation": ("truncate", "drop"),
    "lr_scheduler_type": ("cosine", "linear", "constant"),
    "optim": ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"),
    "eval_strategy": ("steps", "epoch", "no"),
    "save_strategy": ("steps", "epoch", "no"),
    "nan_policy": ("stop", "skip"),
    "method": ("sft",),
}


def validate(cfg: Config) -> None:
    """Every range and combination check, in one place, before any model or data loads."""
    m, lo, d, t, e, g = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.eval, cfg.generate
    for key, choices in CHOICES.items():
        value = cfg.get(key)
        if value not in choices:
            raise ConfigError(f"'{key}' is {value!r}; it must be one of {', '.join(choices)}")
    for key in ("report_to",):
        for value in t.report_to:
            if value not in ("tensorboard", "wandb", "mlflow", "none"):
                raise ConfigError(f"'report_to' holds {value!r}; use tensorboard, wandb, mlflow or none")

    def positive(key: str, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"'{key}' must be > 0, got {value}")

    positive("lora_r", lo.lora_r)
    positive("lora_alpha", lo.lora_alpha)
    positive("learning_rate", t.learning_rate)
    positive("per_device_train_batch_size", t.per_device_train_batch_size)
    positive("per_device_eval_batch_size", t.per_device_eval_batch_size)
    positive("gradient_accumulation_steps", t.gradient_accumulation_steps)
    positive("max_seq_length", d.max_seq_length)
    if t.max_tokens_per_pass is not None and t.max_tokens_per_pass < d.max_seq_length:
        raise ConfigError(f"'max_tokens_per_pass' ({t.max_tokens_per_pass}) is below max_seq_length "
                          f"({d.max_seq_length}): the longest record would not fit in a pass",
                          fix=f"pass --max_tokens_per_pass {d.max_seq_length} or more, or lower --max_seq_length")
    positive("logging_steps", t.logging_steps)
    positive("save_steps", t.save_steps)
    positive("max_new_tokens", g.max_new_tokens)
    positive("eval_max_new_tokens", e.eval_max_new_tokens)
    if not 0 <= lo.lora_dropout < 1:
        raise ConfigError(f"'lora_dropout' must be in [0, 1), got {lo.lora_dropout}")
    if not 0 <= t.warmup_ratio <= 1:
        raise ConfigError(f"'warmup_ratio' must be in [0, 1], got {t.warmup_ratio}")
    if t.warmup_steps < 0:
        raise ConfigError(f"'warmup_steps' must be >= 0, got {t.warmup_steps}")
    if not 0 <= t.seed < 2**32:  # numpy's generator (seeded by transformers.set_seed) takes 32-bit seeds only
        raise ConfigError(f"'seed' must be a whole number in [0, 2**32), got {t.seed}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= cfg.get(key) < 1:  # beta >= 1 never forgets: the moment estimates stop averaging
            raise ConfigError(f"'{key}' must be in [0, 1), got {cfg.get(key)}", fix="the usual values are 0.9 / 0.999")
    positive("adam_epsilon", t.adam_epsilon)
    if t.weight_decay < 0:
        raise ConfigError(f"'weight_decay' must be >= 0, got {t.weight_decay}")
    if t.max_grad_norm < 0:
        raise ConfigError(f"'max_grad_norm' must be >= 0 (0 disables clipping), got {t.max_grad_norm}")
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        raise ConfigError("set 'num_train_epochs' > 0 or 'max_steps' > 0: nothing would train")
    if t.max_steps == 0:
        raise ConfigError("'max_steps' is 0: nothing would train", fix="use -1 to train by epochs, or a positive count")
    if t.eval_steps is not None and t.eval_steps <= 0:
        raise ConfigError(f"'eval_steps' must be > 0, got {t.eval_steps}")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        raise ConfigError(f"'save_total_limit' must be >= 1, got {t.save_total_limit}")
    if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
        raise ConfigError(f"'early_stopping_patience' must be >= 1, got {t.early_stopping_patience}")
    if t.early_stopping_patience and t.eval_strategy == "no":
        raise ConfigError("'early_stopping_patience' needs validation", fix="set eval_strategy to steps or epoch")
    if t.preview_steps < 0:
        raise ConfigError(f"'preview_steps' must be >= 0, got {t.preview_steps}")
    if t.bf16 and t.fp16:
        raise ConfigError("'bf16' and 'fp16' are both on", fix="choose one precision: --bf16 true or --fp16 true")
    if m.load_in_4bit and m.load_in_8bit:
        raise ConfigError("'load_in_4bit' and 'load_in_8bit' are both on", fix="choose one quantization")
    if m.load_in_8bit and m.fast_kernels == "on":
        raise ConfigError("'fast_kernels on' cannot run an 8-bit base: the fused kernels read NF4 (4-bit) or 16-bit "
                          "base weights", fix="use --load_in_4bit for the fused path, or --fast_kernels auto/off")
    if d.val_size < 0 or (d.val_size >= 1 and not float(d.val_size).is_integer()):
        raise ConfigError(f"'val_size' must be a fraction in [0, 1) or a whole count, got {d.val_size}")
    if d.max_examples is not None and d.max_examples < 1:
        raise ConfigError(f"'max_examples' must be >= 1, got {d.max_examples}")
    if d.demo_size < 10:
        raise ConfigError(f"'demo_size' must be >= 10, got {d.demo_size}")
    if d.packing and d.dataset_format == "text" and d.template not in ("auto", "raw"):
        raise ConfigError("'packing' with a chat template on raw text", fix="use template raw for text data")
    if e.max_samples is not None and e.max_samples < 1:
        raise ConfigError(f"'max_samples' must be >= 1, got {e.max_samples}")
    if g.temperature < 0:
        raise ConfigError(f"'temperature' must be >= 0, got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"'top_p' must be in (0, 1], got {g.top_p}")
    if g.top_k < 0:
        raise ConfigError(f"'top_k' must be >= 0, got {g.top_k}")
    if g.repetition_penalty <= 0:
        raise ConfigError(f"'repetition_penalty' must be > 0, got {g.repetition_penalty}")
    if isinstance(lo.target_modules, list) and not lo.target_modules:
        raise ConfigError("'target_modules' is empty", fix="use a preset (attention, mlp, all-linear) or module names")
    if t.fsdp:
        check_fsdp(cfg, "--fsdp true")


def check_fsdp(cfg: Config, source: str) -> None:
    """What FSDP cannot run with; `source` says how it was switched on (a flag or accelerate's launcher)."""
    m, t = cfg.model, cfg.train
    if m.load_in_4bit or m.load_in_8bit:
        bits = "4" if m.load_in_4bit else "8"
        raise ConfigError(f"FSDP ({source}) cannot shard a {bits}-bit (bitsandbytes) base model",
                          fix=f"for QLoRA train data-parallel (torchrun or `accelerate launch --multi_gpu`, without "
                              f"--fsdp / --use_fsdp), or keep FSDP and drop --load_in_{bits}bit for a bf16 LoRA")
    if t.fp16:
        raise ConfigError(f"FSDP ({source}) trains in bf16 or float32, not fp16", fix="use --bf16 true instead of --fp16")
    if t.optim != "adamw_torch":
        raise ConfigError(f"FSDP ({source}) needs optim adamw_torch, not {t.optim} (bitsandbytes' optimizers cannot "
                          "step sharded parameters; the fused AdamW is not tested with them)",
                          fix="pass --optim adamw_torch")
    if t.auto_find_batch_size:
        raise ConfigError(f"FSDP ({source}) cannot probe batch sizes (an out-of-memory on one rank would stall the "
                          "others)", fix="set --max_tokens_per_pass yourself and --auto_find_batch_size false")
