"""Activation checkpointing per decoder layer, the layer input parked in pinned CPU memory.

Forward runs the layer without building a graph and copies its input to a pinned host buffer
on a side stream (overlapping the next layer's compute); backward brings the input back
(prefetching the previous layer's input while this one recomputes), reruns the layer with
grad and backpropagates through it. GPU memory then holds one layer's activations instead of
32 layer inputs (1.5 GiB at 4 x 2048 x 3072 bf16). Host buffers are allocated once and reused.
"""
from __future__ import annotations

import torch


class ActivationStore:
    """Holds each checkpointed layer's input: on the GPU, or in pinned host memory (offload)."""

    def __init__(self, offload: bool):
        self.offload = offload
        self.host: dict[int, torch.Tensor] = {}
        self.saved: dict[int, torch.Tensor] = {}
        self.ready: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.stream = None

    def _side(self, device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=device)
        return self.stream

    def save(self, idx: int, x: torch.Tensor) -> None:
        if not (self.offload and x.is_cuda):
            self.saved[idx] = x
            return
        buf = self.host.get(idx)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            self.host[idx] = buf
        side = self._side(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            buf.copy_(x, non_blocking=True)
        x.record_stream(side)          # the allocator keeps x alive until the copy is done
        self.saved[idx] = buf

    def _copy_in(self, host: torch.Tensor, device) -> tuple[torch.Tensor, torch.cuda.Event]:
        side = self._side(device)
        with torch.cuda.stream(side):
            x = host.to(device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(side)
        return x, ev

    def load(self, idx: int, device) -> torch.Tensor:
        x = self.saved.pop(idx)
        if x.device.type != "cpu" or torch.device(device).type != "cuda":
            return x                   # kept on the device, or a CPU run
        if idx not in self.ready:
            self.ready[idx] = self._copy_in(x, device)
        y, ev = self.ready.pop(idx)
        cur = torch.cuda.current_stream(device)
        cur.wait_event(ev)
        y.record_stream(cur)
        prev = self.saved.get(idx - 1)
        if prev is not None and prev.device.type == "cpu" and idx - 1 not in self.ready:
            self.ready[idx - 1] = self._copy_in(prev, device)  # overlaps this layer's recompute
        return y

    def clear(self) -> None:
        self.saved.clear()
        self.ready.clear()


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, store, idx, rng, recompute):
        ctx.fn = recompute or fn
        ctx.store, ctx.idx, ctx.device = store, idx, x.device
        ctx.rng = (torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()) if rng else None
        with torch.no_grad():
            out = fn(x)
        store.save(idx, x)
        return out

    @staticmethod
    def backward(ctx, dout):
        x = ctx.store.load(ctx.idx, ctx.device).detach().requires_grad_(True)
        with torch.enable_grad():
            if ctx.rng is None:
                out = ctx.fn(x)
            else:
                devices = [ctx.device] if ctx.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
                    if devices:
                        torch.cuda.set_rng_state(ctx.rng, ctx.device)
                    else:
                        torch.set_rng_state(ctx.rng)
                    out = ctx.fn(x)
        torch.autograd.backward(out, dout)
        return x.grad, None, None, None, None, None


def checkpoint(fn, x: torch.Tensor, store: ActivationStore, idx: int, preserve_rng: bool,
               recompute=None) -> torch.Tensor:
    """fn(x) with x kept in `store` and fn recomputed in backward; x must require grad.
    `recompute` (default fn) is what backward reruns: the same graph, but it may skip work whose
    output value backward never reads (only the output's gradient flows back into it)."""
    return _Checkpoint.apply(x, fn, store, idx, preserve_rng, recompute)
