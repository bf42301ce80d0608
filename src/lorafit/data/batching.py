"""Batches: which records make each optimizer step, and the padding-free passes that compute them.

A step is its records, not its passes. The epoch's records are shuffled (deterministic in seed and
epoch) into a list of *items*: one record each, or with `--packing` a row of records filled up to
max_seq_length. An optimizer step takes the next `per_device_train_batch_size x
gradient_accumulation_steps x ranks` items, whatever the split into micro-batches. Each rank takes a
share of the step's items (balanced by tokens) and computes it in as few forward/backward passes as
fit a token budget (`max_tokens_per_pass`): a pass is ONE row, its records concatenated with position
ids restarting at 0 and a document id (1..k) per record, so attention stays within each record and no
pad token is computed. The loss is summed over labelled tokens and divided by the whole step's count
(train/loop.py), so cutting a step into passes changes nothing but float rounding: 4x4, 16x1 and 2x8
train the same adapter. Length grouping (`group_by_length`) sorts whole steps, never passes.

`packed_attention_mask(doc_ids)` turns document ids into a block-diagonal causal mask. With
transformers 5.17 pass it as the 4D `attention_mask` together with `position_ids`:

    mask = packed_attention_mask(batch["doc_ids"], dtype=model.dtype)      # (B, 1, T, T)
    model(input_ids=..., attention_mask=mask, position_ids=batch["position_ids"], labels=...)

`masking_utils._preprocess_mask_arguments` returns a 4D mask untouched for every attention
implementation; sdpa hands it to `scaled_dot_product_attention` and eager adds it to the scores, so
both are exact (tests/test_data_batching.py checks the packed loss against examples run one by one
to 1e-5 in float32). The alternative transformers offers, `attention_mask=None` with restarting
`position_ids`, is only used when no cache is passed: with `use_cache` on (the default in eval mode)
the model makes a DynamicCache and silently attends across examples (measured: logits off by 0.47).

The first label of every example is -100 (it is never a target; in a packed row it would be
predicted from the previous example's last token), which is why packed and unpacked losses match.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lorafit.data.records import IGNORE_INDEX

if TYPE_CHECKING:
    from lorafit.data.encode import Example

# Pass budgets (train/memory.py picks the training one from free memory). On a CPU a pass of 512 tokens runs as fast
# per token as the 8 x 384 rows of a packed micro-batch (measured: 21.9-25.3 s vs 23.3-23.6 s per 3,072 tokens,
# hidden 576, one thread); SmolLM2-135M in float32 with LoRA dropout keeps ~2.5 MB a token for its backward, so the
# issue's packed 8 x 384 run peaked at 12.1 GiB RSS with its micro-batch in one pass, 3.9 GiB at 1,024 tokens a pass
# and 2.9 GiB at 512 (all 40 steps and validations: 3,066,072 kB maxrss). On a GPU, beyond ~8k tokens a pass is
# GPU-bound (bench: the host queues a 4x2048 step in 290 of 363 ms), so more only raises the peak.
CPU_PASS_TOKENS = 512
GPU_PASS_CAP = 16384
_EVAL_GPU_TOKENS = 4096  # a loss-only pass holds its (T, vocab) float32 logits: 2 GiB at 128k vocabulary
_OPEN_ROWS = 16  # rows kept open while packing: first-fit over 16 fills rows to ~99% at 512 tokens
_MEGABATCH = 32  # steps' worth of items sorted together when grouping by length

Item = list[int]
"""Indices of the examples in one item: one record, or a packed row (--packing)."""
Step = list[Item]


@dataclass
class Pass:
    """One forward/backward pass: example indices concatenated in one row. `counted` False marks a stand-in
    (a rank with fewer passes than the others runs it with weight 0, so collectives stay in step)."""
    records: list[int]
    counted: bool = True


def epoch_steps(lengths: Sequence[int], step_items: int, *, packing: bool, max_seq_length: int, seed: int,
                epoch: int, group_by_length: bool = False, shuffle: bool = True) -> list[Step]:
    """The epoch's optimizer steps, all ranks together: each a list of `step_items` items (the last may be short).
    Depends on the global batch only, never on how it is split, so a checkpoint resumes on any number of ranks."""
    if step_items < 1:
        raise ValueError(f"bad step_items: {step_items}")
    rng = random.Random(f"lorafit-batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    clipped = [min(n, max_seq_length) for n in lengths]
    items = _pack(order, clipped, max_seq_length) if packing else [[i] for i in order]
    if group_by_length:
        items = _group_by_length(items, clipped, step_items * _MEGABATCH)
    steps = [items[i: i + step_items] for i in range(0, len(items), step_items)]
    if shuffle and group_by_length:
        rng.shuffle(steps)  # sorted runs would otherwise start every epoch with the longest
    return steps


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


def _group_by_length(items: list[Item], lengths: Sequence[int], chunk: int) -> list[Item]:
    out: list[Item] = []
    for start in range(0, len(items), chunk):
        out += sorted(items[start: start + chunk], key=lambda it: -sum(lengths[i] for i in it))
    return out


def rank_share(step: Step, lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Each rank's records of a step: items dealt longest first to the rank with the fewest tokens (ties: lowest
    rank), then kept in the step's order. Every rank computes every share, so all agree without talking."""
    tokens = [0] * world_size
    share: list[list[int]] = [[] for _ in range(world_size)]
    for k in sorted(range(len(step)), key=lambda k: (-sum(lengths[i] for i in step[k]), k)):
        r = min(range(world_size), key=lambda r: (tokens[r], r))
        share[r].append(k)
        tokens[r] += sum(lengths[i] for i in step[k])
    return [[i for k in sorted(ks) for i in step[k]] for ks in share]


