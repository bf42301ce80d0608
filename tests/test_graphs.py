"""CUDA graphs of the fused pass (train/graphs.py): what can be checked without a GPU. A pass padded to its bucket
with filler documents and the masked cross-entropy trains exactly what the unpadded pass trains (CPU twins);
the buckets bound the padding; the loop turns graphs off with a reason where they cannot replay a pass. The
replay itself is checked against the eager pass on a GPU (tests/test_graphs_gpu.py)."""

from types import SimpleNamespace

import pytest
import torch
from helpers import lora_grads
from helpers import tiny_peft as tiny

from lorafit.config.schema import Config
from lorafit.data.batching import concat_row
from lorafit.kernels.reference import segments
from lorafit.train.fast import enable_fast_path
from lorafit.train.graphs import PassGraphs, bucket_segments, bucket_tokens, graph_choice, pad_pass


def _row(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    pieces = []
    for n in lengths:
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]           # a prompt, then the reply
        pieces.append((ids, labels))
    return concat_row(pieces, max_seq_length=64)


def test_buckets_cover_every_length_with_little_padding():
    for n in range(1, 20000, 7):
        b = bucket_tokens(n)
        assert n <= b and b % 256 == 0
        assert b - n < max(256, n / 8)                      # at most an eighth (or 256 tokens) of padding
    assert bucket_tokens(3489) == 3584 and bucket_tokens(5000) == 5120
    assert len({bucket_tokens(n) for n in range(2300, 5000)}) == 10
    assert [bucket_segments(k) for k in (1, 8, 9, 17)] == [8, 8, 16, 24]


