"""The cuda-triton kernels against the cpu-torch specification (backends/cpu_torch.py).

Runs on a CUDA GPU when one is visible; otherwise under Triton's CPU interpreter, which this module
switches on itself (TRITON_INTERPRET=1 must be set before lorakit.kernels is imported). Interpreter
shapes are small but odd on purpose: K = 32*odd (96, 160), N not a multiple of any tile (50, 97),
M = 1 (decode), 3 and 37 (ragged M tiles); test_matmul_paths forces every kernel path (gemv, gemm,
SWAP_AB, split-K) explicitly.

Tolerances (ONE table, used by every comparison below)
-----------------------------------------------------
Both sides dequantize W identically (fp32 product qs*d, rounded once to the activation dtype), so the
only differences are the order of the fp32 accumulations and where the result is rounded. With
u_acc = 2^-24 (fp32 unit roundoff), a sum of K products computed in any order is within
K*u_acc*sum|x_k w_k| of the exact sum, so two orders differ by at most 2*K*u_acc*mag, where
mag = |x| @ |W|.T (elementwise, computed in fp64) is the natural scale that survives cancellation.
Rounding the result to a storage dtype with unit roundoff u_out (half an ulp, relative) can move two
values that straddle a rounding boundary one ulp apart: <= 2*u_out*|y|.
  * fp32 out  (u_out = 2^-24):  |d| <= 2*K*2^-24*mag + 2*2^-24*|y|
  * bf16 out  (u_out = 2^-8, 8 significant bits):   adds 2*2^-8*|y|
  * fp16 out  (u_out = 2^-11, 11 significant bits): adds 2*2^-11*|y|
Weight rounding: the kernels form W = rnd(qs*d) (fp32 product, one rounding to the activation dtype,
as lorakit.quant.dequantize_q8_0). The cpu-torch spec may form it as rnd(qs*rnd(d)) (d converted to
the activation dtype first): |W' - W| <= 3*u_w*|W| with u_w = 2^-8 for bf16, 0 for fp16 (d is exact
in fp16, so both are one rounding of the exact product) and fp32; vs the spec add 3*u_w*mag (U_W_SPEC).
test_weight_rounding_exact checks the kernels' own rounding with the tight bound.
Fused LoRA: the spec rounds t = x@a, t@b.T, s*(.) and the final sum to the activation dtype (u_act
each); the kernel keeps t@b.T and the sum in fp32 and rounds once. So add u_act*(|y_base| + 3*lmag)
with lmag = |s|*(|x|@|a|)@|b|.T, plus the accumulation term over K + r terms.
AdamW: the update is the spec's op sequence; without clipping (factor 1) it is bit-exact. With
clipping the factor float(c/n) can differ by 1 ulp, because the norm's squares are summed in fp32
blocks (ggml/spec: in double); that relative 2^-23 perturbation of g' passes through at most ~4 more
roundings, so m, v, x match to ADAM_RTOL = 16*2^-24 relative to their magnitude.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # must happen before triton decorates lorakit's kernels
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lorakit.backends.cpu_torch import CpuTorchBackend  # noqa: E402
from lorakit.kernels import lora_update, q8_0_matmul, triton_util  # noqa: E402
from lorakit.kernels.triton_util import _dequant_words  # noqa: E402
from lorakit.lora import LoraLinear  # noqa: E402
from lorakit.quant import Q8Weight, dequantize_q8_0, quantize_q8_0  # noqa: E402
from tests.adam_case import ADAM_RTOL, hyper, large_case  # noqa: E402

qmm = q8_0_matmul
if not CUDA and not qmm.interpreting():
    pytest.skip("lorakit.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

DEVICE = torch.device("cuda" if CUDA else "cpu")
# the interpreter's numpy scalar conversions warn on every program; they are not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# ---- the tolerance table -------------------------------------------------------------------------
U_ACC = 2.0**-24  # fp32 accumulator unit roundoff
U_OUT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff
U_W_SPEC = {torch.float32: 0.0, torch.bfloat16: 3 * 2.0**-8, torch.float16: 0.0}  # spec's W rounding
NORM_RTOL = 64 * 2.0**-24  # fp32 block sums (tree, log2(4096) = 12 levels) vs the spec's double sum


def bound(dtype, n_terms, mag, y, lora_mag=None, y_base=None, spec_w=True):
    """The derived elementwise bound on |kernel - spec| (see the module docstring)."""
    u = U_OUT[dtype]
    tol = 2 * n_terms * U_ACC * mag + 2 * u * y.abs() + 1e-30
    if spec_w:
        tol = tol + U_W_SPEC[dtype] * mag
    if lora_mag is not None:
        tol = tol + u * (y_base.abs() + 3 * lora_mag)
    return tol


def assert_within(got, ref, tol, what=""):
    err = (got.double().cpu() - ref.double().cpu()).abs()
    tol = tol.double().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got.double()).all(), f"{what}: non-finite output"
    worst = float((err / tol).max())
    assert worst <= 1.0, f"{what}: max |err|/bound = {worst:.3g} (max err {float(err.max()):.3g})"


# ---- fixtures --------------------------------------------------------------------------------------

SPEC = CpuTorchBackend()


@pytest.fixture(scope="module")
def tri():
    from lorakit.backends.cuda_triton import CudaTritonBackend

    return CudaTritonBackend(device=DEVICE)


def make_weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_q8_0(torch.randn(n, k, generator=g))


def on(w: Q8Weight, device=DEVICE) -> Q8Weight:
    return w.to(device)


def rand(*shape, dtype=torch.float32, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def magnitude(x, w: Q8Weight):
    """|x| @ |W|.T in fp64 with W as the spec rounds it for x's dtype."""
    wd = SPEC.dequantize(w, x.dtype).double()
    return x.double().abs() @ wd.abs().T


# ---- forward: q8_0 matmul (+ fused LoRA) ---------------------------------------------------------

