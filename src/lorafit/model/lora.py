"""LoRA on the base model: target presets per architecture, injection through PEFT, adapter I/O.

PEFT does the wrapping (each LoRA layer holds its `base_layer`), so adapters save as
`adapter_config.json` + `adapter_model.safetensors` and load unchanged with
`peft.PeftModel.from_pretrained`. What lorafit adds is choosing the targets: recipes write
`q_proj, k_proj, v_proj, o_proj` for Phi-3, whose attention fuses them into `qkv_proj`, and
a target that matches nothing would otherwise fail deep inside PEFT or, worse, silently
train fewer layers than asked.
"""
from __future__ import annotations

from pathlib import Path

from lorafit.config.schema import Config
from lorafit.errors import ConfigError, UserError, reading_files
from lorafit.model.arch import family
from lorafit.model.load import parameter_sizes
from lorafit.parsing import json_loads


def linear_layer_names(model) -> list[str]:
    """Leaf names of the model's linear layers (plain, 4-bit or 8-bit), lm_head excluded."""
    import torch

    names = set()
    for full, module in model.named_modules():
        parts = full.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        if parts[-1] == "base_layer" and len(parts) > 1:  # already wrapped by PEFT: name its holder
            parts = parts[:-1]
        leaf = parts[-1]
        if leaf == "lm_head" or not full:
            continue
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear or type(module).__name__ == "Conv1D":
            names.add(leaf)
    return sorted(names)


def resolve_targets(model, target_modules: list[str] | str) -> list[str]:
    """Module leaf names to wrap: a preset (attention, mlp, all-linear) or names mapped onto this model."""
    arch = model.config.model_type
    have = linear_layer_names(model)
    fam = family(arch)
    if isinstance(target_modules, str):
        wanted = [t.strip() for t in target_modules.split(",") if t.strip()]
    else:
        wanted = list(target_modules)
    names: list[str] = []
    for t in wanted:
        if t in ("all-linear", "all_linear", "all"):
            names += have
        elif t in ("attention", "mlp"):
            if fam is None:
                raise ConfigError(
                    f"no '{t}' preset for architecture '{arch}'",
                    fix=f"use all-linear or name modules with --target_modules; this model has: {', '.join(have)}")
            names += getattr(fam, t)
        else:
            names.append(fam.renames.get(t, t) if fam else t)
    names = list(dict.fromkeys(names))
    missing = [n for n in names if n not in have]
    if missing:
        raise ConfigError(
            f"target_modules {missing} match no layer of this {arch} model",
            fix=f"use a preset (attention, mlp, all-linear) or names from its linear layers: {', '.join(have)}")
    return names


def apply_lora(model, cfg: Config, fused: bool = False):
    """Wrap the target layers with trainable LoRA (A: Kaiming-uniform, B: zeros, so the start is the base).

    `fused`: training runs lorafit's fused kernels (model/arch.py's fused_path_choice), which keep norms,
    embeddings and the head in the compute dtype; PEFT's k-bit preparation would upcast them to fp32 (for
    Phi-3-mini ~0.4 GB more, and the head re-cast on every step), so it is skipped then."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lo = cfg.lora
    targets = resolve_targets(model, lo.target_modules)
    if (cfg.model.load_in_4bit or cfg.model.load_in_8bit) and not fused:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_cfg = LoraConfig(r=lo.lora_r, lora_alpha=lo.lora_alpha, lora_dropout=lo.lora_dropout,
                          target_modules=targets, bias=lo.lora_bias, use_rslora=lo.use_rslora,
                          task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def load_adapter(base_model, adapter_dir: Path, trainable: bool = False):
    """The base with a saved adapter on top (PEFT's own loader, so any PEFT adapter works)."""
    from peft import PeftModel

    fix = "train it again, or resume its run with --resume (a checkpoint under checkpoints/ holds a whole copy)"
    with reading_files("adapter", adapter_dir, fix=fix):
        problem = adapter_config_problem(json_loads((Path(adapter_dir) / "adapter_config.json").read_bytes()))
        if problem:
            raise UserError(f"'{Path(adapter_dir) / 'adapter_config.json'}' is damaged: {problem}", fix=fix)
        return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable)


_ADAPTER_FIELDS = {"r": int, "lora_alpha": (int, float), "target_modules": (list, str, type(None)),
                   "base_model_name_or_path": (str, type(None)), "peft_type": str}


def adapter_config_problem(data) -> str | None:
    """Why PEFT would fail on this adapter_config.json with a TypeError deep in its code, or None.
    PEFT passes the fields to LoraConfig unchecked (`"target_modules": 5` ends in "'int' object is not iterable")."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    for key, types in _ADAPTER_FIELDS.items():
        if key in data and (not isinstance(data[key], types) or isinstance(data[key], bool)):
            return f"'{key}' is {data[key]!r}"
    if isinstance(data.get("target_modules"), list) and not all(isinstance(x, str) for x in data["target_modules"]):
        return f"'target_modules' is {data['target_modules']!r}, not a list of module names"
    if data.get("peft_type", "LORA") != "LORA" or not isinstance(data.get("r", 1), int) or data.get("r", 1) < 1:
        return f"peft_type {data.get('peft_type')!r} / r {data.get('r')!r} is not a LoRA adapter lorafit can load"
    return None


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked element number."""
    trainable = total = 0
    for p, n in parameter_sizes(model):
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
