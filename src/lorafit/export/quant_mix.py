"""Which GGML type each tensor of a GGUF export gets, for each `--dtype`: llama.cpp's rules (llama-quant.cpp),
so a lorafit q4_k_m file has the same per-tensor types as one made by `llama-quantize ... Q4_K_M`.

  k-quant mixes   the base type (Q4_K for q4_k_s/q4_k_m, Q5_K for q5_k_m, ...), with more bits where quantization
                  hurts most: output.weight (and the tied token embedding, which is also the output) gets Q6_K;
                  attn_v and ffn_down get Q6_K on the first and last eighth of the layers and every third layer
                  between for _m (Q5_K on the first layers for q4_k_s).
  fallbacks       a row that is not a multiple of a type's block cannot hold it: Q4_K -> Q5_0, Q5_K -> Q5_1,
                  Q6_K -> Q8_0 (a 32-weight block), and F16 when not even 32 divides the row.
  1-D tensors     norms, biases and rope_freqs stay F32 (llama.cpp adds them in f32).
  with imatrix    q4_0's ffn_down on the first eighth of the layers gets Q4_1 (llama.cpp guards those layers so
                  only when an importance matrix is given, so a plain q4_0 stays what it always was).
"""
from __future__ import annotations

from collections.abc import Iterable

DTYPES = ("f16", "bf16", "f32", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0")
QUANTIZED = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0")
_BASE = {"q4_0": "Q4_0", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "q8_0": "Q8_0"}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q6_k": "MOSTLY_Q6_K", "q5_k_m": "MOSTLY_Q5_K_M", "q4_k_m": "MOSTLY_Q4_K_M", "q4_k_s": "MOSTLY_Q4_K_S",
              "q4_0": "MOSTLY_Q4_0"}


def file_type(dtype: str):
    """`general.file_type` for a --dtype."""
    import gguf

    return getattr(gguf.LlamaFileType, _FILE_TYPE[dtype])


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get a larger type in the _m mixes: first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_types(tensors: Iterable[tuple[str, tuple[int, ...]]], dtype: str, n_layer: int,
                 imatrix: bool = False) -> dict[str, object]:
    """{GGUF tensor name: GGMLQuantizationType} for (name, PyTorch shape) pairs in file order; `imatrix`: the
    mix `llama-quantize --imatrix` picks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    tensors = list(tensors)
    tied = not any(name == "output.weight" for name, _ in tensors)
    n_v = sum(_is_attn_v(name) for name, _ in tensors)
    i_v = i_down = 0
    out = {}
    for name, shape in tensors:
        if len(shape) == 1 or dtype == "f32":
            out[name] = Q.F32
            continue
        if dtype in ("f16", "bf16"):
            out[name] = Q.F16 if dtype == "f16" else Q.BF16
            continue
        cols = shape[-1]
        kind = _BASE[dtype]
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if cols % gguf.GGML_QUANT_SIZES[getattr(Q, kind)][0]:
                kind = "Q8_0"
            elif kind != "Q8_0":
                kind = "Q6_K"
        elif _is_attn_v(name):
            if dtype in ("q4_k_m", "q5_k_m") and more_bits(i_v, n_v):
                kind = "Q6_K"
            elif dtype == "q4_k_s" and i_v < 4:
                kind = "Q5_K"
            i_v += 1
        elif "ffn_down" in name:
            if dtype in ("q4_k_m", "q5_k_m") and more_bits(i_down, n_layer):
                kind = "Q6_K"
            elif dtype == "q4_k_s" and i_down < n_layer // 8:
                kind = "Q5_K"
            elif dtype == "q4_0" and imatrix and i_down < n_layer // 8:
                kind = "Q4_1"
            i_down += 1
        out[name] = _fit(getattr(Q, kind), cols)
    return out


def _is_attn_v(name: str) -> bool:
    return "attn_v.weight" in name or "attn_qkv.weight" in name  # llama.cpp counts fused QKV (Phi-3) as attn_v


def _fit(qtype, cols: int):
    import gguf

    Q = gguf.GGMLQuantizationType
    if cols % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = getattr(Q, _FALLBACK.get(qtype.name, qtype.name))
    return qtype if cols % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16
