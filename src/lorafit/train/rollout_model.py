"""The rollout engine: a plain transformers model whose linear weights are the adapter merged into the base.

Why: sampling through PEFT's LoRA wrappers runs, for every decoded token, each wrapped linear as a base
matmul (after a bitsandbytes dequantize on a 4-bit base), two LoRA matmuls, a scale and an add, issued one by
one from Python: 224 wrapped linears at Phi-3-mini size (32 layers x 7), 256 tokens a rollout, and that host
cost was the GRPO step (30.7 s a step on an H200, bench/grpo_bench.py). A merged linear is one matmul.

Once per optimizer step (the LoRA factors change every step) `merged_policy` builds the model's own class on
the meta device and fills it: every LoRA-wrapped linear gets W + scaling * B @ A, with W dequantized from
NF4 where the base is 4-bit, folded in fp32 and cast once to the compute dtype; every other leaf module
(embeddings, norms, rotary tables, lm_head) *is* the training model's module, shared, not copied (a cast
copy only where k-bit preparation upcast it to fp32: see `_in_dtype`). The caller
samples from it and drops it before the loss pass, so the step's peak is the larger of the two, not their sum.

The merged weights round W + BA once to the compute dtype (bf16: 8 mantissa bits); the loss pass scores the
sampled tokens with the adapter model itself, and with one update per rollout the policy ratio is
exp(logp - logp.detach()) = 1, so that rounding only changes which tokens are drawn, as an inference engine's
(vLLM's in TRL) does. No static cache or CUDA graphs (torch.compile's reduce-overhead): graphs record the
weights' addresses and these weights are new every step, so each step would re-record, or one model's storage
would have to stay allocated through the loss pass; and a compile cannot be tried on the GPU from here.
"""
from __future__ import annotations

import copy

import torch
from peft.tuners.lora import LoraLayer

from lorafit.model.load import has_4bit_weight

ADAPTER = "adapter"
MERGED = "merged"


def why_not_merged(model) -> str | None:
    """Why the rollout cannot sample from merged weights (None: it can)."""
    if not (hasattr(model, "get_base_model") and hasattr(model, "peft_config")):
        return "the model is not a PEFT model"
    adapters = model.active_adapters
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters"
    cfg = model.peft_config[adapters[0]]
    if str(getattr(cfg, "peft_type", "")) not in ("LORA", "PeftType.LORA"):
        return f"peft_type {cfg.peft_type} is not LoRA"
    if getattr(cfg, "use_dora", False):
        return "DoRA's magnitude vectors are not merged here"
    if getattr(cfg, "modules_to_save", None):
        return "modules_to_save are trained copies of whole modules"
    for name, m in model.get_base_model().named_modules():
        kind = type(m).__name__
        if kind.startswith("FSDP") or kind == "FullyShardedDataParallel":
            return "FSDP shards the base weights"
        if any(type(p).__name__ == "DTensor" for p in m.parameters(recurse=False)):
            return "FSDP shards the base weights"
        if kind == "Linear8bitLt" or type(getattr(m, "weight", None)).__name__ == "Int8Params":
            return "the 8-bit base (bitsandbytes Linear8bitLt) is not dequantized here"
        if isinstance(m, LoraLayer):
            base = m.get_base_layer()
            if not (isinstance(base, torch.nn.Linear) or type(base).__name__ == "Conv1D"):
                return f"{name} is a LoRA {type(base).__name__}, not a linear layer"
            if getattr(m, "merged", False) or any(getattr(m, "lora_bias", {}).values()):
                return f"{name} is merged already or has a LoRA bias"
    return None


def merged_bytes(model, dtype: torch.dtype) -> int:
    """Bytes the merged weights take: every LoRA-wrapped or 4-bit linear, in `dtype`."""
    lm = model.get_base_model()
    wrapped = [m for m in lm.modules() if isinstance(m, LoraLayer)]
    bases = {id(m.get_base_layer()) for m in wrapped}
    dense = [m.get_base_layer() for m in wrapped]
    dense += [m for m in lm.modules() if has_4bit_weight(m) and id(m) not in bases]
    return sum(m.in_features * m.out_features if hasattr(m, "in_features") else m.weight.numel()
               for m in dense) * dtype.itemsize


def rollout_policy(model, mode: str, dtype: torch.dtype, rows: int, tokens: int):
    """(the model to sample from, MERGED or ADAPTER, why: a few words for the log)."""
    why = "rollout_weights is adapter" if mode == ADAPTER else why_not_merged(model)
    if why is None and next(model.parameters()).device.type == "cuda":
        why = _no_room(model, dtype, rows, tokens)
    if why is not None:
        return model, ADAPTER, why
    try:
        return merged_policy(model, dtype), MERGED, f"W + scaling * B @ A in {str(dtype).removeprefix('torch.')}"
    except Exception as e:  # noqa: BLE001  a model this engine cannot build must still train, on today's path
        return model, ADAPTER, f"building the merged model failed: {type(e).__name__}: {str(e)[:200]}"


