"""Fully sharded data parallel (torch's FSDP2, `fully_shard`) for LoRA on a base that does not fit one GPU.

On with `--fsdp true` under torchrun, or by itself under `accelerate launch --use_fsdp` (which exports
ACCELERATE_USE_FSDP=true and FSDP_* settings, read here). Each rank loads the model on its CPU; then every
decoder layer, and the rest (embeddings, final norm, head) as the root unit, is cut into 1/W pieces on the
rank's device. Base weights, LoRA weights, their gradients and AdamW state are all sharded; a layer's
weights are gathered just for its forward and backward. LoRA master weights stay float32: weights are
gathered in the compute dtype and gradients reduced in float32 (`MixedPrecisionPolicy`).

A 4-bit (QLoRA) base is sharded the same way: bitsandbytes packs each NF4 weight into a flat (n, 1) tensor,
stored here in the compute dtype (`bnb_4bit_quant_storage`, 4 codes per bf16 element) so that every parameter
of a unit has one dtype and FSDP flattens and cuts it like any other; the gathered bytes are the packed weight
again. Each weight's quant_state (absmax, code, the nested double-quant state) is not a parameter: it stays
whole on every rank, on the Linear4bit module, where bitsandbytes' forward finds it (about 1/32 of the packed
weights' bytes with double quantization).

What leaves a rank is whole: the adapter is gathered (LoRA tensors only, never the base) and written by
rank 0 in PEFT's format, and a checkpoint's optimizer state is gathered into the same index-keyed
`optimizer.state_dict()` a single process writes, so checkpoints move between FSDP, DDP and one process,
on any number of ranks.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist

from lorafit.config.checks import check_fsdp
from lorafit.errors import ConfigError, UserError
from lorafit.model.load import base_from_state_dict, is_4bit_linear, load_base_model

if TYPE_CHECKING:
    from lorafit.config.schema import Config
    from lorafit.train.parallel import Dist

log = logging.getLogger("lorafit")

# accelerate's FSDP settings (accelerate/utils/launch.py) that lorafit does not follow, and why.
_IGNORED = {
    "FSDP_STATE_DICT_TYPE": "the adapter is always saved whole, in PEFT's format",
    "FSDP_BACKWARD_PREFETCH": "FSDP2 prefetches the next layer by itself",
}


@dataclass
class Settings:
    source: str
    """What switched FSDP on: --fsdp true, or accelerate launch --use_fsdp."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (FULL_SHARD); false keeps them to backward."""
    offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in CPU memory (FSDP_OFFLOAD_PARAMS)."""
    layer_classes: list[str] = field(default_factory=list)
    """Module classes that become their own unit; empty: the model's own decoder layer (`_no_split_modules`)."""
    no_wrap: bool = False
    """FSDP_AUTO_WRAP_POLICY=NO_WRAP: the whole model is one unit."""
    activation_checkpointing: bool = False
    """FSDP_ACTIVATION_CHECKPOINTING=true: recompute each layer's activations in backward."""
    rank0_loads: bool = False
    """FSDP_CPU_RAM_EFFICIENT_LOADING=true (accelerate's default): transformers reads the weights on rank 0 only."""
    notes: list[str] = field(default_factory=list)
    """accelerate settings used and ignored, for the log."""


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes", "on")


def offload_requested(cfg: Config | None = None, env: dict[str, str] | None = None) -> bool:
    """--fsdp_offload true, or accelerate launch --use_fsdp --fsdp_offload_params true (known before the process
    group starts: offloaded shards need gloo beside nccl)."""
    env = os.environ if env is None else env
    return bool(cfg is not None and cfg.train.fsdp_offload) or (
        _true(env.get("ACCELERATE_USE_FSDP")) and _true(env.get("FSDP_OFFLOAD_PARAMS")))


def one_process_group(cfg: Config, env: dict[str, str] | None = None) -> bool:
    """`torchrun --nproc_per_node 1 ... --fsdp true`: FSDP over one process, which needs a process group of one.
    Nothing is cut, but every step of the sharded path runs (the gathers, the reduce in float32, CPU offload, the
    4-bit base packed in the compute dtype), so one GPU can check what the multi-GPU runs depend on."""
    env = os.environ if env is None else env
    return cfg.train.fsdp and env.get("WORLD_SIZE") == "1" and "MASTER_ADDR" in env


