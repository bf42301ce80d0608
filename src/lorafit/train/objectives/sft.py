"""Supervised fine-tuning: summed token cross-entropy over the labelled (reply) tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.data.batching import collate_pass, packed_attention_mask
from lorafit.data.records import IGNORE_INDEX
from lorafit.model.arch import decoder_and_head
from lorafit.train.objectives.base import Batch, Metrics


class SFT:
    """Cross-entropy of the reply tokens (prompt tokens carry IGNORE_INDEX), summed; units are labelled tokens."""

    name = "sft"
    rollout = False

    def prepare(self, state, batches: list[Batch]) -> list[Batch]:
        return batches

    def units(self, batch: Batch) -> int:
        return labelled_tokens(batch["labels"])

    def loss(self, model, batch: Batch, fast_loss, mask_dtype: torch.dtype) -> tuple[torch.Tensor, Metrics]:
        if fast_loss is not None:
            ce, _ = fast_loss(batch)
        else:
            ce, _ = reference_loss(model, batch, mask_dtype)
        return ce, {}

    def pass_tokens(self, example, max_seq_length: int) -> int:
        return min(len(example.input_ids), max_seq_length)

    def collate(self, examples, records: list[int], max_seq_length: int) -> Batch:
        return collate_pass(examples, records, max_seq_length)


def labelled_tokens(labels: torch.Tensor) -> int:
    """Tokens that are targets: label t+1 is predicted at position t, so the first label never is."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def reference_loss(model, batch: dict[str, torch.Tensor], mask_dtype=torch.float32):
    """Plain PyTorch: CE summed over labelled tokens, shifted by one as HF does.

    The LM head runs only where a label is trained: instruction data trains ~9% of its
    tokens (the built-in demo set: 8.8%), and SmolLM2's 49k-token head is ~20% of its FLOPs,
    so this cuts a CPU step by about a sixth with the same loss and gradients.
    """

    mask = batch["attention_mask"]
    if "doc_ids" in batch:
        mask = packed_attention_mask(batch["doc_ids"], dtype=mask_dtype)  # (B, 1, T, T) block-diagonal causal
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = labels != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"],
              "use_cache": False}
    split = decoder_and_head(model)
    if split is None:
        return labelled_ce_sum(model(**inputs).logits, batch["labels"])
    decoder, head = split
    hidden = decoder(**inputs).last_hidden_state[:, :-1]  # (B, T-1, C)
    logits = head(hidden[keep])  # (N, V), N labelled tokens
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), keep.sum()


def labelled_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy summed over labelled tokens, their number): logits (B, T, V) of positions 0..T-1 predict
    labels (B, T) of positions 1..T, as Hugging Face shifts them; IGNORE_INDEX labels train nothing."""
    target = labels[:, 1:]                       # (B, T-1)
    logits = logits[:, :-1].float()              # (B, T-1, V)
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    return ce, (target != IGNORE_INDEX).sum()
