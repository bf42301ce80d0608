"""QLoRA training throughput and peak memory of one stack, one process (Unsloth patches
transformers process-wide, so every stack runs in its own process; bench/run.sh runs them all).

usage: python bench/bench.py STACK MODEL_DIR [--shapes 8x512,4x2048] [--real]
STACK: hf (transformers + PEFT + bitsandbytes, the seeds' stack, as ../shared/bench/peer_bench.py),
       unsloth[:nockpt], or lorafit[:offload|:gpu|:nockpt|:graphs|:graphs-gpu|:graphs-nockpt][-fp8|-fp8bwd] (fast path;
       activation checkpointing with inputs parked in pinned CPU memory / kept on the GPU / no recomputation at all /
       parked, and each step one padding-free row of its records replayed as a CUDA graph, as `lorafit train` runs it:
       train/graphs.py; graphs-gpu: the same with each layer's input kept on the GPU, --offload_activations false;
       graphs-nockpt: graphed, no checkpointing, --gradient_checkpointing false; a -fp8 suffix on any of them: the
       base's products on fp8 tensor cores, --fp8_base all; -fp8bwd: its input-gradient products only, backward;
       then +varlen / +dense, for A/Bs of the attention of passes whose records have one length: always flash varlen,
       or dense (cuDNN's) whatever the head layout, where FastLoss.dense_rows keeps grouped-query attention on varlen;
       +cublasadd: the LoRA term added onto the fp8 products' outputs by cuBLAS's addmm_ (and the residual by a
       second pass), not by kernels/fp8.py's lowrank_add_: its A/B).
       unsloth:nockpt: Unsloth with use_gradient_checkpointing=False, its like for like against lorafit's nockpt stacks.
Shapes: the same random token batch every step, all tokens labelled, median of 8 steps after 4
warm-up steps. --real: one pass over the alpaca_en_demo record lengths (bench/alpaca_lengths.txt),
random token ids, prompts masked from the loss; hf/unsloth take batches of 8 records padded to
the longest, lorafit packs records into rows of 2048 (4 rows a step) attending within each record.
Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(stack: str, path: str, max_seq: int = 2048):
    import torch
    if stack.startswith("unsloth"):
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth_cache")
        from unsloth import FastLanguageModel
        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=max_seq, load_in_4bit=True,
                                                     dtype=torch.bfloat16, local_files_only=True)
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS,
                                                bias="none", random_state=0,
                                                use_gradient_checkpointing="unsloth" if stack == "unsloth" else False)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation="sdpa", quantization_config=q)
    if stack == "hf":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                            bias="none", task_type="CAUSAL_LM"))


def _cublas_lowrank_add(y, h, b, c=None):
    """What the fp8 forward did before kernels/fp8.py's lowrank_add_: cuBLAS's addmm_, then the residual's own pass."""
    y.addmm_(h, b.t())
    return y if c is None else y.add_(c)


