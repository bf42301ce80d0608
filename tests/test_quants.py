"""GGUF quantizers (export/quants.py) and llama.cpp's per-tensor type mix (export/quant_mix.py), read back with
the `gguf` package's own dequantizer."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lorafit.export.quant_mix import tensor_types
from lorafit.export.quants import quantize

Q = gguf.GGMLQuantizationType
# Relative RMS error on N(0, 1) weights (seed 0, 64 x 1024), measured: Q8_0 0.533%, Q6_K 1.769%, Q5_K 3.597%,
# Q5_1 3.783%, Q5_0 4.268%, Q4_K 7.153%, Q4_0 8.565%. Bounds sit ~3% above. Without the trial-scale searches
# (plain min/max scales) the k-quants land at Q6_K 1.870%, Q5_K 3.815%, Q4_K 7.843%, above these bounds.
BOUNDS = {Q.Q8_0: 0.0055, Q.Q6_K: 0.0182, Q.Q5_K: 0.0372, Q.Q5_1: 0.039, Q.Q5_0: 0.044, Q.Q4_K: 0.0741,
          Q.Q4_0: 0.0882}


def _rel_rmse(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(((got - want) ** 2).sum() / (want ** 2).sum()))


@pytest.mark.parametrize("qtype", list(BOUNDS), ids=lambda q: q.name)
def test_round_trip_error_and_size(qtype):
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    data = quantize(x, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert data.dtype == np.uint8 and data.shape == (64, 1024 // block * size)
    got = gguf.quants.dequantize(data, qtype)
    assert got.shape == (64, 1024)
    assert _rel_rmse(got, x.numpy()) < BOUNDS[qtype]


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_on_awkward_blocks(qtype):
    """All-zero, constant, all-positive and one-outlier super-blocks: finite, zeros exact, error in bounds."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.zeros(256), torch.full((256,), 0.25), torch.rand(256, generator=g) + 1,
            torch.randn(256, generator=g) * 1e-3, torch.randn(256, generator=g)]
    rows[-1][17] = 40.0
    x = torch.stack(rows)
    got = gguf.quants.dequantize(quantize(x, qtype), qtype)
    assert np.isfinite(got).all()
    assert (got[0] == 0).all()
    for i in range(1, len(rows)):
        assert _rel_rmse(got[i], x[i].numpy()) < 0.1, i
    assert abs(got[-1][17] - 40.0) < 40.0 * 0.05  # the outlier sets the scale and survives


def test_scale_scales_with_the_data():
    """Quantizing 1024x the weights gives exactly 1024x the values: scales are found from the data, and a power
    of two changes no rounding decision."""
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(2))
    for qtype in (Q.Q4_K, Q.Q6_K):
        small = gguf.quants.dequantize(quantize(x, qtype), qtype)
        big = gguf.quants.dequantize(quantize(x * 1024, qtype), qtype)
        assert np.array_equal(small * 1024, big)


def test_rows_not_a_multiple_of_256_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(torch.randn(2, 576), Q.Q4_K)


def _llama_7b() -> list[tuple[str, tuple[int, ...]]]:
    """Llama-2-7B's tensors in file order (32 layers, hidden 4096, ffn 11008, untied output)."""
    out = [("token_embd.weight", (32000, 4096))]
    for i in range(32):
        out += [(f"blk.{i}.attn_norm.weight", (4096,)), (f"blk.{i}.attn_q.weight", (4096, 4096)),
                (f"blk.{i}.attn_k.weight", (4096, 4096)), (f"blk.{i}.attn_v.weight", (4096, 4096)),
                (f"blk.{i}.attn_output.weight", (4096, 4096)), (f"blk.{i}.ffn_norm.weight", (4096,)),
                (f"blk.{i}.ffn_gate.weight", (11008, 4096)), (f"blk.{i}.ffn_up.weight", (11008, 4096)),
                (f"blk.{i}.ffn_down.weight", (4096, 11008))]
    return out + [("output_norm.weight", (4096,)), ("output.weight", (32000, 4096))]


