"""The fast path learns what the transformers + PEFT + bitsandbytes path learns: 50 AdamW steps
each, same model, same initial adapter, same batches, losses compared step by step.

Batches: alpaca_en_demo records tokenized (.bench-data/alpaca_ids.json, written by
bench/make_lengths.py --ids; not committed, carried to the GPU machine), 4 records a step padded
to the longest, prompts masked. Without that file, random ids at the real lengths.
usage: python bench/loss_check.py MODEL_DIR [STEPS]
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench

ROOT = Path(__file__).resolve().parents[1]


def batches(steps: int, bs: int = 4, pad_id: int = 32000):
    ids_file = ROOT / ".bench-data" / "alpaca_ids.json"
    if ids_file.exists():
        recs = json.loads(ids_file.read_text())       # [[prompt_len, [ids...]], ...]
        source = "alpaca_en_demo token ids"
    else:
        g = torch.Generator().manual_seed(0)
        recs = [[p, torch.randint(2, 32000, (n,), generator=g).tolist()] for n, p in bench.real_records()]
        source = "random ids at alpaca_en_demo lengths"
    out = []
    for i in range(steps):
        chunk = recs[i * bs:(i + 1) * bs]
        t = max(len(x) for _, x in chunk)
        ids = torch.full((bs, t), pad_id)
        labels = torch.full((bs, t), -100)
        mask = torch.zeros((bs, t), dtype=torch.long)
        for r, (p, x) in enumerate(chunk):
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, p:len(x)] = ids[r, p:len(x)]
            mask[r, :len(x)] = 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        out.append({"input_ids": ids.cuda(), "labels": labels.cuda(), "attention_mask": mask.cuda(),
                    "position_ids": pos.cuda()})
    return out, source


def run(model, step_fn, data):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    losses = []
    for b in data:
        loss = step_fn(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(path: str, steps: int = 50) -> None:
    from lorafit.train.fast import enable_fast_path
    model = bench.load("lorafit", path)      # NF4 + double quant, bf16 compute, LoRA r16 a32 on all linears
    model.train()
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data, source = batches(steps)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    hf = run(model, lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                    labels=b["labels"]).loss, data)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])
    fl = enable_fast_path(model, gradient_checkpointing=True, offload_activations=True)
    torch.manual_seed(0)

    def fast(b):
        s, n = fl(b)
        return s / n
    fast_l = run(model, fast, data)
    rel = [abs(a - b) / abs(b) for a, b in zip(fast_l, hf, strict=True)]
    print(json.dumps({"check": "loss_50_steps", "data": source, "steps": steps, "hf_first": round(hf[0], 4),
                          "hf_last": round(hf[-1], 4), "fast_first": round(fast_l[0], 4),
                          "fast_last": round(fast_l[-1], 4),
                          "mean_rel_diff": round(sum(rel) / len(rel), 6), "max_rel_diff": round(max(rel), 6),
                          "hf": [round(x, 4) for x in hf], "fast": [round(x, 4) for x in fast_l]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 50)
