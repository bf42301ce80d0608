"""`lorafit export`: a GGUF file (llama.cpp, Ollama) from a run directory or a merged model folder, in pure
Python with the `gguf` package and lorafit's k-quants (quants.py), checked tensor by tensor after writing, plus
an Ollama Modelfile beside it (`NAME.Modelfile` for `NAME.gguf`).

  export_gguf(path, output, dtype)    the command: merge a run if needed, write_gguf, then the quantization's cost
  write_gguf(folder, output, dtype)   merged HF folder -> verified .gguf (+ Modelfile); per-tensor errors
  verify_gguf(path, folder, dtype)    compare every tensor of a written file with the folder's

The file is written to a new temporary file at a random name beside `output` (created exclusively), verified,
then renamed: a failed export leaves nothing behind, and nothing planted at a predictable name is followed.
An existing export is replaced only with `overwrite=True`.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafit.config.load import build_config
from lorafit.errors import UserError
from lorafit.export import quants
from lorafit.export.arch import TensorPlan, add_hparams, arch_for, folder_shapes, tensor_plans
from lorafit.export.cost import quant_cost
from lorafit.export.imatrix import importance
from lorafit.export.merge import merge_to_folder
from lorafit.export.quant_mix import DTYPES, QUANTIZED, file_type, tensor_types
from lorafit.export.template import chat_format, modelfile
from lorafit.export.vocab import add_vocab
from lorafit.run_dir import load_run_config, new_temp_file, write_text_atomic

Q8_BLOCK = 32
# Q8_0 stores each block of 32 weights as int8 codes q = round(w / d), d = max|w| / 127, and d as f16.
# Rounding q moves a weight by at most d / 2; storing d in f16 (relative error <= 2^-11) moves it by at most
# 127 * d * 2^-11 = 0.062 d more. So every dequantized weight is within 0.57 d of the original.
Q8_TOLERANCE_STEPS = 0.57
# Largest relative RMS error (||dequantized - original|| / ||original||) a tensor may read back with; far above
# what the quantizers reach (gaussian weights: Q4_0 8.6%, Q4_K 7.2%, Q5_0 4.3%, Q5_K 3.6%, Q6_K 1.8%; LLM tensors
# with outliers a few points more), far below what a wrong block layout gives (~100%). Above it: a lorafit bug.
MAX_REL_RMSE = {"Q4_0": 0.3, "Q4_1": 0.3, "Q4_K": 0.3, "Q5_0": 0.15, "Q5_1": 0.15, "Q5_K": 0.15, "Q6_K": 0.08}
_EXACT = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGMLQuantizationType F32, F16, BF16 values


def export_gguf(path: Path, output: Path, dtype: str = "f16", overrides: dict[str, Any] | None = None,
                overwrite: bool = False, perplexity: bool = True, imatrix: bool = False) -> Path:
    """Write `output` (.gguf) and its Modelfile from a run directory (merged first) or a merged folder; for a
    quantized dtype also `output`.quant.json/.md: per-tensor error and (for a run) held-out perplexity vs f16.
    `imatrix`: weigh the quantizers' scale searches by importance from the run's training data (imatrix.py)."""
    from rich.console import Console

    console = Console(stderr=True)
    path, output = Path(path), Path(output)
    _check_args(path, output, dtype, overwrite)
    is_run = (path / "adapter_config.json").is_file()
    if imatrix and (not is_run or dtype not in QUANTIZED):
        raise UserError("--imatrix needs a run directory (its training data) and a quantized --dtype",
                        fix="pass the output_dir of `lorafit train` and e.g. --dtype q4_k_m, or drop --imatrix")
    if is_run:
        cfg = load_run_config(path, overrides)
        template = _read_template(path)
        with tempfile.TemporaryDirectory(prefix=".lorafit-merge-", dir=output.parent) as tmp:
            console.print(f"merging the adapter in {path} into its base ...")
            folder = merge_to_folder(path, Path(tmp), cfg)
            weights = None
            if imatrix:
                console.print("importance matrix from the run's training data ...")
                weights = importance(folder, path, cfg, _folder_plans(folder))
            errors = write_gguf(folder, output, dtype, template=template, params=_ollama_params(cfg),
                                console=console, source=path.name, importance=weights)
            if dtype in QUANTIZED:
                quant_cost(output, folder, dtype, errors, console, run=(path, cfg) if perplexity else None)
        return output
    _require_model_folder(path)
    cfg = build_config(None, overrides)
    errors = write_gguf(path, output, dtype, template=_read_template(path), params=_ollama_params(cfg),
                        console=console, source=path.name)
    if dtype in QUANTIZED:
        quant_cost(output, path, dtype, errors, console)
    return output


def modelfile_path(output: Path) -> Path:
    """Each export's own Modelfile: `q4.gguf` -> `q4.Modelfile` (a second export never replaces the first's)."""
    return output.with_suffix(".Modelfile")


def _folder_plans(folder: Path) -> list[TensorPlan]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return tensor_plans(config, arch_for(config), folder_shapes(folder))


def write_gguf(folder: Path, output: Path, dtype: str = "f16", template: dict | None = None,
               params: dict[str, Any] | None = None, console: Any = None, source: str | None = None,
               importance: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Merged HF folder -> verified GGUF at `output`, and its Modelfile. Returns verify_gguf's per-tensor rows.

    `template` is a run's template.json (its chat template goes into the file); `params` are Ollama
    `PARAMETER`s (temperature, top_p, ...); `source` names the model in `general.description`; `importance`
    holds per-column weights for the quantizers' scale searches, by GGUF tensor name.
    """
    from transformers import AutoConfig, AutoTokenizer

    folder, output = Path(folder), Path(output)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as e:  # unknown model_type, broken config.json
        raise UserError(f"cannot read the model config in '{folder}': {e}",
                        fix="export a Llama/Mistral/Qwen2/Phi-3 family model folder saved by transformers") from None
    spec = arch_for(config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plans = tensor_plans(config, spec, folder_shapes(folder))
    types = tensor_types([(p.name, p.shape) for p in plans], dtype, config.num_hidden_layers, bool(importance))
    tmp = new_temp_file(output)
    try:
        writer = _new_writer(spec.gguf_arch, source or folder.name, output, dtype)
        add_hparams(writer, config, spec)
        vocab = add_vocab(writer, folder, tokenizer, config)
        fmt = chat_format(template, tokenizer)
        if fmt.jinja:
            writer.add_chat_template(fmt.jinja)
        _write_tensors(writer, tmp, folder, plans, types, console, importance or {})
        errors = verify_gguf(tmp, folder, dtype, plans, imatrix=bool(importance))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    write_text_atomic(modelfile_path(output), modelfile(output.name, fmt, params or {}))
    for note in (vocab.warning, fmt.warning):
        if note and console is not None:
            console.print(f"[yellow]warning:[/] {note}")
    if console is not None:
        size = output.stat().st_size / 2**20
        console.print(f"wrote {output} ({spec.gguf_arch}, {dtype}, {len(plans)} tensors, {size:.1f} MiB, verified) "
                      f"and {modelfile_path(output)}")
    return errors


def verify_gguf(gguf_path: Path, folder: Path, dtype: str, plans: list[TensorPlan] | None = None,
                imatrix: bool = False) -> list[dict]:
    """Read the file back and compare every tensor with the folder's (same layout change, same cast).

    Bit-exact for f32/f16/bf16; q8_0 within 0.57 quantization steps of each block (Q8_TOLERANCE_STEPS); other
    quantized types within MAX_REL_RMSE, dequantized by the `gguf` package (an independent reader of the block
    layouts). A mismatch is a lorafit bug: RuntimeError. Returns one row per tensor: name, type, shape and
    relative RMS error.
    """
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if plans is None:
        plans = tensor_plans(config, arch_for(config), folder_shapes(folder))
    types = tensor_types([(p.name, p.shape) for p in plans], dtype, config.num_hidden_layers, imatrix)
    reader = gguf.GGUFReader(gguf_path)
    stored = {t.name: t for t in reader.tensors}
    if set(stored) != {p.name for p in plans}:
        raise RuntimeError(f"GGUF tensors differ from the plan: missing {sorted({p.name for p in plans} - set(stored))}"
                           f", extra {sorted(set(stored) - {p.name for p in plans})}")
    rows = []
    for plan, source in _sources(folder, plans):
        t = stored[plan.name]
        if tuple(int(d) for d in reversed(t.shape)) != plan.shape:
            raise RuntimeError(f"{plan.name}: shape {list(reversed(t.shape))} in the file, {plan.shape} expected")
        qtype = types[plan.name]
        if t.tensor_type != qtype:
            raise RuntimeError(f"{plan.name}: type {t.tensor_type.name} in the file, {qtype.name} expected")
        got = np.asarray(t.data)
        want = source.numpy()
        if qtype in _EXACT:
            if got.tobytes() != _cast(source, qtype).tobytes():  # bit-exact (the reader gives bf16 as raw bytes)
                raise RuntimeError(f"{plan.name}: values in the file differ from the merged model's")
            values = source.to(_EXACT[qtype]).float().numpy()
        else:
            values = gguf.quants.dequantize(got, qtype).reshape(plan.shape)
        err = _rel_rmse(values, want)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            _check_q8(plan.name, values, want)
        elif err > MAX_REL_RMSE.get(qtype.name, 1.0):
            raise RuntimeError(f"{plan.name}: {qtype.name} reads back with relative RMS error {err:.3f} "
                               f"(at most {MAX_REL_RMSE[qtype.name]} expected): a wrong block layout")
        rows.append({"name": plan.name, "type": qtype.name, "shape": list(plan.shape), "rel_rmse": err})
    return rows


def _rel_rmse(got: np.ndarray, want: np.ndarray) -> float:
    want64 = want.astype(np.float64)
    norm = float(np.sqrt((want64 ** 2).sum()))
    return float(np.sqrt(((got.astype(np.float64) - want64) ** 2).sum())) / norm if norm > 0 else 0.0


def _check_q8(name: str, got: np.ndarray, want: np.ndarray) -> None:
    blocks = want.reshape(-1, Q8_BLOCK)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # each block's quantization step d
    err = np.abs(got.reshape(-1, Q8_BLOCK) - blocks)
    if not np.all(err <= Q8_TOLERANCE_STEPS * step + 1e-7):
        raise RuntimeError(f"{name}: q8_0 error {err.max():.3g} exceeds {Q8_TOLERANCE_STEPS} quantization steps")


def _check_args(path: Path, output: Path, dtype: str, overwrite: bool) -> None:
    if dtype not in DTYPES:
        raise UserError(f"unknown GGUF dtype '{dtype}'", fix=f"use one of {', '.join(DTYPES)}")
    if not path.exists():
        raise UserError(f"'{path}' does not exist", fix="pass a run directory (`lorafit train --output_dir`) or a "
                                                        "merged model folder (`lorafit merge --output_dir`)")
    if output.suffix != ".gguf":
        raise UserError(f"output '{output}' should end in .gguf", fix=f"--output {output.with_suffix('.gguf')}")
    if output.is_dir():
        raise UserError(f"output '{output}' is a folder", fix="pass a file name such as out/model.gguf")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder '{parent}': {e.strerror}",
                        fix="choose an --output in a folder you can write to") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"the output folder '{parent}' is not writable",
                        fix="choose an --output in a folder you can write to")
    for existing in (output, modelfile_path(output)):
        if os.path.lexists(existing) and not overwrite:
            raise UserError(f"'{existing}' already exists", fix="pass --overwrite to replace it, or another --output")