def _counts(types: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in types.values():
        out[t.name] = out.get(t.name, 0) + 1
    return out


# Tensor-type counts llama.cpp's loader prints for Llama-2-7B files made by llama-quantize.
LLAMA_7B_COUNTS = {
    "q4_k_m": {"F32": 65, "Q4_K": 193, "Q6_K": 33},
    "q4_k_s": {"F32": 65, "Q4_K": 217, "Q5_K": 8, "Q6_K": 1},
    "q5_k_m": {"F32": 65, "Q5_K": 193, "Q6_K": 33},
    "q6_k": {"F32": 65, "Q6_K": 226},
    "q4_0": {"F32": 65, "Q4_0": 225, "Q6_K": 1},
    "q8_0": {"F32": 65, "Q8_0": 226},
}


@pytest.mark.parametrize("dtype", list(LLAMA_7B_COUNTS))
def test_type_mix_matches_llama_cpp_on_llama_2_7b(dtype):
    types = tensor_types(_llama_7b(), dtype, 32)
    assert _counts(types) == LLAMA_7B_COUNTS[dtype]
    if dtype == "q4_0":  # with an importance matrix llama-quantize guards the first eighth's ffn_down with Q4_1
        guarded = tensor_types(_llama_7b(), dtype, 32, imatrix=True)
        assert _counts(guarded) == {"F32": 65, "Q4_0": 221, "Q4_1": 4, "Q6_K": 1}
        assert all(guarded[f"blk.{i}.ffn_down.weight"] == Q.Q4_1 for i in range(4))
    if dtype == "q4_k_m":
        assert tensor_types(_llama_7b(), dtype, 32, imatrix=True) == types
        six = sorted(int(n.split(".")[1]) for n, t in types.items() if "attn_v" in n and t == Q.Q6_K)
        assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K


def test_type_mix_falls_back_for_rows_not_a_multiple_of_256():
    """SmolLM2-135M: hidden 576 (2.25 x 256), ffn 1536, 30 layers, tied embedding."""
    tensors = [("token_embd.weight", (49152, 576))]
    for i in range(30):
        tensors += [(f"blk.{i}.attn_q.weight", (576, 576)), (f"blk.{i}.attn_v.weight", (192, 576)),
                    (f"blk.{i}.ffn_down.weight", (576, 1536)), (f"blk.{i}.ffn_up.weight", (1536, 576))]
    types = tensor_types(tensors, "q4_k_m", 30)
    assert types["token_embd.weight"] == Q.Q8_0  # tied: it is the output, Q6_K does not fit 576
    assert types["blk.5.attn_q.weight"] == Q.Q5_0  # Q4_K -> Q5_0
    assert types["blk.0.attn_v.weight"] == Q.Q8_0 and types["blk.4.attn_v.weight"] == Q.Q5_0  # Q6_K -> Q8_0
    assert types["blk.0.ffn_down.weight"] == Q.Q6_K and types["blk.4.ffn_down.weight"] == Q.Q4_K  # 1536 fits
    assert tensor_types([("blk.0.ffn_up.weight", (64, 48))], "q5_k_m", 1)["blk.0.ffn_up.weight"] == Q.F16
    assert tensor_types([("blk.0.ffn_up.weight", (64, 96))], "q5_k_m", 1)["blk.0.ffn_up.weight"] == Q.Q5_1


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_importance_lowers_the_error_where_it_matters(qtype):
    """64 of 512 columns 100x as important: the importance-weighted error falls (measured to 0.44 / 0.52 / 0.54
    of the unweighted quantizer's for Q4_K / Q5_K / Q6_K)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 512, generator=g)
    imp = torch.ones(512)
    imp[torch.randperm(512, generator=g)[:64]] = 100.0

    def weighted(data: np.ndarray) -> float:
        return float(((gguf.quants.dequantize(data, qtype) - x.numpy()) ** 2 * imp.numpy()).sum())

    assert weighted(quantize(x, qtype, imp)) < 0.8 * weighted(quantize(x, qtype))


def test_importance_from_training_data(tiny_model_dir, llama_run):  # noqa: F811
    """Mean squared inputs per column of every linear layer, keyed by GGUF name, from the run's conversations."""
    from lorafit.export.gguf import _folder_plans
    from lorafit.export.imatrix import importance
    from lorafit.run_dir import load_run_config

    folder = tiny_model_dir("llama")
    plans = _folder_plans(folder)
    imp = importance(folder, llama_run, load_run_config(llama_run), plans, sequences=4)
    assert set(imp) == {p.name for p in plans if len(p.shape) == 2 and p.name != "token_embd.weight"}
    assert imp["blk.0.ffn_down.weight"].shape == (128,) and imp["blk.1.attn_q.weight"].shape == (64,)
    assert all(bool((v >= 0).all()) and float(v.sum()) > 0 for v in imp.values())
