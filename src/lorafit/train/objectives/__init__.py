"""Training objectives, one small module each (base.py says what an objective is); `build_objective` picks one."""
from __future__ import annotations

from lorafit.config.schema import Config
from lorafit.train.objectives.base import Objective
from lorafit.train.objectives.dpo import DPO
from lorafit.train.objectives.grpo import GRPO
from lorafit.train.objectives.kto import KTO
from lorafit.train.objectives.orpo import ORPO
from lorafit.train.objectives.sft import SFT


def build_objective(cfg: Config) -> Objective:
    """The objective `--method` names (config checks have already refused unknown names)."""
    if cfg.train.method == "sft":
        return SFT()
    return {"dpo": DPO, "orpo": ORPO, "kto": KTO, "grpo": GRPO}[cfg.train.method](cfg)  # GRPO checks its rewards
