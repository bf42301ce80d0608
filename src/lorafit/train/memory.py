"""Out of memory: the message that names the shape, and the micro-batch probe of --auto_find_batch_size."""
from __future__ import annotations

import logging

import torch

from lorafit.errors import UserError
from lorafit.train import parallel as dist
from lorafit.train.state import TrainState

log = logging.getLogger("lorafit")


def oom_error(r: TrainState) -> UserError:
    c = r.cfg
    shape = f"micro-batch {r.plan.micro_batch if r.plan else c.train.per_device_train_batch_size}, " \
            f"max_seq_length {c.data.max_seq_length}, gradient_checkpointing {c.model.gradient_checkpointing}, " \
            f"load_in_4bit {c.model.load_in_4bit}, packing {c.data.packing}"
    return UserError(f"out of GPU memory at step {r.pos.step + 1} (this run uses {shape})",
                     fix="lower --per_device_train_batch_size (raise --gradient_accumulation_steps to keep the batch), "
                         "lower --max_seq_length, turn on --gradient_checkpointing, load the base with --load_in_4bit,"
                         " or let --auto_find_batch_size pick the micro-batch")


def find_batch_size(r: TrainState, loss_module) -> int:
    """The largest micro-batch (halving from the configured one) whose widest batch survives forward+backward."""

    c = r.cfg
    micro = c.train.per_device_train_batch_size
    if not c.train.auto_find_batch_size:
        return micro
    rng = torch.get_rng_state()  # the probe's dropout must not shift the run's random stream
    while True:
        batches = r.objective.batches(r.data.train, micro, cfg=c, pad_token_id=r.tokenizer.pad_token_id, epoch=0)
        widest = max(batches, key=lambda b: b["input_ids"].numel())
        try:
            with torch.autocast(r.d.device.type, dtype=r.dtype, enabled=r.dtype != torch.float32):
                loss_sum, _ = loss_module({k: v.to(r.d.device) for k, v in widest.items()})
            (loss_sum / max(loss_module.objective.units(widest), 1)).backward()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        r.model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        fits = not dist.any_rank(r.d, not fits)
        if fits:
            break
        if micro == 1:
            r.plan = None
            raise oom_error(r)
        log.info("auto_find_batch_size: micro-batch %d does not fit; trying %d", micro, micro // 2)
        micro //= 2
    torch.set_rng_state(rng)
    if micro != c.train.per_device_train_batch_size:
        log.info("auto_find_batch_size: micro-batch %d (accumulation raised to keep the global batch)", micro)
    return micro
