"""Optimizer and learning-rate schedule for the trainable (LoRA) parameters.

AdamW from torch, or bitsandbytes' AdamW variants: `paged_adamw_*` keep optimizer state in
CUDA unified memory so a memory spike pages it out instead of failing (QLoRA, Dettmers et al.
2023, sec. 2); `*_8bit` store both moments in 8 bits (4x less state). On a CPU bitsandbytes
runs the same optimizers unpaged. The schedule is a `LambdaLR` (warmup, then cosine / linear /
constant), so its whole state is `last_epoch` and a checkpoint restores it exactly.
"""
from __future__ import annotations

import logging
import math
import warnings
from functools import partial
from typing import TYPE_CHECKING

from lorafit.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from lorafit.config.schema import TrainArgs

log = logging.getLogger("lorafit")

_BNB = {"paged_adamw_32bit": "PagedAdamW32bit", "paged_adamw_8bit": "PagedAdamW8bit", "adamw_8bit": "AdamW8bit"}


def build_optimizer(model: torch.nn.Module, t: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad; biases and norms get no weight decay (as HF does)."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters", fix="check target_modules")
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = {"lr": t.learning_rate, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_epsilon}
    if t.optim == "adamw_torch":
        return torch.optim.AdamW(groups, **kw)
    if t.optim == "adamw_torch_fused":       # one kernel per step instead of ~10 foreach launches per update
        return torch.optim.AdamW(groups, **kw, fused=True)
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        raise ConfigError(f"optim '{t.optim}' needs bitsandbytes",
                          fix="pip install bitsandbytes==0.50.2, or use --optim adamw_torch") from None
    if t.optim.startswith("paged") and not torch.cuda.is_available():

        # bitsandbytes warns on every parameter's first step; one line here says the same once
        warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
        log.info("optim %s: paging needs CUDA; on this CPU bitsandbytes runs it unpaged", t.optim)
    return getattr(bnb_optim, _BNB[t.optim])(groups, **kw)


def warmup_steps(t: TrainArgs, total_steps: int) -> int:
    """warmup_steps when set, else ceil(warmup_ratio x total_steps) (HF's rule)."""
    return t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak lr for the update made at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)  # never 0: a zero-lr first step would be wasted data
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainArgs, total_steps: int, step: int = 0):
    """LambdaLR over `total_steps`, at optimizer step `step`: every param group's lr is then
    learning_rate x lr_factor(step), as in a straight run of `total_steps`.

    A resumed run rebuilds it rather than trusting the checkpoint's scheduler and param-group lr: those
    hold the schedule the checkpoint was saved under, and after `--resume --max_steps 8` on a 4-step
    cosine run that is its end, lr 0, which the first resumed step would use.
    """
    import torch

    fn = partial(lr_factor, kind=t.lr_scheduler_type, warmup=warmup_steps(t, total_steps), total=total_steps)
    for group in optimizer.param_groups:
        group["initial_lr"] = t.learning_rate  # LambdaLR's base lr; a checkpoint's param groups bring their own
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn, last_epoch=step - 1)


def optimizer_state_bytes(n_trainable: int, optim: str) -> int:
    """Bytes of optimizer state for `n_trainable` fp32 parameters (two moments)."""
    per = 2 if optim.endswith("8bit") else 8
    return n_trainable * per
