"""Kernels against their plain-PyTorch twins, and the twins against transformers' modules.

Triton kernels run on the GPU when there is one; on a CPU machine with Triton installed they
run in Triton's interpreter (TRITON_INTERPRET=1, set before the kernel modules are imported),
otherwise those tests skip. Inputs are fresh random values at odd shapes; outputs compare by
||out - ref|| / ||ref||: float32 under 1e-5, bfloat16 under 1e-2 (a few bf16 roundings).
"""
import importlib

import pytest
import torch
from triton_interp import CUDA, HAS_TRITON, INTERPRETED, OUTER_ONLY, run_in_interpreter

from lorafit.kernels import reference
from lorafit.kernels.lora import Group, Head, WeightBuffer, lora_group

DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def kernel(name):
    """Import a Triton op module: compiled on CUDA; on CPU only inside the interpreter subprocess below
    (the interpreter must be switched on before anything imports triton, and transformers does)."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    if not CUDA and not INTERPRETED:
        pytest.skip("on CPU, Triton kernels run in test_triton_kernels_in_interpreter's subprocess")
    return importlib.import_module(f"lorafit.kernels.{name}")


@pytest.mark.skipif(**OUTER_ONLY)
def test_triton_kernels_in_interpreter():
    # by test name: "_kernel" alone would also match the module's name, test_kernels.py, and select every test
    run_in_interpreter(__file__, "rmsnorm_kernel or qkv_rope_kernel or swiglu_kernel or rope_kernel_on "
                                 "or linear_cross_entropy_kernel or hashed_dropout_kernel or lowrank_add_kernel",
                       expect=23)


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def leaf(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype).requires_grad_(True)


# ------------------------------------------------------------------ twins vs transformers (CPU)

def test_reference_rmsnorm_and_rope_equal_llama_modules():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
    x = torch.randn(2, 7, 40, dtype=torch.bfloat16)
    m = LlamaRMSNorm(40, eps=1e-6).to(torch.bfloat16)
    torch.nn.init.normal_(m.weight)
    torch.testing.assert_close(reference.rmsnorm(x.view(14, 40), m.weight, 1e-6), m(x).view(14, 40))
    q = torch.randn(2, 3, 7, 16)            # (B, H, T, D)
    k = torch.randn(2, 1, 7, 16)
    ang = torch.randn(2, 7, 8)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    qe, ke = apply_rotary_pos_emb(q, k, cos, sin)

    def flat(t):
        return t.transpose(1, 2).reshape(14, -1)

    torch.testing.assert_close(reference.rope(flat(q), cos.view(14, 16), sin.view(14, 16), 3), flat(qe))
    torch.testing.assert_close(reference.rope(flat(k), cos.view(14, 16), sin.view(14, 16), 1), flat(ke))


def test_reference_document_attention_equals_separate_documents():
    b, t, h, d = 1, 9, 2, 8
    q, k, v = (torch.randn(b * t, h * d) for _ in range(3))
    doc = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0, 0]])
    out = reference.attention(q, k, v, b, h, h, d, d ** -0.5, doc)
    for s, e in ((0, 4), (4, 7)):
        one = reference.attention(q[s:e], k[s:e], v[s:e], 1, h, h, d, d ** -0.5, None)
        torch.testing.assert_close(out[s:e], one)
    assert reference.segments(doc).tolist() == [0, 4, 7, 9]


# ------------------------------------------------------------------ fused LoRA group (plain torch)

def _heads(d_in, outs, r, dtype, lora_mask=None, bias=False, dropout=0.0):
    heads = []
    for o, has in zip(outs, lora_mask or [True] * len(outs), strict=True):
        w = torch.randn(o, d_in, device=DEV, dtype=dtype) / d_in ** 0.5
        hd = Head(out_features=o, dequant=lambda out, w=w: w if out is None else out.copy_(w),
                  bias=torch.randn(o, device=DEV, dtype=dtype) if bias else None)
        if has:
            hd.lora_A = torch.randn(r, d_in, device=DEV, requires_grad=True)
            hd.lora_B = torch.randn(o, r, device=DEV, requires_grad=True)
            hd.scaling, hd.dropout = 2.0, dropout
        heads.append(hd)
    return heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["qkv", "single", "bias_partial", "mixed_scaling"])
def test_lora_group_matches_reference(dtype, case):
    torch.manual_seed(0)
    n, d_in, r = 37, 72, 5
    if case in ("qkv", "mixed_scaling"):
        heads = _heads(d_in, (72, 24, 24), r, dtype)
        if case == "mixed_scaling":           # PEFT's alpha_pattern / rank_pattern: a scaling per head
            for h, s in zip(heads, (2.0, 0.5, 1.0), strict=True):
                h.scaling = s
    elif case == "single":
        heads = _heads(d_in, (104,), r, dtype)
    else:
        heads = _heads(d_in, (40, 24), r, dtype, lora_mask=(True, False), bias=True)
    x = leaf(n, d_in, dtype=dtype)
    dy = torch.randn(n, sum(h.out_features for h in heads), device=DEV, dtype=dtype)
    params = [p for h in heads if h.lora_A is not None for p in (h.lora_A, h.lora_B)]

    res = leaf(n, dy.shape[1], dtype=dtype) if case == "single" else None
    y = lora_group(x, heads, WeightBuffer() if dtype == torch.bfloat16 else None, residual=res)
    grads = torch.autograd.grad(y, [x, *params] + ([res] if res is not None else []), dy)
    xr = x.detach().double().requires_grad_(True)
    pr = [p.detach().double().requires_grad_(True) for p in params]
    loras, it = [], iter(pr)
    for h in heads:
        loras.append((next(it), next(it), h.scaling) if h.lora_A is not None else None)
    yr = reference.lora_group(xr, [h.dequant(None).double() for h in heads],
                              [None if h.bias is None else h.bias.double() for h in heads], loras)
    if res is not None:
        resr = res.detach().double().requires_grad_(True)
        yr = yr + resr
    grads_r = torch.autograd.grad(yr, [xr, *pr] + ([resr] if res is not None else []), dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(y, yr) < tol
    for g, gr in zip(grads, grads_r, strict=True):
        assert rel(g, gr) < tol


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_lora_group_grad_only_skips_the_product_but_not_the_gradients(dropout):
    """A checkpoint's recomputation of a layer's last product reads only the output's gradient."""
    heads = _heads(48, (40, 24), 4, torch.float32, dropout=dropout)
    x, res = leaf(13, 48, dtype=torch.float32), leaf(13, 64, dtype=torch.float32)
    dy = torch.randn(13, 64, device=DEV)
    params = [p for h in heads for p in (h.lora_A, h.lora_B)]
    seed = torch.tensor([77], device=DEV)          # the same dropout masks in both calls: the same seed
    grads = []
    for grad_only in (False, True):
        y = lora_group(x, heads, training=True, residual=res, grad_only=grad_only, seed=seed)
        grads.append(torch.autograd.grad(y, [x, res, *params], dy))
    for g, g_only in zip(*grads, strict=True):
        torch.testing.assert_close(g_only, g)