def test_padded_pass_has_fillers_no_labels_and_empty_segments():
    bt = _row([30, 12, 50])
    out = pad_pass(bt, tokens=256, segments=16, max_len=64)
    assert {k: v.shape for k, v in out.items() if k != "cu_seqlens"} == {k: (1, 256) for k in
                                                                           ("input_ids", "labels", "position_ids",
                                                                            "doc_ids")}
    n = 92
    assert torch.equal(out["input_ids"][0, :n], bt["input_ids"][0]) and (out["labels"][0, n:] == -100).all()
    # 164 filler tokens: documents of 64, 64 and 36, each with its own ids and positions from 0
    assert out["doc_ids"][0, n:].unique_consecutive().tolist() == [4, 5, 6]
    assert out["position_ids"][0, n:n + 64].tolist() == list(range(64))
    assert out["position_ids"][0, -36:].tolist() == list(range(36))
    cu = out["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.numel() == 17
    assert cu[:7].tolist() == segments(out["doc_ids"]).tolist() == [0, 30, 42, 92, 156, 220, 256]
    assert (cu[7:] == 256).all()                             # empty segments up to the bucket's count
    with pytest.raises(ValueError):
        pad_pass(bt, tokens=256, segments=4, max_len=64)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_padded_masked_pass_trains_what_the_pass_trains(model_type):
    """Loss and every LoRA gradient of the padded pass through FastLoss.masked_sum equal the unpadded pass's
    through FastLoss (checkpointed, float32 twins): the fillers add no loss and no gradient."""
    pm = tiny(model_type)
    fl = enable_fast_path(pm, gradient_checkpointing=True)
    bt = _row([20, 9, 31], seed=1)
    loss, n = fl(fl.host_plan(bt))
    loss.backward()
    ref = lora_grads(pm)
    pm.zero_grad()
    padded = pad_pass(bt, tokens=bucket_tokens(60), segments=8, max_len=64)
    masked, m = fl.masked_sum({**padded, "max_seqlen": 64})
    masked.backward()
    assert int(m) == int(n) == sum(k - k // 2 for k in (20, 9, 31))      # the replies
    torch.testing.assert_close(masked, loss, rtol=1e-5, atol=1e-5)
    for name, g in lora_grads(pm).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_records_of_one_length_run_dense_attention_with_the_varlen_result(model_type):
    """A pass whose records all have one length and tile it (no filler) is planned as dense rows (`dense_rows`:
    plain causal attention over (rows, length), cuDNN's kernel on a GPU); its loss and LoRA gradients equal the
    same pass attending within each document, and each record's own loss (float32 twins). Grouped-query
    attention keeps varlen."""
    from lorafit.kernels.attention import uniform_rows

    assert uniform_rows(torch.tensor([0, 16, 32, 48, 48, 48]), 48) == 3     # empty (padding) segments allowed
    assert uniform_rows(torch.tensor([0, 16, 32, 48]), 64) == 0             # a filler's tokens are not covered
    assert uniform_rows(torch.tensor([0, 16, 31, 48]), 48) == 0             # lengths differ
    assert uniform_rows(torch.tensor([0, 48]), 48) == 1
    bt = _row([16, 16, 16], seed=2)
    assert enable_fast_path(tiny(model_type), gradient_checkpointing=True).host_plan(bt)["dense_rows"] == 0  # GQA
    pm = tiny(model_type, kv_heads=4)
    fl = enable_fast_path(pm, gradient_checkpointing=True)
    dense = fl.host_plan(bt)
    assert dense["dense_rows"] == 3 and fl.host_plan(_row([16, 15, 17]))["dense_rows"] == 0
    loss, n = fl(dense)
    loss.backward()
    got = lora_grads(pm)
    pm.zero_grad()
    varlen = {k: v for k, v in dense.items() if k != "dense_rows"}
    ref, m = fl(varlen)
    ref.backward()
    assert int(n) == int(m)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for name, g in lora_grads(pm).items():
        torch.testing.assert_close(g, got[name], rtol=1e-4, atol=1e-6, msg=name)
    ids, labels = bt["input_ids"].view(3, 16), bt["labels"].view(3, 16)
    alone = sum(fl({"input_ids": ids[i:i + 1], "labels": labels[i:i + 1]})[0] for i in range(3))
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=1e-5)


def _run(**over):
    cfg = Config()
    cfg.model.cuda_graphs = over.pop("cuda_graphs", True)
    rotary = SimpleNamespace(rope_type=over.pop("rope", "default"))
    fast = SimpleNamespace(dropout=over.pop("dropout", False), window=over.pop("window", None),
                           base=SimpleNamespace(model=SimpleNamespace(rotary_emb=rotary)))
    d = SimpleNamespace(device=torch.device(over.pop("device", "cuda")), world_size=over.pop("world_size", 1))
    objective = SimpleNamespace(name=over.pop("objective", "sft"))
    return cfg, fast, objective, d


@pytest.mark.parametrize("over, reason", [
    ({"cuda_graphs": False}, "--cuda_graphs false"),
    ({"device": "cpu"}, "CUDA GPU"),
    ({"world_size": 2}, "more than one process"),
    ({"objective": "dpo"}, "objective dpo"),
    ({"window": 256}, "sliding window 256"),
    ({"rope": "longrope"}, "rope_type longrope"),
    ({"rope": "dynamic"}, "rope_type dynamic"),
])
def test_graphs_turn_off_where_a_replay_cannot_run_the_pass(over, reason):
    ok, why = graph_choice(*_run(**over))
    assert not ok and reason in why


def test_graphs_stay_off_without_a_fused_path_and_on_otherwise():
    cfg, fast, objective, d = _run(dropout=True)        # dropout replays: its masks hash a seed
    assert graph_choice(cfg, None, objective, d)[0] is False
    assert graph_choice(cfg, fast, objective, d) == (True, "on (one per bucket of pass lengths, captured on "
                                                                   "its second pass)")


class _NoGPUGraphs(PassGraphs):
    """PassGraphs' bookkeeping without a GPU: no stream, no pinning; the eager pass is recorded, and a capture runs
    out of memory as it can where the graphs' pool holds memory the eager path would reuse."""

    def __init__(self, fast):
        self.fast, self.params, self.dtype, self.scaler = fast, [], torch.float32, None
        self.device = torch.device("cpu")
        self.max_len, self.graphs, self.off, self.eager_batches = 64, {}, None, []
        self.weight = torch.ones(())
        self.stats = {"captured": 0, "capture_s": 0.0, "replays": 0, "eager": 0, "tokens": 0, "padded_tokens": 0}

    @staticmethod
    def _pin(host):
        return host

    def _eager(self, batch):
        self.eager_batches.append(batch)
        return torch.tensor(float(batch["input_ids"].shape[1]))

    def _capture(self, g):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_capture_out_of_memory_leaves_the_run_eager_instead_of_stopping_it(caplog):
    pm = tiny("llama")
    graphs = _NoGPUGraphs(enable_fast_path(pm, gradient_checkpointing=True))
    bt = _row([30, 12, 50])
    assert graphs.run(bt, 0.5).item() == 256             # the bucket's eager warm-up, padded
    with caplog.at_level("WARNING", logger="lorafit"):
        assert graphs.run(bt, 0.5).item() == 256         # its capture fails: the pass itself still runs, eagerly
    assert graphs.off and "ran out of GPU memory" in caplog.text and graphs.graphs == {}
    assert graphs.run(bt, 0.25).item() == 92             # from now on unpadded, planned on the host
    last = graphs.eager_batches[-1]
    assert "label_index" in last and last["cu_seqlens"].tolist() == [0, 30, 42, 92]
    assert graphs.weight.item() == 0.25 and graphs.summary()["off"] == graphs.off