def make_step(stack: str, model, max_len: int = 2048):
    """batch -> (loss value tensor, labelled tokens) after one optimizer step."""
    import torch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    if stack.startswith("lorafit"):
        from lorafit.train.fast import enable_fast_path
        mode, _, attn = (stack.partition(":")[2] or "offload").partition("+")
        fp8 = "all" if mode.endswith("-fp8") else "backward" if mode.endswith("-fp8bwd") else "off"
        mode = mode.removesuffix("-fp8").removesuffix("-fp8bwd")
        fl = enable_fast_path(model, gradient_checkpointing=not mode.endswith("nockpt"),
                              offload_activations=mode in ("offload", "graphs"), fp8_base=fp8)
        if attn == "cublasadd":     # this process's low-rank add swapped for the A/B (bench only)
            import lorafit.kernels.fp8 as fp8_kernels
            fp8_kernels.lowrank_add_ = _cublas_lowrank_add
        elif attn:          # this instance's plan for one-length passes, overridden for the A/B (bench only)
            from lorafit.kernels.attention import uniform_rows
            fl.dense_rows = {"varlen": lambda cu, tokens: 0, "dense": uniform_rows}[attn]
        if mode.startswith("graphs"):
            return graphed_step(fl, model, opt, max_len)

        def step(batch):
            loss_sum, n = fl(batch)
            loss = loss_sum / n
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    def step(batch):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def as_row(batch: dict) -> dict:
    """A (B, T) batch as the CLI trains it: one padding-free row of its records (each row, or each document of a
    packed row, one record; padding dropped), CPU tensors (lorafit.data.batching.concat_row)."""
    from lorafit.data.batching import concat_row
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    doc = batch["doc_ids"].cpu() if "doc_ids" in batch else batch["attention_mask"].cpu()
    pieces = []
    for r in range(ids.shape[0]):
        for d in doc[r].unique().tolist():
            if d > 0:
                keep = doc[r] == d
                pieces.append((ids[r][keep].tolist(), labels[r][keep].tolist()))
    return concat_row(pieces, max_seq_length=max(len(p[0]) for p in pieces))


def graphed_step(fl, model, opt, max_len: int):
    """lorafit:graphs: the CLI's pass, a padding-free row replayed through train/graphs.py's CUDA graphs (the
    `lorafit train` default for SFT without dropout on one GPU)."""
    import torch

    from lorafit.train.graphs import PassGraphs
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = PassGraphs(fl, params, max_len, torch.bfloat16, torch.device("cuda"))

    def step(batch):
        if "_row" not in batch:
            batch["_row"] = as_row(batch)
        row = batch["_row"]
        n = int((row["labels"][:, 1:] != -100).sum())
        loss_sum = graphs.run(row, 1.0 / n)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss_sum / n
    return step


def timed(step, batches, warmup, pipelined=True):
    import torch
    for b in batches[:warmup]:
        step(b)
    times, losses, issue = [], [], []
    for b in batches[warmup:]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step(b))
        issue.append(time.perf_counter() - t)   # host time to queue the step (GPU-bound when << the step)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    timed.issue_s = sorted(issue)[len(issue) // 2]
    if not pipelined:
        return times, [x.item() for x in losses]
    # the same steps back to back, one sync at the end, as a training loop runs them (no per-step sync: the host
    # queues the next step while the GPU finishes this one)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    torch.cuda.synchronize()
    timed.pipelined_s = (time.perf_counter() - t) / len(batches[warmup:])
    return times, [x.item() for x in losses]


def shape_batches(bs, seq, steps=12):
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, 32000, (bs, seq), device="cuda", generator=g)
    b = {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x),
         "position_ids": torch.arange(seq, device="cuda").expand(bs, seq)}
    return [b] * steps


def real_records():
    lens = [int(x) for x in (HERE / "alpaca_lengths.txt").read_text().split()]
    prompts = [int(x) for x in (HERE / "alpaca_prompt_lengths.txt").read_text().split()]
    return list(zip(lens, prompts, strict=False))


def padded_batches(records, bs=8, pad_id=32000):
    import torch
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(0, len(records), bs):
        chunk = records[i:i + bs]
        t = max(n for n, _ in chunk)
        ids = torch.full((len(chunk), t), pad_id)
        labels = torch.full((len(chunk), t), -100)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for r, (n, p) in enumerate(chunk):
            ids[r, :n] = torch.randint(2, 32000, (n,), generator=g)
            labels[r, p:n] = ids[r, p:n]
            mask[r, :n] = 1
        out.append({"input_ids": ids.cuda(), "labels": labels.cuda(), "attention_mask": mask.cuda(),
                    "real": int(mask.sum())})
    return out