def test_lora_group_reused_lowrank_and_kept_weight_give_the_same_gradients():
    """A checkpoint's recomputation reuses the first forward's x @ A^T and keeps its dequantized weight
    for backward: same output, same gradients, and backward dequantizes nothing."""
    heads = _heads(48, (40, 24), 4, torch.float32)
    x, dy = leaf(13, 48, dtype=torch.float32), torch.randn(13, 64, device=DEV)
    params = [p for h in heads for p in (h.lora_A, h.lora_B)]
    with torch.no_grad():
        y0, low = lora_group(x, heads, with_lowrank=True)
    assert low.shape == (13, 8)
    torch.testing.assert_close(low, torch.cat([x @ h.lora_A.t() for h in heads], 1))
    y = lora_group(x, heads)
    grads = torch.autograd.grad(y, [x, *params], dy)
    calls = []
    for h in heads:
        h.dequant = lambda out, f=h.dequant: calls.append(1) or f(out)
    y2 = lora_group(x, heads, lowrank=low, keep_weight=True)
    n_forward = len(calls)
    grads2 = torch.autograd.grad(y2, [x, *params], dy)
    assert len(calls) == n_forward == 2
    torch.testing.assert_close(y2, y0)
    for g, g2 in zip(grads, grads2, strict=True):
        torch.testing.assert_close(g2, g)


