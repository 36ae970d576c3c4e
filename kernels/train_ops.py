"""Fused kernels for the training step's elementwise ops (lorakit/fused_ops.py), one launch forward and one
backward per op, in place of torch's chains of small kernels (cast, pow, mean, rsqrt, mul, cast, mul, ...).

The compute dtype is fp32, bf16 or fp16; all math is fp32 and each result is rounded to the dtype once, where
the spec (backends/cpu_torch.py, i.e. lorakit/model.py's op sequence) rounds it. Every launcher: check ->
allocate -> launch. rnd(.) is the rounding to the compute dtype, E the row length, rows the number of rows.

  rms_norm_fwd(x, w, eps) -> (y, rstd)   one program per row (the whole row in registers, E <= MAX_ROW):
      xf = fp32(x), rstd = 1 / sqrt(sum(xf^2) / E + eps), n = xf * rstd,
      y = rnd(rnd(n) * rnd(w))            (model.block: rms_norm(h, eps) * w.to(h.dtype))
      rstd (fp32 [rows]) is kept for the backward.
  add_rms_norm_fwd(h, delta, w, eps) -> (s, y, rstd)   the same on s = rnd(h + delta) (a residual sum, returned).
  rms_norm_bwd(dy, x, w, rstd, dres=None) -> (dx, dw)   the gradient of that forward with the rounding rnd(n)
      taken as the identity (as autograd does). With wf = fp32(rnd(w)), g = dy * wf:
      dx = rnd(rstd * (g - n * (sum(g * n) / E)))                       (fp32 math, one rounding)
      [dres: dx = rnd(dx + dres), the residual's gradient added as autograd adds it (two roundings)]
      dw = sum over rows of dy * fp32(rnd(n))      fp32 [E]; autograd's gradient of rnd(n) * rnd(w) w.r.t. rnd(w)
      dw is deterministic: each program adds its fixed block of consecutive rows (in order) into one fp32 row of
      a [programs, E] buffer; torch sums that buffer over axis 0 (no atomics; the same shape gives the same bits).
      (programs ~ BWD_PROGRAMS. On sm_90 the backward holds ~6 fp32 rows in registers: no spills up to E = 8192,
      ~0.5 KB of spills per thread at E = 16384.)
  rope_fwd(x, cos, sin, inverse=False) -> y   x [B, T, H, D], cos/sin fp32 [T, D/2]; one program per (b, t) and
      block of heads. Pairs (x0, x1) = (x[2i], x[2i+1]) turn by theta = (t, i):
      forward  (x0*c - x1*s, x0*s + x1*c),  inverse (x0*c + x1*s, -x0*s + x1*c) (the inverse is the forward with
      s -> -s, exactly). The rotation is orthogonal, so the backward of rope_fwd is rope_fwd(dy, inverse=True).
  rope_heads(x, cos, sin, n_rot, out, inverse=False, last=None) -> out   the general form behind rope_fwd: x's
      first n_rot heads turned, the others copied, into out [B, T, H, W >= D] (any strides but the last axis:
      views into a packed product, a zero-tailed padded buffer or a KV cache); columns D..W-1 of each head set to
      zero; `last` gets the last heads' D columns too (a prompt's k and v into the KV cache). One program per
      (b, t) and block of heads, whole head rows (element j's pair partner is a second load of j ^ 1).
  silu_mul_fwd(g, u) -> y   elementwise: a = rnd(g / (1 + exp(-g))), y = rnd(a * u)   (F.silu(g) * up)
  silu_mul_bwd(dy, g, u, out=None) -> (dg, du)   with sig = 1 / (1 + exp(-g)) (out: tensors to write into):
      du = rnd(dy * a)                                    (a as the forward stored it)
      dg = rnd(((dy * u) * sig) * (1 + g * (1 - sig)))   (d silu / dg = sig * (1 + g * (1 - sig)))

Numerics against cpu-torch (the tests' table, tests/test_train_ops.py, derives the bounds). Every launch passes
enable_fp_fusion=False: the GPU rounds each multiply and add on its own (no FMA contraction), as torch's CPU
kernels and the interpreter (numpy) do, so the interpreter tests check the GPU's op sequence. What differs is
only the order of the sums and the implementation of exp (sqrt.rn and div.rn are correctly rounded):
  * rms_norm: 1/sqrt is sqrt.rn then div.rn (correctly rounded, as torch's CPU rsqrt: 1 / sqrt); the sum of
    squares is a tree reduction (torch sums in another order), so rstd is within ~E fp32 ulps of the spec's
    and y within that plus one rounding step per rounding (n, the product). Given the same rstd, dx differs
    only by the order of the E-term sum, dw only by the order of the row sum.
  * rope: op for op the spec's fp32 sequence (no FMA: x0*c - x1*s is two rounded products and a rounded
    difference): bit-identical to model.apply_rope (forward) and to its autograd gradient (inverse).
  * silu_mul: the spec's sequence; only exp differs (a few fp32 ulps; on the GPU ex2.approx of -g*log2(e),
    ~|g| ulps from the argument) -> one rounding step apart at most in each rounded result.

Under TRITON_INTERPRET=1 (CPU tensors) the tiles are small so the tests' odd shapes hit every mask, and EMU_BF16
makes the interpreter's fp32 -> bf16 cast round to nearest-even like the GPU (see triton_util._to).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_util import ACT_DTYPES, _pdl_start, _to, cdiv, check_tensor, interpreting, launch, next_pow2, pdl

_INTERPRET = interpreting()
MAX_ROW = 16384  # rms_norm keeps a whole row in registers
# rms_norm_bwd: about this many programs (each a block of consecutive rows); a constant, not the device's
# SM count, so that dw's summation order (and bits) depends on the shape only
BWD_PROGRAMS = 4 if _INTERPRET else 512
ROPE_TILE = 8 if _INTERPRET else 4096  # rope_heads: elements (heads x padded head row) per program
EW_BLOCK = 16 if _INTERPRET else 1024  # silu_mul: columns per program


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, s_ptr, w_ptr, y_ptr, r_ptr, E, E_f, eps, stride_x, stride_res,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, EMU_BF16: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    dtype = y_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < E
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:  # x = rnd(x + res): the residual sum, stored, then normalised
        res = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        xs = _to(x + res, dtype, EMU_BF16)
        tl.store(s_ptr + row * E + offs, xs, mask=mask)
        x = xs.to(tl.float32)
    ms = tl.math.div_rn(tl.sum(x * x, axis=0), E_f) + eps  # E_f = float(E)
    r = tl.math.div_rn(1.0, tl.math.sqrt_rn(ms))
    n = _to(x * r, dtype, EMU_BF16).to(tl.float32)
    w = _to(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32), dtype, EMU_BF16).to(tl.float32)
    tl.store(y_ptr + row * E + offs, _to(n * w, dtype, EMU_BF16), mask=mask)
    tl.store(r_ptr + row, r)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, r_ptr, dres_ptr, dx_ptr, part_ptr, n_rows, rows_per_prog, E, E_f, stride_dy, stride_x,
    stride_dres, HAS_DRES: tl.constexpr, BLOCK: tl.constexpr, EMU_BF16: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    dtype = dx_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < E
    w = _to(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32), dtype, EMU_BF16).to(tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_prog  # (the loop's row is then int64 too)
    row1 = tl.minimum(row0 + rows_per_prog, n_rows)
    for row in range(row0, row1):
        dy = tl.load(dy_ptr + row * stride_dy + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row)
        n = x * r
        g = dy * w
        c = tl.math.div_rn(tl.sum(g * n, axis=0), E_f)
        dx = _to(r * (g - n * c), dtype, EMU_BF16)
        if HAS_DRES:  # + the gradient reaching x along its other use (a residual), as autograd adds it
            dres = tl.load(dres_ptr + row * stride_dres + offs, mask=mask, other=0.0).to(tl.float32)
            dx = _to(dx.to(tl.float32) + dres, dtype, EMU_BF16)
        tl.store(dx_ptr + row * E + offs, dx, mask=mask)
        acc += dy * _to(n, dtype, EMU_BF16).to(tl.float32)
    tl.store(part_ptr + pid.to(tl.int64) * E + offs, acc, mask=mask)


@triton.jit
def _heads_kernel(
    x_ptr, y_ptr, cos_ptr, sin_ptr, T, H, N_ROT, D, W, stride_xb, stride_xt, stride_xh, stride_yb, stride_yt,
    stride_yh, stride_c0, stride_c1, stride_s0, stride_s1, z_ptr, H_Z, stride_zb, stride_zt, stride_zh,
    HAS_ROT: tl.constexpr, INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    EMU_BF16: tl.constexpr, HAS_Z: tl.constexpr = False,
):  # fmt: skip
    """y[b, t, h, :D] = RoPE(x[b, t, h]) for heads h < N_ROT, x[b, t, h] for the others; y[b, t, h, D:W] = 0.
    HAS_Z: the last heads h >= H_Z of that also go to z[b, t, h - H_Z, :D].
    A [BLOCK_H, BLOCK_W] tile of one token's heads, each head a contiguous run: element j of a head turns with
    its partner j ^ 1 (a second load of the same lines), so loads and stores stay whole-row and vectorised."""
    bt = tl.program_id(0)  # b * T + t
    b = (bt // T).to(tl.int64)
    t = bt % T
    dtype = y_ptr.dtype.element_ty
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col = tl.arange(0, BLOCK_W)
    mh = (h < H)[:, None]
    mx = mh & (col < D)[None, :]
    src = x_ptr + b * stride_xb + t * stride_xt + h[:, None].to(tl.int64) * stride_xh
    xv = tl.load(src + col[None, :], mask=mx, other=0.0)
    out = xv.to(dtype)
    if HAS_ROT:
        # spec: (x0, x1) -> (x0*c - x1*s, x0*s + x1*c); for element j with partner p = x[j ^ 1]:
        # even j: x*c - p*s, odd j: x*c + p*s (the same products; a + b == b + a exactly)
        xf = xv.to(tl.float32)
        pf = tl.load(src + (col ^ 1)[None, :], mask=mx, other=0.0).to(tl.float32)
        half = col // 2
        mc = col < D
        c = tl.load(cos_ptr + t * stride_c0 + half * stride_c1, mask=mc, other=0.0)[None, :]
        s = tl.load(sin_ptr + t * stride_s0 + half * stride_s1, mask=mc, other=0.0)[None, :]
        if INVERSE:
            s = -s
        xc = xf * c
        ps = pf * s
        turned = tl.where((col % 2 == 1)[None, :], xc + ps, xc - ps)
        out = tl.where((h < N_ROT)[:, None], _to(turned, dtype, EMU_BF16), out)
    out = tl.where((col < D)[None, :], out, tl.zeros((BLOCK_H, BLOCK_W), dtype=dtype))
    dst = y_ptr + b * stride_yb + t * stride_yt + h[:, None].to(tl.int64) * stride_yh + col[None, :]
    tl.store(dst, out, mask=mh & (col < W)[None, :])
    if HAS_Z:
        hz = h[:, None].to(tl.int64) - H_Z
        dz = z_ptr + b * stride_zb + t * stride_zt + hz * stride_zh + col[None, :]
        tl.store(dz, out, mask=mx & (hz >= 0))


@triton.jit
def _silu_mul_fwd_kernel(
    g_ptr,
    u_ptr,
    y_ptr,
    Fd,
    n_blk,
    stride_g,
    stride_u,
    BLOCK: tl.constexpr,
    EMU_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    _pdl_start(PDL)
    pid = tl.program_id(0)
    row = (pid // n_blk).to(tl.int64)
    cols = (pid % n_blk) * BLOCK + tl.arange(0, BLOCK)
    m = cols < Fd
    dtype = y_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    a = _to(tl.math.div_rn(g, 1.0 + tl.exp(-g)), dtype, EMU_BF16).to(tl.float32)
    tl.store(y_ptr + row * Fd + cols, _to(a * u, dtype, EMU_BF16), mask=m)


@triton.jit
def _silu_mul_bwd_kernel(
    dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, Fd, n_blk, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    BLOCK: tl.constexpr, EMU_BF16: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row = (pid // n_blk).to(tl.int64)
    cols = (pid % n_blk) * BLOCK + tl.arange(0, BLOCK)
    m = cols < Fd
    dtype = dg_ptr.dtype.element_ty
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    den = 1.0 + tl.exp(-g)
    a = _to(tl.math.div_rn(g, den), dtype, EMU_BF16).to(tl.float32)
    sig = tl.math.div_rn(1.0, den)
    tl.store(du_ptr + row * stride_du + cols, _to(dy * a, dtype, EMU_BF16), mask=m)
    dg = ((dy * u) * sig) * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + row * stride_dg + cols, _to(dg, dtype, EMU_BF16), mask=m)


# --------------------------------------------------------------------------------------------------
# checks and launchers
# --------------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [..., n] as [rows, n] with one row stride (a copy only when the leading axes cannot be flattened)."""
    return x.reshape(-1, n)