def settings(cfg: Config, d: Dist, env: dict[str, str] | None = None) -> Settings | None:
    """FSDP's settings when it is on (`--fsdp true`, or accelerate's FSDP launcher), else None."""

    env = os.environ if env is None else env
    accelerate = _true(env.get("ACCELERATE_USE_FSDP"))
    if not (cfg.train.fsdp or accelerate):
        if cfg.train.fsdp_offload:
            raise ConfigError("'fsdp_offload' is on but FSDP is not", fix="add --fsdp true, or drop --fsdp_offload")
        return None
    source = "--fsdp true" if cfg.train.fsdp else "accelerate launch --use_fsdp (ACCELERATE_USE_FSDP=true)"
    if not cfg.train.fsdp:
        check_fsdp(cfg, source)  # --fsdp true was checked with the rest of the config
    if d.world_size == 1 and not one_process_group(cfg, env):
        log.info("fsdp: one process has nothing to shard; training unsharded")
        return None
    s = Settings(source, offload=cfg.train.fsdp_offload)
    if accelerate:
        _read_accelerate(s, env)
    if s.offload and d.device.type == "cpu":
        s.offload = False
        s.notes.append("CPU offload off: the shards already live in CPU memory")
    return s


def _read_accelerate(s: Settings, env: dict[str, str]) -> None:
    used = []
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD")
    if reshard:  # FSDP2 takes true/false; FSDP1 names a strategy
        s.reshard_after_forward = reshard.strip().upper() in ("TRUE", "1", "FULL_SHARD", "HYBRID_SHARD")
        used.append(f"FSDP_RESHARD_AFTER_FORWARD={reshard}")
    if "FSDP_OFFLOAD_PARAMS" in env:
        s.offload = s.offload or _true(env["FSDP_OFFLOAD_PARAMS"])
        used.append(f"FSDP_OFFLOAD_PARAMS={env['FSDP_OFFLOAD_PARAMS']}")
    policy = (env.get("FSDP_AUTO_WRAP_POLICY") or "").strip().upper()
    if policy == "NO_WRAP":
        s.no_wrap = True
        used.append("FSDP_AUTO_WRAP_POLICY=NO_WRAP")
    elif policy == "SIZE_BASED_WRAP":
        s.notes.append("FSDP_AUTO_WRAP_POLICY=SIZE_BASED_WRAP ignored: each decoder layer is a unit")
    classes = [c.strip() for c in (env.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or "").split(",") if c.strip()]
    if classes and not s.no_wrap:
        s.layer_classes = classes
        used.append(f"FSDP_TRANSFORMER_CLS_TO_WRAP={','.join(classes)}")
    if _true(env.get("FSDP_CPU_RAM_EFFICIENT_LOADING")):
        s.rank0_loads = True
        used.append("FSDP_CPU_RAM_EFFICIENT_LOADING=true (rank 0 reads the base, then sends it)")
    if _true(env.get("FSDP_ACTIVATION_CHECKPOINTING")):
        s.activation_checkpointing = True
        used.append("FSDP_ACTIVATION_CHECKPOINTING=true (gradient_checkpointing on)")
    if env.get("FSDP_VERSION", "2").strip() != "2":
        s.notes.append(f"FSDP_VERSION={env['FSDP_VERSION']} ignored: lorafit always uses FSDP2 (fully_shard)")
    s.notes += [f"{k} ignored: {_IGNORED[k]}" for k in _IGNORED if env.get(k)]
    s.notes.insert(0, f"accelerate settings used: {', '.join(used) or 'none'}")


