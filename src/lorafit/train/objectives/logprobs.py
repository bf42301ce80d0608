"""Per-sequence summed log-probabilities of reply tokens, for the preference objectives (DPO, ORPO, KTO), and
the reference model's, cached per sequence.

A preference batch (data/preference.py) holds several sequences per row as documents; `seq_index` says which
sequence each token belongs to. The LM head runs on labelled (reply) positions only, as SFT's reference
loss does, and the log-probs are summed into one value per sequence with `index_add_`.

On the fused path (train/fast.py) the same values come from FastLoss.sequence_logps, without the dense mask.

The reference is the same model with the adapter switched off (PEFT's `disable_adapter()`, or on the fused path
its layer stack without the LoRA products: no second copy of the weights, a 4-bit base stays 4-bit), or another
adapter loaded next to the trained one (`ref_adapter`, always through the model's own forward).
Its log-probs depend only on the sequence (the base is frozen), so each is computed once, when its sequence is
first seen, and then read from memory: from the second epoch on DPO runs one forward pass per step, not two.
A resumed run recomputes them as it meets them (the same values: nothing they depend on has changed).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from lorafit.data.batching import packed_attention_mask
from lorafit.data.records import IGNORE_INDEX
from lorafit.errors import UserError
from lorafit.model.arch import decoder_and_head
from lorafit.train.objectives.base import Batch

REFERENCE = "reference"
"""The name the `ref_adapter` is loaded under, next to the trained adapter ('default')."""


def sequence_logps(model, batch: Batch, mask_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each sequence's labelled tokens (S,) float32, labelled tokens per sequence (S,))."""
    mask = packed_attention_mask(batch["doc_ids"], dtype=mask_dtype)  # (B, 1, T, T) block-diagonal causal
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = labels != IGNORE_INDEX
    seq = batch["seq_index"][:, 1:][keep]  # (N,) the sequence of each target
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"],
              "use_cache": False}
    split = decoder_and_head(model)
    if split is None:
        logits = model(**inputs).logits[:, :-1][keep]  # (N, V)
    else:
        decoder, head = split
        logits = head(decoder(**inputs).last_hidden_state[:, :-1][keep])  # (N, V), N labelled tokens
    logp = -F.cross_entropy(logits.float(), labels[keep], reduction="none")  # (N,)
    n_seq = batch["seq_kind"].numel()
    sums = torch.zeros(n_seq, dtype=torch.float32, device=logp.device).index_add_(0, seq, logp)
    counts = torch.zeros(n_seq, dtype=torch.float32, device=logp.device).index_add_(0, seq, torch.ones_like(logp))
    return sums, counts


def sequence_keys(batch: Batch) -> list[tuple[int, int, int]]:
    """(kind, example, reply owner) of each sequence: what its reference log-prob depends on."""
    return list(zip(batch["seq_kind"].tolist(), batch["seq_example"].tolist(), batch["seq_reply"].tolist(),
                    strict=True))


class ReferenceLogps:
    """The reference model's summed log-probs per sequence, computed on first sight and kept in memory.

    The values stay on the batch's device (one float32 slot per sequence, indexed from the host): read back, each
    pass would wait for all the GPU work queued before it, and the GPU would then idle while the next forward
    is queued. Keys come from the host when the objective's `prepare` put them in the batch (`seq_keys`)."""

    def __init__(self, ref_adapter: str | None = None):
        self.ref_adapter = ref_adapter
        self.slots: dict[tuple[int, int, int], int] = {}
        self.table: torch.Tensor | None = None     # (capacity,) float32: slot -> reference log-prob

    def __call__(self, model, batch: Batch, mask_dtype: torch.dtype, fast_loss=None) -> torch.Tensor:
        """(S,) float32 on the batch's device. `fast_loss`: the fused path (train/fast.py's FastLoss), or None."""
        keys = batch.get("seq_keys") or sequence_keys(batch)
        device = batch["input_ids"].device
        new = [k for k in dict.fromkeys(keys) if k not in self.slots]
        if new:
            if fast_loss is not None and self.ref_adapter is None:
                values, _ = fast_loss.sequence_logps(batch, adapter=False)
            else:
                with torch.no_grad(), self._reference(model):
                    values, _ = sequence_logps(model, batch, mask_dtype)
            first = len(self.slots)
            self.slots.update({k: first + i for i, k in enumerate(new)})
            self._reserve(len(self.slots), device)
            self.table.index_copy_(0, self._index(keys, device), values.detach().float())
            return values.detach().float()
        return self.table.index_select(0, self._index(keys, device))

    def _index(self, keys, device) -> torch.Tensor:
        idx = torch.tensor([self.slots[k] for k in keys], dtype=torch.long)
        if device.type == "cuda":
            idx = idx.pin_memory()  # an asynchronous copy: no wait for the queued work
        return idx.to(device, non_blocking=True)

    def _reserve(self, n: int, device) -> None:
        if self.table is not None and self.table.numel() >= n and self.table.device == device:
            return
        grown = torch.zeros(max(2 * n, 1024), dtype=torch.float32, device=device)
        if self.table is not None:
            grown[:self.table.numel()] = self.table.to(device)
        self.table = grown

    @contextmanager
    def _reference(self, model):
        if self.ref_adapter is None:
            with model.disable_adapter():
                yield
            return
        trained = model.active_adapter
        if REFERENCE not in model.peft_config:
            try:
                model.load_adapter(self.ref_adapter, adapter_name=REFERENCE, is_trainable=False)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise UserError(f"could not load the reference adapter '{self.ref_adapter}': {e}",
                                fix="pass --ref_adapter the run directory of an adapter trained on this base model")\
                    from None
        model.set_adapter(REFERENCE, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter(trained)  # trainable again (set_adapter froze it while the reference was active)
