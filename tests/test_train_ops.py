"""The training-step kernels (kernels/train_ops.py) and their autograd Functions (lorakit/fused_ops.py) against
the cpu-torch specification and against torch autograd through lorakit/model.py's functions.

Runs on a CUDA GPU when one is visible; otherwise under Triton's CPU interpreter (switched on here, before
lorakit.kernels is imported). Shapes are odd on purpose: E = 96, 200 (no power of two), rows = 1 and 7 (rows of
very different scales; rms_norm_bwd's row blocks are ragged), D = 8, 12 (12: masked pair tiles), H = 3 (a
ragged head block), T = 5, B = 2, F = 40, 200 (ragged column blocks).

Tolerances (ONE table; the functions right below compute it; u = 2^-24 is fp32's unit roundoff, u_o the
output dtype's: 2^-24 fp32, 2^-8 bf16; magnitudes are computed in fp64 from the inputs)
------------------------------------------------------------------------------------------------------------
Rounding two values that are d apart to the output dtype leaves them at most (d + 2 u_o |ref|)(1 + 4 u_o)
apart (they may straddle a rounding boundary: one unit of the dtype, <= 2 u_o relative): `rounded`.
A sum of K terms in fp32, in any order, is within (K-1) u sum|terms| of the exact sum.
  * rstd = 1/sqrt(sum(x^2)/E + eps): per side (E-1)u (sum) + u (/E) + u (+eps), halved by the sqrt, + u
    (sqrt.rn) + u (the reciprocal, div.rn; torch's CPU rsqrt is 1/sqrt too) = (E+5)u/2 -> the two sides'
    rstd are DR = (E+5)u apart (relative); 0 when both run torch's ops (spec vs autograd).
  * rms_norm y = rnd(rnd(x*rstd) * rnd(w)): |y1 - y2| <= (DR + 2u + 4 u_o) |y| (1 + 4 u_o) (the fp32 product
    x*rstd, then two roundings to the dtype that may each straddle).
  * rms_norm dx = rstd (g - n mean(g n)), g = dy w: with mag = r (|g| + |n| mean|g n|), one side's fp32
    evaluation is within (E+6)u mag (the E-term sum, /E, and 5 products/differences incl. rounding g and n);
    autograd's different sequence (rsqrt_backward's r^3, the pow/mean backwards) has the same form. dx is
    linear in r in its first term and cubic in its second: a relative DR in rstd moves it <= 3 DR mag.
    Autograd rounds g = dy * w to the dtype (mul backward in bf16): + u_o mag. ->
    |dx1 - dx2| <= rounded((2(E+6)u + 3 DR [+ u_o vs autograd]) mag).
  * rms_norm dw = sum_rows dy * rnd(n): with S = sum_rows |dy n|, the rows-term sum in two orders:
    2 rows u S (fp32 result, the same rnd(n) when both sides use the same rstd). With rstd DR apart, rnd(n)
    moves <= (DR + 2u + 2 u_o)|n|. Autograd rounds each product dy * rnd(n) to the dtype (u_o S) and the
    final sum (u_o |dw|).
  * silu(g) = g / (1 + exp(-g)) and sig = 1 / (1 + exp(-g)): exp(-g) is within (2|g| + 6)u per side (the
    argument: the GPU's ex2.approx(-g * log2 e) turns the product's rounding into |g| u and log2(e)'s fp32
    rounding into 0.22 |g| u; the function itself <= 3 ulps: ex2.approx 2, Sleef 1, numpy's float32 exp
    2.52) ; 1 + e and the divide add u each: RHO = (2|g| + 8)u per side for silu and sig.
    y = rnd(rnd(silu) * up): |y1 - y2| <= (2 RHO + 4 u_o) |silu(g) up| (1 + 4 u_o).
    du = rnd(dy * rnd(silu)): the same with |dy silu(g)|; bit-identical to autograd's mul backward.
    dg = rnd(((dy u) sig) (1 + g (1 - sig))): tracing RHO through 1 - sig (absolute sig RHO), g (1 - sig),
    1 + . and the three products gives per side <= |dy u| sig (RHO + 4u)(|f| + |g|), f = 1 + g (1 - sig)
    (the bound survives the cancellation of f near g = -1.28); autograd first rounds dy*u to the dtype:
    + u_o |dy u sig f|.  |dg1 - dg2| <= rounded(2 |dy u| sig (RHO + 4u)(|f| + |g|) [+ u_o |dy u sig f|]).
  * rope (both directions): the same fp32 multiplies and one add/sub per output (no FMA on the GPU), the
    backward as autograd computes it (dx0 = dy0 c + dy1 s, dx1 = (-dy0) s + dy1 c) -> bit-identical.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # must happen before triton decorates lorakit's kernels
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from lorakit import flash, model  # noqa: E402
from lorakit.backends.cpu_torch import CpuTorchBackend  # noqa: E402
from lorakit.fused_ops import TORCH_OPS, RMSNormFn, RopeFn, SiluMulFn, fused_ops  # noqa: E402
from lorakit.kernels import train_ops  # noqa: E402

if not CUDA and not train_ops.interpreting():
    pytest.skip("lorakit.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

DEVICE = torch.device("cuda" if CUDA else "cpu")
# the interpreter's numpy scalar conversions warn on every program; they are not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# ---- the tolerance table (see the module docstring) -----------------------------------------------

U = 2.0**-24  # fp32 unit roundoff
U_OUT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-5


def rounded(d, ref, dtype):
    """Two values d apart (ref one of them), each rounded to dtype."""
    u_o = U_OUT[dtype]
    return (d + 2 * u_o * ref.double().abs()) * (1 + 4 * u_o)


def rstd_rel(E):
    """DR: the relative distance of two sides' rstd (the kernel's vs torch's)."""
    return (E + 5) * U


