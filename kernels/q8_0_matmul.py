"""q8_0 matrix products that read the quantized weight directly (int8 qs + fp16 d, never a float W).

Storage (lorakit.quant.Q8Weight): qs int8 [N, K] (row-major, K contiguous), d fp16 [N, K/32], one
scale per block of 32 along K; W[n, k] = qs[n, k] * d[n, k // 32].

Ops (each launcher: check -> allocate -> launch):
  q8_0_matmul(x, qs, d, a, b, scale)   y[M, N]  = x[M, K] @ W.T  (+ scale * (x @ a) @ b.T)
  q8_0_matmul_grad_input(dy, qs, d)     dx[M, K] = dy[M, N] @ W
  q8_0_dequantize(qs, d, dtype, index)  rows of W (all, or W[index] for an embedding lookup)

Numerics: a weight tile is dequantized in fp32 (qs * d, exact), rounded once to the activation dtype
(as lorakit.quant.dequantize_q8_0(qs, d, x.dtype) does), multiplied on the tensor cores and accumulated
in fp32; the result is rounded once to the output dtype. fp32 activations use an IEEE fp32 dot (no
tf32). Against cpu-torch: identical W for fp32/fp16; for bf16 cpu-torch's matmul currently forms
rnd(qs * rnd(d)) (d converted to bf16 first), which differs from rnd(qs * d) by <= 3 * 2^-8 relative.

Paths (chosen by the launcher from M):
  * "gemm": tutorial-03 style tiled matmul with grouped program order for L2 reuse; the K tile is a
    multiple of 32 so it always covers whole q8_0 blocks: the [BLOCK_N, BLOCK_K] int8 tile is reshaped
    to [BLOCK_N, BLOCK_K/32, 32] and scaled by the [BLOCK_N, BLOCK_K/32] fp16 scales. Autotuned per
    (M bucket, N, K): "skinny" configs for M <= 64 (BLOCK_M 16..64; decode M = 1 uses BLOCK_M = 16),
    Hopper-sized tiles (128x128 .. 256x128, BLOCK_K 64/128) above; each set also has SWAP_AB configs
    that compute y.T = W @ x.T (the dequantized tile as the MMA's A operand). When the output tiles
    cannot fill the SMs, K is split (power of two, >= 4 K tiles per split) and the fp32 partials
    [SPLIT_K, M, N] are summed afterwards in a fixed order (deterministic: no atomics).
  * "gemv" (selectable with config={"path": "gemv"}; off by default, see USE_GEMV): one program per
    BLOCK_N rows of W, the tile dequantized in registers and reduced against <= 4 rows of x with FMAs.
  * LoRA (optional): t = x @ a is a tiny [M, r] torch matmul; the kernel starts its accumulator with
    scale * t @ b.T (a [BLOCK_M, r] x [r, BLOCK_N] dot, r padded to >= 16; split 0 only), so y is
    rounded once.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors with fixed small tiles (no autotuning). Two
triton 3.6 interpreter bugs are worked around there: its dot multiplies the raw uint16 bits of bf16
operands (so bf16 tiles are widened to fp32 after the bf16 rounding: the same arithmetic as the GPU's
bf16 MMA), and its fp32 -> bf16 cast truncates (EMU_BF16 rounds to nearest-even first, as the GPU does).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

QK = 32  # q8_0 block length
MAX_FUSED_RANK = 64  # LoRA ranks above this are added by a separate torch matmul
GEMV_MAX_M = 4
# Route M <= GEMV_MAX_M to the FMA gemv kernel by default? Measured on the H200 (bench/results): no;
# the tensor-core skinny path moved 2.1-2.3 TB/s of q8_0 bytes at M = 16 where gemv reached 0.7-1.1 TB/s
# at M = 1, so small M takes the skinny path (BLOCK_M = 16) and gemv stays selectable via config.
USE_GEMV = False

# the same switch triton.jit read when it decorated the kernels below (TRITON_INTERPRET at import)
_INTERPRET = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """Whether these kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _to(x, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    """x.to(dtype). The interpreter truncates fp32 -> bf16; with EMU_BF16 it rounds to nearest-even first
    (integer ops on the bits, finite values), as the GPU's conversion does."""
    if EMU_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(dtype)
        else:
            return x.to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _dequant_tile(q, dd, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 [BLOCK_N, BLOCK_K] x fp16 [BLOCK_N, BLOCK_K // 32] -> fp32 [BLOCK_N, BLOCK_K]."""
    KB: tl.constexpr = BLOCK_K // 32
    w = tl.reshape(q.to(tl.float32), (BLOCK_N, KB, 32)) * tl.reshape(dd.to(tl.float32), (BLOCK_N, KB, 1))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


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
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

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
        w = _to(_dequant_tile(q, dd, BLOCK_N, BLOCK_K), x.dtype, EMU_BF16)  # = dequantize_q8_0(.., x.dtype)
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
def _q8_gemv_kernel(
    x_ptr,
    qs_ptr,
    d_ptr,
    y_ptr,
    t_ptr,
    b_ptr,
    M,
    N,
    K,
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
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    """Small-M path: y[split, :M, n-block] from one pass over BLOCK_N rows of W (FMA reduction)."""
    KB: tl.constexpr = BLOCK_K // 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
        # round W to x's dtype first (as the spec does), then multiply exactly in fp32
        w = _to(_dequant_tile(q, dd, BLOCK_N, BLOCK_K), x.dtype, EMU_BF16).to(tl.float32)
        xf = x.to(tl.float32)
        acc += tl.sum(xf[:, None, :] * w[None, :, :], axis=2)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K
        d_ptrs += KB

    if HAS_LORA:
        if pid_k == 0:
            offs_r = tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            t_ptrs = t_ptr + rm[:, None] * stride_tm + offs_r[None, :] * stride_tr
            b_ptrs = b_ptr + rn[:, None] * stride_bn + offs_r[None, :] * stride_br
            t = tl.load(t_ptrs, mask=mask_r[None, :], other=0.0)
            bb = tl.load(b_ptrs, mask=mask_r[None, :], other=0.0)
            lora = tl.sum(t.to(tl.float32)[:, None, :] * bb.to(tl.float32)[None, :, :], axis=2)
            acc += lora * scale

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = (
        y_ptr + pid_k.to(tl.int64) * stride_ys + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    )
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
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    num_pid_in_group = GROUP_M * num_pid_k
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_k = (pid % num_pid_in_group) // group_size_m

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
        w = _to(_dequant_tile(q, dd, BLOCK_N, BLOCK_K), g.dtype, EMU_BF16)  # [BLOCK_N, BLOCK_K]
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


@triton.jit
def _q8_rows_kernel(
    qs_ptr,
    d_ptr,
    idx_ptr,
    out_ptr,
    K,
    stride_qn,
    stride_dn,
    stride_om,
    HAS_IDX: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    """out[i] = W[idx[i]] (or W[i]) dequantized: fp32 product qs * d, rounded once to out's dtype."""
    row = tl.program_id(0)
    pid_k = tl.program_id(1)
    if HAS_IDX:
        src = tl.load(idx_ptr + row).to(tl.int64)
    else:
        src = row.to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs_k < K
    q = tl.load(qs_ptr + src * stride_qn + offs_k, mask=mask, other=0)
    dd = tl.load(d_ptr + src * stride_dn + offs_k // 32, mask=mask, other=0.0)
    w = q.to(tl.float32) * dd.to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + offs_k, _to(w, out_ptr.dtype.element_ty, EMU_BF16), mask=mask)


# --------------------------------------------------------------------------------------------------
# autotuning (GPU only; the interpreter uses fixed configs)
# --------------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, warps, stages, group_m=8, swap=None):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}
    if swap is not None:
        kw["SWAP_AB"] = swap
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# M > 64: Hopper-sized tiles (the tensor cores are the limit); BLOCK_K covers 2 or 4 q8 blocks
_LARGE_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 256, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 128, 128, 8, 3),
    # y.T = W @ x.T: W rows are the MMA's M (BLOCK_N), tokens its N (BLOCK_M <= 256)
    _cfg(128, 128, 64, 8, 3, swap=True),
    _cfg(256, 128, 64, 8, 3, swap=True),
    _cfg(128, 256, 64, 8, 3, swap=True),
    _cfg(128, 128, 128, 8, 3, swap=True),
]
# 4 < M <= 64: memory-bound; BLOCK_M follows the bucket, wide K tiles keep many bytes in flight
_SKINNY_CONFIGS = [
    _cfg(bm, bn, bk, w, s, group_m=1)
    for bm in (16, 32, 64)
    for (bn, bk, w, s) in (
        (64, 128, 4, 4),
        (128, 64, 4, 4),
        (64, 256, 4, 3),
        (128, 128, 8, 3),
    )
] + [
    _cfg(bm, bn, bk, w, s, group_m=1, swap=True)
    for bm in (16, 32, 64)
    for (bn, bk, w, s) in ((64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3))
]
# grad-input: BLOCK_N is the reduction tile, BLOCK_K the output tile
_T_LARGE_CONFIGS = [
    _cfg(128, 64, 128, 8, 3),
    _cfg(128, 64, 128, 4, 4),
    _cfg(128, 64, 256, 8, 3),
    _cfg(256, 64, 128, 8, 3),
    _cfg(128, 128, 128, 8, 3),
]
_T_SKINNY_CONFIGS = [
    _cfg(bm, bn, bk, w, s, group_m=1)
    for bm in (16, 32, 64)
    for (bn, bk, w, s) in ((128, 64, 4, 4), (64, 128, 4, 4), (256, 64, 4, 3), (128, 128, 8, 3))
]
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for (bn, bk, w, s) in (
        (8, 256, 4, 3),
        (16, 256, 4, 3),
        (16, 512, 8, 3),
        (32, 256, 8, 3),
        (8, 512, 4, 3),
    )
]


def _prune_skinny(configs, named_args, **kwargs):
    bm = _skinny_block_m(named_args["M_BUCKET"])
    return [c for c in configs if c.kwargs["BLOCK_M"] == bm]


def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


def _even_n(args):
    return args["N"] % args["BLOCK_N"] == 0


def _quick(configs, **want):
    """One config per BLOCK_M: the ones that won most often on the H200 (bench/results)."""
    out, seen = [], set()
    for c in configs:
        kw = c.kwargs
        if all(kw.get(k) == v for k, v in want.items()) and kw["BLOCK_M"] not in seen:
            seen.add(kw["BLOCK_M"])
            out.append(c)
    return out or configs[:1]


@functools.cache
def _tuned():
    """The autotuned kernels (built on first GPU use). LORAKIT_AUTOTUNE=0 skips the search and uses
    the configs that won most often on the H200 (for short runs where tuning time would dominate)."""
    large, skinny_cfgs, t_large, t_skinny = _LARGE_CONFIGS, _SKINNY_CONFIGS, _T_LARGE_CONFIGS, _T_SKINNY_CONFIGS
    if os.environ.get("LORAKIT_AUTOTUNE", "1") == "0":
        large, t_large = large[:1], t_large[:1]
        skinny_cfgs = _quick(skinny_cfgs, BLOCK_N=64, BLOCK_K=256, SWAP_AB=True)
        t_skinny = _quick(t_skinny, BLOCK_N=128, BLOCK_K=64)
    gemm = triton.heuristics({"EVEN_K": _even_k})(_q8_gemm_kernel)
    gemm_t = triton.heuristics({"EVEN_N": _even_n})(_q8_gemm_t_kernel)
    gemv = triton.heuristics({"EVEN_K": _even_k})(_q8_gemv_kernel)
    key = ["M_BUCKET", "N", "K"]
    skinny = {"early_config_prune": _prune_skinny}
    return {
        "gemm_large": triton.autotune(large, key=key)(gemm),
        "gemm_skinny": triton.autotune(skinny_cfgs, key=key, prune_configs_by=skinny)(gemm),
        "gemm_t_large": triton.autotune(t_large, key=key)(gemm_t),
        "gemm_t_skinny": triton.autotune(t_skinny, key=key, prune_configs_by=skinny)(gemm_t),
        "gemv": triton.autotune(_GEMV_CONFIGS, key=["M", "N", "K"])(gemv),
    }


# fixed tiles for the CPU interpreter: small, so the tests' odd shapes hit every mask
_INTERP_GEMM_T = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}
_INTERP_GEMM = {**_INTERP_GEMM_T, "SWAP_AB": False}
_INTERP_GEMV = {"BLOCK_N": 16, "BLOCK_K": 64}


# --------------------------------------------------------------------------------------------------
# launch planning
# --------------------------------------------------------------------------------------------------


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if _INTERPRET or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def _m_bucket(m: int) -> int:
    """Autotune bucket of M: the next power of two, capped at 8192."""
    return min(8192, triton.next_power_of_2(max(1, m)))


def _skinny_block_m(m_bucket: int) -> int:
    return min(64, max(16, m_bucket))


def _split(tiles: int, k_tiles: int, target: int, max_split: int = 16) -> int:
    """Power-of-two split of the reduction so that tiles * split reaches `target` programs, keeping at
    least 4 reduction tiles per split (1 when the tiles alone fill the GPU)."""
    s = 1
    while s < max_split and tiles * s * 2 <= target and k_tiles // (s * 2) >= 4:
        s *= 2
    return s


def _plan(m: int, n_out: int, n_red: int, device: torch.device, small_m_gemv: bool) -> tuple[str, int]:
    """(path, split) for an [m, n_out] output with reduction length n_red; depends on (bucket, N, K) only,
    so it is consistent with the autotune key."""
    sms = _num_sms(device.index if device.type == "cuda" else None)
    mb = _m_bucket(m)
    if small_m_gemv and m <= GEMV_MAX_M:
        return "gemv", _split(triton.cdiv(n_out, 16), triton.cdiv(n_red, 256), 2 * sms)
    if mb <= 64:
        tiles = triton.cdiv(mb, _skinny_block_m(mb)) * triton.cdiv(n_out, 64)
        return "skinny", _split(tiles, triton.cdiv(n_red, 64), 2 * sms)
    tiles = triton.cdiv(mb, 128) * triton.cdiv(n_out, 128)
    return "large", _split(tiles, triton.cdiv(n_red, 64), sms)


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_weight(qs: torch.Tensor, d: torch.Tensor) -> tuple[int, int]:
    if qs.dtype != torch.int8 or qs.dim() != 2:
        raise TypeError(f"qs must be a 2-D int8 tensor, got {qs.dtype} {tuple(qs.shape)}")
    n, k = qs.shape
    if k % QK or k == 0:
        raise ValueError(f"q8_0 row length {k} is not a positive multiple of {QK}")
    if d.dtype != torch.float16 or tuple(d.shape) != (n, k // QK):
        raise TypeError(f"d must be float16 [{n}, {k // QK}], got {d.dtype} {tuple(d.shape)}")
    if qs.stride(1) != 1 or d.stride(1) != 1:
        raise ValueError("qs and d must be contiguous along the input axis")
    if d.device != qs.device:
        raise ValueError(f"qs is on {qs.device} but d is on {d.device}")
    return n, k


def _check_act(x: torch.Tensor, dim: int, k: int, qs: torch.Tensor, what: str) -> None:
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{what} has shape {tuple(x.shape)}; its last axis must be {k} (W {tuple(qs.shape)})")
    if x.device != qs.device:
        raise ValueError(f"{what} is on {x.device} but the weight is on {qs.device}")
    if not _INTERPRET and x.device.type != "cuda":
        raise ValueError(f"{what} must be a CUDA tensor (or set TRITON_INTERPRET=1 before importing triton)")


# best autotuned config per launch key: later calls skip the Autotuner/Heuristics wrappers (their
# Python overhead is tens of microseconds, comparable to a decode-sized kernel)
_BEST: dict[tuple, triton.Config] = {}


def _launch_tuned(name: str, raw, grid_fn, args: tuple, const: dict, key: tuple, even: tuple[str, str, int]):
    """Launch the autotuned kernel `name` (first time per key), then the raw kernel with its best config."""
    best = _BEST.get(key)
    if best is None:
        tuned = _tuned()[name]
        tuned[grid_fn](*args, **const)
        _BEST[key] = tuned.best_config
        return
    meta = best.all_kwargs()
    flag, block, length = even
    raw[grid_fn(meta)](*args, **const, **meta, **{flag: length % meta[block] == 0})


def _tiles(defaults: dict, cfg: dict) -> dict:
    """The fixed (interpreter / forced) tiles: defaults overridden by cfg's BLOCK_*/GROUP_M entries."""
    return {key: cfg.get(key, val) for key, val in defaults.items()}


def _reduce_splits(parts: torch.Tensor, out: torch.Tensor) -> None:
    """out = sum of the fp32 split-K partials (in a fixed order: deterministic), rounded once."""
    if out.dtype == torch.float32:
        torch.sum(parts, dim=0, out=out)
    else:
        out.copy_(parts.sum(dim=0))


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------


def q8_0_matmul(
    x: torch.Tensor,
    qs: torch.Tensor,
    d: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    scale: float = 0.0,
    out_dtype: torch.dtype | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W.T (+ scale * (x @ a) @ b.T), W = q8_0(qs, d) of shape [N, K].

    a: (K, r), b: (N, r) (llama.cpp's lora_a / lora_b layout). fp32 accumulation; y in out_dtype
    (default x.dtype). `config` forces a path/tiles (tests): {"path": "gemv"|"gemm", "SPLIT_K": s,
    plus BLOCK_* entries}.
    """
    n, k = _check_weight(qs, d)
    _check_act(x, -1, k, qs, "x")
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]

    has_lora = a is not None and float(scale) != 0.0
    extra = None
    if has_lora:
        ok = b is not None and a.dim() == 2 and b.dim() == 2
        if not ok or a.shape[0] != k or b.shape[0] != n or a.shape[1] != b.shape[1]:
            raise ValueError(
                f"LoRA factors must be a ({k}, r) and b ({n}, r), got {tuple(a.shape)} and "
                f"{None if b is None else tuple(b.shape)}"
            )
        r = a.shape[1]
        if r > MAX_FUSED_RANK:  # rare: keep the kernel's register tile small, add it outside
            extra = float(scale) * ((x2 @ a.to(x.dtype)) @ b.to(x.dtype).T)
            has_lora = False
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)

    if has_lora:
        t = x2 @ a.to(x.dtype)  # [M, r] in x's dtype, as the spec forms it
        bb = b.to(x.dtype)
        r = t.shape[1]
    else:
        t, bb, r = y, y, 0  # dummies, never read
    lora_args = (t.stride(0), t.stride(1), bb.stride(0), bb.stride(1), r, float(scale) if has_lora else 0.0)

    cfg = dict(config or {})
    path, split = _plan(m, n, k, x.device, small_m_gemv=USE_GEMV)
    if "path" in cfg:
        path = {"gemm": "skinny" if _m_bucket(m) <= 64 else "large"}.get(cfg["path"], cfg["path"])
    split = int(cfg.get("SPLIT_K", split))
    out = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    ys = out.stride(0) if split > 1 else 0
    ym, yn = (out.stride(1), out.stride(2)) if split > 1 else (out.stride(0), out.stride(1))

    if path == "gemv":
        block_m = triton.next_power_of_2(m)
        if block_m > GEMV_MAX_M:
            raise ValueError(f"the gemv path takes M <= {GEMV_MAX_M}, got {m}")
        args = (
            x2,
            qs,
            d,
            out,
            t,
            bb,
            m,
            n,
            k,
            x2.stride(0),
            x2.stride(1),
            qs.stride(0),
            d.stride(0),
            ys,
            ym,
            yn,
        )
        const = dict(
            BLOCK_M=block_m,
            SPLIT_K=split,
            HAS_LORA=has_lora,
            BLOCK_R=max(1, triton.next_power_of_2(r)),
            EMU_BF16=_INTERPRET,
        )
        if _INTERPRET or "BLOCK_N" in cfg:
            tiles = _tiles(_INTERP_GEMV, cfg)
            grid = (triton.cdiv(n, tiles["BLOCK_N"]), split)
            _q8_gemv_kernel[grid](*args, *lora_args, **const, **tiles, EVEN_K=k % tiles["BLOCK_K"] == 0)
        else:
            key = ("gemv", m, n, k, x.dtype, out.dtype, has_lora, split)
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
            _launch_tuned("gemv", _q8_gemv_kernel, grid, (*args, *lora_args), const, key, ("EVEN_K", "BLOCK_K", k))
    else:
        args = (
            x2, qs, d, out, t, bb, m, n, k, _m_bucket(m),
            x2.stride(0), x2.stride(1), qs.stride(0), d.stride(0), ys, ym, yn,
        )  # fmt: skip
        const = dict(
            SPLIT_K=split,
            HAS_LORA=has_lora,
            BLOCK_R=max(16, triton.next_power_of_2(r)),
            DOT_F32=_dot_f32(x.dtype),
            EMU_BF16=_INTERPRET,
        )
        if _INTERPRET or "BLOCK_N" in cfg:
            tiles = _tiles(_INTERP_GEMM, cfg)
            grid = (triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]), split)
            _q8_gemm_kernel[grid](*args, *lora_args, **const, **tiles, EVEN_K=k % tiles["BLOCK_K"] == 0)
        else:
            name = "gemm_skinny" if path == "skinny" else "gemm_large"
            key = (name, _m_bucket(m), n, k, x.dtype, out.dtype, has_lora, split)
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
            _launch_tuned(name, _q8_gemm_kernel, grid, (*args, *lora_args), const, key, ("EVEN_K", "BLOCK_K", k))

    if split > 1:
        _reduce_splits(out, y)
    if extra is not None:
        y += extra.to(out_dtype)
    return y.reshape(*lead, n)


def q8_0_matmul_grad_input(
    dy: torch.Tensor,
    qs: torch.Tensor,
    d: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """dx[..., K] = dy[..., N] @ W, W = q8_0(qs, d) of shape [N, K]; fp32 accumulation, dx in dy's dtype."""
    n, k = _check_weight(qs, d)
    _check_act(dy, -1, n, qs, "dy")
    out_dtype = out_dtype or dy.dtype
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, n)
    m = dy2.shape[0]
    dx = torch.empty(m, k, dtype=out_dtype, device=dy.device)
    if m == 0:
        return dx.reshape(*lead, k)

    cfg = dict(config or {})
    path, split = _plan(m, k, n, dy.device, small_m_gemv=False)
    split = int(cfg.get("SPLIT_K", split))
    out = dx if split == 1 else torch.empty(split, m, k, dtype=torch.float32, device=dy.device)
    xs = out.stride(0) if split > 1 else 0
    xm, xk = (out.stride(1), out.stride(2)) if split > 1 else (out.stride(0), out.stride(1))
    args = (
        dy2,
        qs,
        d,
        out,
        m,
        n,
        k,
        _m_bucket(m),
        dy2.stride(0),
        dy2.stride(1),
        qs.stride(0),
        d.stride(0),
        xs,
        xm,
        xk,
    )
    const = dict(SPLIT_N=split, DOT_F32=_dot_f32(dy.dtype), EMU_BF16=_INTERPRET)
    if _INTERPRET or "BLOCK_N" in cfg:
        tiles = _tiles(_INTERP_GEMM_T, cfg)
        grid = (triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(k, tiles["BLOCK_K"]), split)
        _q8_gemm_t_kernel[grid](*args, **const, **tiles, EVEN_N=n % tiles["BLOCK_N"] == 0)
    else:
        name = "gemm_t_skinny" if path == "skinny" else "gemm_t_large"
        key = (name, _m_bucket(m), n, k, dy.dtype, out.dtype, split)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]), split)  # noqa: E731
        _launch_tuned(name, _q8_gemm_t_kernel, grid, args, const, key, ("EVEN_N", "BLOCK_N", n))

    if split > 1:
        _reduce_splits(out, dx)
    return dx.reshape(*lead, k)


