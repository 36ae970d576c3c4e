"""t = x @ a, the first factor of a LoRA term, for a decode-sized product (M <= 16 rows of x), as its own short
launch ahead of the tensor-core GEMV that adds scale * t @ b.T (q8_0_gemv_tc).

Why a launch of its own: the GEMV's programs need all of t only in their epilogue, and forming it inside the GEMV
made programs that finished their share early wait for it while holding their SM slots (bench/results/
h200_session8). Launched with PDL (triton_util.pdl), the GEMV after it starts while this kernel runs and streams
its weights into L2 (q8_0_gemv_tc's prefetch) before waiting for t, so the extra launch costs little GPU time.

Each program sums x[:, chunk] . a[chunk, :] over one chunk of K (BLOCK_KT) into an fp32 partial; the last to
finish (an acq_rel counter) adds the partials in a fixed order, rounds t once to x's dtype (as the spec forms t) and
stores it, and sets the counter back to zero. Deterministic: no atomics touch a value.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_util import _pdl_start, _to


@triton.jit
def _lora_t_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    ws_ptr,  # fp32 [programs, BLOCK_M, BLOCK_R] partials
    count_ptr,  # int32, zero between launches
    M,
    K,
    R,
    stride_xm,
    stride_ak,
    stride_ar,
    stride_tm,
    stride_tr,
    BLOCK_M: tl.constexpr,  # >= M
    BLOCK_KT: tl.constexpr,  # K per program
    BLOCK_R: tl.constexpr,  # >= R
    BLOCK_S: tl.constexpr,  # >= the number of programs
    EMU_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program pid: the fp32 partial of x @ a over K rows [pid * BLOCK_KT, (pid + 1) * BLOCK_KT); the last one
    forms t."""
    _pdl_start(PDL)
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = pid * BLOCK_KT + tl.arange(0, BLOCK_KT)
    offs_r = tl.arange(0, BLOCK_R)
    mm, mk, mr = offs_m < M, offs_k < K, offs_r < R
    xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
    av = tl.load(a_ptr + offs_k[:, None].to(tl.int64) * stride_ak + offs_r[None, :] * stride_ar,
                 mask=mk[:, None] & mr[None, :], other=0.0)  # fmt: skip
    part = tl.sum(xv.to(tl.float32)[:, :, None] * av.to(tl.float32)[None, :, :], axis=1)  # [BLOCK_M, BLOCK_R]
    offs_tile = offs_m[:, None] * BLOCK_R + offs_r[None, :]
    tl.store(ws_ptr + pid * (BLOCK_M * BLOCK_R) + offs_tile, part)
    tl.debug_barrier()  # every thread's partial store precedes the one thread's gpu-scope release
    if tl.atomic_add(count_ptr, 1, sem="acq_rel") == n_prog - 1:
        offs_s = tl.arange(0, BLOCK_S)
        parts = ws_ptr + offs_s[:, None, None] * (BLOCK_M * BLOCK_R) + offs_tile[None, :, :]
        p = tl.load(parts, mask=(offs_s < n_prog)[:, None, None], other=0.0, cache_modifier=".cg")
        t = tl.sum(p, axis=0)
        t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
        tl.store(t_ptrs, _to(t, t_ptr.dtype.element_ty, EMU_BF16), mask=mm[:, None] & mr[None, :])
        tl.atomic_xchg(count_ptr, 0, sem="relaxed")
