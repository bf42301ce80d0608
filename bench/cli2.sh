#!/usr/bin/env bash
# Issue 7's CLI check on the 2-GPU machine: `torchrun --nproc_per_node 2 -m lorafit train` with a 4-bit base,
# the fast path and gradient checkpointing, on a tiny random model (bench/make_model.py --tiny) and a local
# JSONL file written here; then checks that the run trained on 2 processes and that one adapter, one
# metrics line per step and one log were written (rank 0 alone writes). Run from the repo root; the
# log goes to $OUT/cli2.log. Environment as bench/run.sh sets it (PYTHONPATH, NCCL_NVLS_ENABLE=0, ...).
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}; W=/tmp/cli2; STEPS=6
rm -rf $W && mkdir -p $W
python3 bench/make_model.py $W/tiny --tiny > /dev/null 2>&1 || echo "make_model --tiny failed"
python3 bench/make_jsonl.py /tmp/cli2/data.jsonl
timeout 300 python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m lorafit train --model $W/tiny \
  --dataset $W/data.jsonl --output_dir $W/run --max_steps $STEPS --per_device_train_batch_size 4 --max_seq_length 256 \
  --load_in_4bit true --gradient_checkpointing true --fast_kernels on --target_modules all-linear --lora_dropout 0 \
  --logging_steps 1 --report_to none --eval_strategy no --save_strategy steps --save_steps 3 > "$OUT/cli2.log" 2>&1
rc=$?
echo "cli2: torchrun rc=$rc"
grep -E "processes|^loss:|^step |^done|^adapter|Error|error" "$OUT/cli2.log" | tail -20
ls -l $W/run $W/run/checkpoints 2>&1
python3 - <<'PY'
import json
from pathlib import Path
run = Path("/tmp/cli2/run")
log = Path(__import__("os").environ.get("OUT", "/tmp/bench-out")) / "cli2.log"
text = log.read_text()
metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
ckpts = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
from safetensors.torch import load_file
ad = load_file(str(run / "adapter_model.safetensors"))
res = {"cli2": True, "two_processes": "x 2 processes" in text, "fast_path": "loss: fused kernels" in text,
       "adapter_lines_in_log": text.count("\nadapter:") + text.startswith("adapter:"),
       "metrics_lines": len(metrics), "steps": [m.get("step") for m in metrics], "checkpoints": ckpts,
       "adapter_tensors": len(ad), "adapter_finite": all(bool(t.float().isfinite().all()) for t in ad.values()),
       "losses": [round(m["loss"], 4) for m in metrics if "loss" in m]}
print(json.dumps(res))
PY
