"""Data-parallel training across processes: torchrun / accelerate launch set the environment, we read it.

`torchrun --nproc_per_node N -m lorafit train ...` and `accelerate launch -m lorafit train ...`
both export RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT); a plain `lorafit train`
has none and runs as rank 0 of 1 without a process group. Every rank loads its own model on
its own device and reads its own shard of each epoch; only rank 0 writes to the run directory.
With FSDP (fsdp.py) the same processes shard the model instead of each holding a copy.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafit.train.fsdp import no_sync


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(cpu_collectives: bool = False, group_of_one: bool = False) -> Dist:
    """Join the process group when launched by torchrun/accelerate (nccl on CUDA, gloo on CPU).
    `cpu_collectives`: gloo beside nccl, for FSDP's CPU-offloaded shards (gathers and the grad norm on the CPU).
    `group_of_one`: a group even for one process (FSDP over one GPU, fsdp.one_process_group)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if (world > 1 or group_of_one) and not dist.is_initialized():
        backend = ("cpu:gloo,cuda:nccl" if cpu_collectives else "nccl") if cuda else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                **({"device_id": device} if cuda else {}))
    return Dist(rank, world, local, device)


def cleanup(d: Dist) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(d: Dist, values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (float64, so token counts stay exact)."""
    if not d.enabled:
        return list(values)
    import torch.distributed as dist

    dev = d.device if d.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(d: Dist, flag: bool) -> bool:
    """True when `flag` is true on some rank (e.g. a stop signal reached one of them)."""
    return all_reduce_sum(d, [float(flag)])[0] > 0


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a small picklable object)."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP over the trainable parameters only: frozen (possibly 4-bit) base weights are never broadcast
    or reduced, which for LoRA is >99% of the bytes."""
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
    ids = [d.device.index] if d.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=False)


def grad_sync(module: torch.nn.Module, sync: bool):
    """A context for one micro-step's backward: gradients are reduced across ranks only when `sync` (the last
    micro-step of an accumulation); DDP's no_sync(), FSDP2's set_requires_gradient_sync (see fsdp.py)."""
    if sync:
        return nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):

        return no_sync(module)
    return nullcontext()


def per_rank(d: Dist, value: float) -> list[float]:
    """`value` of every rank, in rank order, on every rank (e.g. each GPU's peak memory)."""
    out = [0.0] * d.world_size
    out[d.rank] = value
    return all_reduce_sum(d, out)