def sync_from_rank0(model, d: Dist) -> None:
    """Rank 0's weights to every rank (accelerate's sync_module_states). Under accelerate's CPU-RAM-efficient
    loading, transformers reads the checkpoint on (local) rank 0 only and fills the other ranks' weights with
    zeros, expecting them to be sent before training; sharding the zeros would train on a broken base."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            buf = t.data.to(d.device)  # nccl sends from the GPU; gloo from the CPU tensor itself
            tdist.broadcast(buf, src=0)
            if buf is not t.data:
                t.data.copy_(buf)


def load_base(cfg: Config, d: Dist, s: Settings, dtype: torch.dtype, source):
    """The frozen base on this rank before sharding. bf16: on the CPU, and fully_shard moves each rank's shard to
    its device. 4-bit: quantized on the rank's GPU by bitsandbytes' CUDA quantizer, packed in `dtype`, so each GPU
    holds the whole 4-bit base until fully_shard cuts it; with CPU offload, which is asked for to spare GPU memory,
    on the CPU instead (its quantizer: a 4096 x 14336 weight in 7.6 s on 2 busy cores, 8M parameters/s, which
    would be ~17 min for 8B). Under rank0_loads only rank 0 reads the files; the others receive what it loaded."""
    if not cfg.model.load_in_4bit:
        base = load_base_model(cfg, torch.device("cpu"), source)
        if s.rank0_loads:
            sync_from_rank0(base, d)
        return base
    where = torch.device("cpu") if s.offload else d.device
    if not s.rank0_loads:
        return load_base_model(cfg, where, source, quant_storage=dtype)
    base = load_base_model(cfg, where, source, quant_storage=dtype) if d.main else None
    return share_base(cfg, base, d, where)


def share_base(cfg: Config, base, d: Dist, where: torch.device):
    """Rank 0's loaded base to every rank, `state_dict()` tensor by tensor (for a 4-bit model that includes each
    weight's quant_state, serialized by bitsandbytes), rebuilt on the other ranks, on `where`, by transformers'
    loader of pre-quantized weights. transformers' own rank-0-only loading (FSDP_CPU_RAM_EFFICIENT_LOADING) skips
    quantized models, so without this every rank would read and quantize the whole checkpoint."""
    state = base.state_dict() if d.main else {}
    head = [(type(base), base.config, [(k, tuple(v.shape), v.dtype) for k, v in state.items()])] if d.main else [None]
    tdist.broadcast_object_list(head, src=0, device=d.device if d.device.type == "cuda" else None)
    model_class, config, manifest = head[0]
    received = {}
    for key, shape, dtype in manifest:  # through d.device: nccl sends from the GPU, gloo from the CPU
        buf = state[key].to(d.device) if d.main else torch.empty(shape, dtype=dtype, device=d.device)
        tdist.broadcast(buf, src=0)
        received[key] = buf.to(where)
    return base if d.main else base_from_state_dict(cfg, model_class, config, received, where)


def _ready_4bit(model, device: torch.device) -> tuple[int, int]:
    """Each Linear4bit's quant_state onto `device` (fully_shard moves parameters and buffers only); returns
    (weights, quant_state bytes). On the CPU, bitsandbytes' forward repacks weight.data in place for avx512-bf16
    inference the first time it runs without gradients (validation) and marks the shared quant_state so; under
    FSDP weight.data is a gathered copy, so the next gather would be read in the wrong layout: kept off."""
    n = nbytes = 0
    for m in model.modules():
        if not is_4bit_linear(m):
            continue
        qs = m.quant_state
        if qs is None:
            raise UserError(f"the 4-bit layer {type(m).__name__} holds no quant_state to shard with",
                            fix="load the base through lorafit (transformers + bitsandbytes), not a converted copy")
        qs.to(device)
        m.support_avx512bf16_for_cpu = False
        n += 1
        nbytes += sum(t.numel() * t.element_size() for t in (qs.absmax, qs.code, getattr(qs.state2, "absmax", None),
                                                             getattr(qs.state2, "code", None)) if t is not None)
    return n, nbytes


def wrap(loss_module: torch.nn.Module, model, d: Dist, s: Settings, dtype: torch.dtype) \
        -> tuple[torch.nn.Module, list[str]]:
    """Shard `model` in place, one unit per decoder layer, and `loss_module` (which holds it) as the root.

    The root is the LossModule, not the model: the reference loss calls the decoder and the head
    separately, so only the LossModule's forward is sure to gather the root's weights (embeddings, head).
    Returns the module to call and lines for the log.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    classes = s.layer_classes or list(getattr(base, "_no_split_modules", None) or [])
    layers = [] if s.no_wrap else [m for m in model.modules() if type(m).__name__ in classes]
    if not layers and not s.no_wrap:
        raise UserError(f"FSDP found no layer of class {', '.join(classes) or '(none named by the model)'} to shard",
                        fix="name the decoder layer class with accelerate's --fsdp_transformer_layer_cls_to_wrap")
    n4, qbytes = _ready_4bit(model, d.device)
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    kw = {"mesh": mesh, "mp_policy": mp, "offload_policy": CPUOffloadPolicy() if s.offload else OffloadPolicy()}
    for layer in layers:
        fully_shard(layer, reshard_after_forward=s.reshard_after_forward, **kw)
    fully_shard(loss_module, reshard_after_forward=False, **kw)  # the root is gathered again at once for backward
    what = f"{len(layers)} x {type(layers[0]).__name__.removeprefix('FSDP')} + root" if layers else "one unit"
    procs = f"{d.world_size} processes" if d.world_size > 1 else "1 process (nothing cut: a check of the sharded path)"
    line = (f"fsdp: FSDP2 over {procs} ({s.source}); units: {what}; weights gathered in "
            f"{str(dtype).removeprefix('torch.')}, gradients reduced in float32; reshard_after_forward "
            f"{str(s.reshard_after_forward).lower()}; CPU offload {'on' if s.offload else 'off'}")
    lines = [line] + (["fsdp: " + "; ".join(s.notes)] if s.notes else [])
    if n4:
        storage = next(m.weight.dtype for m in model.modules() if is_4bit_linear(m))
        lines.append(f"fsdp: 4-bit base: {n4} NF4 weights sharded packed in {str(storage).removeprefix('torch.')} "
                     f"(bnb_4bit_quant_storage); their quant_state stays whole on each rank "
                     f"({qbytes / 2**20:.1f} MiB)")
    if d.device.type == "cuda":  # the base was whole on this GPU until fully_shard cut it: that peak is loading's
        lines.append(f"fsdp: peak while loading {torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB on "
                     f"rank {d.rank}'s GPU; training's peak is counted from the sharded model on")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d.device)
    return loss_module, lines


