"""Memory: the token budget of one pass (picked from free memory, then measured), the out-of-memory message, and
the budget probe of --auto_find_batch_size. A pass's size never changes the result (data/batching.py), only
how much memory and how many passes a step takes."""
from __future__ import annotations

import logging

import torch

from lorafit.data.batching import CPU_PASS_TOKENS, GPU_PASS_CAP, make_passes
from lorafit.errors import UserError
from lorafit.train import parallel as dist
from lorafit.train.state import TrainState

log = logging.getLogger("lorafit")

# The reference path (no fused kernels) builds a (1, 1, T, T) document mask per pass: 512 MiB at 16k tokens in bf16,
# 32 MiB at 4k, so its passes stop at 4k.
_REFERENCE_CAP = 4096
_GPU_SHARE = 0.6  # of the free memory after loading: the allocator's fragmentation and the optimizer's state
_ROUND = 256


def bytes_per_token(model_config, element_size: int, checkpointing: bool, fused: bool, dropout: bool = False) -> float:
    """Activation bytes one token of a pass holds at the peak of its backward (a simple model from the dimensions).

    A decoder layer keeps ~8 hidden-size and ~4 MLP-size values a token for its backward (norm inputs, q/k/v,
    attention output, residuals, gate/up, SwiGLU); with checkpointing only each layer's input stays, plus one
    layer's worth while it recomputes. The reference path's logits cost vocab x (compute dtype + float32 copy +
    its gradient) for a labelled token (assumed all); the fused path's chunked cross-entropy never holds them.
    On the reference path LoRA dropout keeps a dropped copy of each adapted input and its mask (~6 hidden + 1 MLP
    size, all-linear); the fused path keeps neither (its masks are hashed again from a seed)."""
    h = model_config.hidden_size
    inter = getattr(model_config, "intermediate_size", None) or 4 * h
    layers = model_config.num_hidden_layers
    per_layer = (8 * h + 4 * inter + (2 * (6 * h + inter) if dropout and not fused else 0)) * element_size
    acts = (layers * h * element_size + per_layer) if checkpointing else layers * per_layer
    logits = 0 if fused else model_config.vocab_size * (element_size + 8)
    return float(acts + logits)


def pass_budget(r: TrainState, fused: bool) -> int:
    """--max_tokens_per_pass, else CPU_PASS_TOKENS on a CPU, else the free GPU memory's share over bytes_per_token."""
    c = r.cfg
    floor = c.data.max_seq_length
    if c.train.max_tokens_per_pass:
        return c.train.max_tokens_per_pass
    if r.d.device.type != "cuda":
        return max(floor, CPU_PASS_TOKENS)
    free, _ = torch.cuda.mem_get_info(r.d.device)
    per = bytes_per_token(r.model.get_base_model().config, torch.finfo(r.dtype).bits // 8,
                          c.model.gradient_checkpointing, fused, c.lora.lora_dropout > 0)
    return _clamp(_GPU_SHARE * free / per, floor, GPU_PASS_CAP if fused else _REFERENCE_CAP)


def measured_budget(r: TrainState, budget: int, pass_tokens: int, base_bytes: int) -> int:
    """After the first step on a GPU: the budget from what a token really cost there (peak over the largest pass),
    when that pass was large enough to measure (>= 1,024 tokens: below, fixed costs dominate the peak)."""
    if r.d.device.type != "cuda" or r.cfg.train.max_tokens_per_pass or pass_tokens < 1024:
        return budget
    per = (torch.cuda.max_memory_allocated(r.d.device) - base_bytes) / pass_tokens
    if per <= 0:
        return budget
    free, _ = torch.cuda.mem_get_info(r.d.device)
    held = torch.cuda.memory_reserved(r.d.device) - torch.cuda.memory_allocated(r.d.device)
    cap = budget if r.fast is None else GPU_PASS_CAP
    return _clamp(_GPU_SHARE * (free + held) / per, r.cfg.data.max_seq_length, cap)


def _clamp(tokens: float, floor: int, cap: int) -> int:
    return int(max(floor, min(cap, tokens // _ROUND * _ROUND)))


def oom_error(r: TrainState, budget: int | None = None) -> UserError:
    c = r.cfg
    budget = budget or (r.plan.tokens_per_pass if r.plan else c.train.max_tokens_per_pass)
    shape = f"passes of up to {budget} tokens, max_seq_length {c.data.max_seq_length}, " \
            f"gradient_checkpointing {c.model.gradient_checkpointing}, load_in_4bit {c.model.load_in_4bit}"
    return UserError(f"out of GPU memory at step {r.pos.step + 1} (this run uses {shape})",
                     fix="lower --max_tokens_per_pass (the result stays the same: the step's records just take more "
                         "passes), lower --max_seq_length, turn on --gradient_checkpointing, load the base with "
                         "--load_in_4bit, or let --auto_find_batch_size pick the pass size")


def find_pass_budget(r: TrainState, loss_module, budget: int) -> int:
    """With --auto_find_batch_size: the largest budget (halving from `budget`, down to max_seq_length) whose pass
    of the longest training records survives forward + backward on every rank."""
    c = r.cfg
    if not c.train.auto_find_batch_size:
        return budget
    lengths = [r.objective.pass_tokens(e, c.data.max_seq_length) for e in r.data.train]
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rng = torch.get_rng_state()  # the probe's dropout must not shift the run's random stream
    while True:
        widest = make_passes(longest[: budget // max(min(lengths), 1) + 1], lengths, budget)[0]
        batch = r.objective.collate(r.data.train, widest, c.data.max_seq_length)
        try:
            with torch.autocast(r.d.device.type, dtype=r.dtype, enabled=r.dtype != torch.float32):
                loss_sum, _ = loss_module({k: v.to(r.d.device) for k, v in batch.items()})
            (loss_sum / max(loss_module.objective.units(batch), 1)).backward()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        r.model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not dist.any_rank(r.d, not fits):
            break
        if budget <= c.data.max_seq_length:
            raise oom_error(r, budget)
        log.info("auto_find_batch_size: passes of %d tokens do not fit; trying %d", budget,
                 max(budget // 2, c.data.max_seq_length))
        budget = max(budget // 2, c.data.max_seq_length)
    torch.set_rng_state(rng)
    return budget