def packed_batches(records, rows=4, row_len=2048, pad_id=32000):
    """First-fit in order into rows of row_len; each record keeps its own positions and doc id."""
    import torch
    g = torch.Generator().manual_seed(0)
    packed, cur = [], []
    for rec in records:
        if sum(n for n, _ in cur) + rec[0] > row_len:
            packed.append(cur)
            cur = []
        cur.append(rec)
    packed.append(cur)
    out = []
    for i in range(0, len(packed), rows):
        group = packed[i:i + rows]
        ids = torch.full((len(group), row_len), pad_id)
        labels = torch.full_like(ids, -100)
        doc = torch.zeros_like(ids)
        pos = torch.zeros_like(ids)
        for r, row in enumerate(group):
            o = 0
            for d, (n, p) in enumerate(row, start=1):
                ids[r, o:o + n] = torch.randint(2, 32000, (n,), generator=g)
                labels[r, o + p:o + n] = ids[r, o + p:o + n]
                doc[r, o:o + n] = d
                pos[r, o:o + n] = torch.arange(n)
                o += n
        out.append({"input_ids": ids.cuda(), "labels": labels.cuda(), "attention_mask": (doc > 0).long().cuda(),
                    "doc_ids": doc.cuda(), "position_ids": pos.cuda(), "real": int((doc > 0).sum())})
    return out


def profile(step, bs, seq):
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    b = shape_batches(bs, seq)[0]
    for _ in range(2):
        step(b)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(2):
            step(b)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 2
    # kernels only (an aten op's device time repeats its kernels'), grouped, then the largest
    ev = [e for e in p.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in ev) / 2 / 1e3
    print(f"profile {bs}x{seq}: wall/step {wall * 1e3:.1f} ms (with profiler), GPU kernel time/step {total:.1f} ms")
    # attention first: flash attention's kernel names carry cutlass types
    groups = {"attention": ("sdpa", "flash", "attn"), "gemm": ("nvjet", "gemm", "cutlass", "sm90_xmma"),
              "memcpy": ("Memcpy", "Memset"),
              "triton": ("_fwd", "_bwd", "_rope", "_dequant", "_ce_rows", "_rows", "_nf4_", "_drop", "_keep",
                         "_masked_sum")}
    sums = dict.fromkeys([*groups, "other"], 0.0)
    for e in ev:
        g = next((k for k, keys in groups.items() if any(t in e.key for t in keys)), "other")
        sums[g] += e.self_device_time_total / 2 / 1e3
    print("  by kind: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sums.items()))
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:32]:
        print(f"  {e.self_device_time_total / 2 / 1e3:8.2f} ms  {e.count // 2:6d}x  {e.key[:90]}")
    gaps(p)
    cpu = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    for e in cpu:
        print(f"  cpu {e.self_cpu_time_total / 2 / 1e3:8.2f} ms  {e.count // 2:6d}x  {e.key[:80]}")


def memory_peak(step, bs, seq, top=24):
    """Replays one step's allocator trace (torch.cuda.memory._record_memory_history) to the moment of the
    step's peak and prints the blocks live then, largest first, each with the innermost lorafit frames
    that allocated it (memory held before the step, weights and optimizer state, is the base)."""
    import torch
    b = shape_batches(bs, seq)[0]
    for _ in range(2):
        step(b)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    step(b)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, cur, best, at_peak = {}, 0, -1, {}
    for ev in snap["device_traces"][0]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > best:
                best, at_peak = cur, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]
    print(f"memory {bs}x{seq}: base {base / 2**30:.2f} GiB, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB,"
          f" live at the step's peak {best / 2**20:.0f} MiB")

    def where(ev):
        fr = [f for f in ev.get("frames", []) if "lorafit" in f["filename"] or "bench" in f["filename"]]
        return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in fr[:3]) or "?"
    for ev in sorted(at_peak.values(), key=lambda e: -e["size"])[:top]:
        print(f"  {ev['size'] / 2**20:8.1f} MiB  {where(ev)[:160]}")


