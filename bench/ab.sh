#!/usr/bin/env bash
# A/B of lorafit source trees on the GPU machine, alternating in one call so all see the same GPU:
#   bash bench/ab.sh "OLD_TREE [OTHER_TREE...]" [ROUNDS] [SHAPES] [PROFILE_SHAPES]   ("" profiles nothing)
# OLD_TREE holds an older `src/` (e.g. `git archive <rev> src | tar -x -C ab_old`, left untracked so it
# travels with the working tree); the new tree is this checkout's src/. Each round runs bench.py's lorafit
# stack for each tree in turn, then the new one (records labelled "new", the others by their folder);
# then the new tree is profiled at PROFILE_SHAPES (bench.py
# --profile, with the idle-gap analysis of the busiest stream). Needs .whl-site (bitsandbytes) carried
# and `bash bench/run.sh model` having built /tmp/phi3-llama (run.sh sets up /tmp/site the same way).
set -uo pipefail
OLD=$1; ROUNDS=${2:-2}; SHAPES=${3:-8x512,4x2048}; PROF=${4-4x2048 8x512}
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p /tmp/site && cp -r .whl-site/* /tmp/site/
MODEL=/tmp/phi3-llama
for r in $(seq "$ROUNDS"); do
  for tree in $OLD .; do
    label=$([ "$tree" = . ] && echo new || basename "$tree")
    PYTHONPATH=/tmp/site:$PWD/$tree/src timeout 240 python3 bench/bench.py lorafit $MODEL --shapes "$SHAPES" --steps 16 2>&1 \
      | grep -E '^\{|Error' | sed "s/^{/{\"tree\": \"$label\", \"round\": $r, /" | tee -a "$OUT/ab.jsonl"
  done
done
for p in $PROF; do
  PYTHONPATH=/tmp/site:$PWD/src timeout 300 python3 bench/bench.py lorafit $MODEL --shapes "" --profile "$p" 2>&1 \
    | grep -E "profile|ms |gap|stream|Error" | tee -a "$OUT/profile.txt"
done
