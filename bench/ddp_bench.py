"""Data-parallel throughput of lorafit's own training step (issue 7); launch with torchrun.

usage: torchrun --standalone --nproc_per_node N bench/ddp_bench.py MODEL_DIR [--shapes 8x512,4x2048]
                [--steps 12] [--warmup 4] [--no-4bit] [--check]

Every rank loads its own base through lorafit's loader (`model.load_base_model` + `lora.apply_lora`,
from the config `lorafit train` would build: NF4 + double quant, bf16, LoRA r=16 alpha=32
dropout 0 on all linear layers, gradient checkpointing, fast kernels on), wraps
`train.LossModule(FastLoss)` in `distributed.wrap_ddp` and steps with `train._optimizer_step`:
the same token-count all-reduce, autocast, DDP gradient average, clipping and AdamW step as a
real run. With one process `wrap_ddp` returns the module unwrapped, as `lorafit train` does.
Each rank trains on its own random tokens (seeded by rank), all labelled; step time is the
median over the timed steps; tokens/s is the sum over ranks of (batch x seq) / step time.
`--check`: one extra step first that compares DDP's gradient with the mean of the ranks'
local gradients (computed under `no_sync` and all-reduced by hand). Rank 0 prints JSON lines.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from types import SimpleNamespace


def build(model_dir: str, four_bit: bool, d):
    from lorafit.config.load import build_config
    from lorafit.model.arch import fused_path_choice
    from lorafit.model.load import compute_dtype, load_base_model, resolve_model
    from lorafit.model.lora import apply_lora
    from lorafit.train import parallel as dist
    from lorafit.train.fast import loss_path
    from lorafit.train.objectives.base import LossModule
    from lorafit.train.objectives.sft import SFT

    cfg = build_config(None, {"model": model_dir, "load_in_4bit": four_bit, "gradient_checkpointing": True,
                              "fast_kernels": "on", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0,
                              "target_modules": "all-linear", "learning_rate": 2e-4, "seed": 0,
                              "report_to": "none", "max_steps": 1000})
    import torch

    torch.manual_seed(0)  # LoRA init (DDP broadcasts rank 0's anyway)
    base = load_base_model(cfg, d.device, resolve_model(cfg))
    fused, why = fused_path_choice(cfg, base.config.model_type, fsdp=False, cuda=d.device.type == "cuda")
    model = apply_lora(base, cfg, fused=fused)
    model.train()
    fast, why = loss_path(model, fused, why, cfg.model.gradient_checkpointing)
    dtype = compute_dtype(cfg)
    ddp = dist.wrap_ddp(LossModule(model, SFT(), fast, dtype), d)
    return cfg, model, fast, why, dtype, ddp


def run_state(cfg, d, model, ddp, dtype):
    """The fields of TrainState that train/loop.py's _optimizer_step reads."""
    import torch

    from lorafit.train.optim import build_optimizer
    from lorafit.train.plan import Position

    opt = build_optimizer(model, cfg.train)
    from lorafit.train.objectives.sft import SFT

    class Prebuilt(SFT):
        """SFT whose records are ready-made device-shaped batches (the bench's random token rows)."""

        def collate(self, examples, records, max_seq_length):
            return examples[records[0]]

    plan = SimpleNamespace(epoch_micro=1, epoch_items=1, micro_batch=0, tokens_per_pass=1 << 30)
    return SimpleNamespace(cfg=cfg, d=d, model=model, ddp=ddp, dtype=dtype, scaler=None, optimizer=opt,
                           objective=Prebuilt(), data=SimpleNamespace(train=[]), fast=None, graphs=None,
                           scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), pos=Position(),
                           plan=plan, tlog=LastStep())


class LastStep:
    """Stands in for TrainLog: keeps the last step record (loss, grad_norm), ignores the rest."""

    def __init__(self):
        self.rec: dict = {}

    def step(self, rec: dict) -> None:
        self.rec = rec

    def __getattr__(self, name):
        return lambda *a, **k: None


def batch(bs: int, seq: int, rank: int, vocab: int):
    """CPU tensors, as lorafit.data.make_batches yields them; the step moves them to the device."""
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randint(0, vocab, (bs, seq), generator=g)
    return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x),
            "position_ids": torch.arange(seq).expand(bs, seq).contiguous()}


