"""Activation checkpointing per decoder layer, the layer input parked in pinned CPU memory.

Forward runs the layer without building a graph and copies its input to a pinned host buffer
on a side stream (overlapping the next layer's compute); backward brings the input back
(prefetching the previous layer's input while this one recomputes), reruns the layer with
grad and backpropagates through it. GPU memory then holds one layer's activations instead of
32 layer inputs (1.5 GiB at 4 x 2048 x 3072 bf16). Host buffers are allocated once and reused (views of
growing arenas, so passes of another length reuse them too).

A layer may park more than its input (`fn` returning (out, extras)): values its recomputation
would otherwise produce again (lorafit parks the attention output and the mid-layer residual, so
the recomputation skips the attention forward and the output projection). Large tensors travel
to the host and back with the input; small ones and non-tensors stay where they are.
Layers named in `ActivationStore.on_device` park on the GPU even when offloading (the fast path's last
checkpointed layer: its backward comes first, and its copy out and back would make that backward wait).
"""
from __future__ import annotations

import torch

_PARK_MIN = 1 << 16        # elements: smaller tensors (log-sum-exp of a tiny batch, RNG seeds) stay put


def _parkable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_cuda and t.numel() >= _PARK_MIN


class ActivationStore:
    """Holds each checkpointed layer's parked tensors: on the GPU, or in pinned host memory (offload)."""

    def __init__(self, offload: bool):
        self.offload = offload
        # layers whose parked tensors stay on the GPU even when offloading: the last checkpointed one, whose backward
        # comes first (its copy out and back would be on the critical path: ~9 ms a step at 4 x 2048 on an H200)
        self.on_device: set[int] = set()
        self.host: dict[tuple[int, int], torch.Tensor] = {}
        self.saved: dict[int, tuple] = {}
        self.ready: dict[int, tuple[tuple, torch.cuda.Event]] = {}
        self.pending = None        # (device tensors being copied out, their copy's event, compute stream)
        self.stream = None

    def _side(self, device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=device)
        return self.stream

    def save(self, idx: int, items: tuple) -> None:
        if not (self.offload and items[0].is_cuda) or idx in self.on_device:
            self.saved[idx] = items
            return
        cur = torch.cuda.current_stream(items[0].device)
        side = self._side(items[0].device)
        side.wait_stream(cur)
        parked, sent = [], []
        with torch.cuda.stream(side):
            for j, t in enumerate(items):
                if not _parkable(t):
                    parked.append(t)
                    continue
                buf = self._host_view(idx, j, t)
                buf.copy_(t, non_blocking=True)
                parked.append(buf)
                sent.append(t)
            ev = torch.cuda.Event()
            ev.record(side)
        self.saved[idx] = tuple(parked)
        # The sources stay referenced until the compute stream has waited for their copy, one layer later
        # (by then the copy is done, so the wait costs nothing). Not record_stream: that keeps every block
        # out of reuse until the allocator sees the copy complete, and the host runs layers ahead of the GPU.
        self._release()
        self.pending = (sent, ev, cur)

    def _host_view(self, idx: int, j: int, t: torch.Tensor) -> torch.Tensor:
        """A view of (idx, j)'s pinned host arena shaped like t. Arenas only grow (by a quarter more than asked,
        so passes of varying length stop reallocating soon), and a grown one is a new tensor: whoever holds
        the old one (a captured CUDA graph writes to fixed addresses) keeps it, and it stays theirs."""
        arena = self.host.get((idx, j))
        if arena is None or arena.numel() < t.numel() or arena.dtype != t.dtype:
            arena = torch.empty(t.numel() + t.numel() // 4, dtype=t.dtype, pin_memory=True)
            self.host[(idx, j)] = arena
        return arena[:t.numel()].view(t.shape)

    def arenas(self) -> list[torch.Tensor]:
        """The pinned host buffers in use now (a CUDA graph captured over them keeps them alive)."""
        return list(self.host.values())

    def _release(self) -> None:
        if self.pending is not None:
            _sources, ev, cur = self.pending
            cur.wait_event(ev)
            self.pending = None        # the sources may now be freed: later reuse is ordered after the copy

    def _copy_in(self, items: tuple, device) -> tuple[tuple, torch.cuda.Event]:
        # The device tensors are allocated on the compute stream, which uses and frees them, and the side
        # stream first waits for the compute stream's queued work (their memory may be a block it just
        # freed). No record_stream: a block the side stream has used stays unavailable until the allocator
        # sees that stream's event complete, and with the host queueing several layers ahead of the GPU,
        # ~20 layers' reloaded tensors (~1 GiB at 4 x 2048) sat in that state at the step's peak.
        side = self._side(device)
        host = [isinstance(t, torch.Tensor) and t.is_pinned() for t in items]
        out = tuple(torch.empty_like(t, device=device) if h else t for t, h in zip(items, host, strict=True))
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for y, t, h in zip(out, items, host, strict=True):
                if h:
                    y.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(side)
        return out, ev

    def load(self, idx: int, device) -> tuple:
        items = self.saved.pop(idx)
        if not self.offload or torch.device(device).type != "cuda":
            return items               # kept on the device, or a CPU run
        self._release()
        if idx not in self.on_device:
            if idx not in self.ready:
                self.ready[idx] = self._copy_in(items, device)
            items, ev = self.ready.pop(idx)
            torch.cuda.current_stream(device).wait_event(ev)
        self.prefetch(idx - 1, device)     # overlaps this layer's recompute
        return items

    def prefetch(self, idx: int, device) -> None:
        """Start bringing layer idx's parked tensors back (load(idx) then waits only for what is left)."""
        prev = self.saved.get(idx)
        if (prev is not None and idx not in self.ready and idx not in self.on_device and self.offload
                and torch.device(device).type == "cuda"):
            self.ready[idx] = self._copy_in(prev, device)

    def clear(self) -> None:
        self._release()
        self.saved.clear()
        self.ready.clear()


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, store, idx, recompute):
        ctx.fn = recompute or fn
        ctx.store, ctx.idx, ctx.device = store, idx, x.device
        with torch.no_grad():
            out = fn(x)
        extras = ()
        if isinstance(out, tuple):
            out, extras = out
        store.save(idx, (x, *extras))
        return out

    @staticmethod
    def backward(ctx, dout):
        x, *extras = ctx.store.load(ctx.idx, ctx.device)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = ctx.fn(x, *extras)
        torch.autograd.backward(out, dout)
        return x.grad, None, None, None, None


def checkpoint(fn, x: torch.Tensor, store: ActivationStore, idx: int, recompute=None) -> torch.Tensor:
    """fn(x) with x kept in `store` and fn recomputed in backward; x must require grad.
    `recompute` (default fn) is what backward reruns: the same graph, but it may skip work whose
    output value backward never reads (only the output's gradient flows back into it).
    fn may return (out, extras): the tuple `extras` is parked with x and backward calls
    recompute(x, *extras), which must give the same graph using those values. No generator state is saved:
    fn must draw any randomness it uses again the same way (the fast path's dropout masks hash a seed)."""
    return _Checkpoint.apply(x, fn, store, idx, recompute)
