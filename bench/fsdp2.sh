#!/usr/bin/env bash
# Issue 7's FSDP check on the 2-GPU machine, on a tiny random bf16 model (bench/make_model.py --tiny) and a local
# JSONL file written here (as cli2.sh does):
#   torchrun:   `torchrun --nproc_per_node 2 -m lorafit train --fsdp true` (fast_kernels on: the log must say FSDP
#               overrides it), bf16, checkpoints every 3 steps;
#   accelerate: `accelerate launch --use_fsdp --num_processes 2 -m lorafit train` (no --fsdp flag: the launcher
#               alone switches it on), with --fsdp_offload_params true and --fsdp_activation_checkpointing true;
#   single:     one process, same global batch (2 x accumulation), no FSDP: the losses FSDP should track;
#   resume1:    the torchrun run's step-3 checkpoint resumed by one process without FSDP.
# Then prints one JSON line: 2 processes, fsdp in the log, one adapter written, it loads with PeftModel and gives
# finite logits, one metrics line per step, per-GPU peak memory (lorafit's "peak memory per rank" line), and the
# largest relative loss difference from the single-process run. Run from the repo root; logs go to $OUT/fsdp2-*.log.
# Environment as bench/run.sh sets it (PYTHONPATH, NCCL_NVLS_ENABLE=0, ...).
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}; W=/tmp/fsdp2; STEPS=6
mkdir -p "$OUT"; rm -rf $W && mkdir -p $W
python3 bench/make_model.py $W/tiny --tiny > /dev/null 2>&1 || echo "make_model --tiny failed"
python3 bench/make_jsonl.py /tmp/fsdp2/data.jsonl
ARGS="--model $W/tiny --dataset $W/data.jsonl --max_steps $STEPS --per_device_train_batch_size 4 --max_seq_length 256
  --bf16 true --target_modules all-linear --lora_dropout 0 --group_by_length false --logging_steps 1 --report_to none
  --eval_strategy no --save_strategy steps --save_steps 3"
timeout 300 python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m lorafit train $ARGS --fsdp true \
  --fast_kernels on --output_dir $W/torchrun > "$OUT/fsdp2-torchrun.log" 2>&1
echo "fsdp2: torchrun rc=$?"
timeout 300 python3 -m accelerate.commands.launch --use_fsdp --num_processes 2 --num_machines 1 --mixed_precision no \
  --dynamo_backend no --fsdp_version 2 --fsdp_offload_params true --fsdp_activation_checkpointing true \
  -m lorafit train $ARGS --output_dir $W/accelerate > "$OUT/fsdp2-accelerate.log" 2>&1
echo "fsdp2: accelerate rc=$?"
timeout 300 python3 -m lorafit train $ARGS --gradient_accumulation_steps 2 --output_dir $W/single > "$OUT/fsdp2-single.log" 2>&1
echo "fsdp2: single rc=$?"
cp -r $W/torchrun $W/resume1 && rm -rf $W/resume1/checkpoints/step-000006 $W/resume1/adapter_*
timeout 300 python3 -m lorafit train --output_dir $W/resume1 --resume --fsdp false --gradient_accumulation_steps 2 \
  > "$OUT/fsdp2-resume1.log" 2>&1
echo "fsdp2: resume1 rc=$?"
grep -hE "^fsdp|^loss:|processes|peak memory per rank|^done|Error|error" "$OUT"/fsdp2-torchrun.log "$OUT"/fsdp2-accelerate.log | tail -20
python3 - <<'PY'
import json, os, re
from pathlib import Path

W, OUT, STEPS = Path("/tmp/fsdp2"), Path(os.environ.get("OUT", "/tmp/bench-out")), 6


def losses(run):
    p = run / "metrics.jsonl"
    return {m["step"]: m["loss"] for m in map(json.loads, p.read_text().splitlines()) if "loss" in m} if p.is_file() else {}


def loads(run):
    """PeftModel.from_pretrained on the tiny base; finite logits on a few tokens."""
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(W / "tiny"), dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(base, str(run))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 5, 9, 13]])).logits
        return bool(torch.isfinite(logits).all())
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"[:200]


def check(name, single):
    run, log = W / name, (OUT / f"fsdp2-{name}.log")
    text = log.read_text() if log.is_file() else ""
    got, ref = losses(run), losses(W / "single")
    peak = re.search(r"peak memory per rank \(([^)]*)\): ([\d., ]+) GiB", text)
    res = {"two_processes": "x 2 processes" in text, "fsdp_in_log": "fsdp: FSDP2 over 2 processes" in text,
           "fast_path_overridden": "overridden: the fused kernels read whole base weights" in text,
           "adapter_lines_in_log": text.count("\nadapter:") + text.startswith("adapter:"),
           "adapter_written": (run / "adapter_model.safetensors").is_file(), "peft_loads_finite": loads(run),
           "metrics_steps": sorted(losses(run)), "losses": [round(v, 4) for _, v in sorted(got.items())],
           "finite": all(v == v and abs(v) != float("inf") for v in got.values()) and len(got) > 0,
           "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else [],
           "peak_gib_per_rank": [float(x) for x in peak.group(2).split(",")] if peak else None,
           "peak_memory_kind": peak.group(1) if peak else None}
    if not single:
        res["max_rel_loss_diff_vs_single"] = max((abs(got[s] - ref[s]) / abs(ref[s]) for s in got if s in ref), default=None)
    for line in text.splitlines():
        if line.startswith("fsdp: accelerate settings used"):
            res["accelerate_settings"] = line[len("fsdp: "):][:300]
    return res


out = {"fsdp2": True, **{n: check(n, n == "single") for n in ("torchrun", "accelerate", "single", "resume1")}}
print(json.dumps(out))
PY
