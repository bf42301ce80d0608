#!/usr/bin/env bash
# Runs the whole benchmark on the GPU machine: GPU tests, the random model, then each stack in its
# own process, then the table. Wheels (the GPU image lacks bitsandbytes and Unsloth) come from
# `bash ../shared/bench/fetch_peer_wheels.sh`, carried as .whl-bnb and .whl-peers.
# usage: [BENCH_ARGS=...] bash bench/run.sh [STEPS...]   STEPS from: tests model lorafit lorafit:gpu lorafit:nockpt
#        hf unsloth loss prof:BSxSEQ[:STACK] mem:BSxSEQ; BENCH_ARGS (default --real) go to every bench.py stack
#        ddp (lorafit's DDP step on 1 GPU, then on 2: ddp_bench.py under torchrun; needs `model` first)
#        cli2 (a short `torchrun --nproc_per_node 2 -m lorafit train`, 4-bit, fast path, on a tiny random model)
#        dpo (lorafit --method dpo vs TRL's DPOTrainer, QLoRA, pairs of Alpaca lengths: bench/dpo_bench.py; ~5 min)
#        fsdp2 (FSDP on 2 GPUs through torchrun --fsdp true and accelerate launch --use_fsdp, bf16 and 4-bit (FSDP +
#              QLoRA), tiny random model), fsdp1 (the same sharded path on one GPU: torchrun --nproc_per_node 1 --fsdp true)
#        qlora8b (Llama-3-8B-shaped QLoRA: FSDP over 2 vs DDP over 2 vs 1 GPU, peak memory and tokens/s; on one GPU:
#              1 GPU vs FSDP over 1), qlora8b:STEP (one of its steps: model single ddp2 fsdp2 fsdp1 table)
#        graphs (the recipe shape through the CLI with --cuda_graphs true and false, GSTEPS steps (100) each, LoRA
#          dropout GDROP (0), then bench/graphs_check.py: their losses step by step; needs m2:phi3-llama first; ~6 min)
#        nockpt (~6 min: 8x512 / 4x2048 on Phi-3-mini dims without recomputation, lorafit graphed vs Unsloth, and
#          both with checkpointing, each in its own process)
#        recipe (issue 14's recipe shape, one H200, ~7 min: lorafit's CLI on phi3_alpaca.yaml, all-linear, dropout 0,
#          vs Unsloth and transformers+PEFT unpacked at 4 x 4 via peer_real.py, each in its own process, then the table)
#        shapes (~9 min: 8x512 / 4x2048 on Phi-3-mini and Llama-3-8B dims, lorafit (graphs, and rows eager on Phi-3)
#          and Unsloth)
#        fp8shapes (8x512 / 4x2048 on Phi-3-mini and Llama-3-8B dims: lorafit graphed with --fp8_base all, backward
#          and off, and Unsloth, each in its own process; ~8 min)
#        long (~6 min: 1x32768 memory of lorafit and Unsloth, the 50-step loss check; carry .bench-data)
#        recipes (~8 min: the shipped recipes as shipped, hub names swapped for local random models of their dims)
#        fp8 (the recipe shape with --fp8_base FP8 (all) and off, GSTEPS steps (100) each, then their losses step by
#          step; needs m2:phi3-llama first)
#        lradd (bench/lowrank_add_speed.py: the LoRA term onto fp8 products' outputs, cuBLAS vs kernels/fp8.py; ~1 min)
#        m2:KIND (a random model of ../shared/bench/make_models2.py's KIND in /tmp/KIND), rcp:RECIPE (one recipe as
#          shipped), rcp:RECIPE:eager (the same with --cuda_graphs false), rcp:RECIPE:fp8[:backward] (--fp8_base all or backward),
#          rcp:RECIPE:all (the recipe shape)
#        grpo (s per GRPO step, 8 prompts x 8 completions x 256 tokens, QLoRA: lorafit vs TRL's GRPOTrainer; makes the
#        model if missing; about 5 minutes with the model: `bash bench/run.sh grpo`), grpo-adapter (after grpo: lorafit
#        sampling through the adapter model, --rollout_weights adapter, as a third row; ~3 min)
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p /tmp/site && cp -r .whl-site/* /tmp/site/   # bitsandbytes unpacked, CUDA 13 libraries only (64 MiB carry limit)
[ -d .whl-peers ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-peers .whl-peers/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD/src
MODEL=/tmp/phi3-llama
# NVLink multicast stays off on the multi-GPU machines (a program using it can take the host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TORCHRUN="python3 -m torch.distributed.run --standalone"
STEPS=${*:-tests model lorafit hf unsloth loss}
STEPS=" $STEPS "
STEPS=${STEPS// recipes / m2:phi3 m2:mistral-7b rcp:phi3_alpaca rcp:phi3_guanaco rcp:mistral7b }
STEPS=${STEPS// recipe / m2:phi3-llama rcp:phi3_alpaca:all peer:unsloth peer:hf }
STEPS=${STEPS// shapes / model sh:lorafit:graphs sh:lorafit sh:unsloth m2:llama3-8b sh:lorafit:graphs@llama3-8b sh:unsloth@llama3-8b }
STEPS=${STEPS// nockpt / model sh:lorafit:graphs sh:lorafit:graphs-nockpt sh:unsloth sh:unsloth:nockpt }
STEPS=${STEPS// long / model mem32k:lorafit mem32k:unsloth loss }
STEPS=${STEPS// fp8shapes / model sh:lorafit:graphs-fp8 sh:lorafit:graphs-fp8bwd sh:lorafit:graphs sh:unsloth m2:llama3-8b sh:lorafit:graphs-fp8@llama3-8b sh:lorafit:graphs-fp8bwd@llama3-8b sh:lorafit:graphs@llama3-8b sh:unsloth@llama3-8b }
LENS="bench/alpaca_lengths.txt bench/alpaca_prompt_lengths.txt"
declare -A RMODEL=([phi3_alpaca]=/tmp/phi3 [phi3_guanaco]=/tmp/phi3 [mistral7b]=/tmp/mistral-7b)
BENCH_ARGS=${BENCH_ARGS---real}
# the recipe shape twice, FLAG=A then FLAG=B, on the same records (GSTEPS steps, LoRA dropout GDROP): their speed,
# then their losses step by step (graphs_check.py, the runs named NAME_A and NAME_B)
recipe_pair() { local flag=$1 a=$2 b=$3 v
  for v in $a $b; do
    timeout 420 python3 bench/recipe.py configs/phi3_alpaca.yaml /tmp/phi3-llama /tmp/rp-$flag-$v --steps ${GSTEPS:-100} \
      --name recipe-$flag-$v --target_modules all-linear --lora_dropout ${GDROP:-0} --$flag $v 2>&1 \
      | tee -a "$OUT/log" | grep -E '^\{' | tee -a "$OUT/results.jsonl"
  done
  python3 bench/graphs_check.py /tmp/rp-$flag-$a/run-phi3_alpaca /tmp/rp-$flag-$b/run-phi3_alpaca $4 $5 2>&1 | tee -a "$OUT/log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/log"
for s in $STEPS; do
  echo "=== $s $(date -u +%FT%TZ)" | tee -a "$OUT/log"
  case $s in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider -rA tests/test_kernels.py tests/test_graphs_gpu.py > "$OUT/tests.log" 2>&1
           grep -E "^(FAILED|PASSED|ERROR|E  )|passed|failed|backend" "$OUT/tests.log" | tail -40 | tee -a "$OUT/log" ;;
    lradd) timeout 200 python3 bench/lowrank_add_speed.py 2>&1 | grep -E '^\{|Error' | tee -a "$OUT/lowrank_add.jsonl" ;;
    mem:*) timeout 300 python3 bench/bench.py lorafit $MODEL --shapes "" --memory ${s#mem:} 2>&1 | grep -E "^memory|MiB|Error" | tee -a "$OUT/log" ;;
    prof:*) ps=${s#prof:}; pstack=lorafit; [ "${ps#*:}" != "$ps" ] && pstack=${ps#*:}   # prof:BSxSEQ[:STACK]
            timeout 300 python3 bench/bench.py $pstack $MODEL --shapes "" --profile ${ps%%:*} 2>&1 \
              | grep -E "^\{|profile|ms |by kind|stream|Error" | tee -a "$OUT/log" ;;
    model) [ -d $MODEL ] || timeout 300 python3 bench/make_model.py $MODEL 2>&1 | tail -2 | tee -a "$OUT/log" ;;
    ddp) nvidia-smi topo -m 2>&1 | head -4 | tee -a "$OUT/log"
         for n in 1 2; do
           timeout 300 $TORCHRUN --nproc_per_node $n bench/ddp_bench.py $MODEL --check > "$OUT/ddp$n.log" 2>&1
           echo "rc=$? (nproc $n)" | tee -a "$OUT/log"; grep -E '^\{' "$OUT/ddp$n.log" | tee -a "$OUT/ddp.jsonl"
           grep -E 'Error|error' "$OUT/ddp$n.log" | tail -5
         done
         python3 bench/table.py "$OUT/ddp.jsonl" | tee "$OUT/ddp_table.md" ;;
    m2:*) k=${s#m2:}; [ -d /tmp/$k ] || timeout 400 python3 bench/make_models2.py $k /tmp/$k 32768 2>&1 | tail -1 | tee -a "$OUT/log" ;;
    rcp:*) r=${s#rcp:}; name=${r%%:*}; model=${RMODEL[$name]}; extra=""
           case ${r#$name} in
             :eager) extra="--name $name-eager --cuda_graphs false" ;;   # as shipped, CUDA graphs off
             :fp8*) f=${r#$name:fp8}; f=${f#:}; extra="--name $name-fp8${f:+-$f} --fp8_base ${f:-all}" ;;  # fp8 products
             ?*) model=/tmp/phi3-llama; extra="--name recipe --target_modules all-linear --lora_dropout 0" ;;
           esac
           timeout 400 python3 bench/recipe.py configs/$name.yaml $model /tmp/recipe-out --steps 40 $extra 2>&1 \
             | tee -a "$OUT/log" | grep -E '^\{' | tee -a "$OUT/results.jsonl" ;;
    peer:*) p=${s#peer:}; pp=""; [ $p = unsloth ] && pp=/tmp/site-peers:
            PYTHONPATH=$pp$PYTHONPATH timeout 300 python3 bench/peer_real.py $p /tmp/phi3-llama $LENS 4 4 all 24 2>&1 \
              | grep -E '^\{|Error' | tee -a "$OUT/results.jsonl" ;;
    sh:*) st=${s#sh:}; stack=${st%@*}; tag=""; m=$MODEL; pp=""
          if [ "$st" != "$stack" ]; then tag=@${st#*@}; m=/tmp/${st#*@}; fi
          [[ $stack == unsloth* ]] && pp=/tmp/site-peers:
          PYTHONPATH=$pp$PYTHONPATH timeout 300 python3 bench/bench.py $stack $m --tag "$tag" 2>&1 \
            | grep -E '^\{|Error' | tee -a "$OUT/results.jsonl" ;;
    mem32k:*) stack=${s#mem32k:}; pp=""; [ $stack = unsloth ] && pp=/tmp/site-peers:
          PYTHONPATH=$pp$PYTHONPATH timeout 300 python3 bench/bench.py $stack $MODEL --shapes 1x32768 --steps 6 2>&1 \
            | grep -E '^\{|Error' | tee -a "$OUT/results.jsonl" ;;
    dpo) [ -d $MODEL ] || timeout 300 python3 bench/make_model.py $MODEL 2>&1 | tail -2 | tee -a "$OUT/log"
         timeout 200 python3 bench/dpo_bench.py lorafit $MODEL > "$OUT/dpo_lorafit.log" 2>&1
         echo "rc=$? (lorafit)" | tee -a "$OUT/log"; grep -E 'Error|error' "$OUT/dpo_lorafit.log" | tail -5
         PYTHONPATH=/tmp/site-peers:$PYTHONPATH timeout 220 python3 bench/dpo_bench.py trl $MODEL > "$OUT/dpo_trl.log" 2>&1
         echo "rc=$? (trl)" | tee -a "$OUT/log"; grep -E 'Error|error' "$OUT/dpo_trl.log" | tail -5
         grep -hE '^\{' "$OUT/dpo_lorafit.log" "$OUT/dpo_trl.log" | tee "$OUT/dpo.jsonl"
         python3 bench/dpo_bench.py table "$OUT/dpo.jsonl" | tee "$OUT/dpo_table.md" ;;
    graphs) recipe_pair cuda_graphs true false graphs eager ;;   # the recipe shape with CUDA graphs and without
    fp8) recipe_pair fp8_base ${FP8:-all} off fp8 bf16 ;;          # the base's products in fp8 and in bf16
    cli2) bash bench/cli2.sh 2>&1 | tee -a "$OUT/log" ;;
    grpo) [ -d $MODEL ] || timeout 300 python3 bench/make_model.py $MODEL 2>&1 | tail -1 | tee -a "$OUT/log"
          rm -f "$OUT/grpo.jsonl"
          timeout 170 python3 bench/grpo_bench.py lorafit $MODEL "$OUT/grpo.jsonl" > "$OUT/grpo_lorafit.log" 2>&1
          echo "rc=$? (lorafit)" | tee -a "$OUT/log"; grep -E '^step|Error' "$OUT/grpo_lorafit.log" | tail -6 | tee -a "$OUT/log"
          PYTHONPATH=/tmp/site-peers:$PYTHONPATH timeout 170 python3 bench/grpo_bench.py trl $MODEL "$OUT/grpo.jsonl" \
            > "$OUT/grpo_trl.log" 2>&1
          echo "rc=$? (trl)" | tee -a "$OUT/log"; grep -E 'Error' "$OUT/grpo_trl.log" | tail -4 | tee -a "$OUT/log"
          python3 bench/grpo_bench.py table "$OUT/grpo.jsonl" | tee "$OUT/grpo_table.md" ;;
    grpo-adapter) timeout 200 python3 bench/grpo_bench.py lorafit $MODEL "$OUT/grpo.jsonl" --rollout adapter \
            > "$OUT/grpo_adapter.log" 2>&1
          echo "rc=$? (lorafit-adapter)" | tee -a "$OUT/log"; grep -E '^step|Error' "$OUT/grpo_adapter.log" | tail -6 | tee -a "$OUT/log"
          python3 bench/grpo_bench.py table "$OUT/grpo.jsonl" | tee "$OUT/grpo_table.md" ;;
    fsdp2) bash bench/fsdp2.sh 2 2>&1 | tee -a "$OUT/log" ;;
    fsdp1) bash bench/fsdp2.sh 1 2>&1 | tee -a "$OUT/log" ;;
    qlora8b) bash bench/qlora8b.sh 2>&1 | tee -a "$OUT/log" ;;
    qlora8b:*) bash bench/qlora8b.sh ${s#qlora8b:} 2>&1 | tee -a "$OUT/log" ;;
    loss) timeout 400 python3 bench/loss_check.py $MODEL 50 2>&1 | grep -E '^\{|Error|error' | tee -a "$OUT/results.jsonl" ;;
    unsloth) PYTHONPATH=/tmp/site-peers:$PYTHONPATH timeout 280 python3 bench/bench.py unsloth $MODEL $BENCH_ARGS 2>&1 \
               | grep -E '^\{|Error' | tee -a "$OUT/results.jsonl" ;;
    *) timeout 240 python3 bench/bench.py $s $MODEL $BENCH_ARGS 2>&1 | grep -E '^\{|Error|error' | tee -a "$OUT/results.jsonl" ;;
  esac
done
[ -f "$OUT/results.jsonl" ] && python3 bench/table.py "$OUT/results.jsonl" | tee "$OUT/table.md"
