"""What a quantized GGUF export costs: each tensor's relative RMS error and, for a run, the perplexity of the
quantized weights against f16 ones on the run's held-out split. Printed, and written beside the file as
`NAME.quant.json` and `NAME.quant.md`.

The perplexity is lorafit's eval perplexity (reply tokens only, teacher-forced) of the merged HF model with its
weights replaced in memory by what the file holds: each tensor dequantized by the `gguf` package and put back
into the HF layout. The f16 baseline is the same model with every 2-D weight rounded to f16, which is what an
f16 export holds.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lorafit.errors import UserError
from lorafit.evaluate.run import eval_examples, reply_perplexity
from lorafit.export.arch import arch_for, folder_shapes, tensor_plans
from lorafit.infer.generate import Session, run_template
from lorafit.model.load import default_device
from lorafit.run_dir import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from lorafit.config.schema import Config


def quant_cost(output: Path, folder: Path, dtype: str, errors: list[dict], console: Any,
               run: tuple[Path, Config] | None = None) -> dict:
    """Summarize `errors` (verify_gguf's rows) by type, add held-out perplexity when `run` is given, print
    the table and write NAME.quant.json / NAME.quant.md beside `output`."""
    by_type: dict[str, dict] = {}
    for row in errors:
        t = by_type.setdefault(row["type"], {"tensors": 0, "weights": 0, "sq": 0.0, "max_rel_rmse": 0.0})
        n = int(np.prod(row["shape"]))
        t["tensors"] += 1
        t["weights"] += n
        t["sq"] += row["rel_rmse"] ** 2 * n
        t["max_rel_rmse"] = max(t["max_rel_rmse"], row["rel_rmse"])
    for t in by_type.values():
        t["mean_rel_rmse"] = math.sqrt(t.pop("sq") / t["weights"])
    report: dict[str, Any] = {"file": output.name, "dtype": dtype, "bytes": output.stat().st_size,
                              "by_type": by_type, "tensors": errors, "perplexity": None}
    if run is not None:
        report["perplexity"] = held_out_perplexity(output, folder, *run, console)
    write_json_atomic(output.with_suffix(".quant.json"), report)
    write_text_atomic(output.with_suffix(".quant.md"), markdown(report))
    console.print(markdown(report, tensors=False))
    console.print(f"wrote {output.with_suffix('.quant.json')} and {output.with_suffix('.quant.md')}")
    return report


def held_out_perplexity(output: Path, folder: Path, run_dir: Path, cfg: Config, console: Any) -> dict | None:
    """Perplexity on the run's held-out split with f16 weights and with the file's; None without a split."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        examples, settings = eval_examples(run_dir, cfg)
    except UserError as e:  # no held-out split, or the training data is gone: the file itself is fine
        console.print(f"[yellow]note:[/] no held-out perplexity: {e}")
        return None
    config = AutoConfig.from_pretrained(folder)
    plans = [p for p in tensor_plans(config, arch_for(config), folder_shapes(folder)) if p.source is not None]
    device = default_device()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    session = Session(model, AutoTokenizer.from_pretrained(folder), run_template(run_dir, cfg), device, run_dir.name)
    started = time.perf_counter()
    console.print(f"perplexity on {len(examples)} held-out examples, f16 weights vs the file's ...")
    with torch.no_grad():
        for plan in plans:
            if len(plan.shape) > 1:
                p = model.get_parameter(plan.source)
                p.copy_(p.to(torch.float16).float())
        f16 = reply_perplexity(session, examples, cfg)
        for plan, values in _file_tensors(output, plans):
            model.get_parameter(plan.source).copy_(values.to(device))
        quantized = reply_perplexity(session, examples, cfg)
    change = (quantized / f16 - 1) if f16 and quantized else None
    return {"f16": f16, "quantized": quantized, "change": change, "examples": len(examples),
            "split": settings["split"], "seconds": round(time.perf_counter() - started, 1)}


def _file_tensors(path: Path, plans: list):
    """Each plan with the file's tensor, dequantized and back in the HF layout."""
    import gguf

    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for plan in plans:
        t = stored[plan.name]
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:  # the reader gives bf16 as raw 16-bit words
            values = torch.from_numpy(data.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16).float()
        else:
            values = torch.from_numpy(gguf.quants.dequantize(data, t.tensor_type).copy())
        values = values.reshape(plan.shape)
        yield plan, plan.inverse(values) if plan.inverse else values


def markdown(report: dict, tensors: bool = True) -> str:
    """The cost as Markdown: by type, the perplexity, and (tensors=True) one line per tensor."""
    lines = [f"# Quantization cost of {report['file']} ({report['dtype']}, {report['bytes'] / 2**20:.1f} MiB)", "",
             "| type | tensors | weights | relative RMS error (mean) | (worst tensor) |", "|---|---:|---:|---:|---:|"]
    for name, t in sorted(report["by_type"].items(), key=lambda kv: -kv[1]["weights"]):
        lines.append(f"| {name} | {t['tensors']} | {t['weights']:,} | {100 * t['mean_rel_rmse']:.2f}% "
                     f"| {100 * t['max_rel_rmse']:.2f}% |")
    ppl = report.get("perplexity")
    if ppl:
        lines += ["", (f"Held-out perplexity ({ppl['examples']} examples, {ppl['split']}): f16 {ppl['f16']:.4f}, "
                      f"{report['dtype']} {ppl['quantized']:.4f} ({100 * ppl['change']:+.2f}%)")]
    if tensors:
        lines += ["", "| tensor | type | shape | relative RMS error |", "|---|---|---|---:|"]
        lines += [f"| {r['name']} | {r['type']} | {'x'.join(map(str, r['shape']))} | {100 * r['rel_rmse']:.3f}% |"
                  for r in report["tensors"]]
    return "\n".join(lines) + "\n"