@pytest.mark.parametrize("case", ["batched", "mixed_rank", "mixed_p"])
def test_lora_group_dropout_uses_one_mask_per_head_and_matches_reference(case):
    """Two identical heads under dropout answer differently (a mask each, as PEFT's separate nn.Dropout
    modules draw), and output and gradients equal the twin given each head's hashed mask: the seed gives the
    masks, so a second call with it (a recomputation, a graph's replay) draws the same ones. Heads of one rank
    and p run batched (one launch for all masks, batched products); other groups head by head."""
    torch.manual_seed(0)
    twin = _heads(32, (16,), 4, torch.float32, dropout=0.5)[0]
    heads = [twin, Head(out_features=16, dequant=twin.dequant, lora_A=twin.lora_A, lora_B=twin.lora_B,
                        scaling=twin.scaling, dropout=twin.dropout)]
    rank, p = 2 if case == "mixed_rank" else 4, 0.3 if case == "mixed_p" else 0.5
    heads += _heads(32, (8,), rank, torch.float32, dropout=p)
    assert Group(heads).drop_batch is (case == "batched")
    x = leaf(11, 32, dtype=torch.float32)
    params = [twin.lora_A, twin.lora_B, heads[2].lora_A, heads[2].lora_B]
    seed = torch.tensor([12345], device=DEV)
    y = lora_group(x, heads, training=True, seed=seed)
    assert not torch.allclose(y[:, :16], y[:, 16:32])              # same weights, other masks
    torch.testing.assert_close(lora_group(x, heads, training=True, seed=seed), y, rtol=0, atol=0)
    assert not torch.allclose(lora_group(x, heads, training=True, seed=seed + 1), y)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params], dy)
    ones = torch.ones_like(x)
    masks = [reference.hashed_dropout(ones, seed, h.salt * 16 + i, h.dropout) for i, h in enumerate(heads)]
    for m, h in zip(masks, heads, strict=True):
        torch.testing.assert_close(m.unique().cpu(), torch.tensor([0.0, 1 / (1 - h.dropout)]))
    loras = [(h.lora_A, h.lora_B, h.scaling) for h in heads]
    weights = [h.dequant(None) for h in heads]
    yr = reference.lora_group(x, weights, [None] * 3, loras, dropout_masks=masks)
    torch.testing.assert_close(y, yr)
    for g, gr in zip(grads, torch.autograd.grad(yr, [x, *params], dy), strict=True):
        # float32 sums in another order (one product for all heads vs one per head): 1.1e-5 seen on an H200
        torch.testing.assert_close(g, gr, atol=5e-5, rtol=1e-4)
    y_eval = lora_group(x, heads, training=False)
    torch.testing.assert_close(y_eval, reference.lora_group(x, weights, [None] * 3, loras))


def test_hashed_dropout_keeps_one_minus_p_and_differs_by_seed_and_salt():
    """The twin's masks: about 1 - p kept, scaled by 1 / (1 - p); another seed or salt, another mask; the same
    seed and salt, the same mask on any device."""
    t = torch.ones(512, 384)
    seed = torch.tensor([2024])
    for p in (0.05, 0.3, 0.5):
        kept = reference.hashed_dropout(t, seed, 3, p)
        frac = (kept != 0).float().mean().item()
        assert abs(frac - (1 - p)) < 0.005, (p, frac)
        assert torch.allclose(kept[kept != 0], torch.tensor(1 / (1 - p)))
    base = reference.hashed_dropout(t, seed, 3, 0.5) != 0
    for other in (reference.hashed_dropout(t, seed + 1, 3, 0.5), reference.hashed_dropout(t, seed, 4, 0.5)):
        agree = ((other != 0) == base).float().mean().item()
        assert 0.45 < agree < 0.55                                  # independent masks agree half the time
    rows = base.float().mean(1)
    assert rows.min() > 0.4 and rows.max() < 0.6                    # no row (token) is all kept or all dropped
    assert torch.equal(reference.hashed_dropout(t.to(DEV), seed.to(DEV), 3, 0.5).cpu() != 0, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hashed_dropout_kernel(dtype):
    """The Triton masks are the twin's bit for bit: one head, three heads in one launch, and the masked sum of three
    parts into an output (float32 accumulation in head order, one rounding)."""
    mod = kernel("dropout")
    t = leaf(37, 1030, dtype=dtype).detach()
    seed = torch.tensor([987654321], device=DEV)
    salts = (11, 12, 40)
    parts = torch.randn(3, 37, 1030, device=DEV).to(dtype)
    pairs = [(mod.hashed_dropout(t, seed, 11, 0.1), reference.hashed_dropout(t, seed, 11, 0.1)),
             (mod.hashed_dropout_heads(t, seed, salts, 0.1), reference.hashed_dropout_heads(t, seed, salts, 0.1)),
             (mod.masked_sum_(t.clone(), parts, seed, salts, 0.1), reference.masked_sum_(t.clone(), parts, seed, salts,
                                                                                           0.1))]
    for got, want in pairs[:2]:
        assert torch.equal(got == 0, want == 0)                     # the same masks
    for got, want in pairs:
        if INTERPRETED and dtype == torch.bfloat16:
            assert rel(got, want) < TOL[dtype]                      # the interpreter truncates float32 -> bf16
        else:
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="1 to 4 heads"):
        mod.hashed_dropout_heads(t, seed, (1, 2, 3, 4, 5), 0.1)


