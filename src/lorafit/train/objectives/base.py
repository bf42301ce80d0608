"""What a training objective is: a small loss over a batch. The loop (train/loop.py) owns everything else:
batching, accumulation, data parallelism, the optimizer, logging, checkpoints.

An objective sums its loss over *units* (labelled tokens for SFT, pairs for DPO, completions for GRPO) and
the loop divides by the units of the whole optimizer step on every rank, so gradient accumulation and data
parallelism give the gradient of one big batch whatever the split into micro-batches.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

Batch = dict[str, torch.Tensor]
Metrics = dict[str, torch.Tensor]
"""Per-batch sums of per-unit metrics (e.g. rewards/chosen); the loop logs each divided by the step's units."""


class Objective(Protocol):
    name: str

    def prepare(self, state: Any, group: list[Batch]) -> list[Batch]:
        """Called once per optimizer step, before its micro-batches: the batches to train on (TrainState `state`).
        SFT returns `group` as it is; GRPO samples and scores completions of the group's prompts here."""
        ...

    def units(self, batch: Batch) -> int:
        """How many units this batch's loss sums over, counted on the host before the forward pass."""
        ...

    def loss(self, model: Any, batch: Batch, fast_loss: Any, mask_dtype: torch.dtype) -> tuple[torch.Tensor, Metrics]:
        """(loss summed over the batch's units, metric sums). `fast_loss`: the fused path, or None."""
        ...


class LossModule(torch.nn.Module):
    """batch -> (loss sum, metric sums) through an objective; DDP wraps this module, so either path syncs."""

    def __init__(self, model, objective: Objective, fast_loss=None, mask_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.objective = objective
        self.fast_loss = fast_loss
        self.mask_dtype = mask_dtype

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        return self.objective.loss(self.model, batch, self.fast_loss, self.mask_dtype)
