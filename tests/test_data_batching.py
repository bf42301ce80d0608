"""Batching: the padding-free row, the steps of an epoch, rank shares, passes, and packed loss == one-by-one loss."""
from __future__ import annotations

import pytest
import torch
from helpers import make_cfg

from lorafit.data.batching import collate_pass, epoch_steps, make_passes, packed_attention_mask, step_passes
from lorafit.data.encode import Example, prepare_data


def _examples(lengths: list[int]) -> list[Example]:
    out = []
    for k, n in enumerate(lengths):
        ids = [(7 * k + j) % 50 + 3 for j in range(n)]
        out.append(Example(ids, [-100] + ids[1:], [{"role": "assistant", "content": str(k)}]))
    return out


def test_a_pass_is_one_padding_free_row_restarting_positions():
    ex = _examples([5, 3, 4, 7, 2])
    b = collate_pass(ex, [3, 0, 4], max_seq_length=6)  # 7 is cut to 6
    assert set(b) == {"input_ids", "labels", "attention_mask", "position_ids", "doc_ids"}
    assert all(t.dtype == torch.long and t.shape == (1, 6 + 5 + 2) for t in b.values())
    assert b["doc_ids"][0].tolist() == [1] * 6 + [2] * 5 + [3] * 2
    assert b["position_ids"][0].tolist() == [*range(6), *range(5), *range(2)]
    assert bool(b["attention_mask"].all())  # no pad token
    starts = [0, 6, 11]
    assert all(b["labels"][0, s] == -100 for s in starts)  # first token of an example is never a target
    assert b["input_ids"][0, 6:11].tolist() == ex[0].input_ids


def _all_records(steps):
    return [i for s in steps for item in s for i in item]


@pytest.mark.parametrize("packing", [False, True])
def test_steps_cover_the_epoch_once_and_depend_on_the_global_batch_only(packing):
    lengths = [3 + (k * 7) % 20 for k in range(37)]
    steps = epoch_steps(lengths, 6, packing=packing, max_seq_length=32, seed=0, epoch=0)
    assert sorted(_all_records(steps)) == list(range(37))
    assert all(len(s) == 6 for s in steps[:-1]) and 1 <= len(steps[-1]) <= 6
    if packing:
        assert all(sum(lengths[i] for i in row) <= 32 for s in steps for row in s)
    assert steps == epoch_steps(lengths, 6, packing=packing, max_seq_length=32, seed=0, epoch=0)
    assert steps != epoch_steps(lengths, 6, packing=packing, max_seq_length=32, seed=0, epoch=1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_share_each_step_with_equal_pass_counts(world):
    lengths = [3 + (k * 7) % 20 for k in range(37)]
    for step in epoch_steps(lengths, 8, packing=False, max_seq_length=32, seed=0, epoch=0, group_by_length=True):
        per_rank = [step_passes(step, lengths, 32, 40, r, world) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # FSDP: every rank runs as many passes
        counted = [i for passes in per_rank for p in passes if p.counted for i in p.records]
        assert sorted(counted) == sorted(i for item in step for i in item)  # every record once, on one rank
        assert all(sum(lengths[i] for i in p.records) <= 40 or len(p.records) == 1 for ps in per_rank for p in ps)


def test_a_rank_without_records_runs_a_stand_in():
    lengths = [5, 9, 4]
    (step,) = epoch_steps(lengths, 3, packing=False, max_seq_length=16, seed=0, epoch=0)
    idle = step_passes(step, lengths, 16, 64, rank=3, world_size=4)
    assert len(idle) == 1 and not idle[0].counted and len(idle[0].records) == 1


def test_passes_fit_the_budget_first_fit_decreasing():
    lengths = [10, 30, 20, 25, 5, 40]
    passes = make_passes(list(range(6)), lengths, 50)
    assert sorted(i for p in passes for i in p) == list(range(6))
    assert all(sum(lengths[i] for i in p) <= 50 for p in passes)
    assert len(passes) == 3  # 130 tokens in 50-token passes
    assert make_passes([0, 1], [80, 3], 50) == [[0], [1]]  # a record over the budget gets its own pass


def test_packed_attention_mask_is_block_causal_without_nan():
    doc = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = packed_attention_mask(doc, torch.float32)
    assert m.shape == (1, 1, 6, 6)
    allowed = m[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    assert not torch.isnan(torch.softmax(torch.randn(6, 6) + m[0, 0], -1)).any()


def _tiny_llama(vocab: int, impl: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab)
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_packed_loss_equals_token_weighted_loss_one_by_one(tok, impl, train_on_inputs):
    prepared = prepare_data(make_cfg("demo", demo_size=40, train_on_inputs=train_on_inputs), tok)
    examples = prepared.train[:6]
    budget = sum(len(e.input_ids) for e in examples[:4])  # two passes
    passes = make_passes(list(range(6)), [len(e.input_ids) for e in examples], budget)
    assert len(passes) == 2
    batches = [collate_pass(examples, p, 4096) for p in passes]
    model = _tiny_llama(len(tok), impl)
    packed_sum = packed_n = 0.0
    with torch.no_grad():
        for b in batches:
            mask = packed_attention_mask(b["doc_ids"], torch.float32)
            logits = model(input_ids=b["input_ids"], attention_mask=mask, position_ids=b["position_ids"]).logits
            loss, n = _summed_loss(logits, b["labels"])
            packed_sum, packed_n = packed_sum + loss, packed_n + n
        ref_sum = ref_n = 0.0
        for e in examples:
            labels = torch.tensor([e.labels])
            mean = model(input_ids=torch.tensor([e.input_ids]), labels=labels).loss.item()
            n = int((labels[0, 1:] != -100).sum())
            ref_sum, ref_n = ref_sum + mean * n, ref_n + n
    assert packed_n == ref_n
    assert packed_sum / packed_n == pytest.approx(ref_sum / ref_n, abs=1e-5)


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    shift_logits, shift_labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return loss.item(), int((shift_labels != -100).sum())


def test_single_packed_row_loss_through_model_labels(tok):
    """The model's own loss on one packed row (mean over its trained tokens) matches, too."""
    prepared = prepare_data(make_cfg("demo", demo_size=30), tok)
    examples = prepared.train[:4]
    b = collate_pass(examples, [0, 1, 2, 3], 4096)
    model = _tiny_llama(len(tok), "sdpa")
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], attention_mask=packed_attention_mask(b["doc_ids"], torch.float32),
                       position_ids=b["position_ids"], labels=b["labels"]).loss.item()
        parts = [(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item(),
                  sum(1 for t in e.labels[1:] if t != -100)) for e in examples]
    assert packed == pytest.approx(sum(loss * n for loss, n in parts) / sum(n for _, n in parts), abs=1e-5)
