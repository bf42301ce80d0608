"""Per-GPU memory of QLoRA under FSDP, computed from a model's shape (no GPU, no measurement): the README's 70B plan.

usage: python3 bench/memory_plan.py [--micro_batch 1] [--seq 2048] [--r 16]
Prints Markdown tables for Llama-3-70B over 1, 2, 4 and 8 GPUs and for Llama-3-8B over 1 and 2 (the shape
bench/qlora8b.sh measures, to check the arithmetic against).

What lorafit's FSDP + QLoRA path holds on each GPU (src/lorafit/train/fsdp.py):
  sharded 1/W:  the NF4 weights (0.5 byte per parameter of every decoder linear); embeddings, head and norms, which
                PEFT's k-bit preparation upcasts to float32 (4 bytes); the LoRA weights (float32), their gradients
                (float32) and AdamW's two moments (float32): 16 bytes per LoRA parameter;
  whole:        each weight's quant_state, which FSDP does not shard (double quantization: 1 uint8 absmax per 64
                weights + 1 float32 absmax per 256 blocks = 0.127 bits per weight); the root unit (embeddings + head)
                gathered in bf16 for the whole step (lorafit reshards the root only after backward); two decoder
                layers gathered at a time (the running one and the prefetched one), packed 4-bit in bf16 storage;
                one weight dequantized to bf16 by bitsandbytes during its matmul (one GPU without FSDP: only that);
  activations:  not sharded (each GPU runs its own micro-batch): with gradient checkpointing each layer's bf16
                input, one layer recomputed in backward (the tensors autograd keeps per token, counted below), and
                the loss: labelled tokens' logits in bf16, their float32 copy and its gradient (10 bytes x vocab per
                token, reference_loss in train/objectives/sft.py).
Loading: each GPU quantizes the whole base before fully_shard cuts it (fsdp.load_base), a peak of its own; with
CPU offload the base is quantized on the CPU instead (slow) and the GPU never holds it whole.
Not counted: the CUDA context, allocator slack, NCCL buffers and fragmentation (not modelled).
"""
from __future__ import annotations

import argparse

GIB = 2**30
LLAMA3_70B = {"name": "Llama-3-70B", "layers": 80, "hidden": 8192, "mlp": 28672, "heads": 64, "kv_heads": 8,
              "vocab": 128256}
LLAMA3_8B = {"name": "Llama-3-8B", "layers": 32, "hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8,
             "vocab": 128256}
NF4_BYTES = 0.5
QUANT_STATE_BYTES = 1 / 64 + 4 / (64 * 256)  # per weight: uint8 absmax per block of 64, float32 absmax per 256 blocks


def linears(a: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder linear of one layer."""
    h, kv = a["hidden"], a["kv_heads"] * a["hidden"] // a["heads"]
    return {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, a["mlp"]), "up": (h, a["mlp"]),
            "down": (a["mlp"], h)}


def plan(a: dict, world: int, micro_batch: int = 1, seq: int = 2048, r: int = 16) -> dict[str, float]:
    """GiB per GPU, by component, for QLoRA on all linears at LoRA rank r."""
    lin = linears(a)
    layer_w = sum(i * o for i, o in lin.values())
    quantized = a["layers"] * layer_w
    root = 2 * a["vocab"] * a["hidden"]  # embeddings + head, untied
    norms = (2 * a["layers"] + 1) * a["hidden"]
    lora = a["layers"] * sum(r * (i + o) for i, o in lin.values())
    h, kv, tokens = a["hidden"], a["kv_heads"] * a["hidden"] // a["heads"], micro_batch * seq
    # per token, one layer, bf16: 2 norm in/out pairs (4h), q, attention out (2h), k, v (2kv), SDPA's saved q/k/v/out
    # (h + 2kv + h), o_proj input (h), gate, up, silu(gate), their product (4 mlp); float32 norm inputs (2 x 2h)
    per_token_layer = 2 * (4 * h + 2 * h + 2 * kv + 2 * h + 2 * kv + h + 4 * a["mlp"]) + 4 * 2 * h
    out = {
        "NF4 weights (sharded)": quantized * NF4_BYTES / world,
        "quant_state (whole)": quantized * QUANT_STATE_BYTES,
        "embeddings+head+norms fp32 (sharded)": (root + norms) * 4 / world,
        "LoRA + grads + AdamW fp32 (sharded)": lora * 16 / world,
        # one GPU trains without FSDP: nothing gathered, only the dequantized weight
        "gathered: root bf16 + 2 layers + 1 dequantized weight": ((root * 2 + 2 * layer_w * NF4_BYTES if world > 1
                                                                  else 0) + max(i * o for i, o in lin.values()) * 2),
        "activations: checkpointed layer inputs": a["layers"] * tokens * h * 2,
        "activations: one layer recomputed": tokens * per_token_layer,
        "loss: logits bf16 + fp32 + grad": tokens * a["vocab"] * 10,
    }
    out = {k: v / GIB for k, v in out.items()}
    out["total"] = sum(out.values())
    # fsdp.load_base quantizes the whole base on each loading GPU before fully_shard cuts it (bf16 root until then)
    out["loading peak (whole 4-bit base, before sharding; CPU offload: 0)"] = (
        quantized * (NF4_BYTES + QUANT_STATE_BYTES) + (root + norms) * 2) / GIB
    out["params_billion"] = (quantized + root + norms) / 1e9
    out["lora_params_million"] = lora / 1e6
    return out


def table(a: dict, worlds: list[int], **kw) -> str:
    plans = {w: plan(a, w, **kw) for w in worlds}
    first = plans[worlds[0]]
    r, mb, seq = kw.get("r", 16), kw.get("micro_batch", 1), kw.get("seq", 2048)
    head = f"{a['name']} ({first['params_billion']:.1f}B parameters, LoRA r={r} on all linears: " \
           f"{first['lora_params_million']:.0f}M), micro-batch {mb} x {seq} tokens"
    names = [f"{w} GPUs, FSDP" if w > 1 else "1 GPU, no FSDP" for w in worlds]
    rows = [head, "", "| GiB per GPU | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(worlds)]
    for key in first:
        if key in ("params_billion", "lora_params_million"):
            continue
        cells = " | ".join(f"{plans[w][key]:.2f}" for w in worlds)
        rows.append(f"| {'**total (training)**' if key == 'total' else key} | {cells} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro_batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    kw = {"micro_batch": args.micro_batch, "seq": args.seq, "r": args.r}
    print(table(LLAMA3_70B, [1, 2, 4, 8], **kw))
    print()
    print(table(LLAMA3_8B, [1, 2], **kw))


if __name__ == "__main__":
    main()
