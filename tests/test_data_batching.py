"""Batching: packing layout, determinism, sharding, padding share, and packed loss == one-by-one loss."""
from __future__ import annotations

import pytest
import torch
from helpers import make_cfg

from lorafit.data.batching import make_batches, packed_attention_mask, padding_share, plan_batches
from lorafit.data.encode import Example, prepare_data


def _examples(lengths: list[int]) -> list[Example]:
    out = []
    for k, n in enumerate(lengths):
        ids = [(7 * k + j) % 50 + 3 for j in range(n)]
        out.append(Example(ids, [-100] + ids[1:], [{"role": "assistant", "content": str(k)}]))
    return out


def test_packed_rows_restart_positions_and_number_documents():
    ex = _examples([5, 3, 4, 7, 2])
    batches = make_batches(ex, 2, packing=True, max_seq_length=10, pad_token_id=0, seed=1, epoch=0)
    seen = 0
    for b in batches:
        assert set(b) == {"input_ids", "labels", "attention_mask", "position_ids", "doc_ids"}
        assert all(t.dtype == torch.long for t in b.values())
        for row in range(b["input_ids"].shape[0]):
            doc, pos, am = b["doc_ids"][row], b["position_ids"][row], b["attention_mask"][row]
            assert torch.equal(am.bool(), doc > 0)
            for k in range(1, int(doc.max()) + 1):
                where = (doc == k).nonzero().flatten()
                assert torch.equal(pos[where], torch.arange(len(where)))  # restart at 0 per example
                assert b["labels"][row, where[0]] == -100  # first token of an example is never a target
                seen += 1
            assert (b["labels"][row][am == 0] == -100).all()
    assert seen == len(ex)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 21


def test_padded_batches_group_by_length_and_report_padding():
    ex = _examples([3, 30, 4, 29, 5, 31, 2, 28])
    grouped = make_batches(ex, 2, packing=False, max_seq_length=64, pad_token_id=0, seed=0, epoch=0)
    plain = make_batches(ex, 2, packing=False, max_seq_length=64, pad_token_id=0, seed=0, epoch=0,
                         group_by_length=False)
    assert "doc_ids" not in grouped[0]
    assert padding_share(grouped) < padding_share(plain)
    short = _examples([3, 4, 5, 2, 6, 3, 9, 5] * 8)
    packed = make_batches(short, 2, packing=True, max_seq_length=64, pad_token_id=0, seed=0, epoch=0)
    padded = make_batches(short, 2, packing=False, max_seq_length=64, pad_token_id=0, seed=0, epoch=0,
                          group_by_length=False)
    assert padding_share(packed) < 0.1 < padding_share(padded)


def test_batches_are_deterministic_in_seed_and_epoch():
    ex = _examples(list(range(2, 40)))
    kw = {"packing": False, "max_seq_length": 64, "pad_token_id": 0}
    a = make_batches(ex, 4, seed=3, epoch=1, **kw)
    b = make_batches(ex, 4, seed=3, epoch=1, **kw)
    c = make_batches(ex, 4, seed=3, epoch=2, **kw)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_get_disjoint_shards_of_equal_count(packing):
    lengths = [3 + (k * 7) % 20 for k in range(37)]
    world = 3
    plans = [plan_batches(lengths, 2, packing=packing, max_seq_length=32, seed=0, epoch=0, rank=r, world_size=world)
             for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    n_batches = len(plan_batches(lengths, 2, packing=packing, max_seq_length=32, seed=0, epoch=0))
    every = [tuple(map(tuple, batch)) for p in plans for batch in p]
    assert len(set(every)) == n_batches  # every batch of the epoch is served ...
    assert len(every) - n_batches < world  # ... and only the wrapped remainder twice
    covered = {i for p in plans for batch in p for row in batch for i in row}
    assert covered == set(range(len(lengths)))


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
    width = sum(len(e.input_ids) for e in examples[:4]) + 3  # two rows, the second padded
    batches = make_batches(examples, 2, packing=True, max_seq_length=width, pad_token_id=tok.pad_token_id,
                           seed=0, epoch=0)
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
    (b,) = make_batches(examples, 1, packing=True, max_seq_length=4096, pad_token_id=tok.pad_token_id,
                        seed=0, epoch=0)
    model = _tiny_llama(len(tok), "sdpa")
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], attention_mask=packed_attention_mask(b["doc_ids"], torch.float32),
                       position_ids=b["position_ids"], labels=b["labels"]).loss.item()
        parts = [(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item(),
                  sum(1 for t in e.labels[1:] if t != -100)) for e in examples]
    assert packed == pytest.approx(sum(loss * n for loss, n in parts) / sum(n for _, n in parts), abs=1e-5)