def q8_0_dequantize(
    qs: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float32, index: torch.Tensor | None = None
) -> torch.Tensor:
    """W (or W[index], any index shape) dequantized to `dtype`: fp32 product qs * d rounded once."""
    n, k = _check_weight(qs, d)
    if not _INTERPRET and qs.device.type != "cuda":
        raise ValueError("the weight must be on a CUDA device (or set TRITON_INTERPRET=1)")
    if index is None:
        rows, lead, idx = n, (n,), qs
    else:
        if index.dtype not in (torch.int32, torch.int64) or index.is_floating_point():
            raise TypeError(f"index must be int32 or int64, got {index.dtype}")
        idx = index.to(qs.device).reshape(-1).contiguous()
        rows, lead = idx.numel(), tuple(index.shape)
        capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()  # no host sync inside a graph
        if (
            rows and not capturing and (int(idx.min()) < 0 or int(idx.max()) >= n)
        ):  # one sync; a bad id must not read wild
            raise IndexError(f"row index out of range [0, {n}): min {int(idx.min())}, max {int(idx.max())}")
    out = torch.empty(rows, k, dtype=dtype, device=qs.device)
    if rows == 0:
        return out.reshape(*lead, k)
    block_k = min(1024, triton.next_power_of_2(k))
    grid = (rows, triton.cdiv(k, block_k))
    args = (qs, d, idx, out, k, qs.stride(0), d.stride(0), out.stride(0))
    _q8_rows_kernel[grid](*args, HAS_IDX=index is not None, BLOCK_K=block_k, EMU_BF16=_INTERPRET)
    return out.reshape(*lead, k)
