"""q8_0 matrix-vector product for decoding (M = 1 or a few rows): y[m] = W @ x[m] (+ LoRA term).

Memory-bound: the goal is to stream the int8 values and fp16 scales once at HBM speed. One program owns
BLOCK_N rows of W for one row of x and walks K in steps of BLOCK_K = KB q8_0 blocks. Every tile is
built as [rows, blocks, 32] from one 3-D layout, so a scale loaded as [rows, blocks, 1] broadcasts over
its 32 values without a layout shuffle and costs one load per block a thread holds. Products are
accumulated elementwise in an fp32 register tile (no reduction inside the loop, so nothing waits on
the previous step); UNROLL steps issue all their loads before any arithmetic, to keep more bytes in
flight per program. One reduction at the end; no split-K, so every program writes its own outputs
(deterministic, no second pass). Rows of x beyond the first reuse W from L2 (grid axis 1).

Numerics (as the tensor-core path and the spec): W = rnd_dtype(qs * d) (fp32 product, one rounding to
x's dtype), products W * x exact in fp32 for bf16/fp16 inputs, fp32 accumulation, y rounded once. The
LoRA term s * t @ b.T (t = x @ a, computed by the launcher) is added in fp32 before that rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_util import _q8_f32, _to


@triton.jit
def _gemv_load(x_row, q_rows, d_rows, k0, K, KB: tl.constexpr, MASKED: tl.constexpr):
    """x [1, KB, 32], q [BLOCK_N, KB, 32], d [BLOCK_N, KB] of the K step starting at k0 (k0 % 32 == 0)."""
    offs_b = tl.arange(0, KB)
    offs_j = tl.arange(0, 32)
    kk = k0 + offs_b[:, None] * 32 + offs_j[None, :]  # [KB, 32]
    kb = k0 // 32 + offs_b  # [KB]
    if MASKED:
        x = tl.load(x_row + kk[None, :, :], mask=(kk < K)[None, :, :], other=0.0)
        q = tl.load(q_rows + kk[None, :, :], mask=(kk < K)[None, :, :], other=0)
        d = tl.load(d_rows + kb[None, :], mask=(kb * 32 < K)[None, :], other=0.0)
    else:
        x = tl.load(x_row + kk[None, :, :])
        q = tl.load(q_rows + kk[None, :, :])
        d = tl.load(d_rows + kb[None, :])
    return x, q, d


@triton.jit
def _gemv_products(x, q, d, EMU_BF16: tl.constexpr):
    """W * x in fp32 with W = rnd_{x.dtype}(q * d) (= dequantize_q8_0(qs, d, x.dtype)). The kernel is bound
    by these per-element instructions more than by memory (bench/gemv_lab.py), so int8 -> fp32 goes by an
    integer add (_q8_f32) instead of the slower conversion instruction; the rounding to bf16 stays the
    hardware conversion (it measured faster than the fp32-arithmetic and integer roundings)."""
    w = _to(_q8_f32(q) * d.to(tl.float32)[:, :, None], x.dtype, EMU_BF16)
    return w.to(tl.float32) * x.to(tl.float32)


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
    stride_xm,  # x rows are contiguous (the launcher makes them so)
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
    KB: tl.constexpr,  # q8_0 blocks per K step (BLOCK_K = 32 * KB)
    UNROLL: tl.constexpr,  # K steps whose loads are issued together (1 or 2)
    HAS_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    """y[m, n-block] = W[n-block] @ x[m] (+ scale * t[m] @ b[n-block].T)."""
    BLOCK_K: tl.constexpr = KB * 32
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)  # wrapped rows keep every load in bounds; the store is masked
    x_row = x_ptr + row * stride_xm
    q_rows = qs_ptr + rn[:, None, None] * stride_qn
    d_rows = d_ptr + rn[:, None] * stride_dn

    acc = tl.zeros((BLOCK_N, KB, 32), dtype=tl.float32)
    STEP: tl.constexpr = BLOCK_K * UNROLL
    k_full = (K // STEP) * STEP
    for k0 in range(0, k_full, STEP):
        if UNROLL == 2:
            x0, q0, d0 = _gemv_load(x_row, q_rows, d_rows, k0, K, KB, False)
            x1, q1, d1 = _gemv_load(x_row, q_rows, d_rows, k0 + BLOCK_K, K, KB, False)
            acc += _gemv_products(x0, q0, d0, EMU_BF16)
            acc += _gemv_products(x1, q1, d1, EMU_BF16)
        else:
            x0, q0, d0 = _gemv_load(x_row, q_rows, d_rows, k0, K, KB, False)
            acc += _gemv_products(x0, q0, d0, EMU_BF16)
    for k0 in range(k_full, K, BLOCK_K):  # the ragged end (K is a multiple of 32, not of STEP)
        x0, q0, d0 = _gemv_load(x_row, q_rows, d_rows, k0, K, KB, True)
        acc += _gemv_products(x0, q0, d0, EMU_BF16)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)

    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        t = tl.load(t_ptr + row * stride_tm + offs_r * stride_tr, mask=mask_r, other=0.0)
        bb = tl.load(b_ptr + rn[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=mask_r[None, :], other=0.0)
        y += scale * tl.sum(bb.to(tl.float32) * t.to(tl.float32)[None, :], axis=1)

    y_ptrs = y_ptr + row * stride_ym + offs_n.to(tl.int64) * stride_yn
    tl.store(y_ptrs, _to(y, y_ptr.dtype.element_ty, EMU_BF16), mask=offs_n < N)
