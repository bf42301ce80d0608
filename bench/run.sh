#!/usr/bin/env bash
# Runs the whole benchmark on the GPU machine: GPU tests, the random model, then each stack in its
# own process, then the table. Wheels (the GPU image lacks bitsandbytes and Unsloth) come from
# `bash ../shared/bench/fetch_peer_wheels.sh`, carried as .whl-bnb and .whl-peers.
# usage: bash bench/run.sh [STEPS...]   STEPS from: tests model lorafit lorafit:gpu lorafit:nockpt hf unsloth loss
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p /tmp/site && cp -r .whl-site/* /tmp/site/   # bitsandbytes unpacked, CUDA 13 libraries only (64 MiB carry limit)
[ -d .whl-peers ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-peers .whl-peers/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD/src
MODEL=/tmp/phi3-llama
STEPS=${*:-tests model lorafit hf unsloth loss}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/log"
for s in $STEPS; do
  echo "=== $s $(date -u +%FT%TZ)" | tee -a "$OUT/log"
  case $s in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider -rA tests/test_kernels.py > "$OUT/tests.log" 2>&1
           grep -E "^(FAILED|PASSED|ERROR|E  )|passed|failed|backend" "$OUT/tests.log" | tail -40 | tee -a "$OUT/log" ;;
    prof*) timeout 300 python3 bench/bench.py lorafit $MODEL --shapes "" --profile ${s#prof:} 2>&1 | grep -E "^\{|profile|ms |Error" | tee -a "$OUT/log" ;;
    model) [ -d $MODEL ] || timeout 300 python3 bench/make_model.py $MODEL 2>&1 | tail -2 | tee -a "$OUT/log" ;;
    loss) timeout 400 python3 bench/loss_check.py $MODEL 50 2>&1 | grep -E '^\{|Error|error' | tee -a "$OUT/results.jsonl" ;;
    unsloth) PYTHONPATH=/tmp/site-peers:$PYTHONPATH timeout 280 python3 bench/bench.py unsloth $MODEL --real 2>&1 \
               | grep -E '^\{|Error' | tee -a "$OUT/results.jsonl" ;;
    *) timeout 240 python3 bench/bench.py $s $MODEL --real 2>&1 | grep -E '^\{|Error|error' | tee -a "$OUT/results.jsonl" ;;
  esac
done
python3 bench/table.py "$OUT/results.jsonl" | tee "$OUT/table.md"