def make_passes(records: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing of records into passes of at most `budget` tokens (a longer record gets its own),
    each pass in the records' own order."""
    bins: list[tuple[int, list[int]]] = []
    for i in sorted(records, key=lambda i: -lengths[i]):
        for k, (used, rows) in enumerate(bins):
            if used + lengths[i] <= budget:
                rows.append(i)
                bins[k] = (used + lengths[i], rows)
                break
        else:
            bins.append((lengths[i], [i]))
    rank = {i: k for k, i in enumerate(records)}
    return [sorted(rows, key=rank.__getitem__) for _, rows in bins]


def step_passes(step: Step, lengths: Sequence[int], max_seq_length: int, budget: int, rank: int = 0,
                world_size: int = 1) -> list[Pass]:
    """This rank's passes for one step. Every rank gets as many passes as the busiest one (FSDP gathers weights in
    every forward, so all ranks must run the same number): its largest passes are halved first, then stand-ins
    (weight 0) fill up, e.g. for a rank left without records in the epoch's short last step."""
    clipped = [min(n, max_seq_length) for n in lengths]
    shares = rank_share(step, clipped, world_size)
    counts = [len(make_passes(s, clipped, budget)) for s in shares]
    mine = [Pass(p) for p in make_passes(shares[rank], clipped, budget)]
    while len(mine) < max(counts) and any(len(p.records) > 1 for p in mine):
        k = max(range(len(mine)), key=lambda k: len(mine[k].records))
        half = len(mine[k].records) // 2
        mine[k: k + 1] = [Pass(mine[k].records[:half]), Pass(mine[k].records[half:])]
    stand_in = mine[0].records[:1] if mine else [min((i for it in step for i in it), key=lambda i: clipped[i])]
    mine += [Pass(stand_in, counted=False) for _ in range(max(counts) - len(mine))]
    return mine


def collate_pass(examples: list[Example], records: list[int], max_seq_length: int) -> dict[str, torch.Tensor]:
    """One padding-free row (1, T): input_ids, labels, attention_mask (all ones), position_ids restarting per
    record, doc_ids 1..k; T is the records' total length, so no pad token is computed."""
    return concat_row([(examples[i].input_ids, examples[i].labels) for i in records], max_seq_length)


def concat_row(pieces: Sequence[tuple[Sequence[int], Sequence[int]]], max_seq_length: int) -> dict[str, torch.Tensor]:
    """(token ids, labels) pairs -> the tensors of one padding-free row (see `collate_pass`)."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    doc: list[int] = []
    for k, (tok, lab) in enumerate(pieces, start=1):
        n = min(len(tok), max_seq_length)
        if n == 0:
            continue
        ids += tok[:n]
        labels += [IGNORE_INDEX, *lab[1:n]]
        pos += range(n)
        doc += [k] * n
    row = {"input_ids": ids, "labels": labels, "position_ids": pos, "doc_ids": doc}
    out = {k: torch.tensor([v], dtype=torch.long) for k, v in row.items()}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


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


def eval_pass_tokens(max_tokens_per_pass: int | None, max_seq_length: int, on_gpu: bool) -> int:
    """Tokens per pass of a loss-only evaluation (no backward)."""
    return max_tokens_per_pass or max(max_seq_length, _EVAL_GPU_TOKENS if on_gpu else CPU_PASS_TOKENS)


def epoch_items(steps: list[Step]) -> int:
    """Items in an epoch's step list."""
    return sum(len(s) for s in steps)
