"""DPO (Rafailov et al. 2023): the policy's log-ratio to a frozen reference, chosen over rejected.

With h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)):
  sigmoid  -log sigmoid(beta h)                                          (the DPO paper)
  hinge    max(0, 1 - beta h)                                            (SLiC, Zhao et al. 2023)
  ipo      (h' - 1 / (2 beta))^2, h' from per-token mean log-probs       (IPO, Azar et al. 2023)
IPO's regression target is set on length-normalised log-ratios, as its authors' code and TRL's do; on
sums a 300-token pair would sit far from any target 1 / (2 beta) can set.
Rewards are beta times each reply's log-ratio; a pair is "accurate" when the chosen reward is the higher.
Units are pairs: the loop divides the summed loss and metrics by the pairs of the optimizer step.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lorafit.config.schema import Config, beta_of
from lorafit.data.preference import CHOSEN, REJECTED, collate_preference
from lorafit.train.objectives.base import Batch, Metrics
from lorafit.train.objectives.logprobs import ReferenceLogps, sequence_keys, sequence_logps

log = logging.getLogger("lorafit")

def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """Per-pair losses (P,) from log-probs (P,) each: summed for sigmoid/hinge, per-token means for ipo."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss_type!r}")


def pair_metrics(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, policy_chosen: torch.Tensor,
                 policy_rejected: torch.Tensor) -> Metrics:
    """Sums over the batch's pairs (the loop divides by the step's pairs)."""
    return {"rewards/chosen": chosen_reward.sum(), "rewards/rejected": rejected_reward.sum(),
            "margin": (chosen_reward - rejected_reward).sum(),
            "accuracy": (chosen_reward > rejected_reward).float().sum(),
            "logps/chosen": policy_chosen.sum(), "logps/rejected": policy_rejected.sum()}


def split_pairs(values: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) values of each pair, in pair order (a pair's chosen and rejected are adjacent)."""
    if "chosen_index" in batch:  # from host_index: no boolean mask, whose indexing waits for the device
        return values.index_select(0, batch["chosen_index"]), values.index_select(0, batch["rejected_index"])
    kind = batch["seq_kind"]
    return values[kind == CHOSEN], values[kind == REJECTED]


def host_index(batch: Batch, pin: bool) -> Batch:
    """The batch (still on the host) with its sequences' reference-cache keys and each pair's chosen and rejected
    positions: read on the device, each would be a sync (a boolean mask's size, a read-back)."""
    kind = batch["seq_kind"]
    index = {"chosen_index": (kind == CHOSEN).nonzero().squeeze(1),
             "rejected_index": (kind == REJECTED).nonzero().squeeze(1)}
    if pin:
        index = {k: v.pin_memory() for k, v in index.items()}
    return {**batch, **index, "seq_keys": sequence_keys(batch)}


class PreferenceBatches:
    """What DPO, ORPO and KTO share: units are pairs (or completions), batches come from data/preference.py."""

    kl_pairs = False
    rollout = False

    def units(self, batch: Batch) -> int:
        return int((batch["seq_kind"] <= REJECTED).sum()) // (1 if self.kl_pairs else 2)

    def prepare(self, state, batches: list[Batch]) -> list[Batch]:
        return [host_index(b, pin=state.d.device.type == "cuda") for b in batches]

    def pass_tokens(self, example, max_seq_length: int) -> int:
        # chosen and rejected (each already cut to max_seq_length); KTO: also its mismatched KL sequence
        return len(example.input_ids) * (2 if self.kl_pairs else 1)

    def collate(self, examples, records: list[int], max_seq_length: int) -> Batch:
        return collate_preference([examples[i] for i in records], kl_pairs=self.kl_pairs)

    def policy_logps(self, model, batch: Batch, mask_dtype: torch.dtype, fast_loss=None):
        """(summed log-probs (S,), labelled tokens (S,)) per sequence: on the fused path when the run has one."""
        if fast_loss is not None:
            return fast_loss.sequence_logps(batch)
        return sequence_logps(model, batch, mask_dtype)


class DPO(PreferenceBatches):
    name = "dpo"

    def __init__(self, cfg: Config):
        self.beta, self.loss_type = beta_of(cfg), cfg.train.dpo_loss
        self.reference = ReferenceLogps(cfg.train.ref_adapter)

    def loss(self, model, batch: Batch, fast_loss, mask_dtype: torch.dtype) -> tuple[torch.Tensor, Metrics]:
        ref = self.reference(model, batch, mask_dtype, fast_loss)
        logps, counts = self.policy_logps(model, batch, mask_dtype, fast_loss)
        pc, pr = split_pairs(logps, batch)
        rc, rr = split_pairs(ref, batch)
        if self.loss_type == "ipo":
            nc, nr = split_pairs(counts.clamp(min=1), batch)
            losses = dpo_losses(pc / nc, pr / nr, rc / nc, rr / nr, self.beta, "ipo")
        else:
            losses = dpo_losses(pc, pr, rc, rr, self.beta, self.loss_type)
        chosen_reward, rejected_reward = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
        return losses.sum(), pair_metrics(chosen_reward, rejected_reward, pc.detach(), pr.detach())
