"""Per-architecture facts for GGUF export: llama.cpp's architecture name, hyperparameter keys, tensor names
and the one layout change (the rotary permutation of Llama's Q/K rows).

Key and tensor names follow llama.cpp's `convert_hf_to_gguf.py` and the `gguf` package's `TensorNameMap`,
which is what both llama.cpp and transformers' GGUF loader read.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lorafit.errors import UserError
from lorafit.model.arch import FAMILIES


@dataclass(frozen=True)
class ArchSpec:
    hf_type: str
    """`model_type` in config.json."""
    gguf_arch: str
    """llama.cpp's `general.architecture`."""
    permute_qk: bool
    """llama.cpp runs Llama's rope on adjacent pairs; HF stores Q/K rows rotate-half, so they get permuted.
    qwen2 and phi3 use llama.cpp's NEOX rope, which is rotate-half already."""


ARCHS = {f.model_type: ArchSpec(f.model_type, f.gguf_arch, f.permute_qk) for f in FAMILIES.values() if f.gguf_arch}


@dataclass
class TensorPlan:
    """One tensor of the GGUF file: where it comes from and how it is reshaped on the way."""

    name: str
    """GGUF tensor name, e.g. blk.0.attn_q.weight."""
    source: str | None
    """Safetensors key it comes from; None for computed tensors (rope_freqs)."""
    shape: tuple[int, ...]
    """Shape in PyTorch order (rows, cols)."""
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Layout change applied to the float32 source (same shape out)."""
    value: torch.Tensor | None = None
    """The tensor itself, for computed tensors."""
    inverse: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Undoes `transform` (the file's tensor back in the HF model's layout)."""


def arch_for(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UserError(f"GGUF export does not support the '{model_type}' architecture",
                        fix=f"supported: {', '.join(sorted(ARCHS))} (SmolLM2, TinyLlama, Llama 2/3, Mistral, "
                            "Qwen2/2.5, Phi-3); merge with `lorafit merge` and convert with llama.cpp for others")
    return ARCHS[model_type]


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_params(config: Any) -> dict[str, Any]:
    """Rope settings across transformers versions: v5 keeps them in `rope_parameters`, v4 in `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def add_hparams(writer: Any, config: Any, spec: ArchSpec) -> None:
    """The `{arch}.*` keys llama.cpp reads to build the graph."""
    rope = rope_params(config)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    dim = head_dim(config)
    rotary = int(dim * float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0)))
    writer.add_rope_dimension_count(rotary)
    if dim != config.hidden_size // n_head:  # e.g. Mistral-Nemo: head_dim 128 with hidden 5120 / 32 heads
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if spec.gguf_arch == "phi3":
        orig = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(orig)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
    _add_rope_scaling(writer, rope)


def _add_rope_scaling(writer: Any, rope: dict[str, Any]) -> None:
    import gguf

    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3 travels as the rope_freqs tensor (see _llama3_rope_freqs)
        raise UserError(f"GGUF export does not support rope scaling '{kind}'",
                        fix="supported rope types: default, linear, yarn, llama3")


def folder_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """{safetensors key: shape} of a model folder, read from the headers only."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def tensor_plans(config: Any, spec: ArchSpec, shapes: dict[str, tuple[int, ...]]) -> list[TensorPlan]:
    """Every GGUF tensor, in llama.cpp's order, from the safetensors keys and shapes of a merged folder."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == spec.gguf_arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    plans = []
    for key, shape in shapes.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; recomputed by every runtime
            continue
        stem, _, suffix = key.rpartition(".")
        gguf_name = names.get_name(stem)
        if gguf_name is None or suffix not in ("weight", "bias"):
            raise UserError(f"tensor '{key}' has no GGUF equivalent for the {spec.hf_type} architecture",
                            fix="the folder may hold an unmerged adapter or extra heads; export a plain merged "
                                "causal LM (`lorafit merge`)")
        transform = inverse = None
        heads = n_head if gguf_name.endswith(".attn_q") else n_kv if gguf_name.endswith(".attn_k") else None
        if spec.permute_qk and heads:
            transform, inverse = partial(rope_interleave, n_head=heads), partial(rope_deinterleave, n_head=heads)
        plans.append(TensorPlan(f"{gguf_name}.{suffix}", key, tuple(shape), transform, inverse=inverse))
    if "lm_head.weight" in shapes and getattr(config, "tie_word_embeddings", False):
        plans = [p for p in plans if p.source != "lm_head.weight"]  # tied: llama.cpp reuses token_embd
    freqs = _llama3_rope_freqs(config)
    if freqs is not None:
        plans.insert(0, TensorPlan("rope_freqs.weight", None, tuple(freqs.shape), value=freqs))
    plans.sort(key=_order)
    return plans


def _order(plan: TensorPlan) -> tuple[int, int, str]:
    """Global tensors first, then blocks in numeric order (llama.cpp does not need it; people reading dumps do)."""
    parts = plan.name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), plan.name)
    return (0 if parts[0] != "output_norm" and parts[0] != "output" else 2, 0, plan.name)


def rope_interleave(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's pairwise rows, per head.

    HF orders each head's rows as (x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}) and rotates x_i with y_i; llama.cpp's
    LLAMA rope rotates rows 2i and 2i+1. Interleaving the two halves makes both compute the same product.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_deinterleave(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `rope_interleave` (what transformers' GGUF loader does on the way back)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama3_rope_freqs(config: Any) -> torch.Tensor | None:
    """Llama 3.1+ frequency scaling as llama.cpp's `rope_freqs` tensor: one divisor per rotary frequency.

    From Meta's reference `apply_scaling`: high frequencies (short wavelengths) are kept, low ones divided by
    `factor`, and the band between is blended smoothly.
    """
    rope = rope_params(config)
    if rope["rope_type"] != "llama3":
        return None
    base, dim = float(rope["rope_theta"]), head_dim(config)
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    divisors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high_wavelen:
            divisors.append(1.0)
        elif wavelen > low_wavelen:
            divisors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32)
