"""ORPO (Hong et al. 2024): no reference model; the chosen reply's NLL plus an odds-ratio term.

With p_w, p_l the per-token mean log-probs of the chosen and rejected replies and odds(p) = p / (1 - p):
  loss = -p_w  -  alpha * log sigmoid(log odds(exp p_w) - log odds(exp p_l))
The NLL is the per-pair mean over the chosen reply's tokens (TRL averages over the batch's chosen tokens,
which weights long replies more); rewards are alpha * p, as TRL logs them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.config.schema import Config
from lorafit.train.objectives.base import Batch, Metrics
from lorafit.train.objectives.dpo import PreferenceBatches, pair_metrics, split_pairs

_LOG_P_MAX = -1e-6
"""log(1 - exp(p)) is -inf at p = 0 (a reply the model is certain of); clamped just below."""


def orpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, alpha: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, NLL terms, log-odds ratios) from per-token mean log-probs (P,) each."""
    c, r = chosen_mean.clamp(max=_LOG_P_MAX), rejected_mean.clamp(max=_LOG_P_MAX)
    log_odds = (c - r) - (torch.log(-torch.expm1(c)) - torch.log(-torch.expm1(r)))
    nll = -chosen_mean
    return nll - alpha * F.logsigmoid(log_odds), nll, log_odds


class ORPO(PreferenceBatches):
    name = "orpo"

    def __init__(self, cfg: Config):
        self.alpha = cfg.train.orpo_alpha

    def loss(self, model, batch: Batch, fast_loss, mask_dtype: torch.dtype) -> tuple[torch.Tensor, Metrics]:
        logps, counts = self.policy_logps(model, batch, mask_dtype, fast_loss)
        means = logps / counts.clamp(min=1)
        pc, pr = split_pairs(means, batch)
        losses, nll, log_odds = orpo_losses(pc, pr, self.alpha)
        metrics = pair_metrics(self.alpha * pc.detach(), self.alpha * pr.detach(), *split_pairs(logps.detach(), batch))
        return losses.sum(), {**metrics, "nll": nll.detach().sum(), "log_odds": log_odds.detach().sum()}
