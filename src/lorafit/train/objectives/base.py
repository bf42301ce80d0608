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
    rollout: bool
    """`prepare` makes the step's batches (GRPO samples completions), so units are counted after it."""

    def pass_tokens(self, example: Any, max_seq_length: int) -> int:
        """Tokens the example puts in a pass, what passes are planned by (a DPO pair: both sequences; a GRPO
        prompt: its num_generations completions at their longest)."""
        ...

    def collate(self, examples: list, records: list[int], max_seq_length: int) -> Batch:
        """The records' examples as one pass, as `loss` reads it (SFT: data.batching.collate_pass, padding-free;
        preference objectives put a pair's sequences side by side as documents of the row; GRPO: its prompts)."""
        ...

    def prepare(self, state: Any, batches: list[Batch]) -> list[Batch]:
        """Called once per optimizer step with this rank's collated passes (TrainState `state`); returns what
        the passes train on. GRPO samples and scores completions of the prompts here; the others return them."""
        ...

    def units(self, batch: Batch) -> int:
        """How many units this batch's loss sums over (labelled tokens, pairs, completion tokens)."""
        ...

    def loss(self, model: Any, batch: Batch, fast_loss: Any, mask_dtype: torch.dtype) -> tuple[torch.Tensor, Metrics]:
        """(loss summed over the batch's units, metric sums). `fast_loss`: the fused path (train/fast.py's FastLoss:
        the summed cross-entropy, or per-sequence log-probs with the adapter or without it) when model/arch.py's
        fused_path_choice runs it for this method, else None (the model's own forward)."""
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
