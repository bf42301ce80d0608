"""`lorafit merge`: fold the adapter into the base weights (W' = W + scaling * B @ A), save, verify.

    lorafit merge --adapter_path DIR --output_dir OUT

The merged folder is a plain transformers model (safetensors, tokenizer, generation config whose
EOS is the template's end token, template.json, README.md) that loads with no PEFT and no lorafit.

Precision. The merge itself runs in fp32: the base is loaded unquantized in fp32 (an exact upcast of
bf16/fp16 checkpoints), the adapter applied, W + scaling * B @ A folded in fp32, and the result cast
once to the saved dtype: bf16 for a 4-bit (QLoRA) or 8-bit run, else the run's compute dtype (fp32
on CPU). A quantized run is not merged into its NF4 codes: the NF4 grid step is ~100x a typical
B @ A entry, so the update would round away; the base's original weights are what NF4 approximated.
The merged model is therefore "adapter on the unquantized base", and that is what it is checked
against. Peak memory is the fp32 base (~15 GB for a 3.8B model).

Verification. Before anything is kept, the saved folder is loaded back (upcast to fp32) and its
logits on a few template-rendered conversations are compared with the fp32 adapter model's. Running
both in fp32 leaves only the saved dtype's rounding of W' as a legitimate difference (a bf16 forward
adds activation noise of its own: max |diff| 1.6 on logits of 40 for SmolLM2-135M, which would hide a
real merge error). Tolerance on max |difference| / max(1, largest |logit|):
  float32   1e-4  one fp32 rounding of W + BA; measured 3e-6 on SmolLM2-135M, 2e-6 on tiny models.
  bfloat16  2e-2  every weight rounded to 8 mantissa bits; measured 8e-3 on SmolLM2-135M (stored
                  in fp32, so W itself rounds too; bf16 checkpoints round only the update).
  float16   1e-2  10 mantissa bits, 4x finer than bf16; the danger there is overflow, caught as inf.
A larger gap, or any NaN/inf, raises MergeCheckError (exit code 3) and leaves no output folder:
everything is written into a temporary sibling folder and renamed into place only when it checks out.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lorafit.errors import UserError
from lorafit.export.template import chat_format
from lorafit.export.vocab import plain_byte_level
from lorafit.infer.generate import eos_token_ids, run_template
from lorafit.model.load import compute_dtype, load_base_model, load_tokenizer, resolve_model
from lorafit.model.lora import load_adapter
from lorafit.run_dir import require_adapter

if TYPE_CHECKING:
    from lorafit.config.schema import Config

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "What is 17 + 25?"}, {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "Give three tips for staying healthy."},
     {"role": "assistant", "content": "Eat vegetables, sleep eight hours and walk every day."}],
    [{"role": "user", "content": "Write the word 'garden' in capital letters."},
     {"role": "assistant", "content": "GARDEN"}],
]
CHECK_MAX_TOKENS = 64


class MergeCheckError(UserError):
    """The merged model's logits do not match the adapter model's (or hold NaN/inf): nothing was kept.

    Not a user mistake, but not a lorafit crash either: it is a verdict on this adapter or base, so it
    is reported as one message, with its own exit code (3) to tell it apart from a wrong flag (2).
    """

    exit_code = 3


def merge(run_dir: Path, out_dir: Path, cfg: Config) -> Path:
    """merge_to_folder, with progress and a summary on stderr."""
    _status(f"merging the adapter in {run_dir} into {cfg.model.model} ...")
    out = merge_to_folder(run_dir, out_dir, cfg)
    _status(f"merged model written to {out} (logits checked against the adapter model)")
    return out


def merge_to_folder(run_dir: Path, out_dir: Path, cfg: Config) -> Path:
    """Merge, save into a temporary folder, verify the saved model's logits, then rename it to out_dir."""


    run_dir, out_dir = Path(run_dir), Path(out_dir)
    require_adapter(run_dir)
    _check_output_dir(run_dir, out_dir)
    template = run_template(run_dir, cfg)  # the run's, with a --system_prompt given now in place of the trained one
    mcfg = merge_config(cfg)
    dtype = merge_dtype(cfg)
    source = resolve_model(mcfg)
    tokenizer = load_tokenizer(mcfg, source)
    model = load_adapter(load_base_model(mcfg, _cpu(), source), run_dir)
    model.eval()
    inputs = check_inputs(template, tokenizer)
    reference = _logits(model, inputs)
    merged = model.merge_and_unload(progressbar=False, safe_merge=False)
    del model
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _save(merged, tokenizer, template, run_dir, tmp, cfg, dtype)
        del merged
        check_logits(tmp, inputs, reference, dtype)
        if out_dir.exists():
            out_dir.rmdir()  # _check_output_dir allowed only an empty folder
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def merge_dtype(cfg: Config):
    """bf16 for a quantized run (see the module docstring), else the run's compute dtype."""
    import torch


    if cfg.model.load_in_4bit or cfg.model.load_in_8bit:
        return torch.bfloat16
    return compute_dtype(cfg)


