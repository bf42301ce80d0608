#!/usr/bin/env bash
# The FSDP checks (issues 7 and 20) on a tiny random bf16 model (bench/make_model.py --tiny) and a local JSONL file
# written here (as cli2.sh does).
# usage: bash bench/fsdp2.sh [N]   N GPUs, default 2; N=1 is the one-GPU check of the sharded path (torchrun
#        --nproc_per_node 1 --fsdp true runs FSDP2 over a group of one: every gather, reduce and offload runs, nothing
#        is cut), without the accelerate runs.
# bf16 (issue 7):
#   torchrun:   `torchrun --nproc_per_node N -m lorafit train --fsdp true` (fast_kernels auto: the log must say FSDP
#               keeps the reference path; `on` is a config error under FSDP), bf16, checkpoints every 3 steps;
#   accelerate: (N=2) `accelerate launch --use_fsdp --num_processes 2 -m lorafit train` (no --fsdp flag: the launcher
#               alone switches it on), with --fsdp_offload_params true and --fsdp_activation_checkpointing true;
#   single:     one process, same global batch (N x accumulation), no FSDP: the losses FSDP should track;
#   resume1:    the torchrun run's step-3 checkpoint resumed by one process without FSDP.
# FSDP + QLoRA (issue 20), the same with --load_in_4bit true (NF4, packed in bf16 under FSDP):
#   qlora:        torchrun --fsdp true, gradient checkpointing on (each rank quantizes its own copy on its GPU);
#   qlora_accel:  (N=2) accelerate launch --use_fsdp, CPU-RAM-efficient loading (accelerate's default: rank 0 reads and
#                 quantizes, sends the packed weights and quant_state over nccl), CPU offload, activation checkpointing;
#   qlora_offload: (N=1) torchrun --nproc_per_node 1 --fsdp true --fsdp_offload true;
#   qlora_single: one process, 4-bit, no FSDP, same global batch, reference loss path (as FSDP's);  qlora_resume1: qlora's step-3 checkpoint, one process.
# Then prints one JSON line: per run, processes and fsdp in the log, one adapter written, it loads with PeftModel and
# gives finite logits, one metrics line per step, per-GPU peak memory (lorafit's "peak memory per rank" line; under
# FSDP also the peak while loading, before fully_shard), and the largest relative loss difference from its
# one-process reference. Run from the repo root; logs go to $OUT/fsdp2-*.log. Environment as bench/run.sh sets it.
set -uo pipefail
N=${1:-2}
OUT=${OUT:-/tmp/bench-out}; W=/tmp/fsdp2; STEPS=6
mkdir -p "$OUT"; rm -rf $W && mkdir -p $W
python3 bench/make_model.py $W/tiny --tiny > /dev/null 2>&1 || echo "make_model --tiny failed"
python3 bench/make_jsonl.py /tmp/fsdp2/data.jsonl
ARGS="--model $W/tiny --dataset $W/data.jsonl --max_steps $STEPS --per_device_train_batch_size 4 --max_seq_length 256
  --bf16 true --target_modules all-linear --lora_dropout 0 --group_by_length false --logging_steps 1 --report_to none
  --eval_strategy no --save_strategy steps --save_steps 3"
Q="--load_in_4bit true --gradient_checkpointing true"
TORCHRUN="python3 -m torch.distributed.run --standalone --nproc_per_node $N -m lorafit train $ARGS --fsdp true"
ACCEL="python3 -m accelerate.commands.launch --use_fsdp --num_processes 2 --num_machines 1 --mixed_precision no
  --dynamo_backend no --fsdp_version 2 --fsdp_offload_params true --fsdp_activation_checkpointing true -m lorafit train"
run() {  # NAME COMMAND...: one run, its log in $OUT/fsdp2-NAME.log
  local name=$1; shift
  timeout 300 "$@" --output_dir $W/$name > "$OUT/fsdp2-$name.log" 2>&1
  echo "fsdp2: $name rc=$?"
}
resume1() {  # FROM NAME EXTRA...: FROM's step-3 checkpoint resumed by one process without FSDP
  local from=$1 name=$2; shift 2
  cp -r $W/$from $W/$name && rm -rf $W/$name/checkpoints/step-000006 $W/$name/adapter_*
  timeout 300 python3 -m lorafit train --output_dir $W/$name --resume --fsdp false --gradient_accumulation_steps $N \
    "$@" > "$OUT/fsdp2-$name.log" 2>&1
  echo "fsdp2: $name rc=$?"
}
run torchrun $TORCHRUN
[ "$N" = 2 ] && run accelerate $ACCEL $ARGS
run single python3 -m lorafit train $ARGS --gradient_accumulation_steps $N
resume1 torchrun resume1
run qlora $TORCHRUN $Q
[ "$N" = 2 ] && run qlora_accel $ACCEL $ARGS --load_in_4bit true
[ "$N" = 1 ] && run qlora_offload $TORCHRUN $Q --fsdp_offload true
run qlora_single python3 -m lorafit train $ARGS $Q --gradient_accumulation_steps $N --fast_kernels off
resume1 qlora qlora_resume1
grep -hE "^fsdp|^loss:|processes|peak memory per rank|^done|Error|error" "$OUT"/fsdp2-*.log | sort | uniq -c | tail -30
N=$N python3 bench/fsdp2_check.py | tee -a "$OUT/fsdp2.jsonl"
