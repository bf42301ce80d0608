"""One table of model families: what lorafit knows about each architecture, in one place.

LoRA presets and the Llama-layout names each family renames or fuses, whether its logits are a plain
linear map of the decoder output (so the loss can run the head on labelled tokens only), whether the
fused kernels (train/fast.py) handle its layer layout, and its llama.cpp architecture for GGUF export.
`fused_path_choice` is the one rule for "will training run the fused kernels", used before the model is
wrapped (k-bit preparation) and when the loss path is picked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lorafit.config.schema import Config
from lorafit.errors import ConfigError

_LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    model_type: str
    """`model_type` in config.json."""
    attention: tuple[str, ...] = _LLAMA_ATTENTION
    """The `attention` LoRA preset: leaf names of the attention projections."""
    mlp: tuple[str, ...] = _LLAMA_MLP
    """The `mlp` LoRA preset."""
    renames: dict[str, str] = field(default_factory=dict)
    """Llama-layout names (what recipes write) mapped onto this family's fused or renamed layers."""
    plain_head: bool = False
    """Logits are exactly lm_head(decoder output): no soft-capping or logit scale."""
    fused_path: bool = False
    """train/fast.py's fused kernels handle this layer layout."""
    gguf_arch: str | None = None
    """llama.cpp's `general.architecture`; None: no GGUF export."""
    permute_qk: bool = False
    """GGUF: llama.cpp runs this rope on adjacent pairs, HF stores Q/K rotate-half, so Q/K rows are permuted."""


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", plain_head=True, fused_path=True, gguf_arch="llama", permute_qk=True),
    Family("mistral", plain_head=True, fused_path=True, gguf_arch="llama", permute_qk=True),  # llama.cpp: llama
    Family("qwen2", plain_head=True, fused_path=True, gguf_arch="qwen2"),
    Family("qwen3", plain_head=True),
    Family("gemma", plain_head=True),
    Family("gemma2"),  # soft-caps its logits
    Family("mixtral", mlp=("w1", "w2", "w3"), plain_head=True),
    Family("phi3", attention=("qkv_proj", "o_proj"), mlp=("gate_up_proj", "down_proj"), plain_head=True,
           fused_path=True, gguf_arch="phi3",
           renames={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}),
    Family("phi", attention=("q_proj", "k_proj", "v_proj", "dense"), mlp=("fc1", "fc2"), plain_head=True,
           renames={"o_proj": "dense", "up_proj": "fc1", "down_proj": "fc2"}),
    Family("gpt2", attention=("c_attn", "c_proj"), mlp=("c_fc",)),
)}


def family(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type or "")


def decoder_and_head(model):
    """(decoder, lm_head) of a causal LM whose logits are a plain linear map, else None."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    fam = family(getattr(lm.config, "model_type", None))
    if not (fam and fam.plain_head) or not hasattr(lm, "get_decoder"):
        return None
    return lm.get_decoder(), lm.get_output_embeddings()


def fused_families() -> list[str]:
    return [name for name, f in FAMILIES.items() if f.fused_path]


def fused_path_choice(cfg: Config, model_type: str | None, *, fsdp: bool, cuda: bool) -> tuple[bool, str]:
    """(fused, why): whether training runs lorafit's fused kernels, from the config and the architecture.

    `--fast_kernels on` with a setting the kernels cannot serve is a config error; `auto` falls back to the
    reference path and says why. train/fast.py's `fast_forward_supported` then checks the wrapped model itself.
    """
    mode = cfg.model.fast_kernels
    if mode == "off":
        return False, "fast_kernels off"
    if cfg.train.method == "grpo":
        return False, "GRPO's per-token log-probs come from the model's own forward"
    why_not = None
    if fsdp:
        why_not = "the fused kernels read whole base weights, which FSDP shards"
    elif cfg.model.load_in_8bit:
        why_not = "the fused kernels read NF4 (4-bit) or 16-bit base weights, not bitsandbytes' 8-bit ones"
    elif not (family(model_type) and family(model_type).fused_path):
        why_not = f"model_type {model_type!r} has no fused path (supported: {', '.join(fused_families())})"
    if why_not and mode == "on":
        raise ConfigError(f"fast_kernels on cannot run here: {why_not}",
                          fix="use --fast_kernels auto (the reference path) or off")
    if why_not:
        return False, f"fast_kernels auto uses the reference path: {why_not}"
    if mode == "auto" and not cuda:
        return False, "no CUDA GPU, so fast_kernels auto uses the reference path"
    if cfg.train.method in ("dpo", "kto") and cfg.train.ref_adapter:
        return True, "fused LoRA kernels; the --ref_adapter reference runs the model's own forward"
    return True, "fused LoRA kernels"
