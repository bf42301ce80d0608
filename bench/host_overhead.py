"""Host-side cost of the fast path's step, measured on CPU (no GPU needed).

At 8 x 512 on an H100 the fast path's step is bound by the host (Python, autograd, the dispatcher
and launch calls), not by the GPU. This script runs the same FastLoss step (32 decoder layers,
LoRA r=16 on all linear layers, checkpointing, AdamW) on a model so narrow (hidden 64) that the
arithmetic is negligible, so its CPU time per step is almost all per-operation overhead, and it
counts the aten operations one forward + backward issues. On CPU the RMSNorm / RoPE / SwiGLU /
cross-entropy twins run as several torch ops each where the GPU runs one Triton kernel, so the
absolute counts are above the GPU's; differences between two versions of lorafit are what it is for.

usage: python bench/host_overhead.py [--steps 10] [--threads 1]     (prints one JSON line)
"""
from __future__ import annotations

import argparse
import collections
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import peft
    import torch
    import transformers
    from torch.utils._python_dispatch import TorchDispatchMode

    from lorafit.train.fast import enable_fast_path

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = transformers.AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    fl = enable_fast_path(pm, gradient_checkpointing=True)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 256, (2, 16))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(16).expand(2, 16)}

    def step():
        loss, n = fl(batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ops = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with Count():
        loss, n = fl(batch)
        (loss / n).backward()
    opt.zero_grad(set_to_none=True)
    print(json.dumps({"ms_per_step": round(sorted(times)[len(times) // 2] * 1e3, 1),
                      "aten_ops_fwd_bwd": sum(ops.values()), "top": ops.most_common(6)}))


if __name__ == "__main__":
    main()
