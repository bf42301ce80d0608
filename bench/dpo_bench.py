"""DPO throughput and peak memory: lorafit's `--method dpo` against TRL's DPOTrainer + PEFT + bitsandbytes,
QLoRA (NF4, r 16 on all linear layers, gradient checkpointing), the same pairs, one stack per process.

usage: python bench/dpo_bench.py STACK MODEL_DIR [--pairs 160] [--batch 8]      STACK: lorafit | trl
       python bench/dpo_bench.py table RESULTS.jsonl
       python bench/dpo_bench.py lorafit TINY_MODEL_DIR --smoke    (CPU check of the lorafit stack's wiring: 16-bit
       base, 8 pairs of 4; `python bench/make_model.py DIR --tiny` makes the model; no speed figure)

Pairs of real Alpaca lengths: pair i has record i's prompt (bench/alpaca_prompt_lengths.txt), record i's reply
as chosen and record i+1's reply as rejected (bench/alpaca_lengths.txt minus the prompt), random token ids
written as the word-level tokenizer's words (one token each; bench/make_model.py). Both stacks run an epoch
of `--pairs` pairs, `--batch` pairs a step, sigmoid loss, beta 0.1, reference = the base with the adapter off
(computed every step in this first epoch by both); lorafit runs a second epoch, reported as
`lorafit:cached-ref` (its cached reference log-probs: one forward pass a step, as TRL's
precompute_ref_log_probs would give after its own precomputing pass). Timed: the optimizer steps after the first 3 (CUDA
synchronised at step boundaries); tokens = 2 x prompt + chosen + rejected per pair, the same for both.
lorafit runs the fused path (train/fast.py: per-sequence log-probs from the chunked linear + cross-entropy, the
reference as the same layer stack without the LoRA products); its JSON lines' `path` says which path ran, from
the run's train_summary.json. Prints one JSON line per stack; `table` prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP = 3
MAX_LEN = 1024


def make_pairs(n: int) -> list[dict]:
    totals = [int(x) for x in (HERE / "alpaca_lengths.txt").read_text().split()]
    prompts = [int(x) for x in (HERE / "alpaca_prompt_lengths.txt").read_text().split()]
    replies = [max(1, t - p) for t, p in zip(totals, prompts, strict=True)]
    rng = random.Random(0)

    def text(k: int) -> str:
        return " ".join(f"t{rng.randrange(3, 31999)}" for _ in range(k))

    out = []
    for i in range(n):
        j = i % len(prompts)
        out.append({"prompt": text(max(1, prompts[j])), "chosen": text(replies[j]),
                    "rejected": text(replies[(j + 1) % len(replies)])})
    return out


def pair_tokens(pairs: list[dict]) -> list[int]:
    return [2 * len(p["prompt"].split()) + len(p["chosen"].split()) + len(p["rejected"].split()) for p in pairs]


def run_lorafit(model_dir: str, pairs: list[dict], batch: int, smoke: bool = False) -> tuple[list[float], str]:
    """(step times of two epochs from lorafit's own metrics.jsonl (each step's wall time, synchronised by the
    loss read), the loss path that ran); the second epoch reads the reference log-probs from the cache."""
    from lorafit.config.load import build_config
    from lorafit.train.loop import train

    tmp = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    args = {"model": model_dir, "dataset": str(data), "output_dir": str(tmp / "run"), "method": "dpo",
            "beta": 0.1, "load_in_4bit": True, "bnb_4bit_use_double_quant": True, "gradient_checkpointing": True,
            "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
            "template": "raw", "max_seq_length": MAX_LEN, "val_size": 0, "per_device_train_batch_size": batch,
            "num_train_epochs": 2, "learning_rate": 5e-6, "bf16": True, "logging_steps": 1, "report_to": "none",
            "eval_strategy": "no", "save_strategy": "no", "shuffle": False,
            "fast_kernels": "on"}  # the fused path, or a config error naming why not
    if smoke:  # CPU: the same stack and path over the plain-PyTorch twins, a 16-bit base (no CUDA for NF4)
        args.update(load_in_4bit=False, bnb_4bit_use_double_quant=False, bf16=False, max_seq_length=256)
    out = train(build_config(None, {k: str(v) for k, v in args.items()}))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    path = json.loads((out / "train_summary.json").read_text())["loss_path"]
    return [r["step_time"] for r in recs if "step_time" in r], path


def run_trl(model_dir: str, pairs: list[dict], batch: int) -> list[float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation="sdpa", quantization_config=q)
    tok = AutoTokenizer.from_pretrained(model_dir)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    cfg = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), per_device_train_batch_size=batch,
                    num_train_epochs=1, learning_rate=5e-6, bf16=True, gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False}, beta=0.1, loss_type=["sigmoid"],
                    max_length=MAX_LEN, logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0,
                    seed=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                         peft_config=lora, callbacks=[Clock()])
    trainer.train()
    return times, "trl"


def table(path: str) -> None:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.startswith("{")]
    by = {r["stack"]: r for r in rows}
    print("| stack | loss path | pairs/s | tokens/s | peak GiB | steps timed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stack']} | {r.get('path', '?')} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_gib']:.2f} | {r['steps_timed']} |")
    if "lorafit" in by and "trl" in by:
        print(f"\nlorafit / TRL: {by['lorafit']['tokens_per_s'] / by['trl']['tokens_per_s']:.2f}x tokens/s, "
              f"{by['lorafit']['peak_gib'] / by['trl']['peak_gib']:.2f}x peak memory")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stack", choices=["lorafit", "trl", "table"])
    p.add_argument("path")
    p.add_argument("--pairs", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="lorafit on CPU, a tiny model: the wiring, no speed figure")
    a = p.parse_args()
    if a.stack == "table":
        table(a.path)
        return
    import torch

    if a.smoke:
        a.pairs, a.batch = 8, 4
    pairs = make_pairs(a.pairs)
    started = time.perf_counter()
    if a.stack == "lorafit":
        times, path = run_lorafit(a.path, pairs, a.batch, a.smoke)
    else:
        times, path = run_trl(a.path, pairs, a.batch)
    per_epoch = -(-a.pairs // a.batch)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0
    runs = {a.stack: times[WARMUP:per_epoch]}
    if a.stack == "lorafit":
        runs["lorafit:cached-ref"] = times[per_epoch:]  # epoch 2: no reference forward
    mean_tokens = sum(pair_tokens(pairs)) / len(pairs)
    for stack, timed in runs.items():
        n_pairs = a.batch * len(timed)
        print(json.dumps({"stack": stack, "path": path, "pairs": a.pairs, "batch": a.batch, "steps": len(times),
                          "steps_timed": len(timed), "pairs_per_s": n_pairs / max(sum(timed), 1e-9),
                          "tokens_per_s": mean_tokens * n_pairs / max(sum(timed), 1e-9), "peak_gib": peak,
                          "wall_s": round(time.perf_counter() - started, 1)}), flush=True)

if __name__ == "__main__":
    sys.exit(main())