def gaps(p, path="/tmp/trace.json"):
    """Where the busiest stream waits: idle time between its kernels, the largest gaps with the kernels
    around them (a gap means the host, a host sync or another stream held the work back)."""
    p.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)["traceEvents"]
    ev = [e for e in trace
          if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_stream = {}
    for e in ev:
        by_stream.setdefault(e["args"].get("stream"), []).append(e)
    for st, es in by_stream.items():
        print(f"  stream {st}: {len(es)} GPU ops, busy {sum(e['dur'] for e in es) / 2e3:.1f} ms/step")
    main = max(by_stream.values(), key=lambda es: sum(e["dur"] for e in es))
    main.sort(key=lambda e: e["ts"])
    span = (main[-1]["ts"] + main[-1]["dur"] - main[0]["ts"]) / 2e3
    holes = [(b["ts"] - a["ts"] - a["dur"], a["name"], b["name"]) for a, b in itertools.pairwise(main)]
    idle = sum(h for h, _, _ in holes if h > 0) / 2e3
    big = sum(h for h, _, _ in holes if h > 50) / 2e3
    print(f"  main stream: span {span:.1f} ms/step, idle {idle:.1f} ms/step ({big:.1f} in gaps > 50 us)")
    for h, a, b in sorted(holes, reverse=True)[:14]:
        print(f"    gap {h / 1e3:7.2f} ms  after {a[:50]}  before {b[:50]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stack")
    ap.add_argument("model")
    ap.add_argument("--shapes", default="8x512,4x2048")
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--profile", default="", help="BSxSEQ: profile 2 steps at this shape, print the top kernels")
    ap.add_argument("--steps", type=int, default=12, help="steps per shape (the first 4 are warm-up)")
    ap.add_argument("--memory", default="", help="BSxSEQ: what is live at one step's memory peak, largest first")
    ap.add_argument("--tag", default="", help="appended to each shape name (e.g. @llama3-8b)")
    args = ap.parse_args()
    import torch
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",") if s]
    model = load(args.stack, args.model, max([2048, *(seq for _, seq in shapes)]))
    model.train()
    step = make_step(args.stack, model, max([2048, *(seq for _, seq in shapes)]))
    for bs, seq in shapes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            times, losses = timed(step, shape_batches(bs, seq, args.steps), warmup=4)
            st = sorted(times)[len(times) // 2]
            rec = {"stack": args.stack, "shape": f"{bs}x{seq}{args.tag}", "step_s": round(st, 4),
                   "tok_s": round(bs * seq / st), "host_queue_s": round(timed.issue_s, 4),
                   "pipelined_tok_s": round(bs * seq / timed.pipelined_s),
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                   "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}
        except Exception as e:  # noqa: BLE001 -- one failed shape must not hide the others
            import traceback
            traceback.print_exc()
            rec = {"stack": args.stack, "shape": f"{bs}x{seq}{args.tag}", "error": repr(e)[:300]}
        print(json.dumps(rec), flush=True)
    if args.profile:
        profile(step, *map(int, args.profile.split("x")))
    if args.memory:
        memory_peak(step, *map(int, args.memory.split("x")))
    if args.real:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        recs = real_records()
        batches = packed_batches(recs) if args.stack.startswith("lorafit") else padded_batches(recs)
        warm = 3
        times, _ = timed(step, batches[:warm] + batches, warmup=warm, pipelined=False)
        real = sum(b["real"] for b in batches)
        slots = sum(b["input_ids"].numel() for b in batches)
        extra = {}
        if args.stack.startswith("lorafit"):
            from lorafit.kernels.attention import backend
            extra["attention"] = backend()
        print(json.dumps(dict(stack=args.stack, shape="real", **extra, steps=len(batches), real_tokens=real,
                              slot_tokens=slots, seconds=round(sum(times), 3),
                              tok_s=round(real / sum(times)),
                              peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))), flush=True)


if __name__ == "__main__":
    main()