def rms_mags(x, w, dy, eps):
    """(r, n, mag, S) in fp64: r = 1/rms, n = x r, mag = r (|g| + |n| mean|g n|) with g = dy rnd(w),
    S = sum_rows |dy n|."""
    E = x.shape[-1]
    x64, dy64 = x.double().reshape(-1, E), dy.double().reshape(-1, E)
    r = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    n = x64 * r
    g = dy64 * w.to(x.dtype).double()
    mag = r * (g.abs() + n.abs() * (g * n).abs().mean(-1, keepdim=True))
    return r, n, mag.reshape(x.shape), (dy64 * n).abs().sum(0)


def tol_rms_y(y_ref, E, dtype, dr):
    u_o = U_OUT[dtype]
    return (dr + 2 * U + 4 * u_o) * y_ref.double().abs() * (1 + 4 * u_o)


def tol_rms_dx(mag, dx_ref, E, dtype, dr, autograd):
    return rounded((2 * (E + 6) * U + 3 * dr + (U_OUT[dtype] if autograd else 0.0)) * mag, dx_ref, dtype)


def tol_rms_dw(S, dw_ref, rows, dtype, dr, autograd):
    u_o = U_OUT[dtype]
    rel = 2 * rows * U + ((dr + 2 * U + 2 * u_o) if dr else 0.0) + (u_o if autograd else 0.0)
    return rel * S + (u_o * dw_ref.double().abs() if autograd else 0.0)


def silu_rho(g):
    """RHO: the per-side relative error of silu(g) and sig(g) in fp32 (exp's argument and 3 ulps, +, /)."""
    return (2 * g.double().abs() + 8) * U


def tol_silu_y(g, u, dtype):
    u_o = U_OUT[dtype]
    return (2 * silu_rho(g) + 4 * u_o) * (F.silu(g.double()) * u.double()).abs() * (1 + 4 * u_o)


def tol_silu_du(dy, g, dtype):
    return tol_silu_y(g, dy, dtype)  # the same form: rnd(dy * rnd(silu(g)))


def tol_silu_dg(dy, g, u, dg_ref, dtype, autograd):
    g64 = g.double()
    sig = torch.sigmoid(g64)
    f = 1 + g64 * (1 - sig)
    dyu = (dy.double() * u.double()).abs()
    d = 2 * dyu * sig * (silu_rho(g) + 4 * U) * (f.abs() + g64.abs())
    if autograd:
        d = d + U_OUT[dtype] * dyu * sig * f.abs()
    return rounded(d, dg_ref, dtype)


# ---- helpers ---------------------------------------------------------------------------------------

SPEC = CpuTorchBackend()
WORST: dict[str, tuple[float, float]] = {}  # test family -> (largest |err| / bound, largest |err|) (-s prints)


@pytest.fixture(scope="module")
def tri():
    from lorakit.backends.cuda_triton import CudaTritonBackend

    yield CudaTritonBackend(device=DEVICE)
    print("\nworst |err|/bound, max |err|:", {k: f"{v[0]:.3g}, {v[1]:.3g}" for k, v in sorted(WORST.items())})


def rand(*shape, dtype=torch.float32, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def dev(*ts):
    return [t.to(DEVICE) for t in ts]


def assert_within(got, ref, tol, what):
    got, ref = got.double().cpu(), ref.double().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got - ref).abs()
    worst = float((err / (tol.double().cpu() + 1e-300)).max())
    family = f"{what.split()[0]} {what.split()[-1].removeprefix('torch.')}"  # the op, the dtype
    w0, e0 = WORST.get(family, (0.0, 0.0))
    WORST[family] = (max(w0, worst), max(e0, float(err.max())))
    assert worst <= 1.0, f"{what}: max |err|/bound = {worst:.3g} (max err {float(err.max()):.3g})"


def assert_equal(got, ref, what):
    got = got.cpu()
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape, got.dtype, ref.dtype)
    if not torch.equal(got, ref):
        raise AssertionError(f"{what}: not bit-identical (max err {float((got.double() - ref.double()).abs().max())})")
    family = f"{what.split()[0]} {what.split()[-1].removeprefix('torch.')}"
    WORST.setdefault(family, (0.0, 0.0))


