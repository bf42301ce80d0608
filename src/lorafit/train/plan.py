"""The pieces of `train()` that are not the loop: step plan, data position, run directory, signals, OOM,
the closing summary and the hub upload. train.py reads top to bottom because these live here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lorafit.train import parallel as dist

if TYPE_CHECKING:
    from lorafit.config.schema import Config

import logging

from lorafit.data.batching import plan_batches

log = logging.getLogger("lorafit")


# -- how many steps, in what batches ------------------------------------------------------------

@dataclass
class Plan:
    micro_batch: int
    accumulation: int
    world_size: int
    epoch_micro: int
    """Micro-batches in one epoch's global batch list (all ranks together)."""
    steps_per_epoch: int
    total_steps: int
    n_train: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    def describe(self, d: dist.Dist) -> str:
        return (f"batch: {self.micro_batch} per device x {self.accumulation} accumulation x {self.world_size} "
                f"process{'es' if self.world_size > 1 else ''} = {self.global_batch} sequences per optimizer step; "
                f"{self.n_train:,} training examples -> {self.steps_per_epoch:,} steps per epoch, "
                f"{self.total_steps:,} steps")

    def check_resume(self, state: dict[str, Any], d: dist.Dist) -> None:
        if state.get("total_steps", self.total_steps) != self.total_steps:
            log.info("the checkpoint's run planned %s steps, this one %s: the learning rate follows the %s-step "
                     "schedule from step %s on, as a straight %s-step run's would", state["total_steps"],
                     self.total_steps, self.total_steps, state.get("step", 0) + 1, self.total_steps)
        old = state.get("global_batch")
        if old and old != self.global_batch:
            log.warning("the checkpoint was trained with %s sequences per step, this run uses %s; "
                        "resuming at the same data position, but the loss curve will differ", old, self.global_batch)
        if state.get("micro_in_epoch", 0) % d.world_size:
            log.warning("the checkpoint's data position is not a multiple of %d ranks; "
                        "up to %d micro-batches are repeated", d.world_size, d.world_size - 1)


def plan_steps(cfg: Config, data, d: dist.Dist, micro_batch: int) -> Plan:
    """Steps per epoch and in all, counted from the batch plan (padding and packing included)."""

    t = cfg.train
    # auto_find_batch_size may shrink the micro-batch; accumulation grows so the global batch stays put
    accumulation = t.gradient_accumulation_steps * max(1, t.per_device_train_batch_size // micro_batch)
    lengths = [len(e.input_ids) for e in data.train]
    n_micro = len(plan_batches(lengths, micro_batch, packing=cfg.data.packing, max_seq_length=cfg.data.max_seq_length,
                               seed=t.seed, epoch=0, group_by_length=cfg.data.group_by_length))
    per_rank = math.ceil(n_micro / d.world_size)
    steps_per_epoch = max(1, math.ceil(per_rank / accumulation))
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    return Plan(micro_batch, accumulation, d.world_size, n_micro, steps_per_epoch, total, len(data.train))


# -- where the run is ---------------------------------------------------------------------------

@dataclass
class Position:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    micro_in_epoch: int = 0
    """Global micro-batches of this epoch consumed (all ranks together)."""
    samples: int = 0
    tokens: int = 0
    best_val: float | None = None
    bad_evals: int = 0
    """Validations in a row without a new best (early stopping)."""
    skipped: int = 0

    def to_state(self, plan: Plan, d: dist.Dist) -> dict[str, Any]:
        return {**asdict(self), "world_size": d.world_size, "micro_batch": plan.micro_batch,
                "accumulation": plan.accumulation, "global_batch": plan.global_batch, "total_steps": plan.total_steps}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Position:
        return cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})

    def record_validation(self, loss: float, patience: int | None, tlog) -> bool:
        if self.best_val is None or loss < self.best_val:
            self.best_val, self.bad_evals = loss, 0
            return False
        self.bad_evals += 1
        if patience and self.bad_evals >= patience:
            tlog.info(f"early stopping: validation loss has not improved on {self.best_val:.4f} "
                      f"for {self.bad_evals} validations")
            return True
        return False


# -- the run directory --------------------------------------------------------------------------


# -- speed and memory ---------------------------------------------------------------------------


# -- stopping on request ------------------------------------------------------------------------


