"""The QLoRA training fast path: one decoder forward written for training, over the PeftModel's
own tensors (nothing is copied or patched; the optimizer and PEFT's save_pretrained see the
same lora_A / lora_B parameters).

Per decoder layer: fused residual-add + RMSNorm, one fused LoRA product for q/k/v (or phi3's
qkv_proj) over the dequantized NF4 base, Triton RoPE, flash attention (varlen for packed rows),
one fused LoRA product for o, gate/up and down each, Triton SwiGLU; each layer but the last
checkpointed with its input, attention output, mid-layer residual and low-rank activations
parked in pinned CPU memory, the last checkpointed layer's on the GPU (its backward comes first); the
recomputation then skips the attention forward, the o and down products and the x @ A^T products;
LoRA dropout masks hashed from a per-pass seed (kernels/dropout.py),
so the recomputation and the backward draw them again without generator state; a chunked linear +
cross-entropy over the labelled tokens only: summed (SFT), or per token and summed per sequence (DPO,
ORPO, KTO: a pair's chosen and rejected are documents of one padding-free row). The preference
objectives' reference is the same stack with the LoRA products left out (the same base weights, no
copy), which PEFT's disable_adapter() cannot switch off here: these products read lora_A / lora_B
themselves.
With fp8_base backward, the base's input-gradient products run on fp8 tensor cores over row-wise scales
(kernels/fp8.py); with all, its forward and recomputation products too; the LoRA terms, attention, norms and the
loss keep the compute dtype.
On CPU (the test suite) the same code runs the plain-PyTorch twins.

Supported: llama, mistral, qwen2, phi3 with plain LoRA (no DoRA, one adapter). Anything else
falls back to the model's own forward, with one log line saying why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from lorafit.data.records import IGNORE_INDEX
from lorafit.errors import UserError
from lorafit.kernels import reference
from lorafit.kernels.attention import attention, attention_keeping, attention_replay, packed_plan, uniform_rows
from lorafit.kernels.lora import FactorPack, Fp8, Group, Head, WeightBuffer, lora_group
from lorafit.kernels.offload import ActivationStore, checkpoint
from lorafit.model.arch import family, fused_families
from lorafit.model.load import has_4bit_weight

# ---------------------------------------------------------------- support check

def _lora_layer_cls():
    from peft.tuners.lora import LoraLayer
    return LoraLayer


def fast_forward_supported(model) -> tuple[bool, str]:
    """(ok, reason): whether enable_fast_path can run this PeftModel's forward itself."""
    try:
        base = model.get_base_model()
    except AttributeError:
        return False, "not a PeftModel"
    cfg = base.config
    mt = getattr(cfg, "model_type", None)
    if not (family(mt) and family(mt).fused_path):
        return False, f"model_type {mt!r} has no fast path (supported: {', '.join(fused_families())})"
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        return False, f"hidden_act {cfg.hidden_act!r} is not SiLU"
    for name in ("attention_dropout", "resid_pdrop", "embd_pdrop"):
        if float(getattr(cfg, name, 0.0) or 0.0) > 0:
            return False, f"config.{name} > 0"
    adapters = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", "default")]
    if len(adapters) != 1:
        return False, "more than one active adapter"
    lora_cls = _lora_layer_cls()
    for name, mod in base.named_modules():
        if not isinstance(mod, lora_cls):
            continue
        a = adapters[0]
        if getattr(mod, "merged", False) or getattr(mod, "disable_adapters", False):
            return False, f"{name}: adapter merged or disabled"
        if mod.use_dora.get(a, False):
            return False, f"{name}: DoRA"
        if getattr(mod, "lora_bias", {}).get(a, False):
            return False, f"{name}: lora_bias"
        if a not in mod.lora_A or not isinstance(mod.lora_A[a], torch.nn.Linear):
            return False, f"{name}: not a linear LoRA layer"
        if type(mod.base_layer).__name__ == "Linear8bitLt":
            return False, f"{name}: an 8-bit base layer (the kernels read NF4 or 16-bit weights)"
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "embed_tokens"):
            return False, f"{name}: LoRA on {leaf}"
    try:
        _build_layers(base, adapters[0], torch.bfloat16)
    except (AttributeError, TypeError, ValueError) as e:
        return False, f"unexpected module layout: {e}"
    if base.lm_head.weight.requires_grad or getattr(base.lm_head, "bias", None) is not None:
        return False, "lm_head is trainable or has a bias"
    return True, "ok"


