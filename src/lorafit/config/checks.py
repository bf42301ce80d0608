"""Every range and combination check of a run configuration, in one place, before any model or data loads.

User mistakes end as one ConfigError (exit 2) naming the field and the fix."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from lorafit.errors import ConfigError

if TYPE_CHECKING:
    from lorafit.config.schema import Config

CHOICES = {
    "bnb_4bit_quant_type": ("nf4", "fp4"),
    "bnb_4bit_compute_dtype": ("bfloat16", "float16", "float32"),
    "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "fast_kernels": ("auto", "on", "off"),
    "fp8_base": ("off", "backward", "all"),
    "lora_bias": ("none", "all", "lora_only"),
    "dataset_format": ("auto", "alpaca", "instruction", "guanaco", "messages", "prompt_completion", "text", "oasst"),
    "template": ("auto", "alpaca", "instruction", "guanaco", "chatml", "model", "raw"),
    "truncation": ("truncate", "drop"),
    "lr_scheduler_type": ("cosine", "linear", "constant"),
    "optim": ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"),
    "eval_strategy": ("steps", "epoch", "no"),
    "save_strategy": ("steps", "epoch", "no"),
    "nan_policy": ("stop", "skip"),
    "method": ("sft", "dpo", "orpo", "kto", "grpo"),
    "dpo_loss": ("sigmoid", "ipo", "hinge"),
    "loss_type": ("dapo", "bnpo", "grpo", "dr_grpo"),
    "scale_rewards": ("group", "batch", "none"),
    "rollout_weights": ("merged", "adapter"),
}


def validate(cfg: Config) -> None:
    """Every range and combination check, in one place, before any model or data loads."""
    m, lo, d, t, e, g = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.eval, cfg.generate
    for key, choices in CHOICES.items():
        value = cfg.get(key)
        if value not in choices:
            raise ConfigError(f"'{key}' is {value!r}; it must be one of {', '.join(choices)}")
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
    if t.beta is not None and not (math.isfinite(t.beta) and (t.beta > 0 or (t.beta == 0 and t.method == "grpo"))):
        raise ConfigError(f"'beta' must be > 0 (>= 0 for grpo), got {t.beta}")
    positive("orpo_alpha", t.orpo_alpha)
    positive("kto_desirable_weight", t.kto_desirable_weight)
    positive("kto_undesirable_weight", t.kto_undesirable_weight)
    positive("logging_steps", t.logging_steps)
    positive("save_steps", t.save_steps)
    positive("max_new_tokens", g.max_new_tokens)
    if isinstance(e.eval_max_new_tokens, str) and e.eval_max_new_tokens != "auto":
        raise ConfigError(f"'eval_max_new_tokens' must be a number or auto, got {e.eval_max_new_tokens!r}")
    if isinstance(e.eval_max_new_tokens, int):
        positive("eval_max_new_tokens", e.eval_max_new_tokens)
    if e.eval_base_template not in ("both", "run", "chat"):
        raise ConfigError(f"'eval_base_template' must be both, run or chat, got {e.eval_base_template!r}")
    positive("bootstrap_samples", e.bootstrap_samples)
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
    if m.fp8_base != "off" and (m.fast_kernels == "off" or m.load_in_8bit):
        raise ConfigError("'fp8_base' needs the fused kernels, which this config turns off ("
                          + ("fast_kernels off" if m.fast_kernels == "off" else "an 8-bit base") + ")",
                          fix="set --fast_kernels auto and a 4-bit or 16-bit base, or --fp8_base off")
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
    if t.ref_adapter:
        check_ref_adapter(t.method, t.ref_adapter)
    if t.fsdp:
        check_fsdp(cfg, "--fsdp true")
    if t.method == "grpo":
        check_grpo(cfg)


def check_grpo(cfg: Config) -> None:
    """What GRPO needs: rewards, a group of 2 or more sampled (not greedy) completions, unpacked prompts."""
    g, t = cfg.grpo, cfg.train
    if not g.reward_funcs:
        raise ConfigError("--method grpo needs at least one reward function",
                          fix="pass --reward_funcs, e.g. conciseness, exact_match, regex:PATTERN or my_rewards.py:fn")
    if g.reward_weights and len(g.reward_weights) != len(g.reward_funcs):
        raise ConfigError(f"'reward_weights' has {len(g.reward_weights)} weights for {len(g.reward_funcs)} reward "
                          "functions", fix="give one weight per reward function, in the same order")
    if g.num_generations < 2:
        raise ConfigError(f"'num_generations' must be >= 2 (advantages compare completions of one prompt), "
                          f"got {g.num_generations}")
    if g.max_completion_length < 1:
        raise ConfigError(f"'max_completion_length' must be > 0, got {g.max_completion_length}")
    if not 0 <= g.min_completion_length <= g.max_completion_length:
        raise ConfigError("'min_completion_length' must be in [0, max_completion_length], "
                          f"got {g.min_completion_length}")
    if not 0 < g.epsilon < 1:
        raise ConfigError(f"'epsilon' must be in (0, 1), got {g.epsilon}")
    if g.max_words < 1:
        raise ConfigError(f"'max_words' must be >= 1, got {g.max_words}")
    if cfg.generate.temperature == 0:
        raise ConfigError("--method grpo samples completions, and temperature 0 makes all of a prompt's the same",
                          fix="use --temperature 1.0 (TRL's default) or another value > 0")
    for key, on in (("packing", cfg.data.packing), ("fsdp", t.fsdp), ("auto_find_batch_size", t.auto_find_batch_size)):
        if on:
            raise ConfigError(f"--method grpo does not run with {key} (rollouts generate on each rank's whole model, "
                              "one prompt per row)", fix=f"set --{key} false")


def check_ref_adapter(method: str, path: str) -> None:
    if method not in ("dpo", "kto"):
        raise ConfigError(f"'ref_adapter' is set, but --method {method} has no reference model",
                          fix="use it with --method dpo or kto, or leave it out")
    if not (Path(path).expanduser() / "adapter_config.json").is_file():
        raise ConfigError(f"'ref_adapter' {path!r} is not an adapter folder (no adapter_config.json in it)",
                          fix="pass the output_dir of a `lorafit train` run, e.g. --ref_adapter runs/sft")


def check_fsdp(cfg: Config, source: str) -> None:
    """What FSDP cannot run with; `source` says how it was switched on (a flag or accelerate's launcher)."""
    m, t = cfg.model, cfg.train
    if t.method != "sft":
        raise ConfigError(f"FSDP ({source}) trains --method sft only: {t.method} scores sequences by calling the model "
                          "(and its reference with the adapter off) outside FSDP's sharded forward",
                          fix="train data-parallel instead (torchrun or `accelerate launch --multi_gpu`, "
                              "without --fsdp)")
    if m.load_in_8bit:
        raise ConfigError(f"FSDP ({source}) cannot shard an 8-bit (bitsandbytes LLM.int8) base model",
                          fix="shard a 4-bit base instead (--load_in_4bit true: QLoRA under FSDP), or train "
                              "data-parallel without --fsdp / --use_fsdp")
    if t.fp16:
        raise ConfigError(f"FSDP ({source}) trains in bf16 or float32, not fp16",
                          fix="use --bf16 true instead of --fp16")
    if t.optim != "adamw_torch":
        raise ConfigError(f"FSDP ({source}) needs optim adamw_torch, not {t.optim} (bitsandbytes' optimizers cannot "
                          "step sharded parameters; the fused AdamW is not tested with them)",
                          fix="pass --optim adamw_torch")
    if t.auto_find_batch_size:
        raise ConfigError(f"FSDP ({source}) cannot probe batch sizes (an out-of-memory on one rank would stall the "
                          "others)", fix="set --max_tokens_per_pass yourself and --auto_find_batch_size false")
