"""q8_0 matrix-vector product on the tensor cores, for decoding (M <= 16 rows of x): y = x @ W.T (+ LoRA term).

Why the tensor cores for a memory-bound product: the FMA GEMV (q8_0_gemv.py) spends 8.2 instructions per weight
element in its sm_90 SASS (int8 -> fp32, scale, round to bf16 on the conversion pipe, back to fp32, multiply by
x, add, and layout shuffles of x through shared memory), which caps it near half the HBM bandwidth
(bench/gemv_lab.py). Here one program owns BLOCK_N rows of W, streams
[BLOCK_N, BLOCK_K] int8 tiles through shared memory (software-pipelined copies), dequantizes each tile in
registers directly into the MMA's A-operand layout, and lets an MMA with the x tile [BLOCK_K, BLOCK_M] (rows of
x beyond M are zeros) do the products and sums: per element one PRMT, one FFMA and half a packed conversion
(_dequant_words; 4.7-5.1 instructions per element in all in the sm_90 SASS). The scales reach that layout
through the same asynchronous copies only when triton knows their rows' alignment (D_ALIGN, from the launcher:
K / 32 even gives 4-byte rows); without it the dequantized tile took a round trip through shared memory
(5.4 instructions per element).

Numerics: the same as every q8_0 kernel: W = rnd_dtype(qs * d) exactly (fp32 product, one rounding), products
exact in fp32 (bf16/fp16 inputs), fp32 accumulation (the MMA's), y rounded once. The LoRA term s * t @ b.T (t =
x @ a given) is added in fp32 before that rounding. bf16/fp16 activations only (fp32 products would not be exact
on the tensor cores: fp32 x takes the FMA GEMV). A variant that formed t in the launch, as the FMA GEMV's
t-programs do, made a decode step with two adapters slower (2.84 vs 2.42 ms, bench/results/h200_session8): a
program that finishes its split early holds its SM slot while it waits for t.

triton_util._dequant_words (also used by the tiled kernels, q8_0_gemm): for four int8 q of one 32-bit word, u = q ^
0x80 = q + 128 (per byte), and one PRMT places u into bits 8..15 of the float 2^15 (0x4700uu00 = 2^15 + u, the
mantissa's unit there being 2^-8); then fma(2^15 + u, d, -(2^15 + 2^7) d) = q * d exactly: (2^15 + 2^7) d = 2^7 *
257 * d has 9 + 11 significant bits (exact in fp32), and the fma rounds the exact q * d (<= 19 significant bits)
once, i.e. not at all. The scale enters as d itself (an earlier form placed u at 2^23 + 256 u and took d / 256: one
more multiply per scale). cvt.rn.{bf16x2,f16x2}.f32 then rounds pairs to the activation dtype, which is the operand
format the MMA takes. Under the interpreter (no inline PTX) the tile is dequantized by triton_util._dequant_tile and
rounded by _to.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_util import _dequant_to, _pdl_start, _prefetch, _to


@triton.jit
def _tc_step(acc, x_ptrs, q_ptrs, d_ptrs, mask_m, k_rem, offs_k, offs_kb, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, MASKED: tl.constexpr, EMU_BF16: tl.constexpr):  # fmt: skip
    """acc += W[rows, k-tile] @ x[:, k-tile].T for one K tile (MASKED: the tile may run past K)."""
    if MASKED:
        xt = tl.load(x_ptrs, mask=mask_m[None, :] & (offs_k[:, None] < k_rem), other=0.0)
        q = tl.load(q_ptrs, mask=offs_k[None, :] < k_rem, other=0)
        d = tl.load(d_ptrs, mask=offs_kb[None, :] * 32 < k_rem, other=0.0)
    else:
        xt = tl.load(x_ptrs, mask=mask_m[None, :], other=0.0)
        q = tl.load(q_ptrs)
        d = tl.load(d_ptrs)
    w = _dequant_to(q, d, xt.dtype, BLOCK_N, BLOCK_K, EMU_BF16)
    if EMU_BF16:  # the interpreter's dot needs fp32 operands (see q8_0_matmul)
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w, xt, acc)


@triton.jit
def _tc_range(x_ptrs, q_ptrs, d_ptrs, mask_m, k_lo, k_full, k_hi, offs_k, offs_kb, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, EMU_BF16: tl.constexpr):  # fmt: skip
    """acc [BLOCK_N, BLOCK_M] fp32 = W[rows, k_lo:k_hi] @ x[:, k_lo:k_hi].T, the pointers at k_lo: the full K tiles up
    to k_full, then the ragged end (a multiple of 32, not of BLOCK_K: the last split's) masked."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(k_lo, k_full, BLOCK_K):
        acc = _tc_step(acc, x_ptrs, q_ptrs, d_ptrs, mask_m, k_hi, offs_k, offs_kb, BLOCK_N, BLOCK_K, False, EMU_BF16)
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K
        d_ptrs += BLOCK_K // 32
    if k_full < k_hi:
        acc = _tc_step(acc, x_ptrs, q_ptrs, d_ptrs, mask_m, k_hi - k_full, offs_k, offs_kb, BLOCK_N, BLOCK_K, True,
                       EMU_BF16)  # fmt: skip
    return acc


@triton.jit
def _q8_gemv_tc_kernel(
    x_ptr,
    qs_ptr,
    d_ptr,
    y_ptr,
    t_ptr,
    b_ptr,
    part_ptr,  # SPLIT_K > 1: fp32 [N blocks, SPLIT_K, BLOCK_N, BLOCK_M] partials
    count_ptr,  # ... and int32 [N blocks] counters, zero between launches
    M,
    N,
    K,
    stride_xm,  # x rows are contiguous along K (the launcher makes them so)
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
    pf_q,  # PREFETCH: the programs after the product's prefetch these (triton_util.prefetch_launch)
    pf_d,
    pf_q_lines,
    pf_d_lines,
    BLOCK_N: tl.constexpr,  # rows of W per program (16 per warp: each warp dequantizes its own rows)
    BLOCK_K: tl.constexpr,  # a multiple of 32
    BLOCK_M: tl.constexpr,  # >= M, >= 8 (the MMA's N)
    SPLIT_K: tl.constexpr,  # programs per N block, each over its own range of K tiles
    HAS_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr,  # >= R, >= 16
    EMU_BF16: tl.constexpr,
    D_ALIGN: tl.constexpr = 2,  # bytes every row of d (and d_ptr) is aligned to: 2, 4, 8 or 16
    PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,
):
    """y[:, n-block] = x @ W[n-block].T (+ scale * t @ b[n-block].T) for all M rows of x: program pid covers K range
    pid % SPLIT_K of N block pid // SPLIT_K. With SPLIT_K > 1 each stores its fp32 partial and the last of a block to
    finish (an acq_rel counter) sums the block's partials in split order (deterministic) and finishes the block.
    Programs past the product's (PREFETCH) ask L2 for the next product's first weights and end."""
    pid = tl.program_id(0)
    if PREFETCH:
        n_work = tl.cdiv(N, BLOCK_N) * SPLIT_K
        if pid >= n_work:
            _prefetch(pf_q, pf_d, pf_q_lines, pf_d_lines, pid - n_work, tl.num_programs(0) - n_work, PREFETCH)
            return
    _pdl_start(PDL)
    pid_n = pid // SPLIT_K
    pid_k = pid % SPLIT_K
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * per_split
    k_hi = tl.minimum(K, k_lo + per_split)
    k_full = k_lo + tl.maximum(k_hi - k_lo, 0) // BLOCK_K * BLOCK_K

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)  # wrapped rows keep every load in bounds; the store is masked
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 32)
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k_lo + offs_k)[:, None]
    q_ptrs = qs_ptr + rn[:, None] * stride_qn + (k_lo + offs_k)[None, :]
    d_ptrs = d_ptr + rn[:, None] * stride_dn + (k_lo // 32 + offs_kb)[None, :]
    if D_ALIGN > 2:  # the rows of d are D_ALIGN-byte aligned (K / 32 even): the scales can be copied async too
        d_ptrs = tl.max_contiguous(tl.multiple_of(d_ptrs, [D_ALIGN, D_ALIGN]), [1, BLOCK_K // 32])

    acc = _tc_range(x_ptrs, q_ptrs, d_ptrs, mask_m, k_lo, k_full, k_hi, offs_k, offs_kb, BLOCK_N, BLOCK_K, BLOCK_M,
                    EMU_BF16)  # fmt: skip

    if SPLIT_K > 1:
        tile = (pid_n * SPLIT_K).to(tl.int64) * (BLOCK_N * BLOCK_M)
        offs_tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + offs_m[None, :]
        tl.store(part_ptr + tile + pid_k * (BLOCK_N * BLOCK_M) + offs_tile, acc)
        tl.debug_barrier()  # every thread's partial store precedes the one thread's gpu-scope release
        if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.load(part_ptr + tile + offs_tile, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                acc += tl.load(part_ptr + tile + s * (BLOCK_N * BLOCK_M) + offs_tile, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed")
            _tc_finish(acc, y_ptr, t_ptr, b_ptr, stride_ym, stride_yn, stride_tm, stride_tr, stride_bn, stride_br, R,
                       scale, offs_n, rn, offs_m, mask_m, N, HAS_LORA, BLOCK_R, EMU_BF16)  # fmt: skip
    else:
        _tc_finish(acc, y_ptr, t_ptr, b_ptr, stride_ym, stride_yn, stride_tm, stride_tr, stride_bn, stride_br, R,
                   scale, offs_n, rn, offs_m, mask_m, N, HAS_LORA, BLOCK_R, EMU_BF16)  # fmt: skip


@triton.jit
def _tc_finish(acc, y_ptr, t_ptr, b_ptr, stride_ym, stride_yn, stride_tm, stride_tr, stride_bn, stride_br, R, scale,
               offs_n, rn, offs_m, mask_m, N, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
               EMU_BF16: tl.constexpr):  # fmt: skip
    """y[:, n-block] = rnd(acc + scale * t @ b[n-block].T): the LoRA term in fp32 (exact products), one rounding."""
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # fmt: skip
        bb = tl.load(b_ptr + rn[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=mask_r[None, :], other=0.0)
        acc += scale * tl.dot(bb.to(tl.float32), tl.trans(t.to(tl.float32)), input_precision="ieee")
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None].to(tl.int64) * stride_yn
    tl.store(y_ptrs, _to(acc, y_ptr.dtype.element_ty, EMU_BF16), mask=(offs_n[:, None] < N) & mask_m[None, :])