@contextmanager
def no_sync(module):
    """FSDP2's counterpart of DDP's no_sync(): keep this micro-step's gradients local, reduce on the last one."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _whole(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The full tensor on the CPU (a collective for a sharded one: every rank calls it); None where not `keep`."""
    full = t
    if is_sharded(t):
        full = t.full_tensor()  # a CPU-offloaded shard gathers over gloo (distributed.setup's cpu_collectives)
    return full.detach().cpu() if keep else None


def adapter_state(model, keep: bool) -> dict[str, torch.Tensor]:
    """The trainable tensors (LoRA, and biases when trained), whole, keyed as `model.state_dict()` keys them;
    the frozen base is never gathered. A collective: every rank calls it, ranks without `keep` get {}."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = _whole(p, keep)
            if keep:
                out[name] = full
    return out


def optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any] | None:
    """`optimizer.state_dict()` with every sharded tensor gathered whole: the layout one process writes."""
    sd = optimizer.state_dict()
    state = {i: {k: _whole(v, keep) if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return {**sd, "state": state} if keep else None


def _piece(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of the whole tensor `full`, sharded as the parameter `p` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    local = p.to_local()
    piece = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    return DTensor.from_local(piece.to(local.device), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def load_adapter_state(model, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy adapter tensors in PEFT's file layout into `model`, sharded or not; returns the unknown keys."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not any(is_sharded(p) for p in trainable.values()):
        result = set_peft_model_state_dict(model, weights)
        return list(getattr(result, "unexpected_keys", None) or [])
    # PEFT's own key mapping (adapter name dropped), applied to the parameters themselves
    by_key = {key: p for key, p in get_peft_model_state_dict(model, state_dict=trainable).items()}
    with torch.no_grad():
        for key, w in weights.items():
            if key in by_key:
                p = by_key[key]
                p.to_local().copy_(_piece(w.to(p.dtype), p).to_local())
    return [k for k in weights if k not in by_key]


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of a whole state: cut each tensor shaped like its sharded parameter to this rank's
    piece."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            st = optimizer.state.get(p, {})
            for k, v in list(st.items()):
                if torch.is_tensor(v) and not is_sharded(v) and v.shape == p.shape:
                    st[k] = _piece(v, p)
