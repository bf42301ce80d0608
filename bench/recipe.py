"""The recipe shape: `lorafit train` through its CLI on a shipped recipe, the hub model swapped for a local random
model of the same dimensions (../shared/bench/make_models2.py), on records of the real Alpaca lengths.

usage: python bench/recipe.py RECIPE.yaml MODEL_DIR OUT_DIR [--steps N] [--name SHAPE] [--data-only] [FLAG VALUE ...]
Writes OUT_DIR/alpaca_lengths.json: one Alpaca record per line of bench/alpaca_lengths.txt, made of the random
model's word tokens (t3, t4, ...: one token each, its tokenizer is word-level) so that the record's prompt and
reply are about bench/alpaca_prompt_lengths.txt and alpaca_lengths.txt long (the template's words add a few).
Then runs the recipe with --model MODEL_DIR --dataset that file --max_steps N (no validation, no checkpoints,
no trackers; any further flags are passed on) and prints one JSON line from its train_summary.json: steady-state
tokens/s (after the first, warming step: every token is real, passes are padding-free), the same over the
second half of the steps (`second_half_tok_s`, past most CUDA-graph captures), and peak GPU memory.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def write_data(path: Path, vocab: int = 32000) -> int:
    """Alpaca records of the real lengths; returns how many."""
    lens = [int(x) for x in (HERE / "alpaca_lengths.txt").read_text().split()]
    prompts = [int(x) for x in (HERE / "alpaca_prompt_lengths.txt").read_text().split()]
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(max(1, n)))

    with path.open("w", encoding="utf-8") as f:
        for n, p in zip(lens, prompts, strict=True):
            f.write(json.dumps({"instruction": words(p - 8), "input": "", "output": words(n - p)}) + "\n")
    return len(lens)


def late_tok_s(metrics: Path, after: int) -> int | None:
    """Tokens/s over the steps after `after`, from the run's metrics.jsonl: in a short run with CUDA graphs the
    steady figure still holds every bucket's eager warm-up and capture, which a long run pays once; the second
    half of the steps is closer to what such a run trains at."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if '"step_time"' in x]
    late = [r for r in recs if r["step"] > after]
    seconds = sum(r["step_time"] for r in late)
    return round(sum(r["tokens"] for r in late) / seconds) if late and seconds > 0 else None


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 3:
        raise SystemExit(__doc__)
    recipe, model, out, rest = args[0], args[1], Path(args[2]), args[3:]
    steps, name = 40, "recipe:" + Path(recipe).stem
    if "--steps" in rest:
        k = rest.index("--steps")
        steps, rest = int(rest[k + 1]), rest[:k] + rest[k + 2:]
    if "--name" in rest:
        k = rest.index("--name")
        name, rest = rest[k + 1], rest[:k] + rest[k + 2:]
    data_only = "--data-only" in rest
    rest = [a for a in rest if a != "--data-only"]
    out.mkdir(parents=True, exist_ok=True)
    data = out / "alpaca_lengths.json"
    n = write_data(data)
    if data_only:
        print(json.dumps({"data": str(data), "records": n}))
        return
    run = out / ("run-" + Path(recipe).stem)
    cmd = [sys.executable, "-m", "lorafit", "train", "--config", recipe, "--model", model, "--dataset", str(data),
           "--dataset_format", "alpaca", "--template", "alpaca", "--max_steps", str(steps), "--output_dir", str(run),
           "--overwrite_output_dir", "true", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
           "--logging_steps", "10", "--val_size", "0", *rest]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
    wall = time.perf_counter() - t
    tail = [line for line in proc.stderr.splitlines() if line.startswith(("batch:", "loss:", "done:", "step "))]
    for line in tail[-6:]:
        print("  " + line[:300], file=sys.stderr)
    rec = {"stack": "lorafit", "shape": name, "flags": " ".join(rest), "steps": steps, "wall_s": round(wall, 1)}
    summary = run / "train_summary.json"
    if proc.returncode != 0 or not summary.is_file():
        rec["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    else:
        s = json.loads(summary.read_text())
        rec.update(tok_s=round(s["steady_tokens_per_s"] or s["tokens_per_s"]), whole_run_tok_s=round(s["tokens_per_s"]),
                   peak_gib=round(s["peak_memory_gib"], 2), tokens=s["tokens"], reserved_gib=s.get("peak_reserved_gib"),
                   cuda_graphs=s.get("cuda_graphs"), second_half_tok_s=late_tok_s(run / "metrics.jsonl", steps // 2))
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
