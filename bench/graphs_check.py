"""Two `lorafit train` runs of the same recipe, CUDA graphs on and off: their losses step by step.

usage: python bench/graphs_check.py RUN_DIR_GRAPHS RUN_DIR_EAGER [NAME_A NAME_B]   (bench/run.sh `graphs` runs both
first; `fp8` compares --fp8_base true and false the same way, named fp8 and bf16)
Prints one JSON line: steps compared, mean and largest relative difference of the step losses, and each run's
steady tokens/s and CUDA-graph counters from its train_summary.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec and "val_loss" not in rec:
            out[rec["step"]] = rec["loss"]
    return out


def main() -> None:
    if len(sys.argv) not in (3, 5):
        raise SystemExit(__doc__)
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    names = sys.argv[3:5] or ["graphs", "eager"]
    la, lb = losses(a), losses(b)
    steps = sorted(set(la) & set(lb))
    diffs = [abs(la[s] - lb[s]) / abs(lb[s]) for s in steps]
    rec = {"check": f"{names[0]} vs {names[1]}, same records", "steps": len(steps),
           "mean_rel_diff": sum(diffs) / max(len(diffs), 1), "max_rel_diff": max(diffs, default=0.0),
           "first_last": [la[steps[0]], la[steps[-1]], lb[steps[0]], lb[steps[-1]]] if steps else []}
    for name, run in zip(names, (a, b), strict=True):
        s = json.loads((run / "train_summary.json").read_text())
        rec[name] = {"steady_tok_s": s.get("steady_tokens_per_s"), "peak_gib": s.get("peak_memory_gib"),
                     "cuda_graphs": s.get("cuda_graphs")}
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
