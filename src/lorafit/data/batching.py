"""Batches: padding-free packing, or length-grouped padded batches; deterministic in (seed, epoch).

Packing puts several examples in one row. Each keeps its own position ids (restarting at 0) and
a document id (1..k in the row, 0 on padding); `packed_attention_mask(doc_ids)` turns those into
a block-diagonal causal mask so no example attends to another. With transformers 5.17 pass it
as the 4D `attention_mask` together with `position_ids`:

    mask = packed_attention_mask(batch["doc_ids"], dtype=model.dtype)      # (B, 1, T, T)
    model(input_ids=..., attention_mask=mask, position_ids=batch["position_ids"], labels=...)

`masking_utils._preprocess_mask_arguments` returns a 4D mask untouched for every attention
implementation; sdpa hands it to `scaled_dot_product_attention` as an additive float mask and
eager adds it to the scores, so both are exact (tests/test_data_batching.py checks the packed
loss against examples run one by one to 1e-5 in float32). The alternative transformers offers,
`attention_mask=None` with restarting `position_ids` (`find_packed_sequence_indices`), is only
used when no cache is passed: with `use_cache` on (the default in eval mode) the model makes a
DynamicCache and silently attends across examples (measured: logits off by 0.47), so the
explicit mask is the way here; that path needs `use_cache=False`.

The first label of every example is -100 (it is never a target; in a packed row it would be
predicted from the previous example's last token), which is why packed and unpacked losses match.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorafit.data.records import IGNORE_INDEX

if TYPE_CHECKING:
    from lorafit.data.encode import Example

_OPEN_ROWS = 16  # rows kept open while packing: first-fit over 16 fills rows to ~99% at 512 tokens
_MEGABATCH = 32  # batches' worth of examples sorted together when grouping by length

Plan = list[list[list[int]]]
"""batches -> rows -> indices of the examples in that row."""


def plan_batches(lengths: Sequence[int], batch_size: int, *, packing: bool, max_seq_length: int, seed: int,
                 epoch: int, group_by_length: bool = True, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> Plan:
    """Which examples go in which row of which batch, for this rank; no tensors."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size/rank/world_size: {batch_size}, {rank}, {world_size}")
    rng = random.Random(f"lorafit-batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if packing:
        rows = _pack(order, [min(n, max_seq_length) for n in lengths], max_seq_length)
    else:
        rows = [[i] for i in order]
        if group_by_length:
            rows = _group_by_length(rows, lengths, batch_size * world_size * _MEGABATCH)
    batches = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    if shuffle and group_by_length and not packing:
        rng.shuffle(batches)  # sorted runs would otherwise start every epoch with the longest
    return _shard(batches, rank, world_size)


def _pack(order: list[int], lengths: list[int], max_seq_length: int) -> list[list[int]]:
    """First fit over a few open rows, in the shuffled order (so rows stay random)."""
    done: list[list[int]] = []
    open_rows: list[tuple[int, list[int]]] = []  # (tokens used, examples)
    for i in order:
        n = lengths[i]
        for k, (used, row) in enumerate(open_rows):
            if used + n <= max_seq_length:
                row.append(i)
                open_rows[k] = (used + n, row)
                break
        else:
            open_rows.append((n, [i]))
            if len(open_rows) > _OPEN_ROWS:
                fullest = max(range(len(open_rows)), key=lambda k: open_rows[k][0])
                done.append(open_rows.pop(fullest)[1])
    return done + [row for _, row in open_rows]


def _group_by_length(rows: list[list[int]], lengths: Sequence[int], chunk: int) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(rows), chunk):
        out += sorted(rows[start: start + chunk], key=lambda r: -lengths[r[0]])
    return out


def _shard(batches: Plan, rank: int, world_size: int) -> Plan:
    """Rank r takes batches r, r + W, ...; the list wraps so every rank gets the same count."""
    if not batches:
        return []
    per_rank = math.ceil(len(batches) / world_size)
    return [batches[(j * world_size + rank) % len(batches)] for j in range(per_rank)]


def make_batches(examples: list[Example], batch_size: int, *, packing: bool, max_seq_length: int, pad_token_id: int,
                 seed: int, epoch: int, group_by_length: bool = True, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Tensors for one epoch on one rank: input_ids, labels, attention_mask, position_ids (B, T) long, and
    doc_ids (B, T) when packing. Real tokens in a batch: batch["attention_mask"].sum()."""
    plan = plan_batches([len(e.input_ids) for e in examples], batch_size, packing=packing,
                        max_seq_length=max_seq_length, seed=seed, epoch=epoch, group_by_length=group_by_length,
                        shuffle=shuffle, rank=rank, world_size=world_size)
    return [_collate(examples, rows, max_seq_length, pad_token_id, packing) for rows in plan]


def _collate(examples: list[Example], rows: list[list[int]], max_seq_length: int, pad_token_id: int,
             packing: bool) -> dict[str, torch.Tensor]:
    pieces = [[examples[i] for i in row] for row in rows]
    width = max(sum(min(len(e.input_ids), max_seq_length) for e in row) for row in pieces)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.zeros(shape, dtype=torch.long)
    for b, row in enumerate(pieces):
        pos = 0
        for k, e in enumerate(row, start=1):
            n = min(len(e.input_ids), max_seq_length)
            if n == 0:
                continue
            input_ids[b, pos: pos + n] = torch.tensor(e.input_ids[:n])
            labels[b, pos: pos + n] = torch.tensor(e.labels[:n])
            labels[b, pos] = IGNORE_INDEX
            attention_mask[b, pos: pos + n] = 1
            position_ids[b, pos: pos + n] = torch.arange(n)
            doc_ids[b, pos: pos + n] = k
            pos += n
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
    if packing:
        batch["doc_ids"] = doc_ids
    return batch


def packed_attention_mask(doc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 where key and query share an example and key <= query, else the
    dtype's minimum. Padding queries (doc 0) attend to themselves only, so softmax never sees a
    fully masked row (which gives NaN)."""
    B, T = doc_ids.shape
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    real = (doc_ids > 0)[:, :, None]
    allowed = (same & causal & real) | torch.eye(T, dtype=torch.bool, device=doc_ids.device)
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def padding_share(batches) -> float:
    """Share of batch positions that are padding: 1 - real tokens / (rows x width), over all batches."""
    total = sum(b["attention_mask"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 0.0 if total == 0 else 1.0 - real / total


def plan_padding_share(lengths: Sequence[int], plan: Plan, max_seq_length: int) -> float:
    """`padding_share` of a plan without building tensors (for the data report)."""
    total = real = 0
    for rows in plan:
        sizes = [sum(min(lengths[i], max_seq_length) for i in row) for row in rows]
        total += max(sizes) * len(sizes)
        real += sum(sizes)
    return 0.0 if total == 0 else 1.0 - real / total