SHAPES = [(1, 50, 96), (3, 97, 160), (37, 97, 160), (37, 50, 96)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matmul(tri, m, n, k, dtype):
    w = make_weight(n, k)
    x = rand(m, k, dtype=dtype)
    ref = SPEC.matmul(x, w)
    got = tri.matmul(x.to(DEVICE), on(w))
    assert got.dtype == dtype
    assert_within(got, ref, bound(dtype, k, magnitude(x, w), ref.double()), f"matmul {m}x{n}x{k} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 97, 160), (37, 50, 96)])
@pytest.mark.parametrize("rank", [4, 20])
def test_lora_linear_fused(tri, m, n, k, dtype, rank):
    w = make_weight(n, k)
    x = rand(m, k, dtype=dtype)
    a = rand(k, rank, seed=2, scale=0.3)
    b = rand(n, rank, seed=3, scale=0.3)
    s = 0.75
    ref = SPEC.lora_linear(x, w, [(a, b, s)])
    got = tri.lora_linear(x.to(DEVICE), on(w), [(a.to(DEVICE), b.to(DEVICE), s)])
    y_base = SPEC.matmul(x, w).double()
    lmag = s * ((x.double().abs() @ a.to(dtype).double().abs()) @ b.to(dtype).double().abs().T)
    tol = bound(dtype, k + rank, magnitude(x, w) + lmag, ref.double(), lora_mag=lmag, y_base=y_base)
    assert_within(got, ref, tol, f"lora_linear {m}x{n}x{k} r{rank} {dtype}")


def test_lora_linear_several_adapters(tri):
    m, n, k = 5, 50, 96
    w = make_weight(n, k)
    x = rand(m, k)
    loras = [(rand(k, 4, seed=10 + i, scale=0.3), rand(n, 4, seed=20 + i, scale=0.3), 0.5 + i) for i in (0, 1, 2)]
    ref = SPEC.lora_linear(x, w, loras)
    got = tri.lora_linear(x.to(DEVICE), on(w), [(a.to(DEVICE), b.to(DEVICE), s) for a, b, s in loras])
    lmag = sum(s * (x.double().abs() @ a.double().abs()) @ b.double().abs().T for a, b, s in loras)
    tol = bound(torch.float32, k + 12, magnitude(x, w) + lmag, ref.double(), lmag, ref.double())
    assert_within(got, ref, tol, "three adapters")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_loras_gives_lora_linears_numbers(tri, dtype):
    """Backend.fuse_loras forms the terms ahead as lora_linear combines them: the same bits from the formed terms,
    on both backends, for one term, several (joined into one fused term on cuda-triton), a scale 0, and a rank
    past MAX_FUSED_RANK (kept apart)."""
    m, n, k = 5, 50, 96
    w = make_weight(n, k)
    x = rand(m, k, dtype=dtype)

    def term(i, r, s):
        return rand(k, r, seed=10 + i, scale=0.3), rand(n, r, seed=20 + i, scale=0.3), s

    cases = {
        "one": [term(0, 4, 0.7)],
        "three": [term(0, 4, 0.7), term(1, 8, 0.4), term(2, 4, -1.5)],
        "scale 0": [term(0, 4, 0.7), term(1, 4, 0.0)],
        "past the fused rank": [term(0, 60, 0.5), term(1, 8, 0.3)],
    }
    for be, dev in ((SPEC, "cpu"), (tri, DEVICE)):
        xd, wd = x.to(dev), on(w, dev)
        for name, loras in cases.items():
            loras = [(a.to(dev), b.to(dev), s) for a, b, s in loras]
            formed = be.fuse_loras(loras, dtype)
            assert all(a.dtype == dtype and b.dtype == dtype for a, b, _ in formed)
            assert torch.equal(be.lora_linear(xd, wd, formed), be.lora_linear(xd, wd, loras)), (be.name, name)
    joined = tri.fuse_loras([term(0, 4, 0.7), term(1, 8, 0.4)], dtype)
    assert len(joined) == 1 and joined[0][0].shape[1] == 12 and joined[0][2] == 1.0


@pytest.mark.parametrize(
    "m,config",
    [
        (1, {"path": "gemv"}),  # ragged last K step (64 + 64 + 32 of 160) and N tile (97 = 6 * 16 + 1)
        (4, {"path": "gemv", "BLOCK_N": 8, "KB": 1, "UNROLL": 2}),  # several rows of x, 2 steps per load
        (1, {"path": "gemv", "BLOCK_N": 8, "KB": 4, "UNROLL": 2}),  # K < one unrolled step: all masked
        (1, {"path": "gemv", "BLOCK_KT": 32}),  # t = x @ a by 5 t-programs in the launch
        (2, {"path": "gemv", "BLOCK_KT": 64}),  # ... by 3 per row, the last one ragged
        (1, {"path": "gemv_tc"}),  # tensor-core gemv: ragged last K tile (64 + 64 + 32) and N tile
        (16, {"path": "gemv_tc", "BLOCK_N": 32, "num_warps": 2}),  # all 16 rows of x in one MMA tile
        (3, {"path": "gemv_tc", "SPLIT_K": 2}),  # split-K: the last program of an N block sums the partials
        (5, {"path": "gemv_tc", "SPLIT_K": 4, "BLOCK_K": 32}),  # 5 K tiles over 4 splits (2, 2, 1, 0 tiles)
        (1, {"path": "gemv_tc", "SPLIT_K": 5, "BLOCK_K": 64}),  # 3 K tiles over 5 splits (1, 1, 1/2, 0, 0 tiles)
        (37, {"path": "dequant"}),  # dequantize + torch matmul (cuBLAS on the GPU), LoRA by addmm
        (1, {"path": "gemm"}),  # the tiled kernel with a single row
        (37, {"path": "gemm", "SPLIT_K": 2, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}),
        # y.T = W @ x.T (the dequantized tile as the MMA's A operand), ragged M and N tiles, split-K
        (37, {"path": "gemm", "SWAP_AB": True, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}),
        (2, {"path": "gemm", "SWAP_AB": True, "SPLIT_K": 2, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}),
    ],
)
@pytest.mark.parametrize("with_lora", [False, True])
def test_matmul_paths(m, config, with_lora):
    """Every kernel path and split-K explicitly, with and without LoRA (bf16)."""
    n, k, dtype = 97, 160, torch.bfloat16
    w = make_weight(n, k)
    x = rand(m, k, dtype=dtype)
    a = rand(k, 8, seed=2, scale=0.3)
    b = rand(n, 8, seed=3, scale=0.3)
    s = 1.5 if with_lora else 0.0
    ref = SPEC.lora_linear(x, w, [(a, b, s)] if with_lora else [])
    wd = on(w)
    got = qmm.q8_0_matmul(x.to(DEVICE), wd.qs, wd.d, a.to(DEVICE), b.to(DEVICE), s, config=config)
    y_base = SPEC.matmul(x, w).double()
    lmag = abs(s) * ((x.double().abs() @ a.to(dtype).double().abs()) @ b.to(dtype).double().abs().T)
    tol = bound(dtype, k + 8, magnitude(x, w) + lmag, ref.double(), lora_mag=lmag, y_base=y_base)
    assert_within(got, ref, tol, f"path {config}")


@pytest.mark.parametrize("m,r,block_kt", [(1, 5, 32), (2, 24, 16), (3, 8, 4096)])
def test_gemv_t_programs(m, r, block_kt):
    """The gemv path forms t = x @ a in its own launch (t-programs summing K chunks, the last combining): the
    same product as with t given (t rounded to bf16 once either way: their t may differ in its last bit, so
    the bound counts one more rounding of t), the same bits on every call, and its sync words zero again."""
    n, k, dtype = 97, 160, torch.bfloat16
    w = make_weight(n, k, seed=4)
    x = rand(m, k, dtype=dtype, seed=5)
    a = rand(k, r, seed=6, scale=0.3).to(dtype)
    b = rand(n, r, seed=7, scale=0.3).to(dtype)
    wd, xd, ad, bd = on(w), x.to(DEVICE), a.to(DEVICE), b.to(DEVICE)
    cfg = {"path": "gemv", "BLOCK_KT": block_kt}
    got = qmm.q8_0_matmul(xd, wd.qs, wd.d, ad, bd, 0.75, config=cfg)
    again = qmm.q8_0_matmul(xd, wd.qs, wd.d, ad, bd, 0.75, config=cfg)
    assert torch.equal(got, again)
    assert all(int(buf.abs().sum()) == 0 for buf in qmm._SYNC.values())
    ref = SPEC.lora_linear(x, w, [(a, b, 0.75)])
    y_base = SPEC.matmul(x, w).double()
    tmag = x.double().abs() @ a.double().abs()
    lmag = 0.75 * tmag @ b.double().abs().T
    tol = bound(dtype, k + r, magnitude(x, w) + lmag, ref.double(), lora_mag=2 * lmag, y_base=y_base)
    assert_within(got, ref, tol, f"gemv t-programs m{m} r{r}")
    given = qmm.q8_0_matmul(xd, wd.qs, wd.d, ad, bd, 0.75, config=cfg, lora_t=xd @ ad)
    assert_within(got, given, tol, "t formed in the launch vs given")


def test_matmul_fp16_and_out_dtype_and_batch_dims():
    n, k = 50, 96
    w = make_weight(n, k)
    x = rand(2, 3, k, dtype=torch.float16)
    wd = on(w)
    ref = SPEC.matmul(x, w)
    got = qmm.q8_0_matmul(x.to(DEVICE), wd.qs, wd.d)
    assert got.shape == (2, 3, n) and got.dtype == torch.float16
    mag = magnitude(x.reshape(-1, k), w).reshape(2, 3, n)
    assert_within(got, ref, bound(torch.float16, k, mag, ref.double()), "fp16")
    # fp32 output of a bf16 product: no rounding of the result
    xb = rand(37, k, dtype=torch.bfloat16)
    ref32 = xb.float() @ SPEC.dequantize(w, torch.bfloat16).float().T
    got32 = qmm.q8_0_matmul(xb.to(DEVICE), wd.qs, wd.d, out_dtype=torch.float32)
    assert got32.dtype == torch.float32
    assert_within(got32, ref32, bound(torch.float32, k, magnitude(xb, w), ref32.double()), "bf16->fp32")


def test_matmul_strided_input():
    n, k = 50, 96
    w = make_weight(n, k)
    x = rand(37, 2 * k)[:, ::2]  # non-contiguous rows and columns
    ref = SPEC.matmul(x.contiguous(), w)
    got = qmm.q8_0_matmul(x.to(DEVICE), on(w).qs, on(w).d)
    assert_within(got, ref, bound(torch.float32, k, magnitude(x, w), ref.double()), "strided x")


def test_matmul_rejects_bad_input():
    w = on(make_weight(50, 96))
    with pytest.raises(ValueError):
        qmm.q8_0_matmul(torch.zeros(2, 64, device=DEVICE), w.qs, w.d)
    with pytest.raises(TypeError):
        qmm.q8_0_matmul(torch.zeros(2, 96, dtype=torch.int32, device=DEVICE), w.qs, w.d)
    with pytest.raises(ValueError):
        a, b = torch.zeros(96, 4, device=DEVICE), torch.zeros(49, 4, device=DEVICE)
        qmm.q8_0_matmul(torch.zeros(2, 96, device=DEVICE), w.qs, w.d, a, b, 1.0)
    assert qmm.q8_0_matmul(torch.zeros(0, 96, device=DEVICE), w.qs, w.d).shape == (0, 50)


@pytest.mark.parametrize("m,n,k", [(1, 97, 160), (37, 50, 96)])
def test_weight_rounding_exact(m, n, k):
    """bf16: the kernels' W is rnd_bf16(qs*d) exactly (fp64 reference over that W, tight bound)."""
    w = make_weight(n, k)
    x = rand(m, k, dtype=torch.bfloat16)
    wb = dequantize_q8_0(w.qs, w.d, torch.bfloat16).double()
    ref = (x.double() @ wb.T).to(torch.bfloat16).double()
    mag = x.double().abs() @ wb.abs().T
    wd = on(w)
    got = qmm.q8_0_matmul(x.to(DEVICE), wd.qs, wd.d)
    assert_within(got, ref, bound(torch.bfloat16, k, mag, ref, spec_w=False), "fwd W = rnd(qs*d)")
    dy = rand(m, n, dtype=torch.bfloat16, seed=5)
    dref = (dy.double() @ wb).to(torch.bfloat16).double()
    got = qmm.q8_0_matmul_grad_input(dy.to(DEVICE), wd.qs, wd.d)
    gmag = dy.double().abs() @ wb.abs()
    assert_within(got, dref, bound(torch.bfloat16, n, gmag, dref, spec_w=False), "grad W = rnd(qs*d)")


# ---- backward: grad-input, and LoraLinear end to end ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matmul_grad_input(tri, m, n, k, dtype):
    w = make_weight(n, k)
    dy = rand(m, n, dtype=dtype, seed=5)
    ref = SPEC.matmul_grad_input(dy, w)
    got = tri.matmul_grad_input(dy.to(DEVICE), on(w))
    mag = dy.double().abs() @ SPEC.dequantize(w, dtype).double().abs()
    assert got.dtype == dtype
    assert_within(got, ref, bound(dtype, n, mag, ref.double()), f"grad_input {m}x{n}x{k} {dtype}")


def test_grad_input_split_and_tiles():
    n, k = 97, 160
    w = make_weight(n, k)
    dy = rand(37, n, seed=6)
    ref = SPEC.matmul_grad_input(dy, w)
    mag = dy.double().abs() @ SPEC.dequantize(w).double().abs()
    wd = on(w)
    for cfg in ({"SPLIT_K": 3}, {"SPLIT_K": 2, "BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32}, {"path": "dequant"}):
        got = qmm.q8_0_matmul_grad_input(dy.to(DEVICE), wd.qs, wd.d, config=cfg)
        assert_within(got, ref, bound(torch.float32, n, mag, ref.double()), f"grad_input {cfg}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,with_lora", [(1, True), (37, True), (37, False)])
def test_lora_linear_autograd(tri, m, with_lora, dtype):
    """LoraLinear.apply with the triton backend vs the cpu-torch backend: y, dx, da, db."""
    n, k, r, s = 97, 160, 4, 0.5
    w = make_weight(n, k)
    x0 = rand(m, k, dtype=dtype)
    a0 = rand(k, r, seed=2, scale=0.3)
    b0 = rand(n, r, seed=3, scale=0.3)
    gy = rand(m, n, dtype=dtype, seed=4)

    def run(backend, device):
        x = x0.clone().to(device).requires_grad_(True)
        a = a0.clone().to(device).requires_grad_(True) if with_lora else None
        b = b0.clone().to(device).requires_grad_(True) if with_lora else None
        y = LoraLinear.apply(x, w.to(device), a, b, s, backend)
        (y.float() * gy.to(device).float()).sum().backward()
        grads = (x.grad, a.grad, b.grad) if with_lora else (x.grad, None, None)
        return y.detach(), grads

    y_ref, (dx_ref, da_ref, db_ref) = run(SPEC, "cpu")
    y_got, (dx_got, da_got, db_got) = run(tri, DEVICE)

    wd = SPEC.dequantize(w, dtype).double()
    y_base = SPEC.matmul(x0, w).double()
    if with_lora:
        lmag = s * ((x0.double().abs() @ a0.to(dtype).double().abs()) @ b0.to(dtype).double().abs().T)
        tol = bound(dtype, k + r, x0.double().abs() @ wd.abs().T + lmag, y_ref.double(), lmag, y_base)
    else:
        tol = bound(dtype, k, x0.double().abs() @ wd.abs().T, y_ref.double())
    assert_within(y_got, y_ref, tol, "y")
    # dx = grad_input(dy) + s*(dy@b)@a.T: the second term and the sum are the same torch ops on both
    # sides; the bound covers the grad-input term, plus one rounding of the sum
    gmag = gy.double().abs() @ wd.abs()
    if with_lora:
        gmag = gmag + s * (gy.double().abs() @ b0.to(dtype).double().abs()) @ a0.to(dtype).double().abs().T
    assert_within(dx_got, dx_ref, bound(dtype, n + r, gmag, dx_ref.double()) + U_OUT[dtype] * gmag, "dx")
    if with_lora:  # da, db: the same torch ops on both sides (in dtype, with two intermediate roundings)
        u = U_OUT[dtype]
        amag = s * (x0.double().abs().T @ (gy.double().abs() @ b0.double().abs()))
        assert_within(da_got, da_ref, bound(dtype, m + n, amag, da_ref.double()) + 2 * u * amag, "da")
        bmag = s * (gy.double().abs().T @ (x0.double().abs() @ a0.double().abs()))
        assert_within(db_got, db_ref, bound(dtype, m + k, bmag, db_ref.double()) + 2 * u * bmag, "db")


# ---- embedding / dequantize ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_and_dequantize_exact(tri, dtype):
    w = make_weight(97, 160)
    tokens = torch.tensor([[0, 96, 5], [5, 1, 50]])
    assert torch.equal(tri.embedding(on(w), tokens.to(DEVICE), dtype).cpu(), SPEC.embedding(w, tokens, dtype))
    assert torch.equal(tri.dequantize(on(w), dtype).cpu(), SPEC.dequantize(w, dtype))
    with pytest.raises(IndexError):
        tri.embedding(on(w), torch.tensor([97], device=DEVICE), dtype)


def test_float_weights_fall_back_to_torch(tri):
    w = rand(50, 96, seed=7)
    x = rand(3, 96)
    got = tri.matmul(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert torch.allclose(got, SPEC.matmul(x, w), rtol=1e-5, atol=1e-5)
    dy = rand(3, 50)
    got = tri.matmul_grad_input(dy.to(DEVICE), w.to(DEVICE)).cpu()
    assert torch.allclose(got, SPEC.matmul_grad_input(dy, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(tri.embedding(w.to(DEVICE), torch.tensor([1, 2], device=DEVICE)).cpu(), w[[1, 2]])


# ---- AdamW ---------------------------------------------------------------------------------------

SIZES = [(96, 4), (4, 50), (4,), (1000, 4), (4, 1)]  # lora_a / lora_b / norm lora_b shapes
DECAYED = [True, True, False, True, False]


def _adam_state(seed, grad_scale):
    g = torch.Generator().manual_seed(seed)
    mk = lambda s, f=1.0: (torch.randn(*s, generator=g) * f).float()  # noqa: E731
    params = [mk(s) for s in SIZES]
    grads = [mk(s, grad_scale) for s in SIZES]
    m = [mk(s, 0.01) for s in SIZES]
    v = [mk(s, 0.01).abs() for s in SIZES]
    return params, grads, m, v


def close(got, want):
    torch.testing.assert_close(got, want, rtol=ADAM_RTOL, atol=ADAM_RTOL * float(want.abs().max()))


@pytest.mark.parametrize("as_views", [False, True])
@pytest.mark.parametrize("gclip,grad_scale", [(1.0, 1.0), (1e6, 1.0), (0.0, 1.0), (1.0, 1e-3)])
def test_adamw_step(tri, gclip, grad_scale, as_views):
    hp = hyper(gclip)
    params, grads, m, v = _adam_state(11, grad_scale)
    ref = [[t.clone() for t in ts] for ts in (params, grads, m, v)]
    norm_ref = SPEC.adamw_step(*ref[0:4], DECAYED, hp)
    clipping = gclip > 0 and norm_ref > gclip

    if as_views:  # the layout the trainer keeps: every tensor a view into one flat buffer per role
        flats, lists = [], []
        for ts in (params, grads, m, v):
            flat = torch.cat([t.reshape(-1) for t in ts]).to(DEVICE)
            flats.append(flat)
            lists.append([p.view(t.shape) for p, t in zip(torch.split(flat, [t.numel() for t in ts]), ts, strict=True)])
    else:
        lists = [[t.to(DEVICE) for t in ts] for ts in (params, grads, m, v)]
    norm = tri.adamw_step(*lists, DECAYED, hp)

    assert abs(norm - norm_ref) <= NORM_RTOL * norm_ref
    for name, got_ts, ref_ts in zip(("param", "grad", "m", "v"), lists, ref, strict=True):
        for i, (got, want) in enumerate(zip(got_ts, ref_ts, strict=True)):
            got = got.cpu()
            if not clipping or name == "grad":
                assert torch.equal(got, want), f"{name}[{i}] not bit-exact (gclip={gclip})"
            else:
                close(got, want)
    if as_views:  # in place in the caller's buffers: the lists' views changed
        assert not torch.equal(lists[0][0].cpu(), params[0])


def test_adamw_sched_zero_moves_nothing(tri):
    """§4.3: with sched = 0 the first update only fills m and v."""
    hp = hyper(1.0, t=1, sched=0.0)
    params, grads, m, v = _adam_state(12, 1.0)
    lists = [[t.clone().to(DEVICE) for t in ts] for ts in (params, grads, m, v)]
    tri.adamw_step(*lists, DECAYED, hp)
    for got, want in zip(lists[0], params, strict=True):
        assert torch.equal(got.cpu(), want)
    assert not torch.equal(lists[2][0].cpu(), m[0])


def test_adamw_flat_matches_list_form():
    hp = hyper(0.5)
    params, grads, m, v = _adam_state(13, 1.0)
    flat = [torch.cat([t.reshape(-1) for t in ts]).to(DEVICE) for ts in (params, grads, m, v)]
    mask = torch.cat(
        [torch.full((t.numel(),), int(dk), dtype=torch.uint8) for t, dk in zip(params, DECAYED, strict=True)]
    )
    norm = lora_update.adamw_flat(*flat, hp, decay=mask.to(DEVICE))
    ref = [[t.clone() for t in ts] for ts in (params, grads, m, v)]
    lists = [[t.to(DEVICE) for t in ts] for ts in ref]
    norm2 = lora_update.adamw_step(*lists, DECAYED, hp)
    assert float(norm) == norm2
    assert torch.equal(flat[0].cpu(), torch.cat([t.cpu().reshape(-1) for t in lists[0]]))


# ---- GPU only: real shapes through the autotuned kernels -------------------------------------------


def kernel_w(w: Q8Weight, dtype) -> torch.Tensor:
    """W as the GPU kernels round it for activations of `dtype`: rnd(qs * d) (not the spec's rnd(qs * rnd(d)))."""
    n, k = w.qs.shape
    return w.qs.float().reshape(n, k // 32, 32).mul(w.d.float()[:, :, None]).reshape(n, k).to(dtype)


def assert_gpu_matmul(x, w: Q8Weight, r: int, config: dict | None, what: str) -> None:
    """q8_0_matmul(x, W) on the GPU (with r > 0: + 0.5 * (x @ a) @ b.T, rank r) within the derived bounds: the base
    against fp64 over kernel_w (the tight spec_w=False bound), with LoRA against the spec's lora_linear."""
    n, k = w.qs.shape
    dtype = x.dtype
    wd = kernel_w(w, dtype)
    y_base = (x.double() @ wd.double().T).to(dtype).double()
    mag = x.double().abs() @ wd.double().abs().T
    if not r:
        got = qmm.q8_0_matmul(x, w.qs, w.d, config=config)
        assert_within(got, y_base, bound(dtype, k, mag, y_base, spec_w=False), what)
        return
    s = 0.5
    a = rand(k, r, seed=2, scale=0.1).cuda()
    b = rand(n, r, seed=3, scale=0.1).cuda()
    ref = SPEC.lora_linear(x, w, [(a, b, s)])
    lmag = s * ((x.double().abs() @ a.to(dtype).double().abs()) @ b.to(dtype).double().abs().T)
    got = qmm.q8_0_matmul(x, w.qs, w.d, a, b, s, config=config)
    assert_within(got, ref, bound(dtype, k + r, mag + lmag, ref.double(), lmag, y_base), what)


def assert_gpu_grad_input(dy, w: Q8Weight, config: dict | None, what: str) -> None:
    """q8_0_matmul_grad_input(dy, W) on the GPU against fp64 over kernel_w within the tight derived bound."""
    dtype = dy.dtype
    wd = kernel_w(w, dtype).double()
    dref = (dy.double() @ wd).to(dtype).double()
    gmag = dy.double().abs() @ wd.abs()
    dx = qmm.q8_0_matmul_grad_input(dy, w.qs, w.d, config=config)
    assert_within(dx, dref, bound(dtype, w.qs.shape[0], gmag, dref, spec_w=False), what)


@gpu
@needs_gpu
@pytest.mark.parametrize(
    "m,n,k,dtype",
    [(m, 3200, 3200, torch.bfloat16) for m in (1, 3, 16, 64, 300, 2048)]
    + [(m, 1024, 4096, torch.bfloat16) for m in (1, 37, 256)]
    + [(m, 3200, 8640, torch.bfloat16) for m in (2, 512)]
    + [(m, 8640, 3200, torch.float32) for m in (1, 40, 1000)],
)
def test_gpu_autotuned_shapes(m, n, k, dtype):
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_tf32 = False
    w = on(make_weight(n, k))
    x = rand(m, k, dtype=dtype).cuda()
    assert_gpu_matmul(x, w, 0, None, f"gpu fwd {m}x{n}x{k} {dtype}")
    assert_gpu_matmul(x, w, 16, None, f"gpu lora {m}x{n}x{k} {dtype}")
    dy = rand(m, n, dtype=dtype, seed=5).cuda()
    assert_gpu_grad_input(dy, w, None, f"gpu grad {m}x{n}x{k} {dtype}")


@gpu
@needs_gpu
def test_gpu_gemv_tc_replays_in_a_cuda_graph():
    """Tensor-core gemvs with split-K and a LoRA term, captured in one CUDA graph whose capture grows their sync
    words (a larger N after a smaller) and then allocates and fills another tensor: every replay gives the eager
    bits (an outgrown sync buffer stays allocated for the graph that still uses it)."""
    k, dtype = 256, torch.bfloat16
    x = rand(1, k, dtype=dtype).cuda()
    a = rand(k, 8, seed=2, scale=0.3).to(dtype).cuda()
    cases = [(on(make_weight(n, k, seed=n)), rand(n, 8, seed=n, scale=0.3).to(dtype).cuda()) for n in (64, 3000)]
    cfg = {"path": "gemv_tc", "BLOCK_N": 16, "SPLIT_K": 4, "num_warps": 1}
    eager = [qmm.q8_0_matmul(x, w.qs, w.d, a, b, 0.5, config=cfg) for w, b in cases]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a new stream: its sync words are allocated (and grown) in the capture
        outs = [qmm.q8_0_matmul(x, w.qs, w.d, a, b, 0.5, config=cfg) for w, b in cases]
        other = torch.full((1 << 16,), 7, dtype=torch.int32, device="cuda")
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, e) for o, e in zip(outs, eager, strict=True))
    assert int(other.sum()) == 7 << 16


@gpu
@needs_gpu
def test_gpu_adamw_large():
    hp, state, decayed = large_case()
    ref = [[t.clone() for t in ts] for ts in state]
    norm_ref = SPEC.adamw_step(*ref, decayed, hp)
    lists = [[t.cuda() for t in ts] for ts in state]
    norm = lora_update.adamw_step(*lists, decayed, hp)
    assert abs(norm - norm_ref) <= NORM_RTOL * norm_ref
    for got_ts, ref_ts in zip(lists, ref, strict=True):
        for got, want in zip(got_ts, ref_ts, strict=True):
            close(got.cpu(), want)


@triton.jit
def _round_probe_kernel(q_ptr, d_ptr, out_ptr, n_d, BLOCK: tl.constexpr, EMU_BF16: tl.constexpr):
    # out[i, j] = rnd_bf16(q[i] * d[j]) as the q8_0 GEMV forms it (_q8_times: on the GPU one fma folding
    # _q8_f32's subtraction, in the interpreter _q8_f32 and the product), one rounding
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_d
    q = tl.load(q_ptr + i + tl.zeros([BLOCK], dtype=tl.int32))
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = triton_util._to(triton_util._q8_times(q, d, not EMU_BF16), tl.bfloat16, EMU_BF16)
    tl.store(out_ptr + i * n_d + offs, w.to(tl.float32), mask=mask)


def test_q8_conversion_and_bf16_rounding_exhaustive():
    """Every int8 q times every finite fp16 d: the kernels' int8 -> fp32 without a conversion instruction
    (_q8_f32) and the GEMV's fma form of q * d (_q8_times, GPU only) are exact, so W = rnd_bf16(q * d)
    equals the spec's dequantization bit for bit."""
    q = torch.arange(-128, 128, dtype=torch.int8, device=DEVICE)
    d = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    d = d[torch.isfinite(d)].to(DEVICE)
    if not CUDA:  # the interpreter is slow: every q with a spread of d (both signs, subnormals, extremes)
        d = torch.cat([d[::37], d[:64], d[-64:]])
    out = torch.empty(q.numel(), d.numel(), dtype=torch.float32, device=DEVICE)
    block = 1024
    grid = (q.numel(), triton.cdiv(d.numel(), block))
    _round_probe_kernel[grid](q, d, out, d.numel(), BLOCK=block, EMU_BF16=not CUDA)
    exact = q.double()[:, None] * d.double()[None, :]
    assert torch.equal(exact.float().double(), exact)  # q * d is exact in fp32
    ref = exact.float().to(torch.bfloat16).float()
    assert torch.equal(out, ref)


def test_tc_dequant_identity():
    """The tensor-core gemv's dequantization (triton_util._dequant_words) in exact arithmetic: the PRMT float
    2^15 + (q + 128), times d, plus -(2^15 + 2^7) d, is q * d exactly for every int8 q and finite fp16 d: the
    constant is exact in fp32, and the fma's exact result is the exact q * d (which fp32 holds), so its one
    rounding changes nothing."""
    q = torch.arange(-128, 128, dtype=torch.float64)
    d = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    d = d[torch.isfinite(d)].double()
    magic = int(re.search(r"prmt\.b32 f0, u, (0x[0-9A-Fa-f]+),", triton_util._DEQ_ASM).group(1), 16)
    assert magic == 0x47000000  # the float 2^15, the PRMT's other source
    bits = magic + 256 * (q.to(torch.int64) + 128)  # the PRMT's word: bytes (0, q ^ 0x80, 0, 0x47)
    v = bits.to(torch.int32).view(torch.float32).double()
    assert torch.equal(v, 2.0**15 + (q + 128))
    c = -32896 * d
    assert torch.equal(c.float().double(), c)  # exact in fp32
    fma = v[:, None] * d[None, :] + c[None, :]  # products of <= 16 + 11 bits: exact in fp64, as is the sum
    exact = q[:, None] * d[None, :]
    assert torch.equal(fma, exact) and torch.equal(exact.float().double(), exact)


@triton.jit
def _words_probe_kernel(q_ptr, d_ptr, out_ptr, n_d, F16: tl.constexpr):
    # out[j, c * 32 + i] = W for q[c * 32 + i] and d[j] as the tensor-core gemv forms it (inline PTX)
    rows = tl.program_id(0) * 16 + tl.arange(0, 16)
    cols = tl.program_id(1) * 32 + tl.arange(0, 32)
    q = tl.broadcast_to(tl.load(q_ptr + cols)[None, :], (16, 32))
    d = tl.load(d_ptr + rows, mask=rows < n_d, other=0.0)[:, None]
    w = _dequant_words(q, d, tl.float16 if F16 else tl.bfloat16, 16, 32)
    tl.store(out_ptr + rows[:, None] * 256 + cols[None, :], w.to(tl.float32), mask=rows[:, None] < n_d)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dequant_words_exhaustive(dtype):
    """On the GPU: the tensor-core gemv's W (XOR, PRMT, fma, packed conversion) is rnd(q * d) bit for bit, for
    every int8 q and every finite fp16 d."""
    q = torch.arange(-128, 128, dtype=torch.int8, device=DEVICE)
    d = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    d = d[torch.isfinite(d)].to(DEVICE)
    out = torch.empty(d.numel(), 256, dtype=torch.float32, device=DEVICE)
    _words_probe_kernel[(triton.cdiv(d.numel(), 16), 8)](q, d, out, d.numel(), F16=dtype == torch.float16)
    ref = (d.double()[:, None] * q.double()[None, :]).float().to(dtype).float()
    assert torch.equal(out, ref)


def test_scale_row_alignment_hint():
    """The tensor-core gemv tells triton how d's rows are aligned (D_ALIGN) only as far as they are: K / 32 odd
    gives 2-byte rows, even 4, a multiple of 4 gives 8, of 8 gives 16; a view starting off the allocation's
    alignment lowers it."""
    from lorakit.kernels.q8_0_matmul import _d_align

    for kb, want in ((3, 2), (270, 4), (100, 8), (128, 16), (448, 16)):
        d = torch.zeros(4, kb, dtype=torch.float16, device=DEVICE)
        assert _d_align(d) == want, (kb, want)
    wide = torch.zeros(4, 130, dtype=torch.float16, device=DEVICE)
    assert _d_align(wide[:, 1:129]) == 2  # rows 260 bytes apart, starting 2 bytes in
    assert _d_align(wide[:, 2:130]) == 4


def test_host_grid_arithmetic_matches_triton():
    """triton_util.cdiv / next_pow2 (plain host functions) give triton.cdiv / triton.next_power_of_2's values."""
    for n in [*range(0, 2100), 4095, 4096, 4097, 2**31 - 1, 2**31, 2**40 + 3]:
        assert triton_util.next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 16, 32, 100, 1024):
            assert triton_util.cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_pdl_only_on_hopper_cuda():
    """Programmatic dependent launch is asked for only on a CUDA device of sm_90 or newer (its griddepcontrol
    instructions need it), never under the interpreter or on CPU tensors."""
    assert triton_util.pdl(torch.device("cpu")) == {}
    if CUDA:
        want = torch.cuda.get_device_capability() >= (9, 0)
        assert bool(triton_util.pdl(torch.device("cuda"))) == want
        if want:
            assert triton_util.pdl(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}


def test_dequantize_launches_only_lookups_as_dependent():
    """q8_0_dequantize: an embedding lookup launches as the decode step's overlapping launches do (overlap_pdl), a
    whole weight (dequantize + cuBLAS) always as a plain launch (a dependent one ran 45% longer in a training step).
    """
    from lorakit.kernels.q8_0_dequant import launch_options

    idx = torch.zeros(1, dtype=torch.int64)
    assert launch_options(DEVICE, None) == {}
    assert launch_options(DEVICE, idx) == triton_util.overlap_pdl(DEVICE)
    if CUDA and torch.cuda.get_device_capability() >= (9, 0):
        assert launch_options(DEVICE, idx) == {"PDL": True, "launch_pdl": True}


@triton.jit
def _affine_kernel(x_ptr, y_ptr, n, shift, BLOCK: tl.constexpr, SCALE: tl.constexpr, NEG: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    y = x * SCALE + shift
    if NEG:
        y = -y
    tl.store(y_ptr + offs, y, mask=offs < n)


@triton.jit
def _late_arg_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, shift):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + shift, mask=offs < n)


@gpu
def test_launch_reuses_compiled_kernels_per_specialization():
    """triton_util.launch: the first launch per key through triton, later ones straight to the compiled
    kernel's launcher. Every call computes what kernel[grid](...) computes, across what triton specializes on:
    int values (1, multiples of 16, others), tensor alignment (a view one element in), float arguments,
    constexprs and options, defaulted constexprs; a runtime argument after a constexpr takes triton's path."""
    g = torch.Generator().manual_seed(0)
    for rep in range(3):  # the same keys again: the cached path
        for n, offset, shift, scale, neg in [(37, 0, 0.5, 2, False), (37, 1, -1.0, 2, False), (1, 0, 3.0, 2, False),
                                             (16, 0, 0.25, 3, True), (64, 1, 0.0, 2, False)]:  # fmt: skip
            x = torch.randn(n + offset, generator=g).to(DEVICE)[offset:]
            y = torch.full((n + 1,), 7.0, device=DEVICE)
            # no fma contraction: the reference rounds the product and the sum separately
            const = dict(BLOCK=16, SCALE=scale, num_warps=1, enable_fp_fusion=False, **({"NEG": True} if neg else {}))
            triton_util.launch(_affine_kernel, (triton_util.cdiv(n, 16),), (x, y, n, shift), const)
            want = (x * scale + shift) * (-1 if neg else 1)
            assert torch.equal(y[:n], want), (rep, n, offset, neg)
            assert y[n] == 7.0  # nothing written past n
        x = torch.randn(40, generator=g).to(DEVICE)
        y = torch.zeros(40, device=DEVICE)
        triton_util.launch(_late_arg_kernel, (3,), (x, y, 40), dict(BLOCK=16, shift=1.5))
        assert torch.equal(y, x + 1.5)
    if CUDA:
        keys = [k for k in triton_util._COMPILED if k[0] is _affine_kernel]
        assert len(keys) == 5  # one per distinct specialization above, reused on the later passes
        assert all(tail is None for k, (_, tail) in triton_util._COMPILED.items() if k[0] is _late_arg_kernel)


@gpu
@needs_gpu
def test_launch_cache_starts_over_when_full(monkeypatch):
    """Past COMPILED_MAX keys the cache of compiled kernels starts over; launches stay right throughout."""
    monkeypatch.setattr(triton_util, "_COMPILED", {})
    monkeypatch.setattr(triton_util, "COMPILED_MAX", 3)
    for rep in range(2):
        for n in range(1, 8):  # 7 distinct int values: more keys than the cache holds
            x = torch.arange(n, dtype=torch.float32, device=DEVICE)
            y = torch.zeros(n, device=DEVICE)
            const = dict(BLOCK=16, SCALE=2, num_warps=1, enable_fp_fusion=False)
            triton_util.launch(_affine_kernel, (1,), (x, y, n, 1.0), const)
            assert torch.equal(y, x * 2 + 1), (rep, n)
            assert len(triton_util._COMPILED) <= 3


@gpu
@needs_gpu
def test_launch_calls_triton_launch_hooks_on_the_cached_path():
    """A launch hook set in triton's knobs sees every launch, the cached ones too, with the kernel's metadata
    (launch() skips forming it only while no hook is set)."""
    seen = []

    def hook(meta):
        seen.append(meta.get()["name"])  # triton passes a LazyDict

    x = torch.arange(20, dtype=torch.float32, device=DEVICE)
    y = torch.zeros(20, device=DEVICE)
    const = dict(BLOCK=16, SCALE=2, num_warps=1, enable_fp_fusion=False)
    hooks = triton.knobs.runtime.launch_enter_hook
    triton_util.launch(_affine_kernel, (2,), (x, y, 20, 0.5), const)  # compiled and cached, no hook
    hooks.add(hook)
    try:
        for _ in range(2):
            triton_util.launch(_affine_kernel, (2,), (x, y, 20, 0.5), const)
    finally:
        hooks.remove(hook)
    triton_util.launch(_affine_kernel, (2,), (x, y, 20, 0.5), const)
    assert seen == ["_affine_kernel"] * 2
    assert torch.equal(y, x * 2 + 0.5)


def test_launch_key_of_other_arguments():
    """launch()'s key for arguments other than ints and plain tensors (the inline fast paths): a float by its type,
    a tensor subclass as a tensor (dtype, 16-byte alignment), a TMA descriptor by _desc_spec, others as they are."""
    from types import SimpleNamespace

    t = torch.zeros(64, dtype=torch.bfloat16)
    assert triton_util._spec(1.5) is float and triton_util._spec(-0.0) is float
    param = torch.nn.Parameter(t.clone(), requires_grad=False)
    assert triton_util._spec(param) == (torch.bfloat16, True)
    assert triton_util._spec(torch.nn.Parameter(t[1:], requires_grad=False)) == (torch.bfloat16, False)
    assert triton_util._spec(None) is None and triton_util._spec(True) is True and triton_util._spec("x") == "x"
    d = SimpleNamespace(base=t, shape=[8, 8], strides=[8, 1], block_shape=[8, 8], layout="l", padding="zero")
    assert triton_util._spec(d) == triton_util._desc_spec(d)


def test_launch_keys_tma_descriptors_on_all_but_their_address():
    """launch() keeps one compiled Gluon kernel per specialization: a TMA descriptor's key is everything triton
    could specialize on (dtype, 16-byte alignment, shape, strides, block, layout, padding) but its base address, and
    hashable (triton's TensorDescriptor is not)."""
    from types import SimpleNamespace

    def desc(base, shape=(64, 64), block=(64, 32), layout="swizzle128"):
        return SimpleNamespace(base=base, shape=list(shape), strides=[shape[1], 1], block_shape=list(block),
                               layout=layout, padding="zero")  # fmt: skip

    a, b = (torch.zeros(64 * 65, dtype=torch.bfloat16) for _ in range(2))
    key = triton_util._desc_spec(desc(a))
    assert hash(key) is not None and a.data_ptr() != b.data_ptr()
    assert triton_util._desc_spec(desc(b)) == key  # another tensor at another address: the same kernel
    others = [
        desc(a, shape=(32, 64)),
        desc(a, block=(128, 32)),
        desc(a, layout="swizzle64"),
        desc(a.to(torch.float16)),
        desc(a[1:]),  # 2 bytes in: not 16-byte aligned
    ]
    assert all(triton_util._desc_spec(o) != key for o in others)


def test_candidates_and_their_defaults():
    """dequantize + cuBLAS is a candidate from DEQUANT_MIN_M rows and the default (without a measurement) from
    DEQUANT_DEFAULT_M; one or two rows of fp32 take the FMA gemv."""
    from lorakit.kernels.q8_0_matmul import DEQUANT_DEFAULT_M, DEQUANT_MIN_M, _candidates

    for m in (DEQUANT_MIN_M, 512, DEQUANT_DEFAULT_M - 1):
        assert _candidates(m, True, True) == (["large", "dequant"], "large")
    assert _candidates(DEQUANT_DEFAULT_M, True, True) == (["large", "dequant"], "dequant")
    assert _candidates(DEQUANT_MIN_M, False, True) == (["large"], "large")  # fp32 out of bf16: no cuBLAS path
    assert _candidates(1, True, True) == (["gemv"], "gemv")
    # bf16/fp16 activations up to 16 rows: the tensor-core gemv; fp32 keeps the FMA gemv / tiled kernels
    for m in (1, 2, 16):
        assert _candidates(m, True, True, half=True) == (["gemv_tc"], "gemv_tc")
    assert _candidates(17, True, True, half=True) == (["skinny"], "skinny")
    # ... except where t = x @ a is to be formed in the launch for one or two rows: the FMA gemv's t-programs
    assert _candidates(1, True, True, half=True, t_in_launch=True) == (["gemv"], "gemv")
    assert _candidates(3, True, True, half=True, t_in_launch=True) == (["gemv_tc"], "gemv_tc")
    assert _candidates(16, True, False, half=True) == (["skinny"], "skinny")  # not for grad-input


def test_wall_choice_counts_the_host():
    """choose_path(wall=True), a host-bound caller's choice (a prefill): by the wall time of back-to-back calls, so
    an option whose calls cost the host more loses even where its device work would be less."""
    import time

    from lorakit.kernels.q8_0_tuning import _fastest

    runs = []

    def run(opt):
        runs.append(opt)
        time.sleep({"slow-host": 2e-3, "fast-host": 2e-4}[opt])

    assert _fastest(["slow-host", "fast-host"], run, wall=True, sync=lambda: None) == "fast-host"
    assert _fastest(["fast-host", "slow-host"], run, wall=True, sync=lambda: None) == "fast-host"
    assert runs.count("slow-host") == runs.count("fast-host") == 2 * (1 + 3 * 8)  # one untimed, 3 rounds of 8


def test_eager_inference_backend_same_numbers(tri):
    eager = tri.eager_inference()
    assert eager.host_bound and not tri.host_bound and eager.eager_inference() is eager
    w = on(make_weight(97, 160))
    x = rand(37, 160, dtype=torch.bfloat16).to(DEVICE)
    a, b = rand(160, 4, seed=2).to(DEVICE), rand(97, 4, seed=3).to(DEVICE)
    assert torch.equal(eager.matmul(x, w), tri.matmul(x, w))
    assert torch.equal(eager.lora_linear(x, w, [(a, b, 0.5)]), tri.lora_linear(x, w, [(a, b, 0.5)]))
    # cpu-torch: the same ops; only large decode products take cpu_gemv's compiled loop (tests/test_cpu_gemv.py)
    spec_eager = SPEC.eager_inference()
    assert spec_eager.eager_inference() is spec_eager and SPEC.eager_inference() is spec_eager
    xc, wc = x.float().cpu()[:2], make_weight(97, 160)
    assert torch.equal(spec_eager.matmul(xc, wc), SPEC.matmul(xc, wc))  # a small weight: the sliced product


def test_dequant_cache_reuses_and_evicts():
    """DequantCache: the same weight twice -> the same tensor (no second dequantization); the least recently
    used entry goes first; the products through the cache are those without it (bit for bit)."""
    cache = qmm.DequantCache(size=2)
    ws = [on(make_weight(40, 64, seed=s)) for s in range(3)]
    w0 = cache.get(ws[0].qs, ws[0].d, torch.float32)
    assert torch.equal(w0, qmm.q8_0_dequantize(ws[0].qs, ws[0].d, torch.float32))
    assert cache.get(ws[0].qs, ws[0].d, torch.float32) is w0
    assert cache.get(ws[0].qs, ws[0].d, torch.bfloat16) is not w0  # one entry per dtype
    assert cache.get(ws[0].qs, ws[0].d, torch.float32) is w0  # now the most recently used
    cache.get(ws[1].qs, ws[1].d, torch.float32)  # evicts w0 in bf16
    assert cache.get(ws[0].qs, ws[0].d, torch.float32) is w0
    cache.get(ws[2].qs, ws[2].d, torch.float32)  # evicts ws[1]
    assert len(cache._entries) == 2 and all(k[0] != ws[1].qs.data_ptr() for k in cache._entries)
    x, dy = rand(300, 64, seed=3).to(DEVICE), rand(300, 40, seed=4).to(DEVICE)
    cfg = {"path": "dequant"}
    for _ in range(2):  # a miss, then a hit
        y = qmm.q8_0_matmul(x, ws[2].qs, ws[2].d, config=cfg, dequant_cache=cache)
        assert torch.equal(y, qmm.q8_0_matmul(x, ws[2].qs, ws[2].d, config=cfg))
        dx = qmm.q8_0_matmul_grad_input(dy, ws[2].qs, ws[2].d, config=cfg, dequant_cache=cache)
        assert torch.equal(dx, qmm.q8_0_matmul_grad_input(dy, ws[2].qs, ws[2].d, config=cfg))


def test_shared_dequant_takes_dequant_from_256_rows(tri):
    """shared_dequant (a checkpointed training step's products): dequantize + cuBLAS wherever it is a candidate
    (>= 256 rows, y in x's dtype) without a measurement, through the cache, so that the forward and the input
    gradient share one dequantized copy; below 256 rows or into another dtype the usual choice (the interpreter's
    default: the tiled kernel, no cache entry). cuda-triton's checkpointed_training() is that variant, sharing the
    backend's cache; cpu-torch's is the backend itself."""
    w = on(make_weight(40, 64, seed=2))
    dy = rand(256, 40, seed=4).to(DEVICE)
    for m, out_dtype, shared, entries in [(256, None, True, 1), (256, None, False, 0), (255, None, True, 0),
                                          (256, torch.float32, True, 0)]:  # fmt: skip
        x = rand(m, 64, seed=3, dtype=torch.bfloat16).to(DEVICE)
        cache = qmm.DequantCache()
        y = qmm.q8_0_matmul(x, w.qs, w.d, out_dtype=out_dtype, dequant_cache=cache, shared_dequant=shared)
        assert len(cache._entries) == entries, (m, out_dtype, shared)
        if entries:
            assert torch.equal(y, qmm.q8_0_matmul(x, w.qs, w.d, config={"path": "dequant"}))
            (copy,) = [v for _, v in cache._entries.values()]
            dx = qmm.q8_0_matmul_grad_input(dy.to(x.dtype), w.qs, w.d, dequant_cache=cache, shared_dequant=True)
            assert [v for _, v in cache._entries.values()] == [copy]  # a hit: no second dequantization
            ref = qmm.q8_0_matmul_grad_input(dy.to(x.dtype), w.qs, w.d, config={"path": "dequant"})
            assert torch.equal(dx, ref)
    ck = tri.checkpointed_training()
    assert ck is not tri and ck.shared_dequant and not tri.shared_dequant and ck._wcache is tri._wcache
    assert ck.checkpointed_training() is ck and SPEC.checkpointed_training() is SPEC
    x = rand(256, 64, seed=5, dtype=torch.bfloat16).to(DEVICE)
    a, b = rand(64, 8, seed=6).to(DEVICE), rand(40, 8, seed=7).to(DEVICE)
    cfg = {"path": "dequant"}
    assert torch.equal(ck.matmul(x, w), qmm.q8_0_matmul(x, w.qs, w.d, config=cfg))
    ref = qmm.q8_0_matmul(x, w.qs, w.d, a, b, 0.5, config=cfg)
    assert torch.equal(ck.lora_linear(x, w, [(a, b, 0.5)]), ref)
    dyb = dy.bfloat16()
    assert torch.equal(ck.matmul_grad_input(dyb, w), qmm.q8_0_matmul_grad_input(dyb, w.qs, w.d, config=cfg))


def test_lora_linear_with_formed_t_is_the_same_product(tri):
    """lora_linear(x, w, [(a, b, s)], t=x @ a) (LoraLinear's forward, which keeps t for db) gives the bits of
    lora_linear without t, on both backends, q8_0 and float weights."""
    x = rand(2, 37, 64, seed=3)
    a, b = rand(64, 4, seed=5, scale=0.3), rand(40, 4, seed=6, scale=0.3)
    w8 = make_weight(40, 64, seed=2)
    for w in (make_weight(40, 64), dequantize_q8_0(w8.qs, w8.d)):
        for be, dev in ((SPEC, torch.device("cpu")), (tri, DEVICE)):
            wd = on(w, dev) if isinstance(w, Q8Weight) else w.to(dev)
            xd, ad, bd = x.to(dev), a.to(dev), b.to(dev)
            t = xd.reshape(-1, 64) @ ad
            got = be.lora_linear(xd, wd, [(ad, bd, 0.7)], t=t)
            assert torch.equal(got, be.lora_linear(xd, wd, [(ad, bd, 0.7)])), (be.name, type(w))
