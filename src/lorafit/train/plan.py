"""The step plan (how many optimizer steps, of how many items) and the data position of a run."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lorafit.train import parallel as dist

if TYPE_CHECKING:
    from lorafit.config.schema import Config

import logging

from lorafit.data.batching import epoch_items, epoch_steps

log = logging.getLogger("lorafit")


# -- how many steps, in what batches ------------------------------------------------------------

@dataclass
class Plan:
    micro_batch: int
    accumulation: int
    world_size: int
    epoch_items: int
    """Items (records, or packed rows) in one epoch, all ranks together."""
    steps_per_epoch: int
    total_steps: int
    n_train: int
    tokens_per_pass: int = 0
    """The pass budget: most tokens one forward/backward pass holds (train/memory.py pass_budget)."""
    packing: bool = False

    @property
    def global_batch(self) -> int:
        """Items per optimizer step: records, or packed rows with --packing."""
        return self.micro_batch * self.accumulation * self.world_size

    def describe(self, d: dist.Dist) -> str:
        what = "packed rows" if self.packing else "records"
        return (f"batch: {self.micro_batch} per device x {self.accumulation} accumulation x {self.world_size} "
                f"process{'es' if self.world_size > 1 else ''} = {self.global_batch} {what} per optimizer step, "
                f"run padding-free in passes of up to {self.tokens_per_pass:,} tokens; "
                f"{self.n_train:,} training examples -> {self.steps_per_epoch:,} steps per epoch, "
                f"{self.total_steps:,} steps")

    def check_resume(self, state: dict[str, Any], d: dist.Dist) -> None:
        if state.get("total_steps", self.total_steps) != self.total_steps:
            log.info("the checkpoint's run planned %s steps, this one %s: the learning rate follows the %s-step "
                     "schedule from step %s on, as a straight %s-step run's would", state["total_steps"],
                     self.total_steps, self.total_steps, state.get("step", 0) + 1, self.total_steps)
        old = state.get("global_batch")
        if old and old != self.global_batch:
            log.warning("the checkpoint was trained with %s items per step, this run uses %s; "
                        "resuming at the same data position, but the loss curve will differ", old, self.global_batch)


def plan_steps(cfg: Config, data, d: dist.Dist, tokens_per_pass: int) -> Plan:
    """Steps per epoch and in all, counted from the epoch's step list (packing included). The micro-batch and
    accumulation only say how many items a step takes; the passes are cut by tokens_per_pass."""

    t = cfg.train
    micro, accumulation = t.per_device_train_batch_size, t.gradient_accumulation_steps
    lengths = [len(e.input_ids) for e in data.train]
    steps = epoch_steps(lengths, micro * accumulation * d.world_size, packing=cfg.data.packing,
                        max_seq_length=cfg.data.max_seq_length, seed=t.seed, epoch=0,
                        group_by_length=cfg.data.group_by_length)
    steps_per_epoch = max(1, len(steps))
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    return Plan(micro, accumulation, d.world_size, epoch_items(steps), steps_per_epoch, total, len(data.train),
                tokens_per_pass, cfg.data.packing)


# -- where the run is ---------------------------------------------------------------------------

@dataclass
class Position:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    items_in_epoch: int = 0
    """Items (records, or packed rows) of this epoch consumed, all ranks together: the epoch's step list does not
    depend on the number of ranks, so this resumes exactly on any number of them."""
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
        state = dict(state)
        if "micro_in_epoch" in state and "items_in_epoch" not in state:  # checkpoints written before issue 14
            state["items_in_epoch"] = state["micro_in_epoch"] * state.get("micro_batch", 1)
        return cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})

    def epoch_fraction(self, plan: Plan) -> float:
        return round(self.epoch + self.items_in_epoch / max(plan.epoch_items, 1), 4)

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