def merge_config(cfg: Config) -> Config:
    """The run's config with the base unquantized and in fp32, for the merge and the reference."""
    out = copy.deepcopy(cfg)
    out.model.load_in_4bit = out.model.load_in_8bit = False
    out.train.bf16 = out.train.fp16 = False  # compute_dtype -> fp32 on CPU
    return out


def check_inputs(template, tokenizer) -> list[list[int]]:
    """Token ids of a few whole conversations (prompt and reply) in the run's template."""
    out = []
    for conv in CHECK_CONVERSATIONS:
        text = template.render(conv, tokenizer, add_generation_prompt=False)
        ids = tokenizer(text, add_special_tokens=template.add_special_tokens)["input_ids"]
        out.append(list(ids)[:CHECK_MAX_TOKENS])
    return out


def check_logits(model_dir: Path, inputs: list[list[int]], reference: list, dtype) -> float:
    """Load the saved model and compare its logits with `reference`; raise MergeCheckError on a drift."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # exact upcast of `dtype`
    model.eval()
    merged = _logits(model, inputs)
    del model
    name = str(dtype).removeprefix("torch.")
    worst, scale = 0.0, 1.0
    for got, want in zip(merged, reference, strict=True):
        if not torch.isfinite(got).all() or not torch.isfinite(want).all():
            which = "merged model's" if not torch.isfinite(got).all() else "adapter model's"
            raise MergeCheckError(f"the {which} logits hold NaN or inf: the adapter or base weights are broken; "
                                  "no merged model was written",
                                  fix="check the adapter (e.g. a run that diverged); eval or chat show the same")
        worst = max(worst, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
    tol = TOLERANCE.get(name, TOLERANCE["bfloat16"])
    if worst > tol * scale:
        raise MergeCheckError(
            f"merged logits drift from the adapter model's: max abs diff {worst:.3g} > {tol:g} x {scale:.3g} "
            f"(largest |logit|) with {name} weights; no merged model was written",
            fix="report this with the adapter's adapter_config.json; the adapter itself still works with chat/serve")
    return worst


def _cpu():
    import torch

    return torch.device("cpu")


def _logits(model, inputs: list[list[int]]) -> list:
    import torch

    out = []
    with torch.inference_mode():
        for ids in inputs:
            out.append(model(input_ids=torch.tensor([ids])).logits[0].float())  # (T, V)
    return out


def _check_output_dir(run_dir: Path, out_dir: Path) -> None:
    if out_dir.is_symlink():  # the finished folder is renamed onto out_dir: a link would be replaced, not followed
        raise UserError(f"output_dir '{out_dir}' is a symbolic link (to '{os.readlink(out_dir)}')",
                        fix="pass the real folder (or a new path) to --output_dir")
    if out_dir.resolve() == run_dir.resolve():
        raise UserError("output_dir is the run directory itself", fix="pass a new folder to --output_dir")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"output_dir '{out_dir}' already exists and is not empty",
                        fix="pass a new folder to --output_dir, or delete the old one")


def _save(model, tokenizer, template, run_dir: Path, out: Path, cfg: Config, dtype) -> None:
    """safetensors weights, tokenizer (with the trained chat template), generation config, template, README."""

    model.to(dtype)
    eos = sorted(eos_token_ids(model, tokenizer, template))
    gc = model.generation_config
    gc.eos_token_id = eos[0] if len(eos) == 1 else eos
    gc.pad_token_id = tokenizer.pad_token_id
    g = cfg.generate
    gc.do_sample = g.temperature > 0
    if gc.do_sample:
        gc.temperature, gc.top_p, gc.top_k = g.temperature, g.top_p, g.top_k
    gc.repetition_penalty = g.repetition_penalty
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    # apply_chat_template on the merged model renders what training saw: the template, with the trained system
    # prompt as the default when a conversation brings none
    jinja = chat_format(template.to_dict(), tokenizer).jinja
    if jinja:
        tokenizer.chat_template = jinja
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
    plain_byte_level(out / "tokenizer.json")
    template.save(out)
    (out / "README.md").write_text(_readme(run_dir, cfg, template, dtype), encoding="utf-8")


def _readme(run_dir: Path, cfg: Config, template, dtype) -> str:
    lo = cfg.lora
    quant = "4-bit NF4 (QLoRA)" if cfg.model.load_in_4bit else "8-bit" if cfg.model.load_in_8bit else "not quantized"
    return f"""# Merged model

- base model: `{cfg.model.model}` (trained {quant})
- adapter: `{run_dir.resolve()}` (LoRA r={lo.lora_r}, alpha={lo.lora_alpha:g}, targets {lo.target_modules})
- weights: {str(dtype).removeprefix('torch.')}, the adapter folded into the unquantized base
- prompt template: `{template.name}` (template.json holds it; generation stops at {template.stop_strings})

Written by `lorafit merge`, which checked that this model's logits match the adapter model's.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{{this folder}}")
tokenizer = AutoTokenizer.from_pretrained("{{this folder}}")
```
"""


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