def _require_model_folder(path: Path) -> None:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"'{path}' is neither a lorafit run directory (no adapter_config.json) nor a merged model "
                        "folder (no config.json)",
                        fix="pass the output_dir of `lorafit train`, or of `lorafit merge`")
    if not list(path.glob("*.safetensors")):
        raise UserError(f"'{path}' holds no *.safetensors weights",
                        fix="save the model with `model.save_pretrained(folder)` (safetensors is the default)")


def _read_template(folder: Path) -> dict | None:
    path = Path(folder) / "template.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _ollama_params(cfg: Any) -> dict[str, Any]:
    g = cfg.generate
    return {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k, "repeat_penalty": g.repetition_penalty,
            "num_ctx": max(2048, cfg.data.max_seq_length), "num_predict": g.max_new_tokens}


def _sources(folder: Path, plans: list[TensorPlan]) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """Each plan with its float32 tensor, layout change applied; one tensor in memory at a time."""
    from safetensors import safe_open

    where = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    for plan in plans:
        if plan.source is None:
            yield plan, plan.value.float()
            continue
        with safe_open(where[plan.source], framework="pt") as f:
            t = f.get_tensor(plan.source).float()
        yield plan, plan.transform(t).contiguous() if plan.transform else t


def _cast(t: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return t.numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    if qtype == Q.BF16:  # numpy has no bfloat16: the file holds its bits as uint16
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return quants.quantize(t, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _new_writer(arch: str, source: str, output: Path, dtype: str):
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(output.stem)
    writer.add_description(f"exported by lorafit from {source}")
    writer.add_file_type(file_type(dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return writer


def _write_tensors(writer: Any, tmp: Path, folder: Path, plans: list[TensorPlan], types: dict, console: Any,
                   importance: dict[str, torch.Tensor]) -> None:
    """Header and tensor index first, then each tensor's data streamed from safetensors (no full copy in RAM);
    k-quants on the GPU when there is one."""
    from rich.progress import Progress

    for plan in plans:
        qtype = types[plan.name]
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), _nbytes(plan.shape, qtype), qtype)
    writer.write_header_to_file(path=tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    total = sum(int(np.prod(p.shape)) for p in plans)
    try:
        with Progress(console=console, transient=True, disable=console is None) as progress:
            task = progress.add_task("writing tensors", total=total)
            for plan, t in _sources(folder, plans):
                qtype = types[plan.name]
                progress.update(task, description=f"{plan.name} ({qtype.name})")
                if qtype.name.endswith("_K") or plan.name in importance:
                    data = quants.quantize(t.to(device), qtype, importance.get(plan.name))
                else:
                    data = _cast(t, qtype)
                if data.dtype == np.float16 and not np.isfinite(data).all():
                    raise UserError(f"tensor {plan.source} holds values beyond float16's range (65504)",
                                    fix="export with --dtype bf16 (same size, wider range) or --dtype f32")
                writer.write_tensor_data(data)
                progress.advance(task, int(np.prod(plan.shape)))
    finally:
        writer.close()
