"""Tiled q8_0 matmul kernels on the tensor cores: y = x @ W.T (with the LoRA term in the accumulator) and
dx = dy @ W. The K (or N) tile is a multiple of 32, so a weight tile always covers whole q8_0 blocks and
is dequantized in registers before the MMA (triton_util._dequant_to): on the GPU by _dequant_words for bf16/fp16
(one PRMT, one FFMA and half a packed conversion per element, the same numbers as _dequant_tile + _to; in the sm_90
SASS of the autotuned configs 16-23% fewer instructions per loop step, none fewer for the swapped 128 x 128 x 128
tile), by _dequant_tile for fp32 and under the interpreter. Each loop step waits for its wgmma before dequantizing
the next tile (triton keeps one shared-memory copy of the dequantized operand): the MMAs and the dequantization do
not overlap, which caps the kernel near half of cuBLAS at large M. Launchers, autotuning and the numerics contract:
lorakit.kernels.q8_0_matmul.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_util import _dequant_to, _grouped_tile, _to


@triton.jit
def _q8_gemm_kernel(
    x_ptr,
    qs_ptr,
    d_ptr,
    y_ptr,
    t_ptr,
    b_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_xk,
    stride_qn,
    stride_dn,
    stride_ys,
    stride_ym,
    stride_yn,
    stride_tm,
    stride_tr,
    stride_bn,
    stride_br,
    R,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr,
    EMU_BF16: tl.constexpr,
    SWAP_AB: tl.constexpr = False,
):
    """y[split] = x @ W.T over this split's K range (+ LoRA in split 0)."""
    KB: tl.constexpr = BLOCK_K // 32
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrapped row indices keep every load in bounds; the store is masked
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, KB)

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt0 = pid_k * per_split
    kt1 = tl.minimum(kt0 + per_split, k_tiles)

    x_ptrs = x_ptr + rm[:, None] * stride_xm + (kt0 * BLOCK_K + offs_k)[None, :] * stride_xk
    q_ptrs = qs_ptr + rn[:, None] * stride_qn + (kt0 * BLOCK_K + offs_k)[None, :]
    d_ptrs = d_ptr + rn[:, None] * stride_dn + (kt0 * KB + offs_kb)[None, :]

    # SWAP_AB computes the transposed tile y.T = W @ x.T: the dequantized W (computed in registers) is
    # the MMA's A operand, which Hopper's wgmma can take from registers, and a small M becomes the
    # MMA's N dimension (>= 8) instead of padding its M dimension (>= 64)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # LoRA first, straight into the accumulator (split 0 only): a separate [BLOCK_M, BLOCK_N] result tile
    # in the epilogue doubled the register footprint and halved the speed of large tiles on the H200
    if HAS_LORA:
        if pid_k == 0:
            offs_r = tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            t_ptrs = t_ptr + rm[:, None] * stride_tm + offs_r[None, :] * stride_tr
            b_ptrs = b_ptr + rn[:, None] * stride_bn + offs_r[None, :] * stride_br
            t = tl.load(t_ptrs, mask=mask_r[None, :], other=0.0)
            bb = tl.load(b_ptrs, mask=mask_r[None, :], other=0.0)
            if SWAP_AB:
                if DOT_F32:
                    acc = tl.dot(bb.to(tl.float32), tl.trans(t.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(bb, tl.trans(t), acc)
            else:
                if DOT_F32:
                    acc = tl.dot(t.to(tl.float32), tl.trans(bb.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(t, tl.trans(bb), acc)
            acc = acc * scale
    for kt in range(kt0, kt1):
        if EVEN_K:
            x = tl.load(x_ptrs)
            q = tl.load(q_ptrs)
            dd = tl.load(d_ptrs)
        else:
            k_rem = K - kt * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_rem, other=0.0)
            q = tl.load(q_ptrs, mask=offs_k[None, :] < k_rem, other=0)
            dd = tl.load(d_ptrs, mask=offs_kb[None, :] * 32 < k_rem, other=0.0)
        w = _dequant_to(q, dd, x.dtype, BLOCK_N, BLOCK_K, EMU_BF16)  # = dequantize_q8_0(.., x.dtype)
        if SWAP_AB:
            if DOT_F32:
                acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(x), acc)
        else:
            if DOT_F32:
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K
        d_ptrs += KB

    y_base = y_ptr + pid_k.to(tl.int64) * stride_ys
    if SWAP_AB:
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        y_ptrs = y_base + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None] * stride_yn
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        y_ptrs = y_base + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, _to(acc, y_ptr.dtype.element_ty, EMU_BF16), mask=mask)


@triton.jit
def _q8_gemm_t_kernel(
    dy_ptr,
    qs_ptr,
    d_ptr,
    dx_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_dym,
    stride_dyn,
    stride_qn,
    stride_dn,
    stride_xs,
    stride_xm,
    stride_xk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # reduction tile (rows of W)
    BLOCK_K: tl.constexpr,  # output tile (columns of W), a multiple of 32
    GROUP_M: tl.constexpr,
    SPLIT_N: tl.constexpr,
    EVEN_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    """dx[split] = dy @ W over this split's range of W's rows."""
    KB: tl.constexpr = BLOCK_K // 32
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    pid_s = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_kb = pid_k * KB + tl.arange(0, KB)
    rm = (offs_m % M).to(tl.int64)
    rk = offs_k % K  # K and BLOCK_K are multiples of 32: a wrapped column stays in its q8 block
    rkb = offs_kb % (K // 32)
    offs_n = tl.arange(0, BLOCK_N)

    n_tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_tiles, SPLIT_N)
    nt0 = pid_s * per_split
    nt1 = tl.minimum(nt0 + per_split, n_tiles)

    dy_ptrs = dy_ptr + rm[:, None] * stride_dym + (nt0 * BLOCK_N + offs_n)[None, :].to(tl.int64) * stride_dyn
    q_ptrs = qs_ptr + (nt0 * BLOCK_N + offs_n)[:, None].to(tl.int64) * stride_qn + rk[None, :]
    d_ptrs = d_ptr + (nt0 * BLOCK_N + offs_n)[:, None].to(tl.int64) * stride_dn + rkb[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for nt in range(nt0, nt1):
        if EVEN_N:
            g = tl.load(dy_ptrs)
            q = tl.load(q_ptrs)
            dd = tl.load(d_ptrs)
        else:
            n_rem = N - nt * BLOCK_N
            g = tl.load(dy_ptrs, mask=offs_n[None, :] < n_rem, other=0.0)
            q = tl.load(q_ptrs, mask=offs_n[:, None] < n_rem, other=0)
            dd = tl.load(d_ptrs, mask=offs_n[:, None] < n_rem, other=0.0)
        w = _dequant_to(q, dd, g.dtype, BLOCK_N, BLOCK_K, EMU_BF16)  # [BLOCK_N, BLOCK_K]
        if DOT_F32:
            acc = tl.dot(g.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(g, w, acc)
        dy_ptrs += BLOCK_N * stride_dyn
        q_ptrs += BLOCK_N * stride_qn
        d_ptrs += BLOCK_N * stride_dn

    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    dx_ptrs = (
        dx_ptr + pid_s.to(tl.int64) * stride_xs + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    )
    tl.store(dx_ptrs, _to(acc, dx_ptr.dtype.element_ty, EMU_BF16), mask=mask)
