"""q8_0 matrix-vector product for decoding (M = 1 or a few rows): y[m] = W @ x[m] (+ LoRA term).

Memory-bound: the goal is to stream the int8 values and fp16 scales once at HBM speed. One program owns
BLOCK_N rows of W for one row of x and walks K in BLOCK_K steps, accumulating elementwise products in an
fp32 [BLOCK_N, BLOCK_K] register tile (no reduction inside the loop, so the loads of the next step are
not held up); one tl.sum at the end. No split-K: every program writes its own outputs, so the result is
deterministic and there is no second pass. Rows of x beyond the first reuse W from L2 (grid axis 1).

Numerics (as the tensor-core path and the spec): W = rnd_dtype(qs * d) (fp32 product, one rounding to
x's dtype), products W * x exact in fp32 for bf16/fp16 inputs, fp32 accumulation, y rounded once. The
LoRA term s * t @ b.T (t = x @ a, computed by the launcher) is added in fp32 before that rounding.

DEQ_RESHAPE picks how a scale reaches its 32 values: a [BLOCK_N, BLOCK_K/32] load broadcast through a
reshape (fewer loads, a layout shuffle) or a gathered [BLOCK_N, BLOCK_K] load of d[n, k // 32] (more
load instructions, served from L1); the autotuner measures both.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_util import _dequant_tile, _to


@triton.jit
def _gemv_tile(
    x_row,
    q_rows,
    d_rows,
    k0,
    K,
    stride_xk,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MASKED: tl.constexpr,
    DEQ_RESHAPE: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    """The [BLOCK_N, BLOCK_K] products W[n, k0 + j] * x[k0 + j] of one K step, in fp32 (k0 % 32 == 0)."""
    KB: tl.constexpr = BLOCK_K // 32
    kk = k0 + tl.arange(0, BLOCK_K)
    kb = k0 // 32 + tl.arange(0, KB)
    if MASKED:
        x = tl.load(x_row + kk * stride_xk, mask=kk < K, other=0.0)
        q = tl.load(q_rows + kk[None, :], mask=(kk < K)[None, :], other=0)
    else:
        x = tl.load(x_row + kk * stride_xk)
        q = tl.load(q_rows + kk[None, :])
    if DEQ_RESHAPE:
        if MASKED:
            dd = tl.load(d_rows + kb[None, :], mask=(kb * 32 < K)[None, :], other=0.0)
        else:
            dd = tl.load(d_rows + kb[None, :])
        w = _dequant_tile(q, dd, BLOCK_N, BLOCK_K)
    else:
        if MASKED:
            dd = tl.load(d_rows + (kk // 32)[None, :], mask=(kk < K)[None, :], other=0.0)
        else:
            dd = tl.load(d_rows + (kk // 32)[None, :])
        w = q.to(tl.float32) * dd.to(tl.float32)
    w = _to(w, x.dtype, EMU_BF16)  # = dequantize_q8_0(qs, d, x.dtype)
    return w.to(tl.float32) * x.to(tl.float32)[None, :]


@triton.jit
def _q8_gemv_kernel(
    x_ptr,
    qs_ptr,
    d_ptr,
    y_ptr,
    t_ptr,
    b_ptr,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_dn,
    stride_ym,
    stride_yn,
    stride_tm,
    stride_tr,
    stride_bn,
    stride_br,
    R,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DEQ_RESHAPE: tl.constexpr,
    HAS_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    """y[m, n-block] = W[n-block] @ x[m] (+ scale * t[m] @ b[n-block].T)."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)  # wrapped rows keep every load in bounds; the store is masked
    x_row = x_ptr + row * stride_xm
    q_rows = qs_ptr + rn[:, None] * stride_qn
    d_rows = d_ptr + rn[:, None] * stride_dn

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_full = (K // BLOCK_K) * BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        acc += _gemv_tile(x_row, q_rows, d_rows, k0, K, stride_xk, BLOCK_N, BLOCK_K, False, DEQ_RESHAPE, EMU_BF16)
    if k_full < K:  # the ragged last step (K is a multiple of 32, not of BLOCK_K)
        acc += _gemv_tile(x_row, q_rows, d_rows, k_full, K, stride_xk, BLOCK_N, BLOCK_K, True, DEQ_RESHAPE, EMU_BF16)
    y = tl.sum(acc, axis=1)

    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        t = tl.load(t_ptr + row * stride_tm + offs_r * stride_tr, mask=mask_r, other=0.0)
        bb = tl.load(b_ptr + rn[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=mask_r[None, :], other=0.0)
        y += scale * tl.sum(bb.to(tl.float32) * t.to(tl.float32)[None, :], axis=1)

    y_ptrs = y_ptr + row * stride_ym + offs_n.to(tl.int64) * stride_yn
    tl.store(y_ptrs, _to(y, y_ptr.dtype.element_ty, EMU_BF16), mask=offs_n < N)
