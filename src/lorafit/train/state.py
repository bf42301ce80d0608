"""The training run's state, passed explicitly to the loop's helpers."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit.config.schema import Config
from lorafit.train import parallel as dist
from lorafit.train.plan import Position


@dataclass
class Run:
    """Everything the loop's helpers share."""

    cfg: Config
    d: dist.Dist
    run_dir: Path
    tokenizer: Any
    data: Any
    model: Any = None
    ddp: Any = None
    """The module each micro-step calls: the LossModule, DDP-wrapped, or FSDP's sharded root."""
    fsdp: Any = None
    """fsdp.Settings when FSDP shards the model, else None."""
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    tlog: Any = None
    plan: Any = None
    pos: Position = field(default_factory=Position)
    dtype: torch.dtype = torch.float32
    val_batches: list | None = None
