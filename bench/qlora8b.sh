#!/usr/bin/env bash
# Issue 20's figures: QLoRA on a Llama-3-8B-shaped random model (bench/make_models2.py llama3-8b), NF4 + double
# quantization, bf16, gradient checkpointing, reference loss path everywhere (FSDP cannot run the fused one), packed
# 2 x 2048-token micro-batches per GPU, 10 optimizer steps:
#   single  one GPU, no FSDP                     ddp2   torchrun --nproc_per_node 2 (each GPU holds the whole base)
#   fsdp2   torchrun --nproc_per_node 2 --fsdp true (the 4-bit base sharded)
#   fsdp1   torchrun --nproc_per_node 1 --fsdp true (the sharded path on one GPU; the one-GPU machine's check)
# then `table`: per-GPU peak memory (training; under FSDP also the peak while loading, before fully_shard) and
# steady tokens/s (steps 3-10, all GPUs together) against `single`; the issue's targets are fsdp2 peak <= 0.6x and
# tokens/s >= 1.7x single's. JSON lines in $OUT/qlora8b.jsonl, the table in $OUT/qlora8b.md.
# usage: bash bench/qlora8b.sh [STEPS...]   default on 2+ GPUs: model single ddp2 fsdp2 table; on 1: model single
#        fsdp1 table. Runs keep to $W (default /tmp/qlora8b), so the steps may be split over several calls while the
#        machine stays warm. About 2 min for `model`, 1.5-2 min per run (load + quantize 16 GB, then 10 steps).
# Environment as bench/run.sh sets it (PYTHONPATH with bitsandbytes, NCCL_NVLS_ENABLE=0, ...).
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}; W=${QLORA8B_DIR:-/tmp/qlora8b}; mkdir -p "$OUT" "$W"
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ $# -gt 0 ]; then STEPS="$*"; elif [ "$GPUS" -ge 2 ]; then STEPS="model single ddp2 fsdp2 table"
else STEPS="model single fsdp1 table"; fi
ARGS="--model $W/model --dataset $W/data.jsonl --load_in_4bit true --bnb_4bit_use_double_quant true --bf16 true
  --gradient_checkpointing true --fast_kernels off --packing true --max_seq_length 2048 --per_device_train_batch_size 2
  --max_steps 10 --target_modules all-linear --lora_r 16 --lora_alpha 32 --lora_dropout 0 --logging_steps 1
  --report_to none --eval_strategy no --save_strategy no --val_size 0"
TORCHRUN="python3 -m torch.distributed.run --standalone"
for s in $STEPS; do
  echo "=== qlora8b $s $(date -u +%FT%TZ)"
  case $s in
    model) [ -f $W/model/config.json ] || timeout 300 python3 bench/make_models2.py llama3-8b $W/model 2>&1 | tail -1
           [ -f $W/data.jsonl ] || python3 bench/make_jsonl.py $W/data.jsonl 6000 ;;
    single) rm -rf $W/single; timeout 240 python3 -m lorafit train $ARGS --output_dir $W/single > "$OUT/qlora8b-single.log" 2>&1 ;;
    ddp2) rm -rf $W/ddp2; timeout 240 $TORCHRUN --nproc_per_node 2 -m lorafit train $ARGS --output_dir $W/ddp2 \
            > "$OUT/qlora8b-ddp2.log" 2>&1 ;;
    fsdp2) rm -rf $W/fsdp2; timeout 240 $TORCHRUN --nproc_per_node 2 -m lorafit train $ARGS --fsdp true \
             --output_dir $W/fsdp2 > "$OUT/qlora8b-fsdp2.log" 2>&1 ;;
    fsdp1) rm -rf $W/fsdp1; timeout 240 $TORCHRUN --nproc_per_node 1 -m lorafit train $ARGS --fsdp true \
             --output_dir $W/fsdp1 > "$OUT/qlora8b-fsdp1.log" 2>&1 ;;
    table) python3 bench/qlora8b_table.py "$W" "$OUT" ;;
    *) echo "unknown step $s" ;;
  esac
  echo "rc=$?"
  [ -f "$OUT/qlora8b-$s.log" ] && grep -E "^fsdp|^loss:|processes|^done|peak memory|Error|error" "$OUT/qlora8b-$s.log" | tail -8
done
