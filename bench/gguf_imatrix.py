"""q4_k_m with an importance matrix: lorafit's against llama.cpp's, and which tensors cost the perplexity.

  PYTHONPATH=src python bench/gguf_imatrix.py --run RUN_DIR --work WORK --bin LLAMA_CPP/build/bin

Run after bench/gguf_llamacpp.sh RUN_DIR WORK (it builds llama.cpp and writes WORK/exports/f32.gguf, f16.gguf and
q4_k_m.gguf); needs llama-imatrix too (`cmake --build BUILD --target llama-imatrix`).
  1. lorafit's importance matrix (export/imatrix.py: 64 training conversations) -> lorafit's q4_k_m --imatrix, and
     the same matrix written in llama.cpp's imatrix format -> `llama-quantize --imatrix` on the f32 export: per
     tensor type, the share of byte-identical blocks and both files' relative RMS error (the quantizer check);
  2. llama.cpp's own `llama-imatrix` over the same 64 conversations (rendered as training rendered them) ->
     `llama-quantize --imatrix` (the honest end-to-end comparison);
  3. held-out perplexity (lorafit's eval perplexity: reply tokens, 60 examples) of f16 weights, of each file, of
     f16 weights with one group of tensors taken from q4_k_m (plain and --imatrix), and with every Q5_0 tensor
     held at Q8_0 instead (NOT llama.cpp's mix: what keeping 576-wide rows at 8 bits would buy);
  4. llama-perplexity of each file on the held-out text (as bench/gguf_llamacpp.py).
Writes WORK/imatrix_results.json and prints tables.
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf_llamacpp import held_out_text, perplexity
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lorafit.data.encode import load_conversations, split_conversations
from lorafit.evaluate.run import eval_examples, reply_perplexity
from lorafit.export.arch import arch_for, folder_shapes, tensor_plans
from lorafit.export.cost import _file_tensors
from lorafit.export.gguf import _folder_plans, _read_template, write_gguf
from lorafit.export.imatrix import SEQUENCES, importance
from lorafit.export.merge import merge_to_folder
from lorafit.infer.generate import Session, load_session, run_template
from lorafit.run_dir import load_run_config

Q = gguf.GGMLQuantizationType
GROUPS = {"token_embd (Q8_0)": ("token_embd",), "attn_q/k/output": ("attn_q.", "attn_k.", "attn_output"),
          "attn_v": ("attn_v",), "ffn_gate/up": ("ffn_gate", "ffn_up"), "ffn_down": ("ffn_down",)}


def write_llamacpp_imatrix(imp: dict[str, torch.Tensor], path: Path, chunks: int) -> None:
    """llama.cpp's legacy imatrix file (common/imatrix-loader.cpp reads it): per entry the name, ncall and the
    values times ncall (the loader divides by ncall); then the chunk count and a dataset name."""
    with path.open("wb") as f:
        f.write(struct.pack("<i", len(imp)))
        for name, values in imp.items():
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 1, values.numel()))
            f.write(values.float().numpy().astype("<f4").tobytes())
        dataset = b"lorafit training conversations"
        f.write(struct.pack("<ii", chunks, len(dataset)) + dataset)


def training_text(run: Path, session, path: Path) -> Path:
    """The first SEQUENCES training conversations (what export/imatrix.py runs), as training rendered them."""
    cfg = load_run_config(run)
    train, _, _ = split_conversations(load_conversations(cfg)[0], cfg)
    path.write_text("".join(session.template.render(c, session.tokenizer, False) for c in train[:SEQUENCES]),
                    encoding="utf-8")
    return path


def _blocks(path: Path) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """{name: (type, raw blocks (n, bytes), dequantized values)}"""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        data = np.asarray(t.data)
        size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        out[t.name] = (t.tensor_type.name, data.view(np.uint8).reshape(-1, size),
                       gguf.quants.dequantize(data, t.tensor_type).reshape(-1))
    return out


def same_blocks(ours: Path, theirs: Path, ref: Path) -> dict[str, dict]:
    """Per tensor type: tensors, share of byte-identical blocks, relative RMS error of both against `ref`."""
    a, b, r = _blocks(ours), _blocks(theirs), _blocks(ref)
    by: dict[str, dict] = {}
    for name, (kind, blocks, values) in a.items():
        if kind in ("F32", "F16") or b[name][0] != kind:
            continue
        want = r[name][2]
        t = by.setdefault(kind, {"tensors": 0, "blocks": 0, "same": 0, "sq_ours": 0.0, "sq_theirs": 0.0, "sq": 0.0})
        t["tensors"] += 1
        t["blocks"] += len(blocks)
        t["same"] += int((blocks == b[name][1]).all(-1).sum())
        t["sq_ours"] += float(((values - want) ** 2).sum())
        t["sq_theirs"] += float(((b[name][2] - want) ** 2).sum())
        t["sq"] += float((want ** 2).sum())
    return {k: {"tensors": t["tensors"], "same_blocks": t["same"] / t["blocks"],
                "lorafit_rel_rmse": (t["sq_ours"] / t["sq"]) ** 0.5,
                "llamacpp_rel_rmse": (t["sq_theirs"] / t["sq"]) ** 0.5}
            for k, t in by.items()}


class HeldOut:
    """lorafit's held-out reply perplexity with any mix of f16 weights and a file's dequantized tensors."""

    def __init__(self, folder: Path, run: Path, cfg):
        self.examples, _ = eval_examples(run, cfg)
        self.cfg = cfg
        config = AutoConfig.from_pretrained(folder)
        self.plans = [p for p in tensor_plans(config, arch_for(config), folder_shapes(folder)) if p.source]
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.session = Session(self.model, AutoTokenizer.from_pretrained(folder), run_template(run, cfg),
                               torch.device("cpu"), run.name)
        self.f16 = {p.source: self.model.get_parameter(p.source).detach().to(torch.float16).float().clone()
                    for p in self.plans if len(p.shape) > 1}

    def __call__(self, path: Path | None = None, only=lambda name: True, replace=None) -> float:
        with torch.no_grad():
            for source, value in self.f16.items():
                self.model.get_parameter(source).copy_(value)
            if path is not None:
                for plan, values in _file_tensors(path, self.plans):
                    if only(plan.name):
                        self.model.get_parameter(plan.source).copy_(values)
            for plan in self.plans if replace else []:
                if replace(plan.name):  # round trip through Q8_0, in the HF layout (rows stay rows)
                    p = self.model.get_parameter(plan.source)
                    q = gguf.quants.quantize(self.f16[plan.source].numpy(), Q.Q8_0)
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(q, Q.Q8_0).reshape(p.shape)))
            return reply_perplexity(self.session, self.examples, self.cfg)


def _run(cmd: list, log: Path) -> None:
    with log.open("w") as out:
        subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, check=True)


FILES = ["q4_k_m", "q4_k_m-imatrix", "llamacpp-Q4_K_M", "llamacpp-Q4_K_M-lorafit-imatrix",
         "llamacpp-Q4_K_M-llamacpp-imatrix"]


def make_files(folder: Path, run: Path, cfg, session, work: Path, binary: Path) -> None:
    """lorafit's q4_k_m --imatrix, and llama-quantize's Q4_K_M with lorafit's matrix and with llama-imatrix's."""
    ex = work / "exports"
    imp = importance(folder, run, cfg, _folder_plans(folder))
    if not (ex / "q4_k_m-imatrix.gguf").exists():
        write_gguf(folder, ex / "q4_k_m-imatrix.gguf", "q4_k_m", template=_read_template(run), importance=imp)
    write_llamacpp_imatrix(imp, work / "lorafit.imatrix.dat", SEQUENCES)
    text = training_text(run, session, work / "train64.txt")
    _run([binary / "llama-imatrix", "-m", ex / "f16.gguf", "-f", text, "-o", work / "llamacpp.imatrix.gguf",
          "-c", "128", "-b", "128", "--no-ppl"], work / "llama-imatrix.log")
    for name, matrix in (("lorafit-imatrix", "lorafit.imatrix.dat"), ("llamacpp-imatrix", "llamacpp.imatrix.gguf")):
        _run([binary / "llama-quantize", "--imatrix", work / matrix, ex / "f32.gguf",
              ex / f"llamacpp-Q4_K_M-{name}.gguf", "Q4_K_M"], work / f"quantize-{name}.log")


def perplexities(held: HeldOut, ex: Path, results: dict, out: Path) -> None:
    """Held-out perplexity of each file, of one tensor group at a time, and of the Q5_0 tensors held at Q8_0."""
    ppl = results["perplexity"] = {}
    print(f"\n{'weights':64} {'held-out ppl':>12} {'vs f16':>8}", flush=True)

    def record(label: str, value: float) -> None:
        ppl[label] = value
        print(f"{label:64} {value:12.4f} {100 * (value / ppl['f16'] - 1):+7.2f}%", flush=True)
        out.write_text(json.dumps(results, indent=2))

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(ex / "q4_k_m.gguf").tensors}
    record("f16", held())
    # most telling first: on a slow machine the later lines can be left out (each result is written as it comes)
    for name in FILES[:2] + FILES[-1:]:
        record(name, held(ex / f"{name}.gguf"))
    for name in ("q4_k_m-imatrix", "q4_k_m"):
        path = ex / f"{name}.gguf"
        record(f"{name}, Q5_0 tensors at Q8_0 (not llama.cpp's mix)",
               held(path, only=lambda n: types[n] != Q.Q5_0, replace=lambda n: types[n] == Q.Q5_0))
        for label, keys in GROUPS.items():
            record(f"{name}: only {label}", held(path, only=lambda n, k=keys: any(s in n for s in k)))
    for name in FILES[2:-1]:
        record(name, held(ex / f"{name}.gguf"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--bin", type=Path, required=True)
    args = p.parse_args()
    ex, run, out = args.work / "exports", args.run, args.work / "imatrix_results.json"
    cfg = load_run_config(run)
    session = load_session(run, load_run_config(run, {"temperature": 0}))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        folder = merge_to_folder(run, Path(tmp) / "merged", cfg)
        make_files(folder, run, cfg, session, args.work, args.bin)
        results = {"same_blocks": {
            "plain": same_blocks(ex / "q4_k_m.gguf", ex / "llamacpp-Q4_K_M.gguf", ex / "f32.gguf"),
            "imatrix": same_blocks(ex / "q4_k_m-imatrix.gguf", ex / "llamacpp-Q4_K_M-lorafit-imatrix.gguf",
                                   ex / "f32.gguf")}}
        _print_blocks(results["same_blocks"])
        held_out = held_out_text(run, session, args.work / "held_out.txt")
        results["llama_perplexity"] = {n: perplexity(args.bin, ex / f"{n}.gguf", held_out) for n in ["f16", *FILES]}
        out.write_text(json.dumps(results, indent=2))
        print("\nllama-perplexity (held-out text):")
        for name, v in results["llama_perplexity"].items():
            print(f"{name:40} {v or float('nan'):10.4f}", flush=True)
        perplexities(HeldOut(folder, run, cfg), ex, results, out)


def _print_blocks(same: dict) -> None:
    for kind, rows in same.items():
        for t, r in rows.items():
            print(f"{kind:8} {t:5} {r['tensors']:4d} tensors  identical blocks {100 * r['same_blocks']:6.2f}%  rel RMS "
                  f"lorafit {100 * r['lorafit_rel_rmse']:.3f}%  llama-quantize {100 * r['llamacpp_rel_rmse']:.3f}%",
                  flush=True)


if __name__ == "__main__":
    main()
