"""KTO (Ethayarajh et al. 2024): unpaired completions, each desirable or not, against a reference.

With r = log pi(y|x) - log ref(y|x) and z the KL baseline:
  desirable    w_d * (1 - sigmoid(beta (r - z)))
  undesirable  w_u * (1 - sigmoid(beta (z - r)))
z estimates KL(pi || ref) from mismatched pairs, as the paper and TRL do: each completion of the micro-batch
also follows the next example's prompt, and z = max(0, mean(log pi - log ref)) over those sequences, with no
gradient. TRL averages z over all processes; here it is per micro-batch (no collective inside the loss).
Units are completions. Metrics: kl, margin (the reward signed by the label), accuracy (share of completions on
their label's side of zero), rewards/desirable and rewards/undesirable (sums over the step's completions).
"""
from __future__ import annotations

import torch

from lorafit.config.schema import Config, beta_of
from lorafit.data.preference import CHOSEN, KL, REJECTED
from lorafit.train.objectives.base import Batch, Metrics
from lorafit.train.objectives.dpo import PreferenceBatches
from lorafit.train.objectives.logprobs import ReferenceLogps


def kto_losses(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-completion losses (N,) from summed log-probs (N,), labels (N,) bool and the baseline z (scalar)."""
    r = policy - ref
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable, good, bad)


def kl_baseline(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """z = max(0, mean KL estimate), detached; 0 without mismatched sequences."""
    if policy_kl.numel() == 0:
        return torch.zeros((), device=policy_kl.device)
    return (policy_kl - ref_kl).mean().clamp(min=0).detach()


class KTO(PreferenceBatches):
    name = "kto"
    kl_pairs = True

    def __init__(self, cfg: Config):
        t = cfg.train
        self.beta, self.weights = beta_of(cfg), (t.kto_desirable_weight, t.kto_undesirable_weight)
        self.reference = ReferenceLogps(t.ref_adapter)

    def loss(self, model, batch: Batch, fast_loss, mask_dtype: torch.dtype) -> tuple[torch.Tensor, Metrics]:
        ref = self.reference(model, batch, mask_dtype, fast_loss)
        logps, _ = self.policy_logps(model, batch, mask_dtype, fast_loss)
        kind = batch["seq_kind"]
        target, mismatched = kind <= REJECTED, kind == KL
        z = kl_baseline(logps[mismatched].detach(), ref[mismatched])
        desirable = kind[target] == CHOSEN
        losses = kto_losses(logps[target], ref[target], desirable, z, self.beta, *self.weights)
        rewards = self.beta * (logps[target] - ref[target]).detach()
        signed = torch.where(desirable, rewards, -rewards)
        metrics = {"kl": z * target.sum(), "margin": signed.sum(), "accuracy": (signed > 0).float().sum(),
                   "rewards/desirable": rewards[desirable].sum(), "rewards/undesirable": rewards[~desirable].sum()}
        return losses.sum(), metrics
