"""The comparisons of bench/gguf_llamacpp.sh (which builds llama.cpp and writes the exports first).

For each export in WORK/exports (and the merged folder converted by llama.cpp's convert_hf_to_gguf.py):
  warnings     lines of llama-server's load log that warn about the vocabulary (control-looking tokens, the
               pre-tokenizer, missing merges);
  tokens       llama-server's /tokenize of the demo prompts rendered with the run's template == lorafit's ids;
  answers      greedy /v1/chat/completions answers (temperature 0) == `lorafit chat --temperature 0`'s;
  perplexity   llama-perplexity over the run's held-out conversations, rendered as training rendered them.
Then lorafit's q4_k_m and q6_k files against llama-quantize's from the same f32 file: per-tensor type and relative
RMS error against the f32 weights. Writes WORK/results.json; prints a table.
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import gguf
import numpy as np

from lorafit.data.encode import load_conversations, split_conversations
from lorafit.infer.chat import DEMO_PROMPTS
from lorafit.infer.generate import generate_text, load_session
from lorafit.run_dir import load_run_config

FILES = ["f16", "q8_0", "q6_k", "q4_k_m", "converted-f16"]
WARNING = re.compile(r"control-looking|not control-type|pre-tokenizer|GENERATION QUALITY|missing|byte_to_token",
                     re.IGNORECASE)


def _post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_checks(binary: Path, model: Path, session, cfg, want: dict) -> dict:
    """Load warnings, tokenization and greedy answers of one file through llama-server."""
    port = _free_port()
    log = model.with_suffix(".server.log")
    with log.open("w") as out:
        proc = subprocess.Popen([str(binary / "llama-server"), "-m", str(model), "--port", str(port), "-c", "2048",
                                 "--jinja", "-np", "1"], stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        same_tokens = same_answers = 0
        answers = []
        for prompt, (ids, answer) in want.items():
            got = _post(port, "/tokenize", {"content": prompt_text(session, prompt), "add_special": False,
                                            "parse_special": True})["tokens"]
            same_tokens += got == ids
            reply = _post(port, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": prompt}], "temperature": 0, "top_k": 1,
                "repeat_penalty": 1.0, "max_tokens": cfg.generate.max_new_tokens})["choices"][0]["message"]["content"]
            same_answers += reply.strip() == answer.strip()
            answers.append({"prompt": prompt, "lorafit": answer, "llama.cpp": reply})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    warnings = [line.strip() for line in log.read_text(errors="replace").splitlines() if WARNING.search(line)]
    return {"warnings": warnings, "same_tokens": same_tokens, "same_answers": same_answers, "prompts": len(want),
            "answers": answers}


def prompt_text(session, prompt: str) -> str:
    return session.template.render([{"role": "user", "content": prompt}], session.tokenizer, True)


def perplexity(binary: Path, model: Path, text: Path) -> float | None:
    out = subprocess.run([str(binary / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "128", "-b",
                          "128"], capture_output=True, text=True, check=False)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    return float(m.group(1)) if m else None


def held_out_text(run: Path, session, path: Path) -> Path:
    """The run's held-out conversations as training rendered them, one after another."""
    trained = load_run_config(run)
    _, held_out, _ = split_conversations(load_conversations(trained)[0], trained)
    path.write_text("".join(session.template.render(c, session.tokenizer, False) for c in held_out), encoding="utf-8")
    return path


def _tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1))
            for t in gguf.GGUFReader(path).tensors}


def versus_llama_quantize(work: Path) -> list[dict]:
    """Per tensor: type and relative RMS error of lorafit's file and llama-quantize's, against the f32 export."""
    ref = _tensors(work / "exports" / "f32.gguf")
    rows = []
    for ours, theirs in (("q4_k_m", "llamacpp-Q4_K_M"), ("q6_k", "llamacpp-Q6_K")):
        a, b = _tensors(work / "exports" / f"{ours}.gguf"), _tensors(work / "exports" / f"{theirs}.gguf")
        for name, (_, want) in ref.items():
            if want.size < 1024:
                continue
            norm = np.linalg.norm(want)
            rows.append({"dtype": ours, "tensor": name, "lorafit_type": a[name][0], "llamacpp_type": b[name][0],
                         "lorafit_rel_rmse": float(np.linalg.norm(a[name][1] - want) / norm),
                         "llamacpp_rel_rmse": float(np.linalg.norm(b[name][1] - want) / norm)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--bin", type=Path, required=True)
    args = p.parse_args()
    cfg = load_run_config(args.run, {"temperature": 0, "repetition_penalty": 1.0})
    session = load_session(args.run, cfg)
    want = {}
    for prompt in DEMO_PROMPTS:
        ids = session.tokenizer(prompt_text(session, prompt), add_special_tokens=False)["input_ids"]
        answer = generate_text(session.model, session.tokenizer, session.template,
                               [{"role": "user", "content": prompt}], cfg.generate).text
        want[prompt] = (list(ids), answer)
    text = held_out_text(args.run, session, args.work / "held_out.txt")
    results = {"files": {}, "versus_llama_quantize": versus_llama_quantize(args.work)}
    for name in FILES:
        model = args.work / "exports" / f"{name}.gguf"
        results["files"][name] = {**serve_checks(args.bin, model, session, cfg, want),
                                  "perplexity": perplexity(args.bin, model, text),
                                  "mib": round(model.stat().st_size / 2**20, 1)}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{'file':14} {'MiB':>6} {'warnings':>8} {'tokens':>7} {'answers':>7} {'llama-perplexity':>16}")
    for name, r in results["files"].items():
        print(f"{name:14} {r['mib']:6.1f} {len(r['warnings']):8d} {r['same_tokens']:>3}/{r['prompts']:<3} "
              f"{r['same_answers']:>3}/{r['prompts']:<3} {r['perplexity'] or float('nan'):16.4f}")
    for dtype in ("q4_k_m", "q6_k"):
        rows = [r for r in results["versus_llama_quantize"] if r["dtype"] == dtype]
        same = sum(r["lorafit_type"] == r["llamacpp_type"] for r in rows)
        ours = np.sqrt(np.mean([r["lorafit_rel_rmse"] ** 2 for r in rows]))
        theirs = np.sqrt(np.mean([r["llamacpp_rel_rmse"] ** 2 for r in rows]))
        print(f"{dtype}: tensor types equal to llama-quantize's {same}/{len(rows)}; relative RMS error "
              f"(RMS over tensors) lorafit {100 * ours:.3f}% vs llama-quantize {100 * theirs:.3f}%")


if __name__ == "__main__":
    main()