def _no_room(model, dtype: torch.dtype, rows: int, tokens: int) -> str | None:
    """Why the merged weights and the KV cache do not fit in the GPU's free memory (None: they do)."""
    device = next(model.parameters()).device
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, reusable
    need = merged_bytes(model, dtype) + kv_cache_bytes(model.get_base_model().config, rows, tokens, dtype)
    if need > 0.9 * free:
        return f"the merged weights and the KV cache ({need / 2**30:.1f} GiB) exceed the free GPU memory " \
               f"({free / 2**30:.1f} GiB)"
    return None


def merged_policy(model, dtype: torch.dtype):
    """A plain model of the PEFT model's class and config: linear weights W + scaling * B @ A in `dtype`,
    every other module shared with `model`. Raises ValueError (AttributeError) when a module cannot be mapped."""
    lm = model.get_base_model()
    adapter = model.active_adapters[0]
    config = copy.deepcopy(lm.config)
    if hasattr(config, "quantization_config"):  # the merged weights are dense; nothing to quantize
        del config.quantization_config
    with torch.device("meta"):
        fresh = type(lm)(config)
    fresh.generation_config = copy.deepcopy(lm.generation_config)
    head = lm.get_output_embeddings()
    for name, leaf in list(fresh.named_modules()):
        if not name or next(leaf.children(), None) is not None:
            continue  # only leaves are filled; their parents (decoder layers, attention) hold no tensors
        src = lm.get_submodule(name)  # AttributeError: a module the training model lacks (falls back)
        if isinstance(src, LoraLayer):
            _fill(leaf, _merged_weight(src, adapter, dtype), src.get_base_layer())
        elif has_4bit_weight(src):  # a quantized linear without LoRA: dequantized once
            _fill(leaf, _dense_weight(src).to(dtype), src)
        elif type(src) is type(leaf):
            fresh.set_submodule(name, src if src is head else _in_dtype(src, leaf, dtype))
        else:
            raise ValueError(f"{name} is a {type(src).__name__} in the training model, a {type(leaf).__name__} here")
    left = [n for n, t in (*fresh.named_parameters(), *fresh.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"nothing to fill {left[0]} with")
    return fresh.eval()


def _in_dtype(src, leaf, dtype: torch.dtype):
    """`src` itself when its floating parameters are in `dtype`, else `leaf` filled with `dtype` copies of them.

    peft's k-bit preparation upcasts a 4-bit base's norms and embeddings to fp32 for training; shared as they are,
    they would carry the rollout's residual stream, and so its KV cache, in fp32: 16 GB instead of 8 at 64 rows
    of 320 tokens of Phi-3-mini. They were bf16 before the upcast, so the copies are exact; they cost the
    embedding in bf16 (0.2 GB there). The head stays shared: autocast casts its weight per call, and its output
    is the logits, which generate takes in fp32."""
    params = src._parameters
    if all(p is None or not p.is_floating_point() or p.dtype == dtype for p in params.values()):
        return src
    for key, p in params.items():
        leaf._parameters[key] = None if p is None else torch.nn.Parameter(
            p.detach().to(dtype) if p.is_floating_point() else p.detach(), requires_grad=False)
    leaf._buffers.update(src._buffers)
    return leaf


def _fill(leaf, weight: torch.Tensor, base) -> None:
    if tuple(weight.shape) != tuple(leaf.weight.shape):
        raise ValueError(f"a merged weight of shape {tuple(weight.shape)} for a {tuple(leaf.weight.shape)} layer")
    leaf.weight = torch.nn.Parameter(weight, requires_grad=False)
    if getattr(leaf, "bias", None) is not None:
        leaf.bias = base.bias  # the training model's own bias (trained when lora_bias is all / lora_only)


def _merged_weight(layer, adapter: str, dtype: torch.dtype) -> torch.Tensor:
    """W + scaling * B @ A, summed in fp32 (peft's get_delta_weight: fan_in_fan_out and rsLoRA scaling). Autocast
    is off: the rollout runs under it, and it would round B @ A to bf16 before the sum."""
    device = layer.lora_B[adapter].weight.device
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        w = _dense_weight(layer.get_base_layer())
        return (w.float() + layer.get_delta_weight(adapter).float()).to(dtype)


def _dense_weight(base) -> torch.Tensor:
    """The base weight as a dense tensor: dequantized from NF4/FP4 on a 4-bit base (in its compute dtype)."""
    if not has_4bit_weight(base):
        return base.weight.detach()
    import bitsandbytes.functional as bnbf  # noqa: PLC0415  optional: only 4-bit runs have it

    return bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)


def kv_cache_bytes(config, rows: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a full-attention KV cache of `rows` sequences of `tokens` (what generate allocates either way)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, heads = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "num_attention_heads", 1) or 1
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // heads
    return 2 * layers * kv * head_dim * rows * tokens * dtype.itemsize