def autograd(fn, inputs, dy, wrt=(0, 1)):
    """fn(*inputs) and the gradients of <fn(...), dy> w.r.t. inputs[i] for i in wrt (fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_(i in wrt) if i in wrt else t for i, t in enumerate(inputs)]
    y = fn(*leaves)
    return y.detach(), torch.autograd.grad(y, [leaves[i] for i in wrt], dy)


def rms_input(rows, E, dtype):
    shape = (1, 1, E) if rows == 1 else (rows, E)
    scales = torch.logspace(-2, 1.5, rows).view(-1, 1) if rows > 1 else torch.ones(1, 1)
    x = (rand(rows, E) * scales).reshape(shape).to(dtype)  # rows of very different scales
    w = rand(E, seed=3, scale=0.5) + 1.0  # float32, as load_model keeps norms (rounded to dtype by the op)
    dy = rand(*shape, seed=5).to(dtype)
    return x, w, dy


def rope_input(D, dtype, B=2, T=5, H=3):
    args = model.ModelArgs(n_vocab=8, n_embd=H * D, n_ff=8, n_head=H, n_head_kv=H, n_layer=1)
    cos, sin = model.rope_tables(args, T + 4)
    cos, sin = cos[4:].contiguous(), sin[4:].contiguous()  # positions 4..8 (a batch at n_past = 4)
    return rand(B, T, H, D, dtype=dtype, scale=3.0), cos, sin, rand(B, T, H, D, dtype=dtype, seed=2)


def silu_input(rows, Fd, dtype):
    shape = (1, 1, Fd) if rows == 1 else (rows, Fd)
    g = rand(*shape, dtype=dtype, scale=4.0)  # gates over [-15, 15]: silu's tails, its bend, f's zero
    return g, rand(*shape, dtype=dtype, seed=2), rand(*shape, dtype=dtype, seed=3)


# ---- rms_norm ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [96, 200])
@pytest.mark.parametrize("rows", [1, 7])
def test_rms_norm(tri, dtype, E, rows):
    x, w, dy = rms_input(rows, E, dtype)
    tag = f"E={E} rows={rows} {dtype}"
    # the spec is model.block's expression, bit for bit
    y_s, r_s = SPEC.rms_norm_fwd(x, w, EPS)
    assert torch.equal(y_s, model.rms_norm(x, EPS) * w.to(dtype))
    assert r_s.shape == (rows,) and r_s.dtype == torch.float32
    # forward: kernel vs spec
    y_t, r_t = tri.rms_norm_fwd(*dev(x, w), EPS)
    assert y_t.shape == x.shape and y_t.dtype == dtype and r_t.shape == (rows,) and r_t.dtype == torch.float32
    dr = rstd_rel(E)
    assert_within(r_t, r_s, dr * r_s.double().abs(), f"rms_rstd {tag}")
    assert_within(y_t, y_s, tol_rms_y(y_s, E, dtype, dr), f"rms_fwd {tag}")
    # backward with the spec's rstd: kernel vs spec (only the order of the sums differs)
    _, _, mag, S = rms_mags(x, w, dy, EPS)
    dx_s, dw_s = SPEC.rms_norm_bwd(dy, x, w, r_s)
    assert dx_s.dtype == dtype and dw_s.dtype == torch.float32 and dw_s.shape == (E,)
    dx_t, dw_t = tri.rms_norm_bwd(*dev(dy, x, w, r_s))
    assert dx_t.shape == x.shape and dx_t.dtype == dtype and dw_t.shape == (E,) and dw_t.dtype == torch.float32
    assert_within(dx_t, dx_s, tol_rms_dx(mag, dx_s, E, dtype, 0.0, False), f"rms_dx_spec {tag}")
    assert_within(dw_t, dw_s, tol_rms_dw(S, dw_s, rows, dtype, 0.0, False), f"rms_dw_spec {tag}")
    # against torch autograd through model.py (w float32 with a gradient, as the LoRA'd gain in training)
    y_ag, (dx_ag, dw_ag) = autograd(TORCH_OPS.rms_norm, (x, w, EPS), dy)
    assert torch.equal(y_ag, y_s)
    assert_within(dx_s, dx_ag, tol_rms_dx(mag, dx_ag, E, dtype, 0.0, True), f"rms_dx_spec_vs_autograd {tag}")
    assert_within(dw_s, dw_ag, tol_rms_dw(S, dw_ag, rows, dtype, 0.0, True), f"rms_dw_spec_vs_autograd {tag}")
    dx_t, dw_t = tri.rms_norm_bwd(*dev(dy, x, w), r_t)  # the kernels' own forward and backward
    assert_within(dx_t, dx_ag, tol_rms_dx(mag, dx_ag, E, dtype, dr, True), f"rms_dx_autograd {tag}")
    assert_within(dw_t, dw_ag, tol_rms_dw(S, dw_ag, rows, dtype, dr, True), f"rms_dw_autograd {tag}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(tri, dtype):
    """add_rms_norm_fwd (the residual sum s = rnd(h + delta), then the norm of s) and rms_norm_bwd with dres
    (dx = rnd(rnd(dx_norm) + dres), autograd's sum) against the spec, and fused_ops.add_rms_norm against
    model's h + d and rms_norm under autograd with gradients on both outputs (s as the residual stream)."""
    rows, E = 7, 200
    h, w, dy = rms_input(rows, E, dtype)
    d = rand(rows, E, dtype=dtype, seed=9)
    ds = rand(rows, E, dtype=dtype, seed=10)
    tag = f"{dtype}"
    s_s, y_s, r_s = SPEC.add_rms_norm_fwd(h, d, w, EPS)
    assert torch.equal(s_s, h + d) and torch.equal(y_s, SPEC.rms_norm_fwd(h + d, w, EPS)[0])
    s_t, y_t, r_t = tri.add_rms_norm_fwd(*dev(h, d, w), EPS)
    assert_equal(s_t, s_s, f"addrms_sum {tag}")  # one rounded add, as torch's
    dr = rstd_rel(E)
    assert_within(r_t, r_s, dr * r_s.double().abs(), f"addrms_rstd {tag}")
    assert_within(y_t, y_s, tol_rms_y(y_s, E, dtype, dr), f"addrms_fwd {tag}")
    _, _, mag, S = rms_mags(s_s, w, dy, EPS)
    dxn_s, _ = SPEC.rms_norm_bwd(dy, s_s, w, r_s)
    dx_s, dw_s = SPEC.rms_norm_bwd(dy, s_s, w, r_s, dres=ds)
    assert torch.equal(dx_s, dxn_s + ds)
    dx_t, dw_t = tri.rms_norm_bwd(*dev(dy, s_s, w, r_s, ds))
    # |dxn_t - dxn_s| <= tol_rms_dx; adding ds and rounding again may straddle once more
    tol = rounded(tol_rms_dx(mag, dxn_s, E, dtype, 0.0, False), dx_s, dtype)
    assert_within(dx_t, dx_s, tol, f"addrms_dx_spec {tag}")
    assert_within(dw_t, dw_s, tol_rms_dw(S, dw_s, rows, dtype, 0.0, False), f"addrms_dw_spec {tag}")

    # the autograd Function against model's ops, gradients flowing into both outputs
    def both(fn):
        def f(h_, d_, w_):
            s_, y_ = fn(h_, d_, w_, EPS)
            return torch.cat([s_, y_], dim=-1)

        return f

    ops = fused_ops(tri)
    dsy = torch.cat([ds, dy], dim=-1)
    out_ag, (dh_ag, dd_ag, dw_ag) = autograd(both(TORCH_OPS.add_rms_norm), (h, d, w), dsy, wrt=(0, 1, 2))
    out, (dh, dd, dw) = autograd(both(ops.add_rms_norm), dev(h, d, w), dsy.to(DEVICE), wrt=(0, 1, 2))
    assert_equal(out[..., :E].contiguous(), out_ag[..., :E].contiguous(), f"fn_addrms_sum {tag}")
    assert_within(out[..., E:], out_ag[..., E:], tol_rms_y(out_ag[..., E:], E, dtype, dr), f"fn_addrms_fwd {tag}")
    dxn_ag = autograd(TORCH_OPS.rms_norm, (s_s, w, EPS), dy, wrt=(0,))[1][0]
    tol = rounded(tol_rms_dx(mag, dxn_ag, E, dtype, dr, True), dh_ag, dtype)
    assert torch.equal(dh_ag, dd_ag)
    assert_within(dh, dh_ag, tol, f"fn_addrms_dh {tag}")
    assert_within(dd, dd_ag, tol, f"fn_addrms_dd {tag}")
    assert_within(dw, dw_ag, tol_rms_dw(S, dw_ag, rows, dtype, dr, True), f"fn_addrms_dw {tag}")


def test_rms_norm_bwd_deterministic(tri):
    rows, E = 37, 200  # several programs (a ragged last block of rows) under the interpreter
    x, w, dy = rms_input(rows, E, torch.bfloat16)
    xd, wd, dyd = dev(x, w, dy)
    _, r = tri.rms_norm_fwd(xd, wd, EPS)
    dx1, dw1 = tri.rms_norm_bwd(dyd, xd, wd, r)
    dx2, dw2 = tri.rms_norm_bwd(dyd, xd, wd, r)
    assert torch.equal(dw1, dw2) and torch.equal(dx1, dx2)
    _, _, _, S = rms_mags(x, w, dy, EPS)
    dw_s = SPEC.rms_norm_bwd(dy, x, w, r.cpu())[1]
    assert_within(
        dw1, dw_s, tol_rms_dw(S, dw_s, rows, torch.bfloat16, 0.0, False), "rms_dw_spec rows=37 torch.bfloat16"
    )


# ---- rope ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 12])
def test_rope(tri, dtype, D):
    x, cos, sin, dy = rope_input(D, dtype)
    ref = model.apply_rope(x, cos, sin)
    assert_equal(SPEC.rope_fwd(x, cos, sin), ref, f"rope_spec D={D} {dtype}")
    xd, cd, sd = dev(x, cos, sin)
    assert_equal(tri.rope_fwd(xd, cd, sd), ref, f"rope_fwd D={D} {dtype}")
    # any strides on B, T, H (the backward receives attention's transposed gradient)
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xs.is_contiguous()
    assert_equal(tri.rope_fwd(xs.to(DEVICE), cd, sd), ref, f"rope_fwd_strided D={D} {dtype}")
    # backward: the inverse rotation, bit for bit autograd's gradient through apply_rope
    _, (dx_ag,) = autograd(model.apply_rope, (x, cos, sin), dy, wrt=(0,))
    assert_equal(SPEC.rope_fwd(dy, cos, sin, inverse=True), dx_ag, f"rope_spec_bwd D={D} {dtype}")
    assert_equal(tri.rope_fwd(dy.to(DEVICE), cd, sd, inverse=True), dx_ag, f"rope_bwd D={D} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_heads(tri, dtype, inverse):
    """rope_heads between packed and padded layouts: x = the [q | k | v] heads of one product row (strided),
    out = a zero-tailed [B, T, 3H, 16] buffer (first 2H heads turned, v copied bit for bit), and back."""
    D, H = 12, 3
    x, cos, sin, _ = rope_input(D, dtype, H=3 * H)
    packed = torch.cat([x, x[:, :, :1]], dim=2)[:, :, : 3 * H]  # a view with a head stride, not contiguous
    out = torch.full((2, 5, 3 * H, 16), float("nan"), dtype=dtype)
    SPEC.rope_heads(packed, cos, sin, 2 * H, out, inverse)
    ref = SPEC.rope_fwd(packed[:, :, : 2 * H], cos, sin, inverse)
    assert_equal(out[:, :, : 2 * H, :D].contiguous(), ref, f"rope_heads_spec {dtype}")
    assert torch.equal(out[:, :, 2 * H :, :D], packed[:, :, 2 * H :]) and not out[..., D:].any()
    got = torch.full(out.shape, float("nan"), dtype=dtype, device=DEVICE)
    tri.rope_heads(*dev(packed, cos, sin), 2 * H, got, inverse)
    assert_equal(got, out, f"rope_heads {dtype}")
    # the last heads also into a second, strided buffer (a KV cache's rows [B, Hl, n_ctx, D] seen as [B, T, Hl, D])
    for be, where in ((SPEC, "cpu"), (tri, DEVICE)):
        cache = torch.full((2, H + 1, 7, D), float("nan"), dtype=dtype, device=where)
        got2 = torch.full(out.shape, float("nan"), dtype=dtype, device=where)
        be.rope_heads(
            packed.to(where), cos.to(where), sin.to(where), 2 * H, got2, inverse, cache[:, :, :5].transpose(1, 2)
        )
        assert torch.equal(got2.cpu(), out)
        assert torch.equal(cache[:, :, :5].transpose(1, 2).cpu(), out[:, :, 2 * H - 1 :, :D]), where
        assert cache[:, :, 5:].isnan().all()  # rows beyond T untouched
    # padded -> packed: the narrowed heads of a [B, T, H, 16] buffer into column slices of a wider row
    wide = torch.full((2, 5, 4 * H, D), float("nan"), dtype=dtype, device=DEVICE)
    tri.rope_heads(got[..., :D], *dev(cos, sin), H, wide[:, :, H:], inverse)
    ref2 = SPEC.rope_heads(out[..., :D], cos, sin, H, torch.empty(2, 5, 3 * H, D, dtype=dtype), inverse)
    assert_equal(wide[:, :, H:], ref2, f"rope_heads_narrow {dtype}")
    assert wide[:, :, :H].isnan().all()  # nothing written outside out


# ---- silu_mul --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Fd", [40, 200])
@pytest.mark.parametrize("rows", [1, 7])
def test_silu_mul(tri, dtype, Fd, rows):
    g, u, dy = silu_input(rows, Fd, dtype)
    tag = f"F={Fd} rows={rows} {dtype}"
    y_s = SPEC.silu_mul_fwd(g, u)
    assert torch.equal(y_s, F.silu(g) * u)  # model.feed_forward's expression
    y_t = tri.silu_mul_fwd(*dev(g, u))
    assert y_t.shape == g.shape and y_t.dtype == dtype
    assert_within(y_t, y_s, tol_silu_y(g, u, dtype), f"silu_fwd {tag}")
    dg_s, du_s = SPEC.silu_mul_bwd(dy, g, u)
    dg_t, du_t = tri.silu_mul_bwd(*dev(dy, g, u))
    assert dg_t.shape == du_t.shape == g.shape and dg_t.dtype == du_t.dtype == dtype
    assert_within(du_t, du_s, tol_silu_du(dy, g, dtype), f"silu_du_spec {tag}")
    assert_within(dg_t, dg_s, tol_silu_dg(dy, g, u, dg_s, dtype, False), f"silu_dg_spec {tag}")
    # against torch autograd through model.py's F.silu(g) * u
    y_ag, (dg_ag, du_ag) = autograd(TORCH_OPS.silu_mul, (g, u), dy)
    assert torch.equal(y_ag, y_s) and torch.equal(du_s, du_ag)  # du: the mul backward, the same op
    assert_within(dg_s, dg_ag, tol_silu_dg(dy, g, u, dg_ag, dtype, True), f"silu_dg_spec_vs_autograd {tag}")
    assert_within(du_t, du_ag, tol_silu_du(dy, g, dtype), f"silu_du_autograd {tag}")
    assert_within(dg_t, dg_ag, tol_silu_dg(dy, g, u, dg_ag, dtype, True), f"silu_dg_autograd {tag}")


def test_silu_mul_strided_rows(tri):
    """g and u as column slices of one [rows, 2F] product (the fused gate|up layout): the same bits."""
    rows, Fd = 7, 40
    gu = rand(rows, 2 * Fd, dtype=torch.bfloat16, scale=4.0).to(DEVICE)
    g, u = gu.split([Fd, Fd], dim=-1)
    dy = rand(rows, Fd, dtype=torch.bfloat16, seed=4).to(DEVICE)
    assert torch.equal(tri.silu_mul_fwd(g, u), tri.silu_mul_fwd(g.contiguous(), u.contiguous()))
    for a, b in zip(tri.silu_mul_bwd(dy, g, u), tri.silu_mul_bwd(dy, g.contiguous(), u.contiguous()), strict=True):
        assert torch.equal(a, b)


def test_silu_mul_bwd_into_packed(tri):
    """silu_mul_bwd(out=(dg, du)) writes the column halves of one [rows, 2F] gradient: the same bits."""
    rows, Fd = 7, 40
    g, u, dy = dev(*silu_input(rows, Fd, torch.bfloat16))
    dgu = torch.full((rows, 2 * Fd), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    got = tri.silu_mul_bwd(dy, g, u, out=dgu.chunk(2, dim=-1))
    for a, b in zip(got, tri.silu_mul_bwd(dy, g, u), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(torch.cat(tri.silu_mul_bwd(dy, g, u), dim=-1), dgu)
    bad = torch.empty(Fd // 8, 2, 8, dtype=torch.bfloat16, device=DEVICE).transpose(0, 1)  # [2, F/8, 8]: no row stride
    with pytest.raises(ValueError, match="one row stride"):
        tri.silu_mul_bwd(*(t[:2].reshape(2, Fd // 8, 8) for t in (dy, g, u)), out=(bad, bad))


def test_launcher_checks(tri):
    with pytest.raises(ValueError, match="row length"):
        tri.rms_norm_fwd(torch.zeros(1, train_ops.MAX_ROW + 1, device=DEVICE), torch.ones(1, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="w must be"):
        tri.rms_norm_fwd(torch.zeros(2, 8, device=DEVICE), torch.ones(9, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="D even"):
        tri.rope_fwd(torch.zeros(1, 2, 1, 5, device=DEVICE), torch.zeros(2, 2, device=DEVICE), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="cos must be"):
        z = torch.zeros(2, 2, device=DEVICE)
        tri.rope_fwd(torch.zeros(1, 3, 1, 4, device=DEVICE), z, z)
    with pytest.raises(ValueError, match="u has shape"):
        tri.silu_mul_fwd(torch.zeros(2, 8, device=DEVICE), torch.zeros(2, 9, device=DEVICE))
    with pytest.raises(TypeError, match="must be torch.float32"):
        tri.silu_mul_fwd(torch.zeros(2, 8, device=DEVICE), torch.zeros(2, 8, dtype=torch.bfloat16, device=DEVICE))


# ---- the autograd Functions ------------------------------------------------------------------------


def test_functions_gradcheck():
    """The Functions' backward is the derivative of their forward (cpu-torch ops in float64)."""
    x, w = rand(3, 12, dtype=torch.float64), rand(12, dtype=torch.float64, seed=2) + 1.0
    x[1] *= 30.0
    assert torch.autograd.gradcheck(
        lambda a, b: RMSNormFn.apply(a, b, EPS, SPEC), (x.requires_grad_(), w.requires_grad_())
    )
    xr, cos, sin, _ = rope_input(4, torch.float64, B=1, T=3, H=2)
    assert torch.autograd.gradcheck(lambda a: RopeFn.apply(a, cos, sin, SPEC), (xr.requires_grad_(),))
    g, u = rand(3, 5, dtype=torch.float64, scale=4.0), rand(3, 5, dtype=torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda a, b: SiluMulFn.apply(a, b, SPEC), (g.requires_grad_(), u.requires_grad_()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_functions_vs_torch_ops(tri, dtype):
    """fused_ops(cuda-triton) against TORCH_OPS (model.py's functions) under autograd: outputs and all gradients."""
    ops = fused_ops(tri)
    # rms_norm: x in dtype, the gain float32 with a gradient
    rows, E = 7, 200
    x, w, dy = rms_input(rows, E, dtype)
    y_ag, (dx_ag, dw_ag) = autograd(TORCH_OPS.rms_norm, (x, w, EPS), dy)
    y, (dx, dw) = autograd(ops.rms_norm, (*dev(x, w), EPS), dy.to(DEVICE))
    assert dw.dtype == torch.float32 and dx.dtype == dtype
    _, _, mag, S = rms_mags(x, w, dy, EPS)
    dr = rstd_rel(E)
    tag = f"{dtype}"
    assert_within(y, y_ag, tol_rms_y(y_ag, E, dtype, dr), f"fn_rms_fwd {tag}")
    assert_within(dx, dx_ag, tol_rms_dx(mag, dx_ag, E, dtype, dr, True), f"fn_rms_dx {tag}")
    assert_within(dw, dw_ag, tol_rms_dw(S, dw_ag, rows, dtype, dr, True), f"fn_rms_dw {tag}")
    # rope, with the gradient arriving transposed (as from attention) and non-contiguous
    xr, cos, sin, dyr = rope_input(12, dtype)
    dyt = dyr.transpose(1, 2).contiguous().transpose(1, 2)
    y_ag, (dx_ag,) = autograd(TORCH_OPS.rope, (xr, cos, sin), dyt, wrt=(0,))
    y, (dx,) = autograd(ops.rope, dev(xr, cos, sin), dyt.to(DEVICE), wrt=(0,))
    assert_equal(y, y_ag, f"fn_rope_fwd {tag}")
    assert_equal(dx, dx_ag, f"fn_rope_bwd {tag}")
    # silu_mul
    g, u, dy = silu_input(7, 40, dtype)
    y_ag, (dg_ag, du_ag) = autograd(TORCH_OPS.silu_mul, (g, u), dy)
    y, (dg, du) = autograd(ops.silu_mul, dev(g, u), dy.to(DEVICE))
    assert_within(y, y_ag, tol_silu_y(g, u, dtype), f"fn_silu_fwd {tag}")
    assert_within(dg, dg_ag, tol_silu_dg(dy, g, u, dg_ag, dtype, True), f"fn_silu_dg {tag}")
    assert_within(du, du_ag, tol_silu_du(dy, g, dtype), f"fn_silu_du {tag}")


def test_functions_without_autograd_are_the_backend_forwards(tri):
    """Under no_grad (a prefill) fused_ops skips its autograd Functions and calls the backend's forwards: the
    same bits as the Functions give with grad enabled, and no graph."""
    ops = fused_ops(tri)
    x, w, _ = rms_input(7, 200, torch.bfloat16)
    h, d = dev(x, x.flip(0))
    w = w.to(DEVICE)
    xr, cos, sin, _ = rope_input(12, torch.bfloat16)
    xr, cos, sin = dev(xr, cos, sin)
    g, u, _ = silu_input(7, 40, torch.bfloat16)
    g, u = dev(g, u)
    gu = torch.cat([g, u], dim=-1)
    calls = {
        "rms_norm": lambda: ops.rms_norm(h, w, EPS),
        "add_rms_norm": lambda: torch.cat(ops.add_rms_norm(h, d, w, EPS)),
        "rope": lambda: ops.rope(xr, cos, sin),
        "silu_mul": lambda: ops.silu_mul(g, u),
        "swiglu": lambda: ops.swiglu(model.Packed(gu.chunk(2, dim=-1), gu)),
        "swiglu members": lambda: ops.swiglu(model.Packed((g, u))),
    }
    for name, call in calls.items():
        with torch.enable_grad():
            want = call()
        with torch.no_grad():
            got = call()
        assert got.grad_fn is None
        assert torch.equal(got, want), name


# ---- the packed-product Functions (fused attention, SwiGLU) ----------------------------------------


def padded_sdpa(qkv, cos, sin, H, Hkv):
    """What SDPA computes on CUDA for heads of D columns that are not a multiple of 8 (the fused path's flash call):
    RoPE as the spec, q, k, v zero-padded to flash.padded_head(D) columns, SDPA with scale 1/sqrt(D) (GQA: repeated
    key/value heads), narrowed back to D -> [B, T, H*D]. On CPU SDPA runs unpadded heads, whose dot products the
    CPU kernel may sum in another order (1 ulp apart in fp32 on an AVX-512 machine), so the fused path's flash call
    on padded heads is compared with this, and with the spec within attn_out_mags' bound."""
    q, k, v = model._rope_heads(qkv, cos, sin, H, Hkv, model.SPEC_OPS)
    B, _, T, D = q.shape
    pad = [torch.nn.functional.pad(t, (0, flash.padded_head(D) - D)) for t in (q, k, v)]
    q, k, v = pad[0], *(t.repeat_interleave(H // Hkv, dim=1) for t in pad[1:])
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=1.0 / D**0.5)
    return out[..., :D].transpose(1, 2).reshape(B, T, H * D)


def attn_fp64(qkv, cos, sin, H, Hkv):
    """Causal attention's pieces in fp64 for the error bounds: q, k, v [B, H, T, D] (RoPE on q and k; key/value heads
    repeated for GQA), P = softmax(s q k^T) (causal), S_abs = s |q| |k|^T (causal), s = 1/sqrt(D)."""
    B, T, W = qkv.shape
    D = W // (H + 2 * Hkv)
    x = qkv.double().view(B, T, H + 2 * Hkv, D)
    r = H // Hkv
    q = model.apply_rope(x[:, :, :H], cos, sin).transpose(1, 2).double()
    k = model.apply_rope(x[:, :, H : H + Hkv], cos, sin).transpose(1, 2).double().repeat_interleave(r, dim=1)
    v = x[:, :, H + Hkv :].transpose(1, 2).repeat_interleave(r, dim=1)
    s = 1.0 / D**0.5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = (s * q @ k.transpose(-1, -2)).masked_fill(~causal, float("-inf")).softmax(-1)
    s_abs = (s * q.abs() @ k.abs().transpose(-1, -2)).masked_fill(~causal, 0.0)
    return q, k, v, p, s_abs


def attn_out_mags(qkv, cos, sin, H, Hkv):
    """fp64 magnitudes bounding the fp32 rounding error of causal attention's output (before gamma = N u), as
    attn_grad_mags: (P (1 + S_abs)) |V|, P's relative error carried through exp as (1 + |S|)."""
    B, T, _ = qkv.shape
    _, _, v, p, s_abs = attn_fp64(qkv, cos, sin, H, Hkv)
    return ((p * (1 + s_abs)) @ v.abs()).transpose(1, 2).reshape(B, T, -1)


def assert_attention_forward(got, ref_spec, qkv, cos, sin, H, Hkv, dtype, what):
    """The fused path's attention output: where flash runs, bit for bit SDPA on padded heads (padded_sdpa) and
    within the summation-order bound of the spec (both sides' sums over Dp + T + 8 terms, 2 gamma_N mag, rounded to
    the dtype); elsewhere (the spec's own SDPA call) bit for bit the spec."""
    D = qkv.shape[-1] // (H + 2 * Hkv)
    if not flash.supported(dtype, DEVICE, D, gqa=Hkv != H):
        assert_equal(got, ref_spec.cpu(), what)
        return
    parts = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    with torch.no_grad():
        assert_equal(got, padded_sdpa(parts, cos, sin, H, Hkv).cpu(), what)
    n = flash.padded_head(D) + qkv.shape[1] + 8
    mag = attn_out_mags(qkv.cpu(), cos.cpu(), sin.cpu(), H, Hkv)
    assert_within(got, ref_spec, rounded(2 * (n + 3) * U * mag, ref_spec, dtype), f"{what.split()[0]}_spec {dtype}")


def attn_grad_mags(qkv, cos, sin, H, Hkv, dy):
    """fp64 magnitudes bounding one side's fp32 rounding error in d(qkv) of causal attention (before the
    factor gamma = N u): the computation on absolute values, with P's relative error carried as (1 + |S|)
    (S's rounding through exp): mag_dq = s dS_abs |K|, mag_dk = s dS_abs^T |Q|, mag_dv = (P (1 + S_abs))^T |dO|
    with dS_abs = P (1 + S_abs) (|dO| |V|^T + rowsum |dO o O|), key/value heads repeated for GQA and their
    gradients' magnitudes summed over each group; the inverse RoPE adds each pair's magnitudes."""
    B, T, W = qkv.shape
    D = W // (H + 2 * Hkv)
    r = H // Hkv
    q, k, v, p, s_abs = attn_fp64(qkv, cos, sin, H, Hkv)
    do = dy.double().view(B, T, H, D).transpose(1, 2)
    s = 1.0 / D**0.5
    pe = p * (1 + s_abs)
    ds_abs = pe * (do.abs() @ v.abs().transpose(-1, -2) + (do.abs() * (p @ v).abs()).sum(-1, keepdim=True))
    mags = [s * ds_abs @ k.abs(), s * ds_abs.transpose(-1, -2) @ q.abs(), pe.transpose(-1, -2) @ do.abs()]
    mags[1:] = [m.unflatten(1, (Hkv, r)).sum(2) for m in mags[1:]]  # a key/value head's group of query heads
    out = []
    for j, m in enumerate(mags):
        m = m.transpose(1, 2)  # [B, T, heads, D]
        if j < 2:  # the rotation mixes each pair
            m = m.unflatten(-1, (-1, 2)).sum(-1, keepdim=True).expand(*m.shape[:-1], D // 2, 2).flatten(-2)
        out.append(m)
    return torch.cat(out, dim=2).reshape(B, T, W)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hkv", [3, 1], ids=["mha", "gqa"])
def test_fused_attention_vs_torch_ops(tri, dtype, Hkv):
    """fused_ops' causal_attention on the packed product (CausalAttentionFn: heads padded 12 -> 16, flash, the
    gradient straight into [q | k | v]) against model.causal_attention under autograd on the same device (the
    attention kernels are torch's own on each device, so the reference is torch's SDPA there; GQA: SDPA on
    repeated key/value heads, flash natively). The forward: assert_attention_forward (bit for bit SDPA on padded
    heads, as SDPA runs them on CUDA, and within a summation-order bound of the spec; fp32 on CUDA, where flash does
    not run, the same SDPA call as the spec); the backward's sums may
    run in another order where the kernel sees padded heads: per side <= gamma_N mag (attn_grad_mags),
    N = Dp + T + 8 + H/Hkv sums and steps along any path, + 3u for the RoPE roundings; with GQA the reference
    also rounds each repeated head's dk, dv to the dtype before summing them (+ u_o mag); bf16 rounds the
    results: `rounded`."""
    ops = fused_ops(tri)
    B, T, H, D = 2, 7, 3, 12
    args = model.ModelArgs(n_vocab=8, n_embd=H * D, n_ff=8, n_head=H, n_head_kv=Hkv, n_layer=1)
    cos, sin = model.rope_tables(args, T)
    qkv = rand(B, T, (H + 2 * Hkv) * D, dtype=dtype, scale=2.0)
    dy = rand(B, T, H * D, dtype=dtype, seed=4)

    def packed(fn):
        return lambda x, c, s: fn(model.Packed(x.split([H * D, Hkv * D, Hkv * D], dim=-1), x), c, s, H, Hkv)

    if flash.supported(dtype, DEVICE, D, gqa=Hkv != H):
        leaf = qkv.to(DEVICE).clone().requires_grad_()
        assert "CausalAttentionFn" in packed(ops.causal_attention)(leaf, *dev(cos, sin)).grad_fn.name()
    y_ag, (dx_ag,) = autograd(packed(TORCH_OPS.causal_attention), dev(qkv, cos, sin), dy.to(DEVICE), wrt=(0,))
    y, (dx,) = autograd(packed(ops.causal_attention), dev(qkv, cos, sin), dy.to(DEVICE), wrt=(0,))
    y_ag, dx_ag = y_ag.cpu(), dx_ag.cpu()
    assert_attention_forward(y, y_ag, qkv.to(DEVICE), *dev(cos, sin), H, Hkv, dtype, f"attn_fwd {dtype}")
    n = 16 + T + 8 + H // Hkv
    mag = attn_grad_mags(qkv, cos, sin, H, Hkv, dy)
    d = 2 * (n + 3) * U * mag
    if Hkv != H:  # the reference rounds each repeated head's dk, dv to the dtype before the group sum
        d[..., H * D :] += U_OUT[dtype] * mag[..., H * D :]
    tol = rounded(d, dx_ag, dtype)
    assert_within(dx, dx_ag, tol, f"attn_bwd {dtype}")


@pytest.mark.parametrize("layout,B", [("kvcache", 1), ("kvcache", 2), ("separate", 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hkv", [3, 1], ids=["mha", "gqa"])
def test_fused_attention_prompt_writes_the_cache(tri, dtype, Hkv, layout, B, monkeypatch):
    """A prompt from position 0 (no autograd) with kv_out = a KV cache's (k, v): fused_ops' path (flash_prompt)
    gives model.causal_attention's output on the same device (assert_attention_forward) and the same cache rows,
    bit for bit; rows past
    the prompt are left alone. Layouts: model.KVCache's (v heads right after k heads: one copy for both) and
    two separate tensors (one copy each)."""
    from lorakit import fused_ops as fo

    real, calls = fo.flash_prompt, []

    def counting(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(fo, "flash_prompt", counting)  # to see which path ran
    ops = fused_ops(tri)
    T, H, D, n_ctx = 7, 3, 12, 10
    args = model.ModelArgs(n_vocab=8, n_embd=H * D, n_ff=8, n_head=H, n_head_kv=Hkv, n_layer=1)
    cos, sin = dev(*model.rope_tables(args, T))
    qkv = rand(B, T, (H + 2 * Hkv) * D, dtype=dtype, scale=2.0).to(DEVICE)
    packed = model.Packed(qkv.split([H * D, Hkv * D, Hkv * D], dim=-1), qkv)
    if layout == "kvcache":
        cache = model.KVCache.empty(args, B, n_ctx, dtype, DEVICE)
        got_kv = [cache.k[0], cache.v[0]]
        for t in got_kv:
            t.fill_(7.0)
        assert fo.joint_kv(*got_kv) is not None
    else:
        got_kv = [torch.full((B, Hkv, n_ctx, D), 7.0, dtype=dtype, device=DEVICE) for _ in range(2)]
        assert fo.joint_kv(*got_kv) is None
    ref_kv = [t.clone() for t in got_kv]
    with torch.no_grad():
        got = ops.causal_attention(packed, cos, sin, H, Hkv, tuple(got_kv))
        ref = TORCH_OPS.causal_attention(packed, cos, sin, H, Hkv, tuple(ref_kv))
    assert_attention_forward(got, ref.cpu(), qkv, cos, sin, H, Hkv, dtype, f"attn_prompt {dtype}")
    for g, r in zip(got_kv, ref_kv, strict=True):
        assert_equal(g, r.cpu(), f"attn_prompt_cache {dtype}")
        assert (g[:, :, T:] == 7.0).all()
    assert len(calls) == int(flash.supported(dtype, DEVICE, D, gqa=Hkv != H))


def test_fused_attention_falls_back_where_flash_cannot_run(tri):
    """Where torch's flash kernels cannot run (CUDA: fp32, a padded head past 256) or the members were computed
    one by one (no packed product), model.causal_attention runs (with the fused RoPE): the same numbers."""
    assert flash.supported(torch.float32, torch.device("cpu"), 12, gqa=True)
    assert not flash.supported(torch.int32, torch.device("cpu"), 12)
    if CUDA:
        assert not flash.supported(torch.bfloat16, DEVICE, flash.MAX_HEAD + 2)
        assert not flash.supported(torch.float32, DEVICE, 64)
    ops = fused_ops(tri)
    B, T, H, Hkv, D = 1, 4, 4, 2, 8
    args = model.ModelArgs(n_vocab=8, n_embd=H * D, n_ff=8, n_head=H, n_head_kv=Hkv, n_layer=1)
    cos, sin = dev(*model.rope_tables(args, T))
    x = rand(B, T, (H + 2 * Hkv) * D).to(DEVICE).requires_grad_()
    members = model.Packed(t.clone() for t in x.split([H * D, Hkv * D, Hkv * D], dim=-1))  # no .whole
    y = ops.causal_attention(members, cos, sin, H, Hkv)
    assert "CausalAttentionFn" not in y.grad_fn.name()
    ref = model.causal_attention(x.detach().split([H * D, Hkv * D, Hkv * D], dim=-1), cos, sin, H, Hkv)
    assert torch.equal(y.detach(), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_swiglu_packed_vs_torch_ops(tri, dtype):
    """fused_ops' swiglu on the packed [gate | up] product (SwigluPackedFn: one gradient for the product)
    against model's silu(gate) * up on its two views under autograd; the silu_mul bounds."""
    ops = fused_ops(tri)
    rows, Fd = 7, 40
    g, u, dy = silu_input(rows, Fd, dtype)
    gu = torch.cat([g, u], dim=-1)

    def packed(fn):
        return lambda x: fn(model.Packed(x.chunk(2, dim=-1), x))

    y_ag, (dgu_ag,) = autograd(packed(TORCH_OPS.swiglu), (gu,), dy, wrt=(0,))
    leaf = gu.to(DEVICE).clone().requires_grad_()
    assert "SwigluPackedFn" in packed(ops.swiglu)(leaf).grad_fn.name()
    y, (dgu,) = autograd(packed(ops.swiglu), dev(gu), dy.to(DEVICE), wrt=(0,))
    assert_within(y, y_ag, tol_silu_y(g, u, dtype), f"swiglu_fwd {dtype}")
    dg, du = dgu.chunk(2, dim=-1)
    dg_ag, du_ag = dgu_ag.chunk(2, dim=-1)
    assert_within(dg, dg_ag, tol_silu_dg(dy, g, u, dg_ag, dtype, True), f"swiglu_dg {dtype}")
    assert_within(du, du_ag, tol_silu_du(dy, g, dtype), f"swiglu_du {dtype}")
