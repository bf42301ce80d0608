"""Greedy generation speed: the base, the tuned model with its adapter unmerged (PEFT layers), and merged in memory.

    PYTHONPATH=src python bench/gen_speed.py --adapter_path RUN_DIR [--prompts 16] [--max_new_tokens 64] [--repeats 5]

Runs eval's own batched path (generate.generate_batch, left-padded, KV cache) on the first `--prompts`
held-out prompts of --dataset (default: the run's data), with no EOS so every system generates exactly
prompts x max_new_tokens tokens. The base runs twice: as the plain transformers model (what a user of the base
runs; the ratios are to it) and as the PeftModel with its adapter switched off (how eval scores the base). The four
systems take turns in every repeat, so a busy shared machine slows them alike. The table shows median wall seconds,
their ratio to the plain base, the median of the per-repeat ratios (each system over the base of the same repeat),
and the ratio of median process CPU seconds: on 2 cores shared by 4 developers, wall times of one system varied
18.5-26.3 s over 5 repeats, so the CPU-time ratio (run with OMP_NUM_THREADS=1) is the one that resolves 10%.
Writes one JSON line per system to $OUT/gen_speed.jsonl when $OUT is set.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lorafit.data.templates import encode_prompt
from lorafit.evaluate.run import eval_examples
from lorafit.infer.generate import generate_batch, load_session
from lorafit.run_dir import load_run_config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--adapter_path", required=True)
    p.add_argument("--dataset", default=None)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    overrides = {"dataset": args.dataset} if args.dataset else {}
    cfg = load_run_config(args.adapter_path, overrides | {"max_samples": args.prompts})
    examples, _ = eval_examples(Path(args.adapter_path), cfg)
    plain = load_session(args.adapter_path, cfg, use_adapter=False)
    unmerged = load_session(args.adapter_path, cfg, merge=False)
    merged = load_session(args.adapter_path, cfg)
    prompts = [encode_prompt(unmerged.template, e.prompt, unmerged.tokenizer) for e in examples]

    def run(session, base: bool) -> float:
        ctx = session.model.disable_adapter() if base else contextlib.nullcontext()
        with ctx:
            started, cpu = time.perf_counter(), time.process_time()
            out = generate_batch(session.model, session.tokenizer, prompts, args.max_new_tokens, set(), [])
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        assert all(r.completion_tokens == args.max_new_tokens for r in out)
        return seconds, cpu

    systems = {"base": lambda: run(plain, False), "base, adapter disabled": lambda: run(unmerged, True),
               "tuned, adapter unmerged": lambda: run(unmerged, False),
               "tuned, merged in memory": lambda: run(merged, False)}
    for fn in systems.values():  # warm-up: first calls pay one-off allocation costs
        fn()
    times: dict[str, list[float]] = {k: [] for k in systems}
    cpu: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(args.repeats):
        for name, fn in systems.items():
            wall, used = fn()
            times[name].append(wall)
            cpu[name].append(used)
    tokens = len(prompts) * args.max_new_tokens
    base, base_cpu = statistics.median(times["base"]), statistics.median(cpu["base"])
    rows = [{"system": k, "median_s": round(statistics.median(v), 3), "tokens": tokens,
             "tokens_per_s": round(tokens / statistics.median(v), 1),
             "ratio_to_base": round(statistics.median(v) / base, 3),
             "paired_ratio": round(statistics.median(x / b for x, b in zip(v, times["base"], strict=True)), 3),
             "cpu_s": round(statistics.median(cpu[k]), 3),
             "cpu_ratio": round(statistics.median(cpu[k]) / base_cpu, 3),
             "all_s": [round(x, 3) for x in v], "all_cpu_s": [round(x, 3) for x in cpu[k]],
             "threads": torch.get_num_threads()} for k, v in times.items()]
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "gen_speed.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(prompts)} prompts x {args.max_new_tokens} tokens, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    print(f"{'system':<26}{'median s':>10}{'tok/s':>9}{'x base':>8}{'paired':>8}{'cpu s':>8}{'cpu x':>7}")
    for r in rows:
        print(f"{r['system']:<26}{r['median_s']:>10.2f}{r['tokens_per_s']:>9.1f}{r['ratio_to_base']:>8.2f}"
              f"{r['paired_ratio']:>8.2f}{r['cpu_s']:>8.2f}{r['cpu_ratio']:>7.2f}")


if __name__ == "__main__":
    main()
