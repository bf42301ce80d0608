"""Seconds per GRPO optimizer step and peak GPU memory: lorafit vs TRL's GRPOTrainer + PEFT (no vLLM).

usage: python bench/grpo_bench.py {lorafit|trl} MODEL_DIR OUT.jsonl [--steps 4] [--beta 0.0] [--rollout merged|adapter]
       python bench/grpo_bench.py table OUT.jsonl
Each stack runs in its own process (bench/run.sh grpo does both, then the table). Same work in both: the
random Phi-3-mini-sized model of make_model.py, NF4 + double quantization, bf16 compute, LoRA r=16 alpha=32
dropout 0 on all seven linear layers, no gradient checkpointing; 8 prompts of 64 random tokens a step, 8
completions each, sampled at temperature 1 with exactly 256 new tokens (random weights rarely stop, and
min_new_tokens = max_new_tokens makes both stacks generate the same count); micro-batches of one prompt's 8
completions, 8 accumulated per optimizer step; loss dapo, beta 0 (TRL's defaults: no reference forward);
a reward of -len(text) (its cost is nil next to generation). Step time: the median of the steps after the
first (warm-up); the first includes CUDA and allocator warm-up in both stacks. lorafit's line also records
which rollout path ran (its "grpo rollouts:" log lines: merged weights, or the adapter and why) and rollout_s,
the sampling part of each step; `--rollout adapter` times the adapter path (`bash bench/run.sh grpo grpo-adapter`).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

PROMPTS, GENERATIONS, NEW_TOKENS, PROMPT_TOKENS = 8, 8, 256, 64
SMOKE = os.environ.get("GRPO_BENCH_SMOKE") == "1"
"""A CPU check of both code paths (make_model.py --tiny, no quantization, 2 x 2 completions of 4 tokens)."""
if SMOKE:
    PROMPTS, GENERATIONS, NEW_TOKENS, PROMPT_TOKENS = 2, 2, 4, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prompts(n: int) -> list[str]:
    """n prompts of PROMPT_TOKENS word-level tokens (make_model.py's tokenizer reads 't123' as id 123)."""
    import random

    rng = random.Random(0)
    return [" ".join(f"t{rng.randrange(2, 32000)}" for _ in range(PROMPT_TOKENS)) for _ in range(n)]


def length_reward(prompts=None, completions=None, **_):
    return [-len(c) / 100 for c in completions]


class _Lines(logging.Handler):
    """lorafit's log lines, kept: the JSON line records which rollout path ran ("grpo rollouts: ...")."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_lorafit(model: str, steps: int, beta: float, rollout: str = "merged") -> dict:
    import tempfile

    from lorafit.config.load import build_config
    from lorafit.train.log import read_metrics, setup_console
    from lorafit.train.loop import train

    setup_console()  # first: the step lines still reach stderr (run.sh greps them)
    lines = _Lines()
    logging.getLogger("lorafit").addHandler(lines)

    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(PROMPTS * steps)))
    reward = work / "reward.py"
    reward.write_text("def length_reward(prompts, completions, **_):\n"
                      "    return [-len(c) / 100 for c in completions]\n")
    cfg = build_config(None, {
        "model": model, "load_in_4bit": not SMOKE, "bf16": not SMOKE, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0,
        "target_modules": ",".join(TARGETS), "dataset": str(data), "template": "raw", "max_seq_length": 128,
        "output_dir": str(work / "run"), "method": "grpo", "reward_funcs": f"{reward}:length_reward",
        "num_generations": GENERATIONS, "max_completion_length": NEW_TOKENS, "min_completion_length": NEW_TOKENS,
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "beta": beta, "loss_type": "dapo",
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": PROMPTS, "max_steps": steps,
        "learning_rate": 1e-5, "lr_scheduler_type": "constant", "logging_steps": 1, "report_to": "none",
        "save_strategy": "no", "shuffle": False, "group_by_length": False, "rollout_weights": rollout})
    _reset_peak()
    train(cfg)
    recs = [r for r in read_metrics(cfg.train.output_dir) if "reward" in r]
    assert all(r["completion_length"] == NEW_TOKENS for r in recs), [r["completion_length"] for r in recs]
    paths = [x.removeprefix("grpo rollouts: ") for x in lines.lines if x.startswith("grpo rollouts: ")]
    return {"stack": "lorafit" if rollout == "merged" else f"lorafit-{rollout}", "rollout": paths or ["not logged"],
            "step_s": [round(r["step_time"], 3) for r in recs],
            "rollout_s": [round(r.get("rollout_s", float("nan")), 3) for r in recs], "peak_gib": _peak()}


def run_trl(model_dir: str, steps: int, beta: float) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if SMOKE else torch.bfloat16,
                                                 device_map=None if SMOKE else {"": 0}, attn_implementation="sdpa",
                                                 quantization_config=None if SMOKE else q)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = GRPOConfig(output_dir="/tmp/grpo-bench-trl", per_device_train_batch_size=GENERATIONS,
                      gradient_accumulation_steps=PROMPTS, num_generations=GENERATIONS,
                      max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
                      temperature=1.0, top_p=1.0, top_k=0, beta=beta, loss_type="dapo", learning_rate=1e-5,
                      lr_scheduler_type="constant", max_steps=steps, logging_steps=1, report_to=[], save_strategy="no",
                      bf16=not SMOKE, use_cpu=SMOKE, gradient_checkpointing=False, use_vllm=False,
                      shuffle_dataset=False, seed=0)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            _sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync()
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts(PROMPTS * steps)]),
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                 bias="none", task_type="CAUSAL_LM"), callbacks=[timer])
    _reset_peak()
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    assert all(x == NEW_TOKENS for x in lengths), lengths
    return {"stack": "trl", "step_s": [round(t, 3) for t in timer.times], "peak_gib": _peak()}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else float("nan")


def table(path: str) -> None:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.startswith("{")]
    ok = {r["stack"]: r for r in rows if "step_s" in r}
    for r in rows:
        if "error" in r:
            print(f"error: {r['stack']}: {r['error']}")
    print(f"GRPO step: {PROMPTS} prompts x {GENERATIONS} completions x {NEW_TOKENS} new tokens, QLoRA r=16, "
          "Phi-3-mini dims (random), 1 GPU")
    print("| stack | beta | s/step (median after the first) | of it sampling | steps timed | peak GiB | x TRL (speed) "
          "| x TRL (memory) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    trl = ok.get("trl")
    for name, r in sorted(ok.items()):
        med = statistics.median(r["step_s"][1:] or r["step_s"])
        r["median"] = med
        tmed = statistics.median(trl["step_s"][1:] or trl["step_s"]) if trl else None
        speed = f"{tmed / med:.2f}" if tmed else ""
        mem = f"{r['peak_gib'] / trl['peak_gib']:.2f}" if trl else ""
        timed, ro = len(r["step_s"][1:]), r.get("rollout_s")
        ro = f"{statistics.median(ro[1:] or ro):.2f}" if ro else ""
        print(f"| {name} | {r.get('beta', 0.0)} | {med:.2f} | {ro} | {timed} | {r['peak_gib']} | {speed} | {mem} |")
    for name, r in sorted(ok.items()):
        for path in r.get("rollout", []):
            print(f"{name} rollouts: {path}")


def main(argv: list[str]) -> None:
    if argv[0] == "table":
        table(argv[1])
        return
    stack, model, out = argv[0], argv[1], argv[2]
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 4
    beta = float(argv[argv.index("--beta") + 1]) if "--beta" in argv else 0.0
    rollout = argv[argv.index("--rollout") + 1] if "--rollout" in argv else "merged"
    try:
        res = run_lorafit(model, steps, beta, rollout) if stack == "lorafit" else run_trl(model, steps, beta)
        res["beta"] = beta
    except Exception as e:  # noqa: BLE001  one stack failing must still leave a row and let the other run
        import traceback

        traceback.print_exc()
        name = stack if rollout == "merged" else f"{stack}-{rollout}"
        res = {"stack": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    line = json.dumps(res)
    print(line, flush=True)
    with open(out, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