# ------------------------------------------------------------------ Triton kernels vs twins

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True, "fork"])
def test_rmsnorm_kernel(dtype, residual):
    mod = kernel("rmsnorm")
    n, c = 13, 200
    x, r = leaf(n, c, dtype=dtype), leaf(n, c, dtype=dtype)
    w = torch.randn(c, device=DEV).to(dtype)
    if residual == "fork":       # x also continues on the residual stream: both gradients summed in one pass
        x2, y = mod.rmsnorm_fork(x, w, 1e-5)
        x2r, yr = reference.rmsnorm_fork(x, w, 1e-5)
        assert torch.equal(x2, x)
        dres, dy = torch.randn_like(x2), torch.randn_like(y)
        g = torch.autograd.grad((x2 * 1.0, y), x, (dres, dy))
        gr = torch.autograd.grad((x2r * 1.0, yr), x, (dres, dy))
    elif residual:
        h, y = mod.add_rmsnorm(x, r, w, 1e-5)
        hr, yr = reference.add_rmsnorm(x, r, w, 1e-5)
        dh, dy = torch.randn_like(h), torch.randn_like(y)
        g = torch.autograd.grad((h, y), (x, r), (dh, dy))
        gr = torch.autograd.grad((hr, yr), (x, r), (dh, dy))
        assert rel(h, hr) < TOL[dtype]
    else:
        y, yr = mod.rmsnorm(x, w, 1e-5), reference.rmsnorm(x, w, 1e-5)
        dy = torch.randn_like(y)
        g, gr = torch.autograd.grad(y, x, dy), torch.autograd.grad(yr, x, dy)
    assert rel(y, yr) < TOL[dtype]
    for a, b in zip(g, gr, strict=True):
        assert rel(a, b) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_rope_kernel(dtype):
    mod = kernel("rope")
    n, h, hkv, d = 13, 4, 2, 16
    qkv = leaf(n, (h + 2 * hkv) * d, dtype=dtype)
    ang = torch.randn(n, d // 2, device=DEV)
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    out, ref = mod.qkv_rope(qkv, cos, sin, h, hkv, d), reference.qkv_rope(qkv, cos, sin, h, hkv, d)
    for a, b in zip(out, ref, strict=True):
        assert rel(a, b) < TOL[dtype]
    # gradients as they arrive: contiguous; rows of a wider buffer (unit last stride, read in place);
    # transposed (last stride N, copied first)
    contiguous = [torch.randn_like(t) for t in ref]
    wide = [torch.randn(n, 3 * t.shape[1], device=DEV, dtype=dtype)[:, 1:1 + t.shape[1]] for t in ref]
    transposed = [torch.randn(t.shape[1], n, device=DEV, dtype=dtype).t() for t in ref]
    assert not any(t.is_contiguous() for t in wide + transposed)
    for dys in (contiguous, wide, transposed):
        g = torch.autograd.grad(out, qkv, dys, retain_graph=True)[0]
        gr = torch.autograd.grad(ref, qkv, dys, retain_graph=True)[0]
        assert rel(g, gr) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel(dtype):
    mod = kernel("swiglu")
    gu = leaf(9, 2 * 1100, dtype=dtype, scale=2.0)
    yr = reference.swiglu(gu)
    dy = torch.randn_like(yr)
    want = torch.autograd.grad(yr, gu, dy)[0]
    mid = gu * 1.0                        # the kernel's backward overwrites its saved input with the gradient
    y = mod.swiglu(mid)
    assert rel(y, yr) < TOL[dtype]
    got = torch.autograd.grad(y, gu, dy, retain_graph=True)[0]
    assert rel(got, want) < TOL[dtype]
    assert not torch.equal(mid, gu.detach())     # in place: the saved [gate | up] now holds d[gate | up]
    with pytest.raises(RuntimeError, match="backward ran twice"):
        torch.autograd.grad(y, gu, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot", [12, 8])     # full and partial rotary (phi-style)
def test_rope_kernel_on_strided_slice(dtype, rot):
    mod = kernel("rope")
    n, h, hkv, d = 11, 3, 1, 12
    qkv = leaf(n, (h + 2 * hkv) * d, dtype=dtype)
    ang = torch.randn(n, rot // 2, device=DEV)
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    for sl, heads in ((slice(0, h * d), h), (slice(h * d, (h + hkv) * d), hkv)):
        x = qkv[:, sl]
        y, yr = mod.rope(x, cos, sin, heads), reference.rope(x, cos, sin, heads)
        dy = torch.randn_like(y)
        assert rel(y, yr) < TOL[dtype]
        assert rel(torch.autograd.grad(y, qkv, dy)[0], torch.autograd.grad(yr, qkv, dy)[0]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_kernel(dtype):
    mod = kernel("cross_entropy")
    n, c, v = 21, 40, 5000   # vocab not a multiple of the 4096 block
    x = leaf(n, c, dtype=dtype)
    w = torch.randn(v, c, device=DEV).to(dtype)
    tgt = torch.randint(0, v, (n,), device=DEV)
    loss = mod.linear_cross_entropy_sum(x, w, tgt, chunk=8)
    ref = reference.cross_entropy_sum(x, w, tgt)
    assert rel(loss, ref) < TOL[dtype]
    assert rel(torch.autograd.grad(2 * loss, x)[0], torch.autograd.grad(2 * ref, x)[0]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_kernel_per_token(dtype):
    mod = kernel("cross_entropy")
    n, c, v = 19, 40, 4500
    x = leaf(n, c, dtype=dtype)
    w = torch.randn(v, c, device=DEV).to(dtype)
    tgt = torch.randint(0, v, (n,), device=DEV)
    losses = mod.linear_cross_entropy(x, w, tgt, chunk=8)
    ref = reference.cross_entropy(x, w, tgt)
    assert losses.shape == (n,) and rel(losses, ref) < TOL[dtype]
    g = torch.randn(n, device=DEV)  # a different gradient per token, as per-sequence log-probs give
    assert rel(torch.autograd.grad(losses, x, g)[0], torch.autograd.grad(ref, x, g)[0]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_kernel_without_grad(dtype):
    mod = kernel("cross_entropy")
    x = torch.randn(13, 24, device=DEV).to(dtype)
    w = torch.randn(4200, 24, device=DEV).to(dtype)
    tgt = torch.randint(0, 4200, (13,), device=DEV)
    with torch.no_grad():
        losses = mod.linear_cross_entropy(x, w, tgt, chunk=5)
    assert not losses.requires_grad and rel(losses, reference.cross_entropy(x, w, tgt)) < TOL[dtype]


def test_reference_cross_entropy_rows_sum_to_the_summed_twin():
    x, w = torch.randn(9, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    tgt = torch.randint(0, 50, (9,))
    assert torch.allclose(reference.cross_entropy(x, w, tgt).sum(), reference.cross_entropy_sum(x, w, tgt))


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_packed_attention_matches_reference():
    from lorafit.kernels.attention import attention, backend, packed_plan
    print("packed attention backend:", backend())
    torch.manual_seed(0)
    b, t, h, d = 2, 333, 4, 64
    doc = torch.zeros(b, t, dtype=torch.long, device="cuda")
    doc[0, :100], doc[0, 100:300], doc[1, :333] = 1, 2, 1
    q, k, v = (leaf(b * t, h * d, dtype=torch.bfloat16) for _ in range(3))
    o = attention(q, k, v, b, h, h, d, d ** -0.5, plan=packed_plan(doc), doc_ids=doc)
    orf = reference.attention(q.float(), k.float(), v.float(), b, h, h, d, d ** -0.5, doc)
    dy = torch.randn_like(o)
    assert rel(o, orf) < 1e-2
    g = torch.autograd.grad(o, (q, k, v), dy)
    gr = torch.autograd.grad(orf, (q, k, v), dy.float())
    for a, bb in zip(g, gr, strict=True):
        assert rel(a, bb) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_offloaded_checkpoint_gives_plain_autograd_gradients():
    from lorafit.kernels.offload import ActivationStore, checkpoint
    w = torch.randn(64, 64, device="cuda", requires_grad=True)
    xs = torch.randn(50, 64, device="cuda", requires_grad=True)

    def fn(z):
        return torch.tanh(z @ w)

    store = ActivationStore(offload=True)
    z = xs
    for i in range(3):
        z = checkpoint(fn, z, store, i)
    z.sum().backward()      # parameters get their gradients inside the recompute (as reentrant checkpointing)
    gx, gw = xs.grad.clone(), w.grad.clone()
    xs.grad = w.grad = None
    fn(fn(fn(xs))).sum().backward()
    gx2, gw2 = xs.grad, w.grad
    assert rel(gx, gx2) < 1e-5 and rel(gw, gw2) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_checkpoint_parks_extras_and_recompute_reads_them():
    from lorafit.kernels.offload import ActivationStore, checkpoint
    w = torch.randn(64, 64, device="cuda", requires_grad=True)
    xs = torch.randn(1100, 64, device="cuda", requires_grad=True)     # 70k elements: parked in host memory

    def first(z):
        mid = torch.tanh(z @ w)
        return mid * 2, (mid, 3)

    def again(z, mid, three):      # mid's value comes from the parked copy; the graph is rebuilt through z
        assert three == 3 and mid.is_cuda
        g = torch.tanh(z @ w)
        return (g + (mid - g).detach()) * 2

    store = ActivationStore(offload=True)
    store.on_device = {2}               # the last checkpointed layer stays on the GPU, as the fast path's does
    z = xs
    for i in range(3):
        z = checkpoint(first, z, store, i, recompute=again)
    assert store.saved[0][1].device.type == "cpu" and store.saved[0][2] == 3
    assert store.saved[2][0].is_cuda and store.saved[2][1].is_cuda
    store.prefetch(1, "cuda")           # started early
    z.sum().backward()
    gx, gw = xs.grad.clone(), w.grad.clone()
    xs.grad = w.grad = None

    def f(z):
        return torch.tanh(z @ w) * 2

    f(f(f(xs))).sum().backward()
    assert rel(gx, xs.grad) < 1e-5 and rel(gw, w.grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("h, hkv, d", [(4, 4, 96), (8, 2, 64)])
@pytest.mark.parametrize("packed", [False, True])
def test_attention_replay_matches_plain_attention(packed, h, hkv, d):
    """The parked output + state give attention's gradients without its forward: cuDNN's backward for
    unpacked rows (against SDPA), flash varlen's for packed rows (against varlen_attn)."""
    from lorafit.kernels.attention import attention, attention_keeping, attention_replay, packed_plan
    torch.manual_seed(0)
    b, t = 2, 333
    kw = {}
    if packed:
        doc = torch.zeros(b, t, dtype=torch.long, device="cuda")
        doc[0, :100], doc[0, 100:300], doc[1, :333] = 1, 2, 1
        kw = {"plan": packed_plan(doc), "doc_ids": doc}
    qkv = leaf(b * t, (h + 2 * hkv) * d, dtype=torch.bfloat16)     # q, k, v as strided column slices
    q, k, v = qkv[:, :h * d], qkv[:, h * d:(h + hkv) * d], qkv[:, (h + hkv) * d:]
    args = (b, h, hkv, d, d ** -0.5)
    o_ref = attention(q, k, v, *args, **kw)
    dy = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, qkv, dy)[0]
    with torch.no_grad():
        o, state = attention_keeping(q, k, v, *args, **kw)
    assert state is not None and state[0] == ("flash" if packed else "cudnn")
    assert rel(o, o_ref) < 1e-2
    a = attention_replay(q, k, v, o, state, *args)
    assert torch.equal(a, o)
    assert rel(torch.autograd.grad(a, qkv, dy)[0], g_ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_nf4_group_dequantizes_into_buffer_like_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from lorafit.train.fast import _Dequant
    torch.manual_seed(0)
    layers = []
    for o in (96, 32):
        w = torch.randn(o, 160, device="cuda", dtype=torch.bfloat16)
        q, st = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        layers.append((q, st))

    class Linear4bit:  # a stand-in with bitsandbytes' Linear4bit weight/quant_state attributes
        def __init__(self, q, st):
            self.weight = q
            self.weight.quant_state = st
    heads = [Head(out_features=st.shape[0], dequant=_Dequant(Linear4bit(q, st), torch.bfloat16))
             for q, st in layers]
    x = torch.randn(45, 160, device="cuda", dtype=torch.bfloat16)
    ref = torch.cat([x @ bnbf.dequantize_4bit(q, st).t() for q, st in layers], 1)
    assert rel(lora_group(x, heads, WeightBuffer()), ref) < 1e-2


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_dequant_kernel_equals_bitsandbytes(nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    mod = kernel("nf4")
    torch.manual_seed(0)
    w = torch.randn(40, 328, device=DEV, dtype=torch.bfloat16)     # 13120 values: not a multiple of 2048
    q, st = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested, blocksize=64)
    ref = bnbf.dequantize_4bit(q, st)
    torch.testing.assert_close(reference.dequant_nf4(q, st), ref, rtol=0, atol=0)
    out = torch.full((40, 328), float("nan"), device=DEV, dtype=torch.bfloat16)
    got = mod.NF4Weight(q, st)(out)
    assert got.data_ptr() == out.data_ptr()
    # bit-exact on the GPU; Triton's CPU interpreter truncates float32 -> bf16 (1 ulp)
    tol = {"rtol": 8e-3, "atol": 0} if INTERPRETED else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(got, ref, **tol)


# ------------------------------------------------------------------ fp8 operands of the base's products

def test_reference_fp8_rows_put_each_row_max_on_e4m3s_largest():
    torch.manual_seed(0)
    x = (torch.randn(6, 40) * torch.logspace(-3, 3, 6)[:, None]).to(torch.bfloat16)
    x[2] = 0
    q, s = reference.fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6, 1) and torch.isfinite(s).all()
    back = q.float() * s
    live = [0, 1, 3, 4, 5]
    assert (back[2] == 0).all()
    assert torch.equal(q.float().abs().amax(1)[live], torch.full((5,), reference.FP8_MAX))
    # e4m3 keeps 3 mantissa bits: within 1/16 of each element (its row's max bounds the subnormals' error)
    err = (back - x.float()).abs() / torch.maximum(x.float().abs(), x.float().abs().amax(1, keepdim=True) / 64)
    assert err[live].max() <= 2 ** -4
    # past e4m3's largest the cast saturates
    assert reference.fp8_cast(torch.tensor([500.0, -1e4, 3.0])).float().tolist() == [448.0, -448.0, 3.0]


def test_reference_fp8_weight_scales_rows_or_columns_and_transposes():
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    rows, cols = reference.FP8_MAX / w.abs().amax(1), reference.FP8_MAX / w.abs().amax(0)
    q = reference.fp8_weight(w, rows)
    assert q.shape == (24, 40) and torch.equal(q.float().abs().amax(1), torch.full((24,), reference.FP8_MAX))
    assert rel(q.float() / rows[:, None], w) < 0.03
    out = torch.zeros(40, 30, dtype=torch.float8_e4m3fn)
    qt = reference.fp8_weight(w, cols, transposed=True, out=out[:, 6:])
    assert qt.shape == (40, 24) and out[:, :6].float().abs().sum() == 0       # written into its columns only
    assert torch.equal(qt.float(), reference.fp8_weight(w.t(), cols).float())
    assert rel(qt.float().t() / cols[None, :], w) < 0.03


def _fp8_operands(x, w, dim):
    """(x's e4m3 rows and scales, w's e4m3 (rows over their maxima: dim 1; columns, transposed: dim 0) and scales)."""
    xq, sx = reference.fp8_rows(x)
    amax = w.float().abs().amax(dim)
    wq = reference.fp8_weight(w, reference.FP8_MAX / amax, transposed=dim == 0)
    return xq.float() * sx, wq.float() * (amax / reference.FP8_MAX)[:, None]


@pytest.mark.parametrize("lora, forward", [(False, True), (True, True), (True, False)])
def test_lora_group_fp8_products_are_the_scaled_e4m3_operands(lora, forward):
    """y's base term = (x in e4m3 over row scales) (W in e4m3 over row scales)^T, or without `forward` the compute
    dtype's product; dx's = (dy over row scales) (W^T in e4m3 over column scales, taken across the group's heads);
    LoRA terms and dA / dB as without fp8."""
    torch.manual_seed(0)
    n, d_in, outs = 37, 64, [32, 16, 16]
    heads = _heads(d_in, outs, 4, torch.bfloat16, lora_mask=None if lora else [False] * 3)
    w = torch.cat([h.dequant(None) for h in heads])
    x = leaf(n, d_in, dtype=torch.bfloat16)
    dy = torch.randn(n, sum(outs), device=DEV, dtype=torch.bfloat16)
    y = lora_group(x, heads, WeightBuffer(), fp8=(reference.fp8_rows, forward))
    y.backward(dy)
    dx, grads = x.grad.clone(), [p.grad.clone() for h in heads if h.lora_A is not None for p in (h.lora_A, h.lora_B)]
    x.grad = None
    for h in heads:
        if h.lora_A is not None:
            h.lora_A.grad = h.lora_B.grad = None
    plain = lora_group(x, heads, WeightBuffer())
    plain.backward(dy)
    xe, we = _fp8_operands(x.detach(), w, 1)
    dye, wte = _fp8_operands(dy, w, 0)
    low = (plain.detach().float() - x.detach().float() @ w.float().t())        # the LoRA term (zero without LoRA)
    if forward:
        assert rel(y, xe @ we.t() + low) < 1e-2
        assert rel(y, plain) > 1e-4                                             # the fp8 product did run
    else:
        assert torch.equal(y, plain)
    low_dx = x.grad.float() - dy.float() @ w.float()
    assert rel(dx, dye @ wte.t() + low_dx) < 1e-2
    assert rel(dx, x.grad) > 1e-4
    for g, h_ in zip(grads, [p.grad for h in heads if h.lora_A is not None for p in (h.lora_A, h.lora_B)],
                     strict=True):
        assert rel(g, h_) < 0.05


def test_lora_group_fp8_leaves_dimensions_cublas_cannot_take_in_the_compute_dtype():
    torch.manual_seed(0)
    heads = _heads(40, [24], 4, torch.bfloat16)                 # 24 outputs: not a multiple of 16
    x = leaf(9, 40, dtype=torch.bfloat16)
    assert torch.equal(lora_group(x, heads, fp8=(reference.fp8_rows, True)), lora_group(x, heads))


@pytest.mark.gpu
def test_fp8_rows_kernel_equals_the_twin():
    mod = kernel("fp8")
    if INTERPRETED:
        pytest.skip("the interpreter's float32 -> e4m3 cast is not the GPU's")
    torch.manual_seed(0)
    for k in (200, 9000):                                       # one chunk; three
        x = torch.randn(37, k, device=DEV, dtype=torch.bfloat16) * 3
        x[3] = 0
        q, s = mod.rows(x)
        q2, s2 = reference.fp8_rows(x)
        assert torch.equal(s, s2)
        assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowrank_add_kernel_equals_the_twin(dtype):
    """y += h b^T (+ c) in place: b a (n, r) factor or a transposed (r, n) one, c a residual, a bias or none, ranks
    below, at and across the kernel's 16-wide inner tile, rows and columns not multiples of its tiles."""
    mod = kernel("fp8")
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 tl.dot is wrong (float16 checks the kernel there)")
    torch.manual_seed(0)
    m, n = 70, 200
    for r, b_t, c_kind in [(16, False, None), (48, False, "residual"), (5, True, "bias"), (33, True, None)]:
        y = torch.randn(m, n, device=DEV, dtype=dtype)
        h = torch.randn(m, r, device=DEV, dtype=dtype)
        b = torch.randn(r, n, device=DEV, dtype=dtype).t() if b_t else torch.randn(n, r, device=DEV, dtype=dtype)
        c = {None: None, "residual": torch.randn(m, n, device=DEV, dtype=dtype),
             "bias": torch.randn(n, device=DEV, dtype=dtype)}[c_kind]
        want = reference.lowrank_add_(y.clone(), h, b, c)
        got = y.clone()
        assert mod.lowrank_add_(got, h, b, c) is got
        assert rel(got, want) < 1e-3, (r, b_t, c_kind)
        assert rel(want, y) > 0.1                                  # the term is not lost in the sum


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_fp8_kernels_equal_the_twin(nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    mod = kernel("fp8")
    if INTERPRETED:
        pytest.skip("the interpreter's float32 -> e4m3 cast is not the GPU's")
    from lorafit.kernels.nf4 import NF4Weight
    torch.manual_seed(0)
    w = torch.randn(96, 320, device=DEV, dtype=torch.bfloat16)
    q, st = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested, blocksize=64)
    full = reference.dequant_nf4(q, st, torch.float32)
    rows, cols = reference.FP8_MAX / full.abs().amax(1), reference.FP8_MAX / full.abs().amax(0)
    got = mod.nf4_rows(NF4Weight(q, st), rows, torch.empty(96, 320, dtype=torch.float8_e4m3fn, device=DEV))
    assert torch.equal(got.view(torch.uint8), reference.fp8_weight(full, rows).view(torch.uint8))
    wide = torch.zeros(320, 128, dtype=torch.float8_e4m3fn, device=DEV)   # a head's columns of a group's W^T
    mod.nf4_cols(NF4Weight(q, st), cols, wide[:, 16:112])
    want = reference.fp8_weight(full, cols, transposed=True)
    assert torch.equal(wide[:, 16:112].view(torch.uint8), want.view(torch.uint8))
    assert wide[:, :16].float().abs().sum() == 0 and wide[:, 112:].float().abs().sum() == 0