def grad_check(r, b) -> float:
    """Max relative difference between DDP's averaged gradient and the hand-averaged local gradients."""
    import torch

    from lorafit.train import parallel as dist
    from lorafit.train.objectives.sft import labelled_tokens

    params = [p for p in r.model.parameters() if p.requires_grad]
    dev = {k: v.to(r.d.device) for k, v in b.items()}
    autocast = torch.autocast(r.d.device.type, dtype=r.dtype, enabled=r.dtype != torch.float32)
    with autocast, (r.ddp.no_sync() if r.d.enabled else nullcontext()):
        ce, _ = r.ddp(dev)
        (ce / labelled_tokens(b["labels"])).backward()
    local = [p.grad.detach().clone() for p in params]
    r.optimizer.zero_grad(set_to_none=True)
    if r.d.enabled:
        import torch.distributed as tdist
        for t in local:
            tdist.all_reduce(t)
            t /= r.d.world_size
    with autocast:
        ce, _ = r.ddp(dev)
        (ce / labelled_tokens(b["labels"])).backward()
    num = sum(float((p.grad - t).float().norm()) ** 2 for p, t in zip(params, local, strict=True))
    den = sum(float(t.float().norm()) ** 2 for t in local)
    r.optimizer.zero_grad(set_to_none=True)
    dist.barrier(r.d)
    return (num / max(den, 1e-30)) ** 0.5


def measure(r, bs: int, seq: int, steps: int, warmup: int, vocab: int) -> dict:
    import torch

    from lorafit.data.batching import Pass
    from lorafit.train import parallel as dist
    from lorafit.train.loop import _optimizer_step

    cuda = r.d.device.type == "cuda"
    b = batch(bs, seq, r.d.rank, vocab)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(r.d.device)
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(r.d.device)
        t = time.perf_counter()
        r.data.train[:] = [b]  # the prebuilt batch is the step's one record, one pass
        _optimizer_step(r, [Pass([0])], [0])
        if cuda:
            torch.cuda.synchronize(r.d.device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(r.d.device) / 2**30 if cuda else 0.0
    tok_sum, step_sum, peak_sum = dist.all_reduce_sum(r.d, [bs * seq / step, step, peak])  # sums over ranks
    w = r.d.world_size
    return {"world": w, "shape": f"{bs}x{seq}", "tok_s": round(tok_sum), "tok_s_per_gpu": round(tok_sum / w),
            "step_s": round(step_sum / w, 4), "step_s_rank0": round(step, 4), "peak_gib": round(peak_sum / w, 2),
            "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--shapes", default="8x512,4x2048")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--no-4bit", dest="four_bit", action="store_false")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    import torch

    from lorafit.train import parallel as dist

    d = dist.setup()
    try:
        cfg, model, fast, why, dtype, ddp = build(args.model, args.four_bit, d)
        assert fast is not None, f"fast path not taken: {why}"
        r = run_state(cfg, d, model, ddp, dtype)
        vocab = model.get_base_model().config.vocab_size
        head = {"stack": "lorafit-ddp", "world": d.world_size, "loss_path": why, "ddp": type(ddp).__name__,
                "device": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"}
        if args.check:
            head["grad_check_rel"] = grad_check(r, batch(2, 64, d.rank, vocab))
        if d.main:
            print(json.dumps(head), flush=True)
        for s in args.shapes.split(","):
            bs, seq = map(int, s.split("x"))
            rec = measure(r, bs, seq, args.steps, args.warmup, vocab)
            if d.main:
                print(json.dumps({"stack": "lorafit-ddp", **rec, "loss": round(r.tlog.rec["loss"], 4),
                                  "grad_norm": round(r.tlog.rec["grad_norm"], 4)}), flush=True)
        if d.main:
            sums = [float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad]
            print(json.dumps({"stack": "lorafit-ddp", "adapter_sum": sum(sums)}), flush=True)
        if d.enabled:  # every rank holds the same adapter after the steps
            import torch.distributed as tdist
            s = torch.tensor([float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad],
                             dtype=torch.float64, device=d.device)
            lo, hi = s.clone(), s.clone()
            tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
            tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
            if d.main:
                print(json.dumps({"stack": "lorafit-ddp", "ranks_agree": bool(torch.equal(lo, hi))}), flush=True)
    finally:
        dist.cleanup(d)


if __name__ == "__main__":
    main()
