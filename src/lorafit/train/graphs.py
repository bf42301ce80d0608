"""CUDA graphs of the fused path's training pass (forward and backward), replayed with one launch.

Why: at the recipe shape (16 Alpaca records a step, one padding-free pass of ~3,500 tokens) an H200 computes
the pass in ~165 ms but the host needs ~280 ms to queue its ~3,500 launches (Python, autograd, the dispatcher):
the step waits on the host (bench/results/2026-12-01-h200-profile-1x3584.txt). A replay queues all of it at once.

Shapes: a graph replays fixed shapes at fixed addresses, so a pass is padded to a bucket of token counts
(`bucket_tokens`: multiples of 256 up to 4,096, then of 1/8 of the power of two below, ~3% padding on average)
with filler documents (token 0, no labels, attending within themselves), and its cu_seqlens to a multiple of 8
segments with empty ones. The cross-entropy runs at every position and masks (FastLoss.masked_sum), so no shape
depends on the labels. A pass whose segments all have one length and fill the bucket (records of one length, the
benchmark shapes) runs dense attention over (rows, length) instead of varlen (FastLoss.dense_rows): the row
count is part of its bucket. One graph per (tokens, segments, rows) bucket: the first pass of a bucket runs
eagerly (the warm-up: Triton compiles, host arenas grow; its gradient counts as usual), the second is captured
and replayed, and so is every later one. All graphs share one memory pool: they never run at once, and their one output
(the pass's loss) is read right after each replay.

What a replay reads and writes at fixed addresses: its static inputs (copied in before it), the LoRA parameters
and their .grad (accumulated in place: with graphs the loop zeroes gradients instead of dropping them, and a
.grad replaced since the capture drops the graphs), the FactorPack and dequantization buffers (a new one drops
the graphs), and the activation store's pinned host arenas (each graph holds the ones it was captured over).

LoRA dropout replays too: its masks are hashes of a per-pass seed, one more static input (kernels/dropout.py).
So does fp16 loss scaling: the scaler's scale is a device tensor it updates in place, read by the graph.
fp8 products (--fp8_base) replay as captured: their scales are device tensors computed before any capture.

The graphs' pool holds memory the eager path would reuse (a run's reserved memory grows with its buckets): a
capture that runs out of memory drops every graph and leaves the rest of the run eager, with a warning, instead
of stopping it.

Not graphed (the fused path runs eagerly, and the log says why): more than one process, objectives other than
SFT, a sliding window shorter than max_seq_length, a RoPE whose frequencies transformers re-picks on the host
(dynamic, longrope), a torch without varlen attention.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafit.data.records import IGNORE_INDEX
from lorafit.kernels import reference
from lorafit.kernels.attention import has_varlen

log = logging.getLogger("lorafit")

_INPUTS = ("input_ids", "labels", "position_ids", "doc_ids")


def bucket_tokens(n: int) -> int:
    """The padded length of a pass of n tokens."""
    step = 256 if n <= 4096 else 1 << (n.bit_length() - 4)
    return -(-max(n, 1) // step) * step


def bucket_segments(k: int) -> int:
    return -(-k // 8) * 8


def pad_pass(batch: dict[str, torch.Tensor], tokens: int, segments: int, max_len: int) -> dict[str, torch.Tensor]:
    """The padding-free row `batch` (1, n) padded to `tokens` with filler documents of at most `max_len` tokens
    (ids 0, labels IGNORE_INDEX, their own positions and document ids), and its cu_seqlens (int32, segments + 1)
    padded with empty segments."""
    ids, labels, pos, doc = (batch[k][0] for k in _INPUTS)
    n = ids.numel()
    fill = [min(max_len, tokens - n - o) for o in range(0, tokens - n, max_len)]
    last = int(doc.max()) if n else 0
    out = {"input_ids": torch.cat([ids, ids.new_zeros(tokens - n)]),
           "labels": torch.cat([labels, labels.new_full((tokens - n,), IGNORE_INDEX)]),
           "position_ids": torch.cat([pos, *(torch.arange(m) for m in fill)]),
           "doc_ids": torch.cat([doc, *(torch.full((m,), last + 1 + i) for i, m in enumerate(fill))])}
    out = {k: v.reshape(1, -1).to(torch.long) for k, v in out.items()}
    cu = reference.segments(out["doc_ids"])
    if cu.numel() > segments + 1 or n > tokens:
        raise ValueError(f"a pass of {n} tokens in {cu.numel() - 1} segments does not fit ({tokens}, {segments})")
    out["cu_seqlens"] = torch.cat([cu, cu.new_full((segments + 1 - cu.numel(),), tokens)])
    return out


def graph_choice(cfg, fast, objective, d) -> tuple[bool, str]:
    """(whether the run's passes are graphed, why) for a run whose loss path is `fast` (a FastLoss or None)."""
    if not cfg.model.cuda_graphs:
        return False, "off (--cuda_graphs false)"
    if fast is None or d.device.type != "cuda":
        return False, "off (they replay the fused path on a CUDA GPU)"
    if d.world_size > 1:
        return False, "off (more than one process: the gradient all-reduce runs outside a graph)"
    if objective.name != "sft":
        return False, f"off (objective {objective.name}: SFT passes only)"
    if fast.window is not None and fast.window < cfg.data.max_seq_length:
        return False, f"off (sliding window {fast.window} < max_seq_length {cfg.data.max_seq_length})"
    rope = str(getattr(getattr(fast.base.model, "rotary_emb", None), "rope_type", "default"))
    if "dynamic" in rope or rope == "longrope":
        # transformers re-picks these frequencies from max(position_ids) on the host every forward
        return False, f"off (rope_type {rope} reads the positions on the host)"
    if not has_varlen():
        return False, "off (this torch has no varlen attention)"
    return True, "on (one per bucket of pass lengths, captured on its second pass)"


@dataclass
class _Graph:
    inputs: dict[str, Any]
    seen: bool = False
    graph: torch.cuda.CUDAGraph | None = None
    loss: torch.Tensor | None = None
    # what the graph reads and writes at fixed addresses, kept alive: checked (factors, weight buffer, .grad) or
    # only held (the activation store's pinned arenas)
    factors: Any = None
    wbuf: torch.Tensor | None = None
    grads: list[torch.Tensor] = field(default_factory=list)
    arenas: list[torch.Tensor] = field(default_factory=list)


class PassGraphs:
    """Runs a step's padding-free SFT passes through CUDA graphs (see the module docstring)."""

    def __init__(self, fast, params: list[torch.Tensor], max_seq_length: int, dtype: torch.dtype,
                 device: torch.device, scaler: torch.amp.GradScaler | None = None):
        self.fast, self.params, self.dtype, self.device, self.scaler = fast, params, dtype, device, scaler
        self.max_len = max_seq_length
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.weight = torch.ones((), dtype=torch.float32, device=device)
        self.stats = {"captured": 0, "capture_s": 0.0, "replays": 0, "eager": 0, "tokens": 0, "padded_tokens": 0}
        self.off: str | None = None    # why the rest of the run is eager (a capture ran out of memory)

    def run(self, batch: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
        """Forward and backward of one pass (a CPU batch from collate_pass) with its loss scaled by `weight`;
        returns the pass's summed cross-entropy (a device scalar), gradients accumulated into .grad."""
        self.weight.fill_(weight)
        if self.off:                   # unpadded, planned on the host as the eager loop does
            planned = self.fast.host_plan(batch)
            return self._eager({k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                                for k, v in planned.items()})
        n = batch["input_ids"].numel()
        docs = int(batch["doc_ids"].max()) if n else 0
        tokens = bucket_tokens(n)
        segments = bucket_segments(docs + -(-(tokens - n) // self.max_len))
        host = pad_pass(batch, tokens, segments, self.max_len)
        rows = self.fast.dense_rows(host["cu_seqlens"], tokens)   # one length throughout: dense attention
        key = (tokens, segments, rows)
        if self.fast.dropout:
            host["dropout_seed"] = self.fast.dropout_seed()
        host = self._pin(host)
        self.stats["tokens"] += n
        self.stats["padded_tokens"] += tokens
        g = self.graphs.get(key)
        if g is not None and not self._current(g):
            self.graphs.clear()         # a buffer a graph writes to was replaced: capture again
            g = None
        if g is None:
            g = self.graphs[key] = _Graph(inputs={k: torch.empty_like(v, device=self.device) for k, v in host.items()})
            g.inputs["max_seqlen"], g.inputs["dense_rows"] = self.max_len, rows
        for k, v in host.items():
            g.inputs[k].copy_(v, non_blocking=True)
        if g.graph is None and not g.seen:
            g.seen = True              # a bucket's first pass runs eagerly: the warm-up of its capture
            return self._eager(g.inputs)
        if g.graph is None:
            try:
                self._capture(g)       # its second: captured, then replayed like every later one
            except torch.OutOfMemoryError:
                return self._give_up(g, tokens)
        g.graph.replay()
        self.stats["replays"] += 1
        return g.loss.clone()

    @staticmethod
    def _pin(host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.pin_memory() for k, v in host.items()}

    def _give_up(self, g: _Graph, tokens: int) -> torch.Tensor:
        """A capture ran out of memory (the graphs' pool holds memory the eager path would reuse): drop every graph,
        hand their memory back, and run this pass and the rest of the run eagerly rather than stop the run. A
        failed capture ran no kernel, so this pass's gradient is still to compute."""
        self.graphs.clear()
        self.off = f"a capture of a {tokens}-token pass ran out of GPU memory"
        torch.cuda.empty_cache()
        log.warning("cuda graphs: %s; the rest of the run is eager (--cuda_graphs false starts that way)", self.off)
        return self._eager(g.inputs)

    def _pass(self, batch: dict[str, Any]) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=False)
        with autocast:
            loss, _ = self.fast.masked_sum(batch)
        weighted = loss * self.weight
        # fp16: scaled by the scaler's device tensor (created by the eager warm-up, updated in place by the loop)
        (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
        return loss.detach()

    def _eager(self, batch: dict[str, Any]) -> torch.Tensor:
        """The pass on the capture stream, as the warm-up before its capture (its gradient is the pass's)."""
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            loss = self._pass(batch)
        cur.wait_stream(self.stream)
        self.stats["eager"] += 1
        return loss

    def _capture(self, g: _Graph) -> None:
        t0 = time.perf_counter()
        with torch.cuda.stream(self.stream):
            for p in self.params:      # accumulation into existing .grad is what gets captured
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        g.grads = [p.grad for p in self.params]
        # an autograd node made by an earlier pass on another stream (a leaf's AccumulateGrad, cached while any
        # graph holds it) would pull that stream into the capture; torch >= 2.13 can redirect it to ours
        override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
        if override is not None:
            override(True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                g.loss = self._pass(g.inputs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:   # an op that cannot be captured (a host sync, another stream): say the way out
            raise RuntimeError(f"capturing a training pass as a CUDA graph failed: {str(e).splitlines()[0]}; "
                               "--cuda_graphs false runs every pass eagerly") from e
        g.graph = graph
        g.factors, g.wbuf, g.arenas = self.fast.factors, self.fast.pool.buf, self.fast.store.arenas()
        self.stats["captured"] += 1
        self.stats["capture_s"] += time.perf_counter() - t0

    def _current(self, g: _Graph) -> bool:
        """Whether every buffer the graph writes to is still the one in use (a .grad set to None is rebound)."""
        if g.graph is None:
            return True
        if self.fast.factors is not g.factors or self.fast.pool.buf is not g.wbuf:
            return False
        if not g.factors.current(g.factors.a_buf.device):   # (its own device: "cuda" and "cuda:0" compare unequal)
            return False
        for i, (p, held) in enumerate(zip(self.params, g.grads, strict=True)):
            if p.grad is None:
                held.zero_()
                p.grad = held
            elif p.grad is not held:
                log.debug("cuda graphs: parameter %d has a new .grad; capturing again", i)
                return False
        return True

    def summary(self) -> dict[str, Any]:
        s = dict(self.stats)
        s["capture_s"] = round(s["capture_s"], 2)
        s["padding"] = round(s["padded_tokens"] / max(s["tokens"], 1) - 1, 4)
        s["buckets"] = sorted(k[0] for k in self.graphs)
        if self.off:
            s["off"] = self.off
        return s