# ---------------------------------------------------------------- model description

class _Dequant:
    """Callable giving a frozen base weight (out, in) in the compute dtype, into `out` if given."""

    def __init__(self, layer, dtype):
        self.layer, self.dtype = layer, dtype
        self.nf4 = None
        self._amax = None

    def _kernel(self):
        """The Triton NF4 decoder of a CUDA NF4 weight (kernels/nf4.py), else None."""
        w = self.layer.weight
        if not (has_4bit_weight(self.layer) and w.is_cuda and w.quant_state.quant_type == "nf4"):
            return None
        if self.nf4 is None or self.nf4.packed.data_ptr() != w.data_ptr():
            from lorafit.kernels.nf4 import NF4Weight
            self.nf4 = NF4Weight(w.data, w.quant_state)
        return self.nf4

    def amax(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(absolute max of each row, of each column) of the weight, float32, computed once (the base is frozen):
        the scales of its fp8 operands."""
        if self._amax is None:
            nf4 = self._kernel()
            w = nf4(torch.empty(nf4.shape, dtype=torch.float32, device=nf4.packed.device)) if nf4 is not None \
                else self(None).float()
            w = w.abs()
            self._amax = (w.amax(1), w.amax(0))
        return self._amax

    def fp8(self, out, inv, transposed: bool):
        """The weight in e4m3 into `out`: rows times inv (out,), or transposed (in, out) with columns times inv
        (in,); NF4 on CUDA decodes straight to e4m3 (kernels/fp8.py)."""
        nf4 = self._kernel()
        if nf4 is None:
            return reference.fp8_weight(self(None), inv, transposed, out)
        import lorafit.kernels.fp8 as fp8
        return (fp8.nf4_cols if transposed else fp8.nf4_rows)(nf4, inv, out)

    def __call__(self, out):
        w = self.layer.weight
        if has_4bit_weight(self.layer):
            qs = w.quant_state
            if qs.dtype == self.dtype and self._kernel() is not None:
                return self.nf4(out)
            import bitsandbytes.functional as bnbf
            if out is not None and w.is_cuda and qs.dtype == out.dtype:
                return bnbf.dequantize_4bit(w.data, qs, out=out)
            full = bnbf.dequantize_4bit(w.data, qs).to(self.dtype)
        else:
            full = w if w.dtype == self.dtype else w.to(self.dtype)
        if out is None:
            return full
        return out.copy_(full)


def _head(mod, adapter: str, dtype, salt: int = 0) -> Head:
    lora_cls = _lora_layer_cls()
    if isinstance(mod, lora_cls):
        base = mod.get_base_layer()
        drop = mod.lora_dropout[adapter]
        return Head(out_features=base.out_features, dequant=_Dequant(base, dtype), bias=base.bias,
                    lora_A=mod.lora_A[adapter].weight, lora_B=mod.lora_B[adapter].weight,
                    scaling=float(mod.scaling[adapter]),
                    dropout=float(drop.p) if isinstance(drop, torch.nn.Dropout) else 0.0, salt=salt)
    if not isinstance(mod, torch.nn.Linear) and not has_4bit_weight(mod):
        raise TypeError(f"{type(mod).__name__} is not a linear layer")
    return Head(out_features=mod.out_features, dequant=_Dequant(mod, dtype), bias=mod.bias)


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    qkv: Group
    o: Group
    gate_up: Group
    down: Group

    @property
    def groups(self) -> tuple[Group, ...]:
        return (self.qkv, self.o, self.gate_up, self.down)


def _build_layers(base, adapter: str, dtype) -> list[_Layer]:
    layers = []
    for i, blk in enumerate(base.model.layers):
        att, mlp = blk.self_attn, blk.mlp
        qkv = [att.qkv_proj] if hasattr(att, "qkv_proj") else [att.q_proj, att.k_proj, att.v_proj]
        gu = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
        eps = getattr(blk.input_layernorm, "variance_epsilon", None) or blk.input_layernorm.eps
        layers.append(_Layer(ln1=blk.input_layernorm.weight, ln2=blk.post_attention_layernorm.weight, eps=float(eps),
                             qkv=Group([_head(m, adapter, dtype, 4 * i) for m in qkv]),
                             o=Group([_head(att.o_proj, adapter, dtype, 4 * i + 1)]),
                             gate_up=Group([_head(m, adapter, dtype, 4 * i + 2) for m in gu]),
                             down=Group([_head(mlp.down_proj, adapter, dtype, 4 * i + 3)])))
    return layers


def _without_lora(layers: list[_Layer]) -> list[_Layer]:
    """The same layers with every LoRA product left out: the base model (the heads share the base weights and
    their dequantizers, so nothing is copied)."""
    def base(g: Group) -> Group:
        return Group([replace(h, lora_A=None, lora_B=None, dropout=0.0) for h in g.heads])
    return [replace(ly, qkv=base(ly.qkv), o=base(ly.o), gate_up=base(ly.gate_up), down=base(ly.down)) for ly in layers]


def _compute_dtype(base) -> torch.dtype:
    for m in base.modules():
        if has_4bit_weight(m):
            return getattr(m, "compute_dtype", None) or m.weight.quant_state.dtype
    w = base.model.layers[0].mlp.down_proj
    w = getattr(w, "base_layer", w).weight
    return w.dtype


def _ops(device: torch.device):
    """Triton kernels on CUDA, their plain-PyTorch twins elsewhere (imported here, never at import).
    Under TRITON_INTERPRET=1 the Triton kernels run on CPU tensors too: the tests check the whole
    fused forward/backward through them that way on machines without a GPU."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        import lorafit.kernels.dropout as dropout
        import lorafit.kernels.fp8 as fp8
        from lorafit.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_sum
        from lorafit.kernels.rmsnorm import add_rmsnorm, rmsnorm, rmsnorm_fork
        from lorafit.kernels.rope import qkv_rope
        from lorafit.kernels.swiglu import swiglu
        return SimpleNamespace(rmsnorm=rmsnorm, rmsnorm_fork=rmsnorm_fork, add_rmsnorm=add_rmsnorm, qkv_rope=qkv_rope,
                               swiglu=swiglu, ce=linear_cross_entropy_sum, ce_rows=linear_cross_entropy,
                               dropout=dropout,
                               # (the interpreter's float32 -> e4m3 cast and bf16 tl.dot are not the GPU's: the
                               # twins on CPU)
                               fp8_rows=fp8.rows if device.type == "cuda" else reference.fp8_rows,
                               lowrank_add=fp8.lowrank_add_ if device.type == "cuda" else reference.lowrank_add_)
    return SimpleNamespace(rmsnorm=reference.rmsnorm, rmsnorm_fork=reference.rmsnorm_fork,
                           add_rmsnorm=reference.add_rmsnorm, qkv_rope=reference.qkv_rope, swiglu=reference.swiglu,
                           ce=reference.cross_entropy_sum, ce_rows=reference.cross_entropy,
                           dropout=reference, fp8_rows=reference.fp8_rows, lowrank_add=reference.lowrank_add_)


# ---------------------------------------------------------------- the loss

class FastLoss:
    """batch -> (sum of CE over labelled tokens (float32), number of labelled tokens (int64)); `sequence_logps`:
    per-sequence summed log-probs of a preference batch, with the adapter or without it (the reference)."""

    def __init__(self, peft_model, *, gradient_checkpointing: bool, offload_activations: bool = True,
                 fp8_base: str = "off"):
        self.model = peft_model
        ok, reason = fast_forward_supported(peft_model)
        if not ok:
            raise ValueError(f"the fused path cannot run this model: {reason}")  # loss_path checks first
        self.gradient_checkpointing = gradient_checkpointing
        self.fp8_base = fp8_base      # off, backward or all: the base's products on fp8 tensor cores (kernels/fp8.py)
        base = peft_model.get_base_model()
        cfg = base.config
        adapter = (getattr(peft_model, "active_adapters", None) or ["default"])[0]
        self.base = base
        self.dtype = _compute_dtype(base)
        self.layers = _build_layers(base, adapter, self.dtype)
        self.base_layers = _without_lora(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = self.head_dim ** -0.5
        window = getattr(cfg, "sliding_window", None)
        if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
            window = None
        self.window = window
        self.dropout = any(h.dropout > 0 for ly in self.layers for g in ly.groups for h in g.heads)
        self.factors = None          # FactorPack, built on the first call (on the batch's device)
        self.store = ActivationStore(offload=offload_activations)
        self.store.on_device = {len(self.layers) - 2}     # the last checkpointed layer (see _hidden)
        self.pool = WeightBuffer()

    def host_plan(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The pass's label positions and segment plan, computed on its CPU tensors before they move: on the
        device each is a host sync (nonzero's size, the longest segment), and a sync at a pass's start waits
        for everything queued before it (the previous pass's backward, the optimizer step)."""
        tgt = _shifted(batch["labels"])
        out: dict[str, Any] = {**batch, "label_index": (tgt != IGNORE_INDEX).nonzero().squeeze(1)}
        if self.dropout and self.model.training:
            out["dropout_seed"] = self.dropout_seed()
        if "seq_index" in batch:
            out["label_seq"] = _label_seq(batch, out["label_index"])
        if "doc_ids" in batch:
            out["cu_seqlens"], out["max_seqlen"] = packed_plan(batch["doc_ids"])
            out["dense_rows"] = self.dense_rows(out["cu_seqlens"], batch["doc_ids"].numel())
        return out

    def dense_rows(self, cu: torch.Tensor, tokens: int) -> int:
        """attention.uniform_rows for this model's passes: records of one length run dense attention (cuDNN's) over
        (rows, length) instead of varlen. Not with grouped-query attention: that path repeats k and v to every head,
        and on Llama-3-8B dimensions it did not measure faster (8 x 512: 16,814 tok/s against 17,439 with varlen,
        in different calls)."""
        return uniform_rows(cu, tokens) if self.n_kv == self.n_heads else 0

    def dropout_seed(self) -> torch.Tensor:
        """A pass's dropout seed, (1,) int64 on the CPU: drawn from torch's CPU generator (so a run's seed and a
        resumed checkpoint's generator state give the same masks), mixed with the process's rank."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return (torch.randint(0, 1 << 31, (1,)) + rank * 0x9E3779B1) % (1 << 31)

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tgt, sel = _targets(batch)
        x, ops = self._hidden(batch, self.layers)
        # a fill kernel, not torch.tensor(n, device=...): a copy from pageable host memory waits for the
        # GPU to finish everything queued (here the whole forward), and the GPU then idles while the
        # host queues the loss and the first layer's backward
        n_sel = sel.numel()
        n_tok = torch.full((), n_sel, dtype=torch.int64, device=x.device)
        if n_sel == 0:
            return x.sum().float() * 0.0, n_tok
        if n_sel < tgt.numel():
            x, tgt = x.index_select(0, sel), tgt.index_select(0, sel)
        loss = ops.ce(x, self.base.lm_head.weight, tgt)
        return loss, n_tok

    def masked_sum(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """As __call__, with the cross-entropy taken at every position and the unlabelled ones masked out
        instead of selected first: no shape depends on the labels, so a CUDA graph captured over one pass
        replays for any other of its length (train/graphs.py). The extra rows cost a little head work (about
        0.4 GFLOP a token at Phi-3-mini's 32k vocabulary)."""
        tgt = _shifted(batch["labels"])
        x, ops = self._hidden(batch, self.layers)
        keep = tgt != IGNORE_INDEX
        losses = ops.ce_rows(x, self.base.lm_head.weight, tgt.clamp_min(0))
        return (losses * keep).sum(), keep.sum()

    def sequence_logps(self, batch: dict[str, Any], adapter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-prob of each sequence's labelled tokens (S,) float32, labelled tokens per sequence (S,)) of
        a preference batch (data/preference.py: `seq_index` says whose token is where, `seq_kind` lists the
        sequences); twin of objectives/logprobs.py's sequence_logps. `adapter=False`: the base model, without
        gradient (the reference of DPO and KTO)."""
        if not adapter:
            with torch.no_grad():
                return self._sequence_logps(batch, self.base_layers)
        return self._sequence_logps(batch, self.layers)

    def _sequence_logps(self, batch, layers) -> tuple[torch.Tensor, torch.Tensor]:
        tgt, sel = _targets(batch)
        seq = batch.get("label_seq")
        if seq is None:
            seq = _label_seq(batch, sel)
        x, ops = self._hidden(batch, layers)
        logp = -ops.ce_rows(x.index_select(0, sel), self.base.lm_head.weight, tgt.index_select(0, sel))  # (N,)
        n_seq = batch["seq_kind"].numel()
        sums = torch.zeros(n_seq, dtype=torch.float32, device=x.device).index_add_(0, seq, logp)
        counts = torch.zeros(n_seq, dtype=torch.float32, device=x.device).index_add_(0, seq, torch.ones_like(logp))
        return sums, counts

    def _hidden(self, batch: dict[str, Any], layers: list[_Layer]):
        """(final-norm hidden states (B*T, C) of every position, the ops that ran) through `layers`."""
        ids = batch["input_ids"]
        device = ids.device
        if layers is self.layers:
            if self.factors is None or not self.factors.current(device):
                self.factors = FactorPack([g for ly in self.layers for g in ly.groups], self.dtype, device)
            self.factors.refresh()       # the optimizer may have changed the LoRA factors since the last call
        ops = _ops(device)
        b, t = ids.shape
        training = self.model.training
        doc_ids = batch.get("doc_ids")
        if doc_ids is None and "attention_mask" in batch and not bool(batch["attention_mask"].all()):
            doc_ids = batch["attention_mask"]
        plan = None
        rows = batch.get("dense_rows") or 0       # segments of one length tiling the pass: dense attention over them
        if rows:
            doc_ids = None
        elif doc_ids is not None and device.type == "cuda":
            plan = (batch["cu_seqlens"], batch["max_seqlen"]) if "cu_seqlens" in batch else packed_plan(doc_ids)
        pos = batch.get("position_ids")
        if pos is None:
            pos = torch.arange(t, device=device).expand(b, t)
        emb = self.base.model.embed_tokens
        x = F.embedding(ids, emb.weight).to(self.dtype)                       # (B, T, C)
        cos, sin = self.base.model.rotary_emb(x, pos)
        cos, sin = cos.reshape(b * t, -1).contiguous(), sin.reshape(b * t, -1).contiguous()
        x = x.reshape(b * t, -1)                                               # (N, C)
        # the pass's dropout seed: every mask of the pass is a hash of it (the forward, the recomputation and the
        # backward agree without saving a mask); a direct call without one draws it here
        seed = None
        if self.dropout and training and layers is self.layers:
            seed = batch.get("dropout_seed")
            seed = (seed if seed is not None else self.dropout_seed()).to(device, non_blocking=True)
        # a sliding window no segment reaches changes nothing (Mistral-7B-v0.1's 4,096 against records of 512):
        # the packed rows then keep the varlen kernel instead of the masked fallback
        window = None if self.window is not None and plan is not None and plan[1] <= self.window else self.window
        fp8 = None if self.fp8_base == "off" else Fp8(ops.fp8_rows, self.fp8_base == "all", ops.lowrank_add)
        ctx = SimpleNamespace(ops=ops, cos=cos, sin=sin, batch=rows or b, plan=plan, doc_ids=doc_ids, training=training,
                              window=window, seed=seed, fp8=fp8)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            x = x.detach().requires_grad_(True)
            self.store.clear()
            park = self.store.offload     # park more than the input only where it goes to host memory
            *body, last = layers
            for i, layer in enumerate(body):
                x = checkpoint(lambda h, layer=layer: self._layer(layer, ctx, h, park=park), x, self.store, i,
                               recompute=lambda h, *kept, layer=layer: self._layer(layer, ctx, h, grad_only=True,
                                                                                    kept=kept or None))
            # the last layer keeps its activations (no parking, no recomputation): its backward comes right
            # after the loss, when they would just have been rebuilt. It holds about what a recomputed layer
            # holds in its backward, so the step's peak does not grow. The layer before it parks on the GPU
            # (store.on_device): its copy to the host and back would make the first recomputation wait. It holds
            # the memory its early reload used to hold here.
            x = self._layer(last, ctx, x)
        else:
            for layer in layers:
                x = self._layer(layer, ctx, x)
        return ops.rmsnorm(x, self.base.model.norm.weight, self.layers[0].eps), ops

    def _layer(self, ly: _Layer, c, x: torch.Tensor, grad_only: bool = False, park: bool = False,
               kept: tuple | None = None):
        """One decoder layer.
        `park` (a checkpoint's first forward): also return what the recomputation can reuse, the
        attention output, its backward state, the mid-layer residual and each product's low-rank
        activation x @ A^T, when the attention kernel can run its backward from them (else the plain
        output, and the recomputation is the usual one).
        `grad_only` (the recomputation): products whose output value backward never reads are skipped:
        always the down product (~1/5 of the matrix work); with `kept`, also the attention forward, the
        o product and the four low-rank products x @ A^T, whose values come from the parked tensors."""
        hq, hkv, d = self.n_heads, self.n_kv, self.head_dim
        attn = (c.batch, hq, hkv, d, self.scale)
        # parked with the layer: attention output, mid-layer residual, the four low-rank activations, attention state
        low = kept[2:6] if kept is not None else (None,) * 4
        # the recomputation keeps its dequantized q/k/v and gate/up weights for the backward right after it
        run = {"pool": self.pool, "training": c.training, "with_lowrank": True, "seed": c.seed, "drop": c.ops.dropout,
               "fp8": c.fp8}
        x, h = c.ops.rmsnorm_fork(x, ly.ln1, ly.eps)
        qkv, l_qkv = lora_group(h, ly.qkv, lowrank=low[0], keep_weight=grad_only, **run)
        q, k, v = c.ops.qkv_rope(qkv, c.cos, c.sin, hq, hkv, d)
        state = None
        if kept is not None:
            a_val, mid, *state = kept[:2] + kept[6:]
            a = attention_replay(q, k, v, a_val, state, *attn)
            x, l_o = lora_group(a, ly.o, residual=x, grad_only=True, value=mid, lowrank=low[1], **run)
            x, h = c.ops.rmsnorm_fork(x, ly.ln2, ly.eps)
        else:
            if park:
                a, state = attention_keeping(q, k, v, *attn, plan=c.plan, doc_ids=c.doc_ids, window=c.window)
            else:
                a = attention(q, k, v, *attn, plan=c.plan, doc_ids=c.doc_ids, window=c.window)
            o, l_o = lora_group(a, ly.o, **run)
            x, h = c.ops.add_rmsnorm(x, o, ly.ln2, ly.eps)
        gu, l_gu = lora_group(h, ly.gate_up, lowrank=low[2], keep_weight=grad_only, **run)
        out, l_down = lora_group(c.ops.swiglu(gu), ly.down, residual=x, grad_only=grad_only, lowrank=low[3], **run)
        if not (park and state is not None):
            return out
        return out, (a, x, l_qkv, l_o, l_gu, l_down, *state)


def _targets(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token targets of every position (B*T,), the labelled positions): found before any layer is queued
    (from host_plan, else here: a host sync)."""
    tgt = _shifted(batch["labels"])
    sel = batch.get("label_index")
    if sel is None:
        sel = (tgt != IGNORE_INDEX).nonzero().squeeze(1)
    return tgt, sel


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """The next-token target of every position (B*T,), as Hugging Face shifts labels (-100 after each row's end)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)


def _label_seq(batch: dict[str, Any], sel: torch.Tensor) -> torch.Tensor:
    """The sequence (index into seq_kind) each labelled position's target belongs to, (N,)."""
    return F.pad(batch["seq_index"][:, 1:], (0, 1), value=-1).reshape(-1).index_select(0, sel)


def enable_fast_path(peft_model, *, gradient_checkpointing: bool, offload_activations: bool = True,
                     fp8_base: str = "off") -> FastLoss:
    """A FastLoss over this PeftModel (see the module docstring); ValueError if fast_forward_supported says no."""
    return FastLoss(peft_model, gradient_checkpointing=gradient_checkpointing, offload_activations=offload_activations,
                    fp8_base=fp8_base)


def check_fp8(fused: bool, why: str, device: torch.device) -> None:
    """fp8_base's preconditions, as one error a user can act on: the fused path runs (`fused`; else `why` not), on
    fp8 tensor cores."""
    if not fused:
        raise UserError(f"fp8_base needs the fused kernels, which this run cannot use ({why})",
                        fix="set --fp8_base off, or --fast_kernels on where the model supports them")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise UserError(f"fp8_base needs fp8 tensor cores (compute capability 8.9 or later: Ada, Hopper); "
                        f"{torch.cuda.get_device_name(device)} is {cap}", fix="set --fp8_base off")


def loss_path(model, fused: bool, why: str, gradient_checkpointing: bool,
              offload_activations: bool = True, fp8_base: str = "off") -> tuple[FastLoss | None, str]:
    """(FastLoss or None, why), given model/arch.py's fused_path_choice for this run; the wrapped model has the
    last word (dropout, DoRA, a LoRA on the head... fall back to the reference path, saying why)."""
    if not fused:
        return None, why
    ok, reason = fast_forward_supported(model)
    if not ok:
        return None, f"fused kernels do not support this model: {reason}"
    return enable_fast_path(model, gradient_checkpointing=gradient_checkpointing,
                            offload_activations=offload_activations, fp8_base=fp8_base), why
