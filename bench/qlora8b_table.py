"""bench/qlora8b.sh's table: per-GPU peak memory and steady tokens/s of each run against one GPU.

usage: python3 bench/qlora8b_table.py RUNS_DIR OUT_DIR   (reads RUNS_DIR/NAME/{metrics.jsonl,train_summary.json} and
OUT_DIR/qlora8b-NAME.log; appends JSON lines to OUT_DIR/qlora8b.jsonl, writes OUT_DIR/qlora8b.md)"""
import json
import re
import sys
from pathlib import Path

SKIP = 2  # the first steps hold the allocator's and the kernels' warm-up


def row(runs: Path, out: Path, name: str) -> dict | None:
    run, log = runs / name, out / f"qlora8b-{name}.log"
    if not (run / "metrics.jsonl").is_file():
        return {"run": name, "error": "no metrics.jsonl", "log_tail": log.read_text()[-600:] if log.is_file() else None}
    steps = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    steady = steps[SKIP:] or steps
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").is_file() else {}
    text = log.read_text() if log.is_file() else ""
    load = re.search(r"fsdp: peak while loading ([\d.]+) GiB", text)
    peaks = summary.get("peak_memory_gib_per_rank") or [summary.get("peak_memory_gib")]
    return {"run": name, "gpus": summary.get("world_size"), "fsdp": summary.get("fsdp"), "steps": len(steps),
            "tokens_per_s": sum(m["tokens"] for m in steady) / sum(m["step_time"] for m in steady),
            "peak_gib_per_gpu": max(p for p in peaks if p is not None) if any(peaks) else None,
            "peak_gib_per_rank": peaks, "load_peak_gib_rank0": float(load.group(1)) if load else None,
            "losses": [round(m["loss"], 4) for m in steps]}


def main(runs: Path, out: Path) -> None:
    rows = [r for r in (row(runs, out, n) for n in ("single", "ddp2", "fsdp2", "fsdp1")
                        if (runs / n).is_dir() or (out / f"qlora8b-{n}.log").is_file())]
    one = next((r for r in rows if r["run"] == "single" and "error" not in r), None)
    lines = ["| run | GPUs | peak GiB/GPU | x single | load peak GiB | tokens/s | x single |",
             "|---|---|---|---|---|---|---|"]
    with (out / "qlora8b.jsonl").open("a") as f:
        for r in rows:
            if one and "error" not in r:
                r["peak_vs_single"] = r["peak_gib_per_gpu"] / one["peak_gib_per_gpu"]
                r["tokens_per_s_vs_single"] = r["tokens_per_s"] / one["tokens_per_s"]
            f.write(json.dumps({"qlora8b": True, **r}) + "\n")
            print(json.dumps(r))
            if "error" in r:
                lines.append(f"| {r['run']} | | {r['error']} | | | | |")
                continue
            lp = f"{r['load_peak_gib_rank0']:.2f}" if r["load_peak_gib_rank0"] is not None else "-"
            lines.append(f"| {r['run']} | {r['gpus']} | {r['peak_gib_per_gpu']:.2f} | "
                         f"{r.get('peak_vs_single', 0):.2f} | {lp} | {r['tokens_per_s']:,.0f} | "
                         f"{r.get('tokens_per_s_vs_single', 0):.2f} |")
    lines.append("targets (issue 20): fsdp2 peak <= 0.60x single, fsdp2 tokens/s >= 1.70x single")
    (out / "qlora8b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
