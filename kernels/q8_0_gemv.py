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
LoRA term s * t @ b.T is added in fp32 before that rounding; t = x @ a (fp32 sums, rounded once to x's
dtype, as the spec forms it) is either given or formed inside the same launch (T_PROG).

t in the same launch (T_PROG): a separate t = x @ a costs a launch per product (a cuBLAS split-K GEMM
and its reduce: ~6 us each, 0.66 ms of a 3.2 ms decode step with two adapters), more than the term's
arithmetic. So the first T_SPLITS programs of each row of the grid are t-programs: each
sums x . a over one chunk of K into an fp32 partial, and the last of them to finish (an acq_rel counter)
adds the partials in a fixed order, rounds t, stores it and raises the row's flag (release). The other
programs stream W as usual and wait for the flag (acquire) only in their epilogue, long after the
t-programs (the lowest block indices, dispatched first) are done. The last program to read t lowers the
flag again, so the sync words (sync[3 * row : 3 * row + 3] = flag, t-programs done, readers done) are zero
between launches. Deterministic: no atomics touch a value.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_util import _pdl_start, _prefetch, _q8_times, _to


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
    integer add instead of the slower conversion instruction, with the magic number's subtraction folded
    into the scale's multiply on the GPU (_q8_times); the rounding to bf16 stays the hardware conversion (it
    measured faster than the fp32-arithmetic and integer roundings)."""
    w = _to(_q8_times(q, d.to(tl.float32)[:, :, None], not EMU_BF16), x.dtype, EMU_BF16)
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
    a_ptr,  # T_PROG: a [K, R], ws fp32 [M, T_SPLITS, BLOCK_R], sync int32 [M, 3] (zero between launches)
    stride_ak,
    stride_ar,
    ws_ptr,
    sync_ptr,
    T_SPLITS,
    pf_q,  # PREFETCH: programs past the product's prefetch these (triton_util.prefetch_launch)
    pf_d,
    pf_q_lines,
    pf_d_lines,
    BLOCK_N: tl.constexpr,
    KB: tl.constexpr,  # q8_0 blocks per K step (BLOCK_K = 32 * KB)
    UNROLL: tl.constexpr,  # K steps whose loads are issued together (1 or 2)
    HAS_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EMU_BF16: tl.constexpr,
    T_PROG: tl.constexpr = False,  # form t = x @ a in this launch (the first T_SPLITS programs of a row)
    BLOCK_KT: tl.constexpr = 128,  # K rows of a per t-program
    BLOCK_S: tl.constexpr = 1,  # >= T_SPLITS
    PDL: tl.constexpr = False,  # launched with triton_util.pdl(): overlaps the previous kernel's tail
    PREFETCH: tl.constexpr = 0,  # programs past the product's (of row 0) ask L2 for the next product's weights
):
    """y[m, n-block] = W[n-block] @ x[m] (+ scale * t[m] @ b[n-block].T)."""
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    if PREFETCH:
        n_work = T_SPLITS + tl.cdiv(N, BLOCK_N)
        if pid >= n_work:
            if row == 0:
                _prefetch(pf_q, pf_d, pf_q_lines, pf_d_lines, pid - n_work, tl.num_programs(0) - n_work, PREFETCH)
            return
    _pdl_start(PDL)
    x_row = x_ptr + row * stride_xm
    if T_PROG:
        if pid < T_SPLITS:
            ws_row = ws_ptr + row * T_SPLITS * BLOCK_R
            _t_program(x_row, a_ptr, stride_ak, stride_ar, ws_row, sync_ptr + row * 3, t_ptr + row * stride_tm,
                       stride_tr, K, R, pid, T_SPLITS, BLOCK_KT, BLOCK_R, BLOCK_S, EMU_BF16)  # fmt: skip
        else:
            _w_program(x_row, qs_ptr, d_ptr, y_ptr, t_ptr, b_ptr, N, K, stride_qn, stride_dn, stride_ym, stride_yn,
                       stride_tm, stride_tr, stride_bn, stride_br, R, scale, pid - T_SPLITS, row, sync_ptr + row * 3,
                       BLOCK_N, KB, UNROLL, HAS_LORA, BLOCK_R, EMU_BF16, True)  # fmt: skip
    else:
        _w_program(x_row, qs_ptr, d_ptr, y_ptr, t_ptr, b_ptr, N, K, stride_qn, stride_dn, stride_ym, stride_yn,
                   stride_tm, stride_tr, stride_bn, stride_br, R, scale, pid, row, sync_ptr,
                   BLOCK_N, KB, UNROLL, HAS_LORA, BLOCK_R, EMU_BF16, False)  # fmt: skip


@triton.jit
def _t_program(x_row, a_ptr, stride_ak, stride_ar, ws_row, sync_row, t_row, stride_tr, K, R, split, T_SPLITS,
               BLOCK_KT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
               EMU_BF16: tl.constexpr):  # fmt: skip
    """t-program `split`: the fp32 partial of x . a over its K chunk; the last one sums them (fixed order), rounds
    t to x's dtype, stores it and raises the row's flag."""
    offs_k = split * BLOCK_KT + tl.arange(0, BLOCK_KT)
    offs_r = tl.arange(0, BLOCK_R)
    mk = offs_k < K
    mr = offs_r < R
    xv = tl.load(x_row + offs_k, mask=mk, other=0.0).to(tl.float32)
    a_tile = a_ptr + offs_k[:, None].to(tl.int64) * stride_ak + offs_r[None, :] * stride_ar
    av = tl.load(a_tile, mask=mk[:, None] & mr[None, :], other=0.0).to(tl.float32)
    tl.store(ws_row + split * BLOCK_R + offs_r, tl.sum(xv[:, None] * av, axis=0))
    tl.debug_barrier()  # every thread's partial store precedes the one thread's gpu-scope release
    done = tl.atomic_add(sync_row + 1, 1, sem="acq_rel")
    if done == T_SPLITS - 1:
        offs_s = tl.arange(0, BLOCK_S)
        parts = ws_row + offs_s[:, None] * BLOCK_R + offs_r[None, :]
        p = tl.load(parts, mask=(offs_s < T_SPLITS)[:, None], other=0.0, cache_modifier=".cg")
        t = tl.sum(p, axis=0)
        tl.store(t_row + offs_r * stride_tr, _to(t, t_row.dtype.element_ty, EMU_BF16), mask=mr)
        tl.atomic_xchg(sync_row + 1, 0, sem="relaxed")
        tl.debug_barrier()
        tl.atomic_xchg(sync_row, 1, sem="release")


@triton.jit
def _w_program(x_row, qs_ptr, d_ptr, y_ptr, t_ptr, b_ptr, N, K, stride_qn, stride_dn, stride_ym, stride_yn,
               stride_tm, stride_tr, stride_bn, stride_br, R, scale, pid_n, row, sync_row,
               BLOCK_N: tl.constexpr, KB: tl.constexpr, UNROLL: tl.constexpr, HAS_LORA: tl.constexpr,
               BLOCK_R: tl.constexpr, EMU_BF16: tl.constexpr, WAIT_T: tl.constexpr):  # fmt: skip
    """y[row, rows of block pid_n] (WAIT_T: t comes from this launch's t-programs)."""
    BLOCK_K: tl.constexpr = KB * 32
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)  # wrapped rows keep every load in bounds; the store is masked
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
        if WAIT_T:
            ready = tl.atomic_add(sync_row, 0, sem="acquire")
            while ready == 0:
                ready = tl.atomic_add(sync_row, 0, sem="acquire")
            t = tl.load(t_ptr + row * stride_tm + offs_r * stride_tr, mask=mask_r, other=0.0, cache_modifier=".cg")
            if tl.atomic_add(sync_row + 2, 1, sem="relaxed") == tl.cdiv(N, BLOCK_N) - 1:  # the last reader
                tl.atomic_xchg(sync_row + 2, 0, sem="relaxed")
                tl.atomic_xchg(sync_row, 0, sem="relaxed")
        else:
            t = tl.load(t_ptr + row * stride_tm + offs_r * stride_tr, mask=mask_r, other=0.0)
        bb = tl.load(b_ptr + rn[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=mask_r[None, :], other=0.0)
        y += scale * tl.sum(bb.to(tl.float32) * t.to(tl.float32)[None, :], axis=1)

    y_ptrs = y_ptr + row * stride_ym + offs_n.to(tl.int64) * stride_yn
    tl.store(y_ptrs, _to(y, y_ptr.dtype.element_ty, EMU_BF16), mask=offs_n < N)
