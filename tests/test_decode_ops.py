"""The decode-step kernels (kernels/decode_ops.py) against the cpu-torch specification, and the
specification against lorakit/model.py (bit for bit on CPU where the op sequence is the same).

Runs on a CUDA GPU when one is visible; otherwise under Triton's CPU interpreter (switched on here, before
lorakit.kernels is imported). Shapes are odd on purpose: E = 96, 200 and F = 96, 200 (not powers of two,
ragged column blocks), D = 8, 12 (12: the pair / head tiles are masked), GQA (H = 4, Hkv = 2), n_ctx = 37
with pos = 0, 5, 36 (the first key only, a partial chunk, the last row of the cache); attention_decode also
with forced key splits S = 1..16 (empty splits included), repeated calls (bit-identical, counters back at 0)
and strided cache views.

Tolerances (derived; u = 2^-24 is fp32's unit roundoff, u_out the output dtype's: 2^-24 fp32, 2^-8 bf16)
------------------------------------------------------------------------------------------------------
Rounding two values that are d apart to the output dtype leaves them at most d + 2*u_out*|y| apart (they
may straddle a rounding boundary: one unit of the dtype, <= 2*u_out relative). Per op:
  * add_rms_norm: s: the same fp32 add and one rounding on both sides -> bit-identical.
    y = rnd(rnd(x * r) * w), r = rsqrt(sum(x^2) / E + eps). A sum of E positive terms is within (E-1)*u
    (relative) of the exact sum in any order; the mean (a divide, or a product with 1/E: 2u) and +eps
    (u) make the argument of rsqrt (E+2)u-accurate per side; rsqrt halves that and adds its own error
    (<= 4u: the GPU's rsqrt.approx is within 2^-22.9, 1/sqrt within 2u) -> the two sides' r are (E+10)u
    apart. Then two roundings to the dtype (the normalized value, the product): 4*u_out.
    |dy| <= ((E+10)u + 4 u_out) * |y| * (1 + 4 u_out).
  * swiglu (silu_mul_fwd on the packed output's views): silu(g) = g / (1 + exp(-g)) in fp32 on both sides.
    exp is within 4u (libm / Sleef <= 1 ulp;
    the GPU's ex2.approx of g*log2(e): 2 ulp plus the argument's rounding, u*|g| relative); + and / add
    u each (div.rn) -> (|g| + 6)u per side, 2(|g| + 6)u apart; then two roundings (silu, the product):
    |dy| <= (2(|g| + 6)u + 4 u_out) * |silu(g) * up| * (1 + 4 u_out).
  * rope_kv_write: the same fp32 ops (mul, mul, sub/add; FMA contraction disabled on the GPU) and one
    rounding on both sides -> q and the cache rows are bit-identical; every other cache row is untouched.
  * greedy_next: exact (an index): the first index of the largest value, as torch.argmax.
  * attention_decode: with S = max_j scale*sum_d |q_d k_jd| over the n = pos+1 keys and pmag = sum_j p_j |v_j|
    (fp64 softmax weights p), each side computes o = sum_j p'_j v_j / sum_j p'_j with p'_j = p_j (1 + e_j):
    the score is within (D+3)u*S (D-term fp32 dot, the scale and log2(e) factors), the argument s_j - max
    within 2u*S, exp within 4u, and the online rescalings by exp(m_old - m_new) (n_c <= n chunks) add
    4u*n_c + 2u*S (the arguments' roundings telescope) -> |e_j| <= ((D+7)S + 4 + 4n)u; normalizing moves
    the weights by twice that. The fp32 sums over n keys with n_c rescalings (numerator and denominator)
    and the divide add (4n + 3)u -> per side (2(D+7)S + 12n + 11)u * pmag, twice that apart. The spec's
    CPU flash kernel also rounds P to bf16 before P @ V (fp32: no rounding): <= 2 u_P * pmag. The output
    rounding: 2 u_out * |o|.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # must happen before triton decorates lorakit's kernels
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from lorakit import model  # noqa: E402
from lorakit.backends.cpu_torch import CpuTorchBackend  # noqa: E402
from lorakit.kernels import decode_ops, q8_0_matmul  # noqa: E402

if not CUDA and not q8_0_matmul.interpreting():
    pytest.skip("lorakit.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

DEVICE = torch.device("cuda" if CUDA else "cpu")
# the interpreter's numpy scalar conversions warn on every program; they are not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

U = 2.0**-24  # fp32 unit roundoff
U_OUT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
U_P = {torch.float32: 0.0, torch.bfloat16: 2.0**-8}  # the spec's rounding of the softmax weights
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-5
N_CTX, H, SENTINEL = 37, 4, 99.0  # 99 is exact in bf16

SPEC = CpuTorchBackend()
WORST: dict[str, float] = {}  # largest |err| / bound per test family (printed with -s)


@pytest.fixture(scope="module")
def tri():
    from lorakit.backends.cuda_triton import CudaTritonBackend

    yield CudaTritonBackend(device=DEVICE)
    print("\nworst |err|/bound:", {k: f"{v:.3g}" for k, v in WORST.items()})


def rand(*shape, dtype=torch.float32, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def assert_within(got, ref, tol, what):
    got, ref = got.double().cpu(), ref.double().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got - ref).abs()
    worst = float((err / (tol.double().cpu() + 1e-30)).max())
    family = what.split()[0]
    WORST[family] = max(WORST.get(family, 0.0), worst)
    assert worst <= 1.0, f"{what}: max |err|/bound = {worst:.3g} (max err {float(err.max()):.3g})"


def rope_args(D, Hkv):
    return model.ModelArgs(n_vocab=8, n_embd=H * D, n_ff=8, n_head=H, n_head_kv=Hkv, n_layer=1)


# ---- add_rms_norm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [96, 200])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm(tri, dtype, E, M, with_delta):
    shape = (1, 1, E) if M == 1 else (M, E)
    h = rand(*shape, dtype=dtype) * torch.tensor([0.01, 1.0, 30.0][:M]).view(-1, 1).to(dtype)  # rows of any scale
    delta = rand(*shape, dtype=dtype, seed=2) if with_delta else None
    w = (rand(E, seed=3, scale=0.5) + 1.0).to(dtype)
    s_ref, y_ref = SPEC.add_rms_norm(h, delta, w, EPS)
    hd = h.to(DEVICE)
    s, y = tri.add_rms_norm(hd, None if delta is None else delta.to(DEVICE), w.to(DEVICE), EPS)
    assert s.dtype == y.dtype == dtype and s.shape == y.shape == h.shape
    if delta is None:
        assert s is hd
    assert torch.equal(s.cpu(), s_ref), "s = h + delta must be bit-identical"
    u_out = U_OUT[dtype]
    tol = ((E + 10) * U + 4 * u_out) * y_ref.double().abs() * (1 + 4 * u_out)
    assert_within(y, y_ref, tol, f"add_rms_norm E={E} M={M} {dtype}")


# ---- swiglu ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Fd", [96, 200])
@pytest.mark.parametrize("M", [1, 3])
def test_swiglu(tri, dtype, Fd, M):
    """SwiGLU as the decode step runs it: silu_mul_fwd on the two column views of the packed [gate | up]."""
    shape = (1, 1, 2 * Fd) if M == 1 else (M, 2 * Fd)
    gu = rand(*shape, dtype=dtype, scale=4.0)  # gates over [-15, 15]: silu's tails and its bend
    ref = SPEC.silu_mul_fwd(*gu.chunk(2, dim=-1))
    got = tri.silu_mul_fwd(*gu.to(DEVICE).chunk(2, dim=-1))
    assert got.dtype == dtype and got.shape == (*shape[:-1], Fd)
    g, up = gu.double().split([Fd, Fd], dim=-1)
    mag = (F.silu(g) * up).abs()
    u_out = U_OUT[dtype]
    tol = (2 * (g.abs() + 6) * U + 4 * u_out) * mag * (1 + 4 * u_out)
    assert_within(got, ref, tol, f"swiglu F={Fd} M={M} {dtype}")


# ---- rope_kv_write ---------------------------------------------------------------------------------

ATTN_CASES = [(D, Hkv, pos) for D in (8, 12) for Hkv in (4, 2) for pos in (0, 5, 36)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,Hkv,pos", ATTN_CASES)
def test_rope_kv_write(tri, dtype, D, Hkv, pos):
    cos, sin = model.rope_tables(rope_args(D, Hkv), N_CTX)
    qkv = rand(1, 1, (H + 2 * Hkv) * D, dtype=dtype, seed=pos)
    p = torch.tensor([pos])
    caches = [torch.full((1, Hkv, N_CTX, D), SENTINEL, dtype=dtype) for _ in range(4)]
    q_ref = SPEC.rope_kv_write(qkv, cos, sin, p, caches[0], caches[1], H, Hkv)
    kd, vd = caches[2].to(DEVICE), caches[3].to(DEVICE)
    q = tri.rope_kv_write(qkv.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), p.to(DEVICE), kd, vd, H, Hkv)
    assert q.shape == (1, H, 1, D) and q.dtype == dtype
    assert torch.equal(q.cpu(), q_ref), "rotated q must be bit-identical"
    for got, ref, name in ((kd.cpu(), caches[0], "k"), (vd.cpu(), caches[1], "v")):
        assert torch.equal(got, ref), f"cache_{name} must be bit-identical"
        others = torch.ones(N_CTX, dtype=torch.bool)
        others[pos] = False
        assert (got[:, :, others] == SENTINEL).all(), f"cache_{name}: a row other than pos was written"
        assert (got[:, :, pos] != SENTINEL).all()
    v = qkv.view(H + 2 * Hkv, D)[H + Hkv :]
    assert torch.equal(vd[0, :, pos].cpu(), v), "v is stored as is"


# ---- attention_decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,Hkv,pos", ATTN_CASES)
def test_attention_decode(tri, dtype, D, Hkv, pos):
    q = rand(1, H, 1, D, dtype=dtype, seed=1, scale=2.0)  # peaked and flat softmaxes
    k = rand(1, Hkv, N_CTX, D, dtype=dtype, seed=2)
    v = rand(1, Hkv, N_CTX, D, dtype=dtype, seed=3)
    p = torch.tensor([pos])
    ref = SPEC.attention_decode(q, k, v, p)
    # rows past pos are NaN for the kernel: one read of them would poison the output
    kn, vn = k.clone(), v.clone()
    kn[:, :, pos + 1 :] = float("nan")
    vn[:, :, pos + 1 :] = float("nan")
    got = tri.attention_decode(q.to(DEVICE), kn.to(DEVICE), vn.to(DEVICE), p.to(DEVICE))
    assert got.shape == (1, 1, H * D) and got.dtype == dtype

    assert_within(got, ref, attention_bound(q, k, v, pos, ref), f"attention D={D} Hkv={Hkv} pos={pos} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [None, 1, 3, 16])
@pytest.mark.parametrize("D,Hkv,pos", [(12, 2, 0), (12, 4, 5), (8, 2, N_CTX - 1), (12, 1, 20), (8, 1, 30)])
def test_rope_attention_decode_is_rope_then_attention(tri, dtype, S, D, Hkv, pos):
    """The fused launch (RoPE of q and k, the cache write, attention; decode.py's step) against the spec's
    rope_kv_write then attention_decode: the same cache rows bit for bit (row pos written, every other row kept),
    the attention within attention_decode's bound (on the rotated q), the same
    bits on a second call, and kept counters back at zero."""
    cos, sin = model.rope_tables(rope_args(D, Hkv), N_CTX)
    qkv = rand(1, 1, (H + 2 * Hkv) * D, dtype=dtype, seed=pos + 7, scale=2.0)
    k, v = rand(1, Hkv, N_CTX, D, dtype=dtype, seed=2), rand(1, Hkv, N_CTX, D, dtype=dtype, seed=3)
    p = torch.tensor([pos])
    kr, vr = k.clone(), v.clone()
    q_ref = SPEC.rope_kv_write(qkv, cos, sin, p, kr, vr, H, Hkv)
    ref = SPEC.attention_decode(q_ref, kr, vr, p)
    kd, vd = k.clone().to(DEVICE), v.clone().to(DEVICE)
    last = min(pos, N_CTX - 1)
    kd[:, :, last + 1 :] = float("nan")  # rows past pos: one read of them would poison the output
    vd[:, :, last + 1 :] = float("nan")
    cnt = torch.zeros(H, dtype=torch.int32, device=DEVICE)
    args = (qkv.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), p.to(DEVICE), kd, vd, H, Hkv)
    got = decode_ops.rope_attention_decode(*args, cnt, splits=S)
    assert got.shape == (1, 1, H * D) and got.dtype == dtype
    assert torch.equal(kd[:, :, : last + 1].cpu(), kr[:, :, : last + 1]), "cache_k rows must be bit-identical"
    assert torch.equal(vd[:, :, : last + 1].cpu(), vr[:, :, : last + 1]), "cache_v rows must be bit-identical"
    assert torch.isnan(kd[:, :, last + 1 :]).all() and torch.isnan(vd[:, :, last + 1 :]).all()
    bound = attention_bound(q_ref, kr, vr, last, ref)
    assert_within(got, ref, bound, f"rope_attention S={S} D={D} Hkv={Hkv} pos={pos} {dtype}")
    assert torch.equal(decode_ops.rope_attention_decode(*args, cnt, splits=S), got)
    assert not cnt.any()
    assert torch.equal(tri.rope_attention_decode(*args, cnt), decode_ops.rope_attention_decode(*args, cnt))


def test_rope_attention_decode_rejects_bad_input():
    cos, sin = model.rope_tables(rope_args(12, 2), N_CTX)
    k = torch.zeros(1, 2, N_CTX, 12, device=DEVICE)
    p = torch.tensor([3], device=DEVICE)
    qkv = torch.zeros(1, 1, (H + 4) * 12, device=DEVICE)
    with pytest.raises(ValueError, match="qkv"):
        decode_ops.rope_attention_decode(qkv[..., :-1], cos.to(DEVICE), sin.to(DEVICE), p, k, k.clone(), H, 2)
    with pytest.raises(ValueError, match="cos"):
        decode_ops.rope_attention_decode(qkv, cos.double().to(DEVICE), sin.to(DEVICE), p, k, k.clone(), H, 2)
    with pytest.raises(ValueError, match="multiple"):
        decode_ops.rope_attention_decode(torch.zeros(1, 1, 7 * 12, device=DEVICE), cos.to(DEVICE), sin.to(DEVICE),
                                         p, k, k.clone(), 3, 2)  # fmt: skip


# the key splits (decode_ops.attention_decode's test hook `splits`): S = 1 (the direct path), S < the number
# of BLOCK_T-key blocks (several blocks per split), S = that number (the default at N_CTX = 37 under the
# interpreter: 5 blocks of 8), S above it (splits that never hold a key) and S = 16 (MAX_SPLITS); N_CTX is
# a multiple of none. pos = 0 (one busy split), 5, 20, N_CTX - 1 and N_CTX + 5 (past the cache: every row);
# GQA groups of 1, 2 and 4.
SPLITS = [1, 2, 3, 5, 7, 16]
SPLIT_CASES = [(12, 4, 0), (12, 4, 20), (12, 2, 5), (12, 2, N_CTX - 1), (12, 1, 20), (8, 1, 0), (8, 2, N_CTX + 5)]


def attention_inputs(D, Hkv, pos, dtype, n_ctx=N_CTX):
    """q, k, v (rows past pos NaN: one read of them would poison the output) and the spec's output."""
    q = rand(1, H, 1, D, dtype=dtype, seed=1, scale=2.0)
    k = rand(1, Hkv, n_ctx, D, dtype=dtype, seed=2)
    v = rand(1, Hkv, n_ctx, D, dtype=dtype, seed=3)
    ref = SPEC.attention_decode(q, k, v, torch.tensor([pos]))
    kn, vn = k.clone(), v.clone()
    kn[:, :, pos + 1 :] = float("nan")
    vn[:, :, pos + 1 :] = float("nan")
    return q, k, v, kn, vn, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", SPLITS)
@pytest.mark.parametrize("D,Hkv,pos", SPLIT_CASES)
def test_attention_decode_splits(dtype, S, D, Hkv, pos):
    q, k, v, kn, vn, ref = attention_inputs(D, Hkv, pos, dtype)
    p = torch.tensor([pos], device=DEVICE)
    got = decode_ops.attention_decode(q.to(DEVICE), kn.to(DEVICE), vn.to(DEVICE), p, splits=S)
    assert got.shape == (1, 1, H * D) and got.dtype == dtype
    last = min(pos, N_CTX - 1)  # keys 0..last
    bound = attention_bound(q, k, v, last, ref)
    assert_within(got, ref, bound, f"attention_splits S={S} D={D} Hkv={Hkv} pos={pos} {dtype}")


def test_attention_decode_with_kept_counters():
    """One counters buffer kept across launches (as the CUDA-graph decode keeps it for all layers): the same bits
    as fresh counters, and every launch leaves it zero; a wrong buffer is refused."""
    cnt = torch.zeros(H + 3, dtype=torch.int32, device=DEVICE)
    for S, (D, Hkv, pos) in zip((3, 16, 5, 2), SPLIT_CASES, strict=False):
        q, _, _, kn, vn, _ = attention_inputs(D, Hkv, pos, torch.float32)
        args = (q.to(DEVICE), kn.to(DEVICE), vn.to(DEVICE), torch.tensor([pos], device=DEVICE))
        got = decode_ops.attention_decode(*args, cnt, splits=S)
        assert torch.equal(got, decode_ops.attention_decode(*args, splits=S))
        assert not cnt.any()
    with pytest.raises(ValueError, match="counters"):
        decode_ops.attention_decode(*args, cnt[:2], splits=3)
    with pytest.raises(ValueError, match="counters"):
        decode_ops.attention_decode(*args, cnt.long(), splits=3)


def test_attention_splits_heuristic():
    bt, most = decode_ops.BLOCK_T, decode_ops.MAX_SPLITS
    assert decode_ops.attention_splits(1) == decode_ops.attention_splits(bt) == 1
    assert decode_ops.attention_splits(bt + 1) == 2
    assert decode_ops.attention_splits(N_CTX) == -(-N_CTX // bt)
    assert decode_ops.attention_splits(most * bt) == decode_ops.attention_splits(100 * most * bt) == most
    with pytest.raises(ValueError, match="splits"):
        decode_ops.attention_decode(
            *[t.to(DEVICE) for t in attention_inputs(8, 2, 3, torch.float32)[:3]],
            torch.tensor([3], device=DEVICE),
            splits=0,
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [None, 1, 3, 16])
def test_attention_decode_deterministic(dtype, S, monkeypatch):
    """Two calls with the same inputs give the same bits, and the combining program leaves its counters at 0:
    the second call here gets the first call's counter buffer back (not re-zeroed)."""
    q, k, v, *_ = attention_inputs(12, 2, N_CTX - 1, dtype)
    q, k, v, p = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), torch.tensor([N_CTX - 1], device=DEVICE)
    counters = []
    zeros = torch.zeros

    def reused_counters(*shape, **kw):  # the first int32 buffer, handed out again as is
        if kw.get("dtype") is not torch.int32:
            return zeros(*shape, **kw)
        if not counters:
            counters.append(zeros(*shape, **kw))
        return counters[0]

    monkeypatch.setattr(decode_ops.torch, "zeros", reused_counters)
    outs = [decode_ops.attention_decode(q, k, v, p, splits=S) for _ in range(3)]
    monkeypatch.undo()
    split = (S or decode_ops.attention_splits(N_CTX)) > 1
    assert len(counters) == int(split)
    if split:
        assert counters[0].shape == (H,) and not counters[0].any(), "the counters must be back at 0"
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "repeated calls must be bit-identical"


def test_attention_decode_strided_cache():
    """Caches that are views: rows longer than D (stride_kt != D) and a head stride with no power-of-two factor
    above 1 (KV_ALIGN = 1)."""
    D, Hkv, pos = 12, 2, 30
    q, k, v, kn, vn, ref = attention_inputs(D, Hkv, pos, torch.float32)
    views = []
    for t in (kn, vn):
        big = torch.full((1, Hkv, N_CTX, D + 1), SENTINEL)  # head stride 37 * 13: odd
        big[..., :D] = t
        views.append(big.to(DEVICE)[..., :D])
    assert views[0].stride(2) == D + 1 and views[0].stride(1) % 2
    for S in (1, 4):
        got = decode_ops.attention_decode(q.to(DEVICE), *views, torch.tensor([pos], device=DEVICE), splits=S)
        assert_within(got, ref, attention_bound(q, k, v, pos, ref), f"attention_strided S={S}")


def attention_bound(q, k, v, pos, ref):
    """The module docstring's bound on |o - ref| for q [1, H, 1, D] over cache rows 0..pos ([1, 1, H*D])."""
    Hq, D, Hkv = q.shape[1], q.shape[-1], k.shape[1]
    n, scale = pos + 1, 1 / math.sqrt(D)
    kk = k[:, :, :n].double().repeat_interleave(Hq // Hkv, dim=1)
    vv = v[:, :, :n].double().repeat_interleave(Hq // Hkv, dim=1)
    qd = q.double()
    w = torch.softmax(qd @ kk.transpose(-1, -2) * scale, dim=-1)  # [1, H, 1, n]
    S = (qd.abs() @ kk.abs().transpose(-1, -2) * scale).amax(dim=-1, keepdim=True)  # [1, H, 1, 1]
    pmag = w @ vv.abs()  # [1, H, 1, D]
    side = (2 * (D + 7) * S + 12 * n + 11) * U * pmag
    tol = (2 * side + 2 * U_P[q.dtype] * pmag).transpose(1, 2).reshape(1, 1, Hq * D)
    return tol + 2 * U_OUT[q.dtype] * ref.double().abs()


# ---- the specification against model.py / decode.py (bit for bit, CPU) ---------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_spec_add_rms_norm_is_model_math(dtype):
    h, delta = rand(3, 200, dtype=dtype), rand(3, 200, dtype=dtype, seed=2)
    w = rand(200, seed=3) + 1.0  # float32, as load_model keeps norms; block converts with .to(h.dtype)
    s, y = SPEC.add_rms_norm(h, delta, w.to(dtype), EPS)
    assert torch.equal(s, h + delta)
    assert torch.equal(y, model.rms_norm(h + delta, EPS) * w.to(dtype))
    assert torch.equal(SPEC.add_rms_norm(h, None, w.to(dtype), EPS)[1], model.rms_norm(h, EPS) * w.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_spec_swiglu_is_feed_forward(dtype):
    Fd = 200
    gate, up = rand(1, 3, Fd, dtype=dtype, scale=4.0), rand(1, 3, Fd, dtype=dtype, seed=2)
    seen = {}

    def linear(x, name):
        if "gate_up" in name:  # model.feed_forward's one product over the packed [gate; up]: two views
            return torch.cat([gate, up], dim=-1).split([Fd, Fd], dim=-1)
        if "gate" in name:
            return gate
        if "up" in name:
            return up
        seen["down_input"] = x
        return x

    model.feed_forward(0, None, linear)
    assert torch.equal(SPEC.silu_mul_fwd(*torch.cat([gate, up], dim=-1).chunk(2, dim=-1)), seen["down_input"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hkv,pos", [(2, 0), (2, 5), (4, 36)])
def test_spec_rope_attention_is_model_attention(dtype, Hkv, pos):
    """rope_kv_write + attention_decode against model.attention's cached path for one token at n_past = pos:
    q and the cache rows bit for bit (apply_rope, the row write), the attention within the bound."""
    D = 12
    args = rope_args(D, Hkv)
    cos, sin = model.rope_tables(args, N_CTX)
    qkv = rand(1, 1, (H + 2 * Hkv) * D, dtype=dtype, seed=7)
    q_, k_, v_ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    seen = {}

    def linear(x, name):
        if "attn_output" in name:
            seen["attn"] = x
            return x
        return {"attn_q": q_, "attn_k": k_, "attn_v": v_, "attn_qkv": (q_, k_, v_)}[name.split(".")[2]]

    p = torch.tensor([pos])
    cache = model.KVCache.empty(args, 1, N_CTX, dtype, "cpu")
    for t in (*cache.k, *cache.v):
        t.copy_(rand(*t.shape, dtype=dtype, seed=9))
    ck, cv = cache.k[0].clone(), cache.v[0].clone()
    model.attention(args, 0, qkv[..., :0], linear, cos[pos : pos + 1], sin[pos : pos + 1], cache, pos)
    q = SPEC.rope_kv_write(qkv, cos, sin, p, ck, cv, H, Hkv)
    assert torch.equal(ck, cache.k[0]) and torch.equal(cv, cache.v[0])
    # SDPA over rows 0..pos (the model's slice) vs over the masked full cache: not always the same fp32
    # operation order (measured: 1 ulp apart in fp32), so the attention bound applies, not equality
    got, ref = SPEC.attention_decode(q, ck, cv, p), seen["attn"]
    assert_within(got, ref, attention_bound(q, ck, cv, pos, ref), f"spec_attention Hkv={Hkv} pos={pos} {dtype}")


@pytest.mark.parametrize("start,nbytes", [(0, 1), (0, 5000), (300, 129), (4096, 10**9), (6143, 1), (7000, 100), (5, 0)])
def test_prefetch_ranges_cover_the_hinted_rows(start, nbytes):
    """triton_util.prefetch_ranges: the hinted qs bytes (clipped to the weight) in 128-byte lines that all start
    inside qs, and the lines of d covering the scales of the hinted q8_0 blocks (d is row-major like qs)."""
    from lorakit.kernels.triton_util import Prefetch, prefetch_ranges

    N, K = 48, 128  # qs 6144 bytes, d 48 x 4 fp16 = 384 bytes
    qs, d = torch.zeros(N, K, dtype=torch.int8), torch.zeros(N, K // 32, dtype=torch.float16)
    q0, q_lines, d0, d_lines = prefetch_ranges(Prefetch(qs, d, start, nbytes))
    lo, hi = start, min(start + nbytes, N * K)
    if hi <= lo:
        assert q_lines == 0
        return
    assert q0 == lo and q0 + (q_lines - 1) * 128 < hi <= q0 + q_lines * 128
    b_lo, b_hi = lo // 32, (hi - 1) // 32  # the blocks touched; block b's scale is d's bytes 2b, 2b + 1
    assert d0 <= 2 * b_lo and d0 + d_lines * 128 >= 2 * b_hi + 2
    assert d0 + (d_lines - 1) * 128 < 2 * N * K // 32


@pytest.mark.parametrize("n", [1, 37, 64, 65, 200])
def test_greedy_next_is_torch_argmax(n):
    """The first index of the largest value, over one chunk and several (ARGMAX_BLOCK is 64 under the
    interpreter): random values, ties (the first one wins, inside a chunk and across chunks), -inf everywhere
    but one value, a NaN (the largest, as torch.argmax); the position moves on by one and the buffer to zero is
    zero (several programs' shares); cpu-torch's greedy_next agrees."""
    g = torch.Generator().manual_seed(n)
    cases = [torch.randn(n, generator=g)]
    ties = torch.randint(-3, 3, (n,), generator=g).float()
    ties[n // 3], ties[n - 1] = 7.0, 7.0  # two maxima, the first of them maybe in an earlier chunk
    cases.append(ties)
    lone = torch.full((n,), float("-inf"))
    lone[n // 2] = -1e30
    cases += [lone, torch.full((n,), float("-inf"))]
    if n > 2:
        nan = torch.randn(n, generator=g)
        nan[n - 2] = float("nan")
        cases.append(nan)
    tok = torch.full((1, 1), -1, dtype=torch.int64, device=DEVICE)
    pos = torch.tensor([5], device=DEVICE)
    for i, x in enumerate(cases):
        want = int(torch.argmax(x))
        zero = torch.randn(3 * 8192 + n, device=DEVICE)
        assert int(decode_ops.greedy_next(x.to(DEVICE), tok, pos, zero)) == want
        assert int(pos) == 6 + i and not zero.any()
        ref_tok, ref_pos, ref_zero = torch.zeros(1, 1, dtype=torch.int64), torch.tensor([1]), torch.ones(3)
        assert int(CpuTorchBackend().greedy_next(x, ref_tok, ref_pos, ref_zero)) == want
        assert int(ref_pos) == 2 and not ref_zero.any()
    assert int(decode_ops.greedy_next(cases[0].to(DEVICE), tok)) == int(torch.argmax(cases[0]))  # tok alone
    with pytest.raises(ValueError):
        decode_ops.greedy_next(torch.zeros(2, 3, device=DEVICE), tok)


def test_greedy_next_history():
    """With hist, the token lands at hist[pos] (the position before the step's increment), one slot per step, in
    both backends; a position outside hist writes nothing; hist without pos is an error."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(50, generator=g) for _ in range(4)]
    for be_next, dev in ((decode_ops.greedy_next, DEVICE), (CpuTorchBackend().greedy_next, "cpu")):
        hist = torch.full((4,), -1, dtype=torch.int64, device=dev)
        tok = torch.zeros(1, 1, dtype=torch.int64, device=dev)
        pos = torch.tensor([1], device=dev)
        for x in xs:  # positions 1, 2, 3, then 4: past the end, nothing written
            be_next(x.to(dev), tok, pos, None, hist)
        assert hist.tolist() == [-1] + [int(torch.argmax(x)) for x in xs[:3]]
        assert int(pos) == 5 and int(tok) == int(torch.argmax(xs[3]))
    with pytest.raises(ValueError):
        decode_ops.greedy_next(xs[0].to(DEVICE), tok.to(DEVICE), None, None, hist.to(DEVICE))