def _check_row(x: torch.Tensor, w: torch.Tensor) -> int:
    check_tensor(x, "x")
    E = x.shape[-1] if x.dim() else 0
    if not 0 < E <= MAX_ROW:
        raise ValueError(f"row length {E} is outside 1..{MAX_ROW} (the kernel keeps a row in registers)")
    if not w.is_floating_point() or w.shape != (E,) or w.device != x.device:
        raise ValueError(f"w must be a float [{E}] tensor on {x.device}, got {w.dtype} {tuple(w.shape)} on {w.device}")
    return E


def _w_arg(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w as the kernels read it: fp32/bf16/fp16 as is (rounded to dtype in the kernel), other floats converted."""
    w = w if w.dtype in ACT_DTYPES else w.to(dtype)
    return w if w.stride(0) == 1 else w.contiguous()


def _row_warps(block: int) -> int:
    return min(16, max(1, block // 512))


def rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): y = rms_norm(x, eps) * w.to(x.dtype) in x's dtype [..., E]; rstd fp32 [rows] = 1/rms per row."""
    _, y, rstd = _rms_fwd(x, None, w, eps)
    return y, rstd


def add_rms_norm_fwd(
    h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, y, rstd): s = rnd(h + delta) (the residual sum), then rms_norm_fwd of s, in one pass."""
    _check_same([(h, "h"), (delta, "delta")])
    return _rms_fwd(h, delta, w, eps)


def _rms_fwd(x, res, w, eps):
    E = _check_row(x, w)
    x2 = _rows(x, E)
    r2 = _rows(res, E) if res is not None else None
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if res is not None else x
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0] == 0:
        return s, y, rstd
    rms_norm_rows(x2, r2, s, _w_arg(w, x.dtype), y, rstd, eps)
    return s, y, rstd


def rms_norm_rows(
    x2: torch.Tensor,
    r2: torch.Tensor | None,
    s: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
) -> None:
    """The launch of rms_norm_fwd (r2 None) or add_rms_norm_fwd, unchecked, into given buffers: x2, r2 [rows, E]
    with a row stride each, s and y contiguous like x2 (s = rnd(x2 + r2) written where r2 is given; s may be x2's
    buffer then, each program reading its row before it writes it), w [E] as _w_arg gives it, rstd fp32 [rows]. For
    callers that checked the operands once (a prompt's lean forward, backends/cuda_prompt.py)."""
    E = x2.shape[1]
    block = next_pow2(E)
    res = x2 if r2 is None else r2  # (not read without HAS_RES)
    launch(_rms_norm_fwd_kernel, (x2.shape[0],),
           (x2, res, s, w, y, rstd, E, float(E), float(eps), x2.stride(0), res.stride(0)),
           dict(HAS_RES=r2 is not None, BLOCK=block, EMU_BF16=_INTERPRET, enable_fp_fusion=False,
                num_warps=_row_warps(block)))  # fmt: skip


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, dres: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dw fp32 [E]): the gradient of rms_norm_fwd for the output gradient dy (deterministic).
    dres: a gradient reaching x along another use (add_rms_norm_fwd's residual sum): dx = rnd(dx_norm + dres),
    the sum autograd would form."""
    E = _check_row(x, w)
    _check_same([(x, "x"), (dy, "dy"), *([(dres, "dres")] if dres is not None else [])])
    x2, dy2 = _rows(x, E), _rows(dy, E)
    dr2 = _rows(dres, E) if dres is not None else dy2
    n_rows = x2.shape[0]
    if rstd.dtype != torch.float32 or rstd.numel() != n_rows or rstd.device != x.device:
        raise ValueError(f"rstd must be a float32 tensor of {n_rows} rows on {x.device} (rms_norm_fwd's)")
    rstd = rstd.reshape(-1).contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros(E, dtype=torch.float32, device=x.device)
    rows_per_prog = cdiv(n_rows, BWD_PROGRAMS)
    n_prog = cdiv(n_rows, rows_per_prog)
    part = torch.empty(n_prog, E, dtype=torch.float32, device=x.device)
    block = next_pow2(E)
    launch(_rms_norm_bwd_kernel, (n_prog,),
           (dy2, x2, _w_arg(w, x.dtype), rstd, dr2, dx, part, n_rows, rows_per_prog, E, float(E), dy2.stride(0),
            x2.stride(0), dr2.stride(0)),
           dict(HAS_DRES=dres is not None, BLOCK=block, EMU_BF16=_INTERPRET, enable_fp_fusion=False,
                num_warps=_row_warps(block)))  # fmt: skip
    return dx, part.sum(0)


def rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """model.apply_rope: x [B, T, H, D] (last axis contiguous, any strides on the others; D even), cos/sin fp32
    [T, D/2] -> contiguous [B, T, H, D] in x's dtype. inverse=True turns by -theta (the backward)."""
    check_tensor(x, "x")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return rope_heads(x, cos, sin, x.shape[2] if x.dim() == 4 else 0, y, inverse)


def rope_heads(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_rot: int,
    out: torch.Tensor,
    inverse: bool = False,
    last: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[..., :D] = model.apply_rope of x's first n_rot heads (-theta if inverse) and x's other heads as they
    are; out[..., D:] = 0. x [B, T, H, D], out [B, T, H, W >= D] in x's dtype (last axes contiguous, any
    strides on the others: views into packed or padded buffers); cos/sin fp32 [T, D/2]. last [B, T, Hl, D]
    (Hl <= H, any strides but the last axis: a KV cache's rows): also gets out[:, :, H - Hl:, :D], in the same
    launch. Returns out."""
    check_tensor(x, "x")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be [B, T, H, D] with D even, got {tuple(x.shape)}")
    B, T, H, D = x.shape
    check_tensor(out, "out", x.dtype, x.device)
    if out.dim() != 4 or tuple(out.shape[:3]) != (B, T, H) or out.shape[3] < D:
        raise ValueError(f"out must be [{B}, {T}, {H}, >= {D}], got {tuple(out.shape)}")
    if not 0 <= n_rot <= H:
        raise ValueError(f"n_rot must be in 0..{H}, got {n_rot}")
    for t, name in ((cos, "cos"), (sin, "sin")):
        if t.dtype != torch.float32 or t.shape != (T, D // 2) or t.device != x.device:
            raise ValueError(
                f"{name} must be a float32 [{T}, {D // 2}] table on {x.device}, got {t.dtype} {tuple(t.shape)}"
            )
    if last is not None:
        check_tensor(last, "last", x.dtype, x.device)
        if last.dim() != 4 or tuple(last.shape[:2]) != (B, T) or last.shape[2] > H or last.shape[3] != D:
            raise ValueError(f"last must be [{B}, {T}, <= {H}, {D}], got {tuple(last.shape)}")
    if out.numel() == 0:
        return out
    rope_heads_launch(x, cos, sin, n_rot, out, inverse, last)
    return out


def rope_heads_launch(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_rot: int,
    out: torch.Tensor,
    inverse: bool = False,
    last: torch.Tensor | None = None,
) -> None:
    """rope_heads' launch, unchecked (operands as rope_heads takes them, out non-empty): for callers that checked
    them once (a prompt's lean forward)."""
    B, T, H, D = x.shape
    W = out.shape[3]
    block_w = next_pow2(W)
    block_h = min(next_pow2(H), max(1, ROPE_TILE // block_w))
    xs, os_, cs, ss = x.stride(), out.stride(), cos.stride(), sin.stride()
    z, h_z, zs = (out, H, (0, 0, 0)) if last is None else (last, H - last.shape[2], last.stride())
    launch(_heads_kernel, (B * T, cdiv(H, block_h)),
           (x, out, cos, sin, T, H, n_rot, D, W, xs[0], xs[1], xs[2], os_[0], os_[1], os_[2], cs[0], cs[1], ss[0],
            ss[1], z, h_z, zs[0], zs[1], zs[2]),
           dict(HAS_ROT=n_rot > 0, INVERSE=bool(inverse), BLOCK_H=block_h, BLOCK_W=block_w, EMU_BF16=_INTERPRET,
                HAS_Z=last is not None, enable_fp_fusion=False,
                num_warps=8 if block_h * block_w >= 4096 else (4 if block_h * block_w >= 512 else 1)))  # fmt: skip


def _check_same(ts: list[tuple[torch.Tensor, str]]) -> int:
    t0, name0 = ts[0]
    check_tensor(t0, name0)
    for t, name in ts[1:]:
        check_tensor(t, name, t0.dtype, t0.device)
        if t.shape != t0.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, {name0} {tuple(t0.shape)}")
    Fd = t0.shape[-1] if t0.dim() else 0
    if Fd <= 0:
        raise ValueError(f"{name0} must have a non-empty last axis, got shape {tuple(t0.shape)}")
    return Fd


def silu_mul_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """F.silu(g) * u with model.feed_forward's roundings; g, u [..., F] (last axis contiguous) -> contiguous y."""
    Fd = _check_same([(g, "g"), (u, "u")])
    g2, u2 = _rows(g, Fd), _rows(u, Fd)
    y = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if g2.shape[0]:
        silu_mul_rows(g2, u2, y)
    return y


def silu_mul_rows(g2: torch.Tensor, u2: torch.Tensor, y: torch.Tensor) -> None:
    """silu_mul_fwd's launch, unchecked: g2, u2 [rows > 0, F] with a row stride each, y contiguous [rows, F] (any
    leading shape). For callers that checked them once (a prompt's lean forward)."""
    rows, Fd = g2.shape
    n_blk = cdiv(Fd, EW_BLOCK)
    launch(_silu_mul_fwd_kernel, (rows * n_blk,), (g2, u2, y, Fd, n_blk, g2.stride(0), u2.stride(0)),
           dict(BLOCK=EW_BLOCK, EMU_BF16=_INTERPRET, enable_fp_fusion=False, num_warps=4,
                **pdl(g2.device)))  # fmt: skip


def silu_mul_bwd(
    dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) in g's dtype: the gradient of silu_mul_fwd for the output gradient dy. out: (dg, du) to write
    into, g's shape (last axis contiguous, rows strided: e.g. the two column views of one packed buffer)."""
    Fd = _check_same([(g, "g"), (u, "u"), (dy, "dy")])
    dy2, g2, u2 = _rows(dy, Fd), _rows(g, Fd), _rows(u, Fd)
    if out is None:
        out = tuple(torch.empty(g.shape, dtype=g.dtype, device=g.device) for _ in range(2))
    else:
        _check_same([(g, "g"), (out[0], "out[0]"), (out[1], "out[1]")])
    dg, du = out
    dg2, du2 = _rows(dg, Fd), _rows(du, Fd)
    if dg2.data_ptr() != dg.data_ptr() or du2.data_ptr() != du.data_ptr():
        raise ValueError("out's leading axes must flatten to one row stride (no copy)")
    rows = g2.shape[0]
    if rows == 0:
        return dg, du
    n_blk = cdiv(Fd, EW_BLOCK)
    launch(_silu_mul_bwd_kernel, (rows * n_blk,),
           (dy2, g2, u2, dg2, du2, Fd, n_blk, dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0),
            du2.stride(0)),
           dict(BLOCK=EW_BLOCK, EMU_BF16=_INTERPRET, enable_fp_fusion=False, num_warps=4))  # fmt: skip
    return dg, du
