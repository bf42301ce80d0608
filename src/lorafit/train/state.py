"""The training run's state, one typed object passed explicitly to the loop's helpers."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit.config.schema import Config
from lorafit.data.encode import PreparedData
from lorafit.train import parallel as dist
from lorafit.train.fsdp import Settings as FsdpSettings
from lorafit.train.log import NullLog, TrainLog
from lorafit.train.objectives.base import Objective
from lorafit.train.plan import Plan, Position


@dataclass
class TrainState:
    """What the loop and its helpers share; set up top to bottom in `train()`, then only `pos` changes."""

    cfg: Config
    d: dist.Dist
    run_dir: Path
    tokenizer: Any
    """A transformers tokenizer."""
    data: PreparedData
    objective: Objective
    dtype: torch.dtype = torch.float32
    fsdp: FsdpSettings | None = None
    """Set when FSDP shards the model."""
    model: Any = None
    """The PEFT model (LoRA on the base)."""
    fused: bool = False
    """Whether training runs the fused kernels (model/arch.py's fused_path_choice) and why (or why not)."""
    fused_why: str = ""
    fast: Any = None
    """The fused loss (train/fast.py FastLoss) when the run uses it, else None."""
    graphs: Any = None
    """The CUDA graphs the passes replay (train/graphs.py PassGraphs) when graph_choice says so, else None."""
    ddp: torch.nn.Module | None = None
    """The module each micro-step calls: the LossModule, DDP-wrapped, or FSDP's sharded root."""
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    tlog: TrainLog | NullLog | None = None
    plan: Plan | None = None
    pos: Position = field(default_factory=Position)
    val_batches: list[tuple[dict[str, torch.Tensor], bool]] | None = None
    """Validation passes, built once: (CPU batch, counted); stand-ins keep ranks in step."""
