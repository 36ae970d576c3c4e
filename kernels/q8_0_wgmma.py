"""The q8_0 matmul y = x @ W.T for many rows of x on Hopper (sm_90), written in Gluon (triton's explicit
language): the dequantization of each weight tile overlaps the previous tile's MMA.

Why a second tiled kernel: triton's compiler keeps one shared-memory copy of an operand computed in the loop
(the dequantized W tile), so q8_0_gemm's loop waits for each wgmma before dequantizing the next tile, and the
tensor cores idle while the CUDA cores dequantize (about half of cuBLAS at large M). Here the program owns its
shared memory: two W buffers, a ring of x tiles filled by TMA, and wgmma issued asynchronously with one group
left in flight, so step k's MMA runs while step k + 1's W tile is dequantized.

One program computes a [BLOCK_M, BLOCK_N] tile of y, all warps (2 warpgroups) sharing it:
  * x tiles [BLOCK_M, BLOCK_K] arrive by TMA into a STAGES-deep ring (one mbarrier per stage; rows and
    columns past the ends read as zero);
  * W's int8 tiles arrive by TMA in the same stages; W's fp16 scales (a row's two per tile as one int32 word) by
    cp.async eight tiles ahead into a small ring of their own (K % 64 != 0: loaded into registers a step ahead);
  * step k: wait for stage k, issue wgmma(x_k, W_k) asynchronously, wait until only it is in flight (step
    k - 1's MMA done in this warpgroup), a CTA barrier (... in every warpgroup: stage k - 1 and W buffer
    k + 1 are free), refill stage k - 1 with tile k - 1 + STAGES, dequantize tile k + 1 exactly as
    lorakit.quant.dequantize_q8_0(qs, d, x.dtype) (qs * d in fp32, rounded once to x's dtype; triton_util's
    PRMT form) into W buffer k + 1, fence the generic proxy's shared writes for the MMA's async proxy, a CTA
    barrier;
  * the LoRA term (optional) is the accumulator's start: scale * (t @ b.T) by one more wgmma over the rank
    padded to BLOCK_R (as q8_0_gemm's kernel does: y is rounded once).
Where K % 64 == 0, two more kernels compute y.T = W @ x.T instead (the shape CUTLASS's Hopper mixed-input GEMMs
take): W's dequantized tile is the wgmma's operand A in registers, so it never goes through shared memory.
  * _q8_wgmma_rs_kernel: the loop above without the W buffers, one CTA barrier per step instead of two, x's and W's
    tiles completing barriers of their own. An async wgmma's register operand must stay untouched until a wait covers
    it, so the loop takes tiles in pairs with two register sets: tile k + 1 is dequantized into one set while tile
    k's MMA reads the other, and each wait names the set it releases (which keeps that set live until then; CI
    checks the sm_90a SASS writes neither set between its HGMMAs and the covering WARPGROUP.DEPBAR).
  * _q8_wgmma_ws_kernel: warp-specialized (gl.warp_specialize): a producer warp keeps the ring full (TMA, the scale
    words by cp.async arriving on the stage's barrier) and two consumer warpgroups, 64 W rows each, free a stage by
    an mbarrier arrive, with no CTA barrier and no TMA issue in their loop. ptxas serializes its wgmmas (C7512,
    "insufficient register resources"), so each consumer waits for its own MMA; the two consumers' MMAs still
    overlap each other's dequantization. The cause is the partitions' register split (setmaxnreg: 240 / 24 of a
    launch at 168 for 384 threads): the same PTX without it compiles asynchronous in 208 registers. Serialization
    is not what holds it back, though: made asynchronous (the first consumer issuing the loads instead of a producer
    warp, 8 warps at 255 registers) it measured the same, 71-78% of cuBLAS against 72-79%, and W's tiles through
    each consumer's own shared buffers 67-74% (bench/results/h200_session14/NOTES.md); stage releases by one arrival
    per consumer thread (no partition barrier around them) 74-78% (bench/results/h200_session15/NOTES.md); a
    dequantizing warpgroup feeding two consumers' asynchronous shared-memory wgmmas 77-81% against 74-78%, W's int8
    values stored in an mma-ready byte order (two 16-byte loads per thread per tile) 78-82% against 73-77% (branches
    exp/dq-warpgroup and exp/mma-ready-q8, bench/results/h200_session26/NOTES.md). Under sustained load cuBLAS runs
    at 1.39-1.57 GHz, these kernels at 1.68-1.98 GHz, both near the board's 700 W (bench/clock_lab.py): per clock
    this kernel does 67-69% of cuBLAS's work, so what has paid is fewer instructions per dequantized value.
  * the input gradient dx = dy @ W (_q8_wgmma_ws_kernel with GRAD, wgmma_grad_input): dx.T = W.T @ dy.T, the same
    loop with W's transposed tile (TMA tiles [64 of N, 128 of K], read transposed from shared memory: a byte per
    load) as operand A and each column's scale word; 65-74% of cuBLAS at M = 2048 / 8192
    (bench/results/wgmma_grad_lab_h200.json; the triton tiled kernel 37-38% in one run, h200_session25/call7).
H200, M = 2048 and 8192 at 3B / 8B layer shapes (bench/results/h200_session13/call5): the shared-memory kernel
61-72% of cuBLAS, the register-operand kernel 70-79%, the warp-specialized one 71-81%; the product's config is
measured.
Products are accumulated in fp32 (the MMA's), bf16/fp16 activations only. The interpreter cannot run Gluon:
tests compare this kernel with cpu-torch on the GPU (marker gpu) and compile it for sm_90a without one.
"""

from __future__ import annotations

import functools

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import constexpr_function

from . import triton_util

# triton_util's helpers (builtins only), compiled by Gluon from the same source
_grouped_tile = gluon.jit(triton_util._grouped_tile_src)
_prmt_dequant = gluon.jit(triton_util._prmt_dequant_src)


@constexpr_function
def _rows_layout(cols, num_warps):
    """8 consecutive values per thread along rows of `cols` (>= 8) values."""
    tc = min(32, cols // 8)
    return gl.BlockedLayout([1, 8], [32 // tc, tc], [num_warps, 1], [1, 0])


@gluon.jit
def _scales(d_ptr, rn, kt, K, stride_dn, BLOCK_K: gl.constexpr, L3: gl.constexpr):
    """W's fp16 scales [BLOCK_N, KB] for K tile kt (zero past K's end; in L3's slice along its last axis), when they
    cannot come as int32 words (K % 64 != 0): loaded a step before their use and kept as loaded (a conversion or
    a packing move right after the load would wait for it)."""
    KB: gl.constexpr = BLOCK_K // 32
    kb = kt * KB + gl.arange(0, KB, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
    ok = gl.expand_dims(kb * 32 < K, 0)  # K is a multiple of 32: a block is wholly in or out
    return gl.load(d_ptr + gl.expand_dims(rn, 1) * stride_dn + gl.expand_dims(kb, 0), mask=ok, other=0.0)


@gluon.jit
def _copy_scales(d_slot, d_ptr, rn, kt, K, stride_dn, BLOCK_K: gl.constexpr):
    """cp.async of K tile kt's scale words [BLOCK_N] (int32: a row's two fp16 scales) into a ring slot, as one commit
    group (a tile past K's end copies nothing; the group is still committed, so the groups count tiles)."""
    ok = rn * 0 + kt * BLOCK_K < K
    words = (d_ptr + rn * stride_dn + kt * (BLOCK_K // 32)).to(gl.pointer_type(gl.int32), bitcast=True)
    async_copy.async_copy_global_to_shared(d_slot, words, mask=ok)
    async_copy.commit_group()


@gluon.jit
def _dequant(q_s, d, dtype: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, L2: gl.constexpr,
             L3: gl.constexpr, D_WORDS: gl.constexpr):  # fmt: skip
    """W tile [BLOCK_N, BLOCK_K] = rnd_dtype(q * d) from the int8 tile in shared memory, four values per PTX call
    (triton_util's PRMT dequantization: the same numbers as lorakit.quant.dequantize_q8_0)."""
    KB: gl.constexpr = BLOCK_K // 32
    q = gl.convert_layout(gl.reshape(q_s.load(L2), [BLOCK_N, KB, 32]), L3, assert_trivial=True)
    if D_WORDS:  # the word's low half is the first block's scale
        kb = gl.arange(0, KB, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
        half = (gl.expand_dims(d, 1) >> gl.expand_dims(kb * 16, 0)) & 0xFFFF
        df = half.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    else:
        df = d.to(gl.float32)
    d3 = gl.expand_dims(df, 2)
    ds, _ = gl.broadcast(d3, q)
    dc, _ = gl.broadcast(d3 * -32896.0, q)  # -(2^15 + 2^7) d
    return gl.reshape(_prmt_dequant(q, ds, dc, dtype), [BLOCK_N, BLOCK_K])


@gluon.jit
def _load_tile(x_desc, q_desc, bar, x_dst, q_dst, off_m, off_n, kt, pred):
    """TMA: x tile kt and W's int8 tile kt into one stage, completing `bar` (rows / columns past the ends: 0)."""
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    mbarrier.expect(bar, x_desc.block_type.nbytes + q_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(x_desc, [off_m, kt * BLOCK_K], bar, x_dst, pred=pred)
    tma.async_copy_global_to_shared(q_desc, [off_n, kt * BLOCK_K], bar, q_dst, pred=pred)


@gluon.jit
def _q8_wgmma_kernel(
    x_desc,
    q_desc,
    d_ptr,
    y_ptr,
    t_ptr,
    b_ptr,
    M,
    N,
    K,
    stride_dn,
    stride_ym,
    stride_tm,
    stride_bn,
    R,
    scale,
    STAGES: gl.constexpr,
    GROUP_M: gl.constexpr,
    HAS_LORA: gl.constexpr,
    BLOCK_R: gl.constexpr,
    D_WORDS: gl.constexpr,
    num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = q_desc.block_type.shape[0]
    D_AHEAD: gl.constexpr = 8
    dtype: gl.constexpr = x_desc.dtype

    pid_m, pid_n = _grouped_tile(gl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    # the MMA: warps stacked along M (each warpgroup a [BLOCK_M / 2, BLOCK_N] slab), instruction N = BLOCK_N
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    # the dequantization: 16 consecutive values of one q8_0 block per thread
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 2, 2], [num_warps, 1, 1], [2, 1, 0])
    L2: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [num_warps, 1], [1, 0])  # the same, 2-D
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)

    x_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    q_s = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], q_desc.layout)
    w_s = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_K], w_layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    # W's scales: with D_WORDS by cp.async, D_AHEAD tiles ahead, into a ring of D_AHEAD + 1 slots (a thread waits for
    # its own copies of a tile a step before its use, then a CTA barrier): a load into registers a step ahead left
    # the dequantization waiting for it (49-51% of cuBLAS at 2048 x 3200 x 8640, 66% with cp.async at STAGES - 1
    # tiles ahead, bench/results/h200_session12); else (K % 64 != 0) loaded into registers a step ahead
    DS: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L3))
    DC: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    d_s = gl.allocate_shared_memory(gl.int32, [D_AHEAD + 1, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    # wrapped row indices keep the scales' loads in bounds (W's rows past N are TMA zeros; the store is masked)
    rn = (off_n + gl.arange(0, BLOCK_N, layout=DS)) % N
    rn_c = (off_n + gl.arange(0, BLOCK_N, layout=DC)) % N

    k_tiles = gl.cdiv(K, BLOCK_K)
    for i in gl.static_range(STAGES - 1):
        _load_tile(x_desc, q_desc, bars.index(i), x_s.index(i), q_s.index(i), off_m, off_n, i, i < k_tiles)
    if D_WORDS:
        for i in gl.static_range(D_AHEAD):
            _copy_scales(d_s.index(i), d_ptr, rn_c, i, K, stride_dn, BLOCK_K)
        async_copy.wait_group(D_AHEAD - 1)
        gl.thread_barrier()
        d0 = d_s.index(0).load(DS)
    else:
        d0 = _scales(d_ptr, rn, 0, K, stride_dn, BLOCK_K, L3)
        d1 = _scales(d_ptr, rn, 1, K, stride_dn, BLOCK_K, L3)  # the next tile's, a step ahead
    mbarrier.wait(bars.index(0), 0)
    w_s.index(0).store(_dequant(q_s.index(0), d0, dtype, BLOCK_N, BLOCK_K, L2, L3, D_WORDS))

    if HAS_LORA:
        # acc = scale * (t @ b.T) over the rank (zero-padded to BLOCK_R), rounded into y with the base product
        LR: gl.constexpr = _rows_layout(BLOCK_R, num_warps)
        offs_r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, LR))
        rm_t = (off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LR))) % M
        rn_b = (off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LR))) % N
        mask_r = gl.expand_dims(offs_r < R, 0)
        tt = gl.load(t_ptr + gl.expand_dims(rm_t, 1) * stride_tm + gl.expand_dims(offs_r, 0), mask=mask_r, other=0.0)
        bb = gl.load(b_ptr + gl.expand_dims(rn_b, 1) * stride_bn + gl.expand_dims(offs_r, 0), mask=mask_r, other=0.0)
        t_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_R], dtype)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_R], dtype)
        t_s = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_R], t_layout, tt)
        b_s = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_R], b_layout, bb)
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(t_s, b_s.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma), use_acc=False)
        acc = acc * scale
    else:
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
    fence_async_shared()
    gl.thread_barrier()

    for kt in range(k_tiles):
        st = kt % STAGES
        mbarrier.wait(bars.index(st), (kt // STAGES) & 1)
        acc = warpgroup_mma(x_s.index(st), w_s.index(kt % 2).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        if D_WORDS:
            async_copy.wait_group(D_AHEAD - 2)  # this thread's copies of tile kt + 1's scales
        # step kt - 1's MMA is done in every warpgroup: its stage and W buffer are free (and every thread's copies of
        # tile kt + 1's scales have landed)
        gl.thread_barrier()
        nxt = kt + STAGES - 1
        sn = nxt % STAGES
        _load_tile(x_desc, q_desc, bars.index(sn), x_s.index(sn), q_s.index(sn), off_m, off_n, nxt, nxt < k_tiles)
        if D_WORDS:  # into the slot of tile kt - 1's scales, read a step ago
            dn = kt + D_AHEAD
            _copy_scales(d_s.index(dn % (D_AHEAD + 1)), d_ptr, rn_c, dn, K, stride_dn, BLOCK_K)
        if kt + 1 < k_tiles:
            s1 = (kt + 1) % STAGES
            mbarrier.wait(bars.index(s1), ((kt + 1) // STAGES) & 1)
            if D_WORDS:
                d1 = d_s.index((kt + 1) % (D_AHEAD + 1)).load(DS)
            w_s.index((kt + 1) % 2).store(_dequant(q_s.index(s1), d1, dtype, BLOCK_N, BLOCK_K, L2, L3, D_WORDS))
            fence_async_shared()
            gl.thread_barrier()
            if not D_WORDS:
                d1 = _scales(d_ptr, rn, kt + 2, K, stride_dn, BLOCK_K, L3)  # into d1's registers: no move
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    LY: gl.constexpr = _rows_layout(BLOCK_N, num_warps)
    out = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), LY)
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LY))
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, LY))
    mask = gl.expand_dims(offs_m < M, 1) & gl.expand_dims(offs_n < N, 0)
    ptrs = y_ptr + gl.expand_dims(offs_m.to(gl.int64), 1) * stride_ym + gl.expand_dims(offs_n, 0)
    gl.store(ptrs, out, mask=mask)


@gluon.jit
def _q8_wgmma_rs_kernel(
    x_desc,
    q_desc,
    d_ptr,
    y_ptr,
    t_ptr,
    b_ptr,
    M,
    N,
    K,
    stride_dn,
    stride_ym,
    stride_tm,
    stride_bn,
    R,
    scale,
    STAGES: gl.constexpr,
    GROUP_M: gl.constexpr,
    HAS_LORA: gl.constexpr,
    BLOCK_R: gl.constexpr,
    num_warps: gl.constexpr,
):
    """y.T tile [BLOCK_N, BLOCK_M] = W tile @ x tile.T with W's dequantized tile as the wgmma's register operand A
    (it never goes through shared memory) and x's tile as operand B; K % 64 == 0 (scales as int32 words). The
    pipeline is the kernel above's (TMA ring, scales by cp.async, one wgmma group in flight) without the W buffers."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = q_desc.block_type.shape[0]
    D_AHEAD: gl.constexpr = 8
    dtype: gl.constexpr = x_desc.dtype

    pid_m, pid_n = _grouped_tile(gl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    # the MMA: W's rows along the instruction's M (16 per warp, a warpgroup's 64 together), x's rows along its N
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16]
    )
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    RL: gl.constexpr = gl.SliceLayout(1, AL)
    KL: gl.constexpr = gl.SliceLayout(0, AL)

    x_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    q_s = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], q_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    # W's tiles complete barriers of their own (their own allocation: the compiler's shared-memory hazard analysis
    # puts no CTA barrier between the two TMA issues; 1-2 points of cuBLAS, bench/results/h200_session13/call4)
    bars_q = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars_q.index(i), count=1)
    DC: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    d_s = gl.allocate_shared_memory(gl.int32, [D_AHEAD + 1, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    rn_c = (off_n + gl.arange(0, BLOCK_N, layout=DC)) % N
    first = gl.expand_dims(gl.arange(0, BLOCK_K, layout=KL) < 32, 0)  # the tile's first q8_0 block

    k_tiles = gl.cdiv(K, BLOCK_K)
    for i in gl.static_range(STAGES - 1):
        _load_pair(x_desc, q_desc, bars, bars_q, x_s, q_s, off_m, off_n, i, i < k_tiles, True)
    for i in gl.static_range(D_AHEAD):
        _copy_scales(d_s.index(i), d_ptr, rn_c, i, K, stride_dn, BLOCK_K)
    async_copy.wait_group(D_AHEAD - 1)
    gl.thread_barrier()

    if HAS_LORA:
        t_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_R], dtype)
        t_s = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_R], t_layout)
        acc = _lora_start_t(t_s, t_ptr, b_ptr, off_m, off_n, M, N, stride_tm, stride_bn, R, scale, BLOCK_N, BLOCK_R,
                            mma)  # fmt: skip
    else:
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)

    # two register sets for W's tiles, alternating (the loop takes tiles in pairs): an async wgmma's operand A must
    # stay untouched until a wait covers it, so tile k + 1 is dequantized into the other set while tile k's MMA runs
    # (the waits name the set they release, which keeps it live until then)
    w_a = _tile_a(q_s, d_s, bars, bars_q, 0, first, STAGES, D_AHEAD, dtype, AL, RL)
    w_b = w_a
    for j in range(k_tiles // 2):
        kt = 2 * j
        acc, w_b = _mma_step(w_a, w_b, x_s.index(kt % STAGES), acc)
        _refill(x_desc, q_desc, bars, bars_q, x_s, q_s, d_s, d_ptr, rn_c, off_m, off_n, kt, k_tiles, K, stride_dn,
                STAGES, D_AHEAD)  # fmt: skip
        w_b = _tile_a(q_s, d_s, bars, bars_q, kt + 1, first, STAGES, D_AHEAD, dtype, AL, RL)
        acc, w_a = _mma_step(w_b, w_a, x_s.index((kt + 1) % STAGES), acc)
        _refill(x_desc, q_desc, bars, bars_q, x_s, q_s, d_s, d_ptr, rn_c, off_m, off_n, kt + 1, k_tiles, K,
                stride_dn, STAGES, D_AHEAD)  # fmt: skip
        if kt + 2 < k_tiles:
            w_a = _tile_a(q_s, d_s, bars, bars_q, kt + 2, first, STAGES, D_AHEAD, dtype, AL, RL)
    acc = _mma_drain(acc, w_a, w_b, x_s, k_tiles)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    _store_t(acc, y_ptr, off_m, off_n, M, N, stride_ym, num_warps)


@gluon.jit
def _lora_start_t(t_s, t_ptr, b_ptr, off_m, row0, M, N, stride_tm, stride_bn, R, scale, ROWS: gl.constexpr,
                  BLOCK_R: gl.constexpr, mma: gl.constexpr):  # fmt: skip
    """The transposed product's accumulator start: scale * (b @ t.T) over the rank (zero-padded to BLOCK_R) for W rows
    [row0, + ROWS) and x rows [off_m, + BLOCK_M), b's rows as the wgmma's operand A from registers, t's tile staged
    in t_s [BLOCK_M, BLOCK_R] (the calling warps' own)."""
    BLOCK_M: gl.constexpr = t_s.shape[0]
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    LR: gl.constexpr = _rows_layout(BLOCK_R, gl.num_warps())
    offs_r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, LR))
    rm_t = (off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LR))) % M
    tt = gl.load(t_ptr + gl.expand_dims(rm_t, 1) * stride_tm + gl.expand_dims(offs_r, 0),
                 mask=gl.expand_dims(offs_r < R, 0), other=0.0)  # fmt: skip
    t_s.store(tt)
    offs_rb = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, AL))
    rn_b = (row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, AL))) % N
    bb = gl.load(b_ptr + gl.expand_dims(rn_b, 1) * stride_bn + gl.expand_dims(offs_rb, 0),
                 mask=gl.expand_dims(offs_rb < R, 0), other=0.0)  # fmt: skip
    fence_async_shared()
    gl.thread_barrier()
    acc = warpgroup_mma(bb, t_s.permute((1, 0)), gl.zeros([ROWS, BLOCK_M], gl.float32, mma), use_acc=False)
    return acc * scale


@gluon.jit
def _store_t(acc, y_ptr, off_m, row0, M, N, stride_ym, NW: gl.constexpr):
    """y[off_m + m, row0 + n] = acc[n, m] rounded to y's dtype (rows past N or M masked): each thread's values run
    along y's row (8 consecutive columns)."""
    ROWS: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    LY: gl.constexpr = gl.BlockedLayout([8, 1], [4, 8], [1, NW], [0, 1])
    out = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), LY)
    offs_n = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, LY))
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, LY))
    mask = gl.expand_dims(offs_n < N, 1) & gl.expand_dims(offs_m < M, 0)
    gl.store(y_ptr + gl.expand_dims(offs_m.to(gl.int64), 0) * stride_ym + gl.expand_dims(offs_n, 1), out, mask=mask)


@gluon.jit
def _mma_step(w, w_prev, x_tile, acc):
    """acc += w @ x_tile.T issued asynchronously, then wait until it alone is in flight: the previous step's MMA is
    done and w_prev (its operand A, kept live until here) may be overwritten."""
    acc = warpgroup_mma(w, x_tile.permute((1, 0)), acc, is_async=True)
    return warpgroup_mma_wait(num_outstanding=1, deps=(acc, w_prev))


@gluon.jit
def _mma_drain(acc, w_a, w_b, x_s, k_tiles):
    """The end of a paired loop: the last tile's MMA where k_tiles is odd (its operand in w_a), then wait for every
    MMA in flight (both register sets kept live until then)."""
    STAGES: gl.constexpr = x_s.shape[0]
    if k_tiles % 2:
        acc = warpgroup_mma(w_a, x_s.index((k_tiles - 1) % STAGES).permute((1, 0)), acc, is_async=True)
        acc, w_a, w_b = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w_a, w_b))
    acc, w_a, w_b = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w_a, w_b))
    return acc


@gluon.jit
def _ws_producer(x_desc, q_desc, d_ptr, x_s, q_s, d_s, full, empty, off_m, off_n, N, K, stride_dn,
                 GRAD: gl.constexpr):  # fmt: skip
    """One warp: for every tile along the reduction, once its stage is free, the scale words by cp.async (arriving on
    the stage's full barrier when they land) and the x and int8 W tiles by TMA (counted in bytes on the same
    barrier). GRAD (dx = dy @ W, off_n the program's first column of dx): the reduction runs along W's rows, a stage
    holds W's rows [kt * BLOCK_K, + BLOCK_K) x columns [off_n, + 128) and each row's two scale words, one per
    64 columns (words [0, BLOCK_K) for columns [off_n, + 64), the first consumer's; the next BLOCK_K the second's)."""
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    WORDS: gl.constexpr = d_s.shape[1]
    STAGES: gl.constexpr = x_s.shape[0]
    DL: gl.constexpr = gl.BlockedLayout([WORDS // 32], [32], [1], [0])
    i = gl.arange(0, WORDS, layout=DL)
    # rows past N read wrapped (W's are TMA zeros there, the store is masked), and so do words past K's end
    if GRAD:  # word i: row kt * BLOCK_K + i % BLOCK_K, columns from off_n + 64 * (i // BLOCK_K)
        rows = i % BLOCK_K
        cols = ((off_n // 64 + i // BLOCK_K) % (K // 64)) * 2
    else:  # word i: row off_n + i, columns from kt * BLOCK_K
        rows = (off_n + i) % N
    for kt in range(gl.cdiv(N if GRAD else K, BLOCK_K)):
        st = kt % STAGES
        mbarrier.wait(empty.index(st), ((kt // STAGES) & 1) ^ 1)
        if GRAD:
            words = d_ptr + ((kt * BLOCK_K + rows) % N) * stride_dn + cols
        else:
            words = d_ptr + rows * stride_dn + kt * (BLOCK_K // 32)
        async_copy.async_copy_global_to_shared(d_s.index(st), words.to(gl.pointer_type(gl.int32), bitcast=True))
        async_copy.mbarrier_arrive(full.index(st))
        mbarrier.expect(full.index(st), x_desc.block_type.nbytes + q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [off_m, kt * BLOCK_K], full.index(st), x_s.index(st))
        if GRAD:
            tma.async_copy_global_to_shared(q_desc, [kt * BLOCK_K, off_n], full.index(st), q_s.index(st))
        else:
            tma.async_copy_global_to_shared(q_desc, [off_n, kt * BLOCK_K], full.index(st), q_s.index(st))


@gluon.jit
def _ws_tile(q_s, d_s, full, kt, first, WG: gl.constexpr, dtype: gl.constexpr, AL: gl.constexpr,
             RL: gl.constexpr, GRAD: gl.constexpr):  # fmt: skip
    """This warpgroup's 64 rows of W's tile kt (GRAD: of W's transposed tile), dequantized into the operand-A layout
    once the stage has landed."""
    STAGES: gl.constexpr = q_s.shape[0]
    st = kt % STAGES
    mbarrier.wait(full.index(st), (kt // STAGES) & 1)
    words = d_s.index(st).slice(WG * 64, 64)
    if GRAD:
        return _dequant_a(q_s.index(st).permute((1, 0)).slice(WG * 64, 64), words, first, dtype, AL, RL, 0)
    else:
        return _dequant_a(q_s.index(st).slice(WG * 64, 64), words, first, dtype, AL, RL)


@gluon.jit
def _ws_release(empty, kt, STAGES: gl.constexpr):
    """Stage kt is free as far as this warpgroup is concerned (its MMA over the stage is done, its W reads were
    consumed by it): order those reads before the producer's TMA writes, then arrive (one of two arrivals)."""
    fence_async_shared()
    mbarrier.arrive(empty.index(kt % STAGES), count=1)


@gluon.jit
def _ws_consumer(x_s, q_s, d_s, full, empty, t_s, y_ptr, t_ptr, b_ptr, off_m, off_n, M, N, K, stride_ym, stride_tm,
                 stride_bn, R, scale, WG: gl.constexpr, HAS_LORA: gl.constexpr, BLOCK_R: gl.constexpr,
                 GRAD: gl.constexpr):  # fmt: skip
    """One warpgroup: y.T rows [off_n + 64 WG, + 64) x columns [off_m, + BLOCK_M), as _q8_wgmma_rs_kernel's loop
    (tiles in pairs over two register sets), releasing each stage to the producer once its MMA is done. GRAD: dx.T
    rows (dx's columns) [off_n + 64 WG, + 64), the reduction along W's N rows."""
    STAGES: gl.constexpr = x_s.shape[0]
    BLOCK_M: gl.constexpr = x_s.shape[1]
    BLOCK_K: gl.constexpr = x_s.shape[2]
    dtype: gl.constexpr = x_s.dtype
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # a scale word per row of W's tile, its first block's in the first 32 columns; GRAD: per column of the transposed
    # tile, the first block's in its first 32 rows
    FA: gl.constexpr = 1 if GRAD else 0
    RL: gl.constexpr = gl.SliceLayout(1 - FA, AL)
    first = gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(FA, AL)) < 32, FA)
    row0 = off_n + WG * 64

    if HAS_LORA:
        acc = _lora_start_t(t_s.index(WG), t_ptr, b_ptr, off_m, row0, M, N, stride_tm, stride_bn, R, scale, 64, BLOCK_R,
                            mma)  # fmt: skip
    else:
        acc = gl.zeros([64, BLOCK_M], gl.float32, mma)

    k_tiles = gl.cdiv(N if GRAD else K, BLOCK_K)
    w_a = _ws_tile(q_s, d_s, full, 0, first, WG, dtype, AL, RL, GRAD)
    w_b = w_a
    for j in range(k_tiles // 2):
        kt = 2 * j
        acc, w_b = _mma_step(w_a, w_b, x_s.index(kt % STAGES), acc)
        if kt > 0:
            _ws_release(empty, kt - 1, STAGES)
        w_b = _ws_tile(q_s, d_s, full, kt + 1, first, WG, dtype, AL, RL, GRAD)
        acc, w_a = _mma_step(w_b, w_a, x_s.index((kt + 1) % STAGES), acc)
        _ws_release(empty, kt, STAGES)
        if kt + 2 < k_tiles:
            w_a = _ws_tile(q_s, d_s, full, kt + 2, first, WG, dtype, AL, RL, GRAD)
    acc = _mma_drain(acc, w_a, w_b, x_s, k_tiles)

    _store_t(acc, y_ptr, off_m, row0, M, K if GRAD else N, stride_ym, 4)


@gluon.jit
def _q8_wgmma_ws_kernel(
    x_desc,
    q_desc,
    d_ptr,
    y_ptr,
    t_ptr,
    b_ptr,
    M,
    N,
    K,
    stride_dn,
    stride_ym,
    stride_tm,
    stride_bn,
    R,
    scale,
    STAGES: gl.constexpr,
    GROUP_M: gl.constexpr,
    HAS_LORA: gl.constexpr,
    BLOCK_R: gl.constexpr,
    num_warps: gl.constexpr,
    GRAD: gl.constexpr = False,
):
    """The register-operand product, warp-specialized: a producer warp keeps the ring of stages full (TMA, scales by
    cp.async) and each of two consumer warpgroups owns 64 W rows of the tile and frees a stage by an mbarrier arrive
    (no CTA barrier, no TMA issue in the consumers' loop). GRAD: the input gradient dx = dy @ W instead (x_desc
    dy's tiles, y_ptr dx [M, K], no LoRA): dx.T = W.T @ dy.T, W's transposed tile [128 of K, BLOCK_K of N] as
    operand A (q_desc's tiles [BLOCK_K, 128]), so the same loop computes dx's [BLOCK_M, 128] tile."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = q_desc.block_type.shape[1 if GRAD else 0]
    dtype: gl.constexpr = x_desc.dtype
    gl.static_assert(BLOCK_N == 128, "two consumer warpgroups of 64 W rows")
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")

    pid_m, pid_n = _grouped_tile(gl.program_id(0), M, K if GRAD else N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    x_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    QR: gl.constexpr = q_desc.block_type.shape[0]
    QC: gl.constexpr = q_desc.block_type.shape[1]
    q_s = gl.allocate_shared_memory(gl.int8, [STAGES, QR, QC], q_desc.layout)
    d_s = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    t_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_R], dtype)
    t_s = gl.allocate_shared_memory(dtype, [2 if HAS_LORA else 1, BLOCK_M, BLOCK_R], t_layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    WG0: gl.constexpr = 0
    WG1: gl.constexpr = 1
    # the two consumers' arguments differ in WG only (a tuple built once and extended loses the constexprs)
    # fmt: off
    gl.warp_specialize(
        [
            (_ws_consumer, (x_s, q_s, d_s, full, empty, t_s, y_ptr, t_ptr, b_ptr, off_m, off_n, M, N, K, stride_ym,
                            stride_tm, stride_bn, R, scale, WG0, HAS_LORA, BLOCK_R, GRAD)),
            (_ws_consumer, (x_s, q_s, d_s, full, empty, t_s, y_ptr, t_ptr, b_ptr, off_m, off_n, M, N, K, stride_ym,
                            stride_tm, stride_bn, R, scale, WG1, HAS_LORA, BLOCK_R, GRAD)),
            (_ws_producer, (x_desc, q_desc, d_ptr, x_s, q_s, d_s, full, empty, off_m, off_n, N, K, stride_dn, GRAD)),
        ],
        [4, 1],
        [240, 24],
    )
    # fmt: on


@gluon.jit
def _load_pair(x_desc, q_desc, bars, bars_q, x_s, q_s, off_m, off_n, kt, pred, EXPECT: gl.constexpr):
    """TMA of tile kt into its stage, x's and W's tiles each completing a barrier of its own; their byte counts
    announced here (EXPECT) or before."""
    STAGES: gl.constexpr = x_s.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    st = kt % STAGES
    if EXPECT:
        mbarrier.expect(bars.index(st), x_desc.block_type.nbytes, pred=pred)
        mbarrier.expect(bars_q.index(st), q_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(x_desc, [off_m, kt * BLOCK_K], bars.index(st), x_s.index(st), pred=pred)
    tma.async_copy_global_to_shared(q_desc, [off_n, kt * BLOCK_K], bars_q.index(st), q_s.index(st), pred=pred)


@gluon.jit
def _refill(x_desc, q_desc, bars, bars_q, x_s, q_s, d_s, d_ptr, rn_c, off_m, off_n, kt, k_tiles, K, stride_dn,
            STAGES: gl.constexpr, D_AHEAD: gl.constexpr):  # fmt: skip
    """After step kt's wait (step kt - 1's MMA done in this warpgroup): stage kt - 1's byte counts announced for tile
    kt - 1 + STAGES (every warp waited for the stage's previous phase before the last CTA barrier), a CTA barrier
    (step kt - 1's MMA done in every warpgroup, and every thread's copies of tile kt + 1's scales have landed), then
    the stage's TMA, and tile kt + D_AHEAD's scale words into the slot read at step kt - 1."""
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    async_copy.wait_group(D_AHEAD - 2)
    nxt = kt + STAGES - 1
    sn = nxt % STAGES
    mbarrier.expect(bars.index(sn), x_desc.block_type.nbytes, pred=nxt < k_tiles)
    mbarrier.expect(bars_q.index(sn), q_desc.block_type.nbytes, pred=nxt < k_tiles)
    gl.thread_barrier()
    _load_pair(x_desc, q_desc, bars, bars_q, x_s, q_s, off_m, off_n, nxt, nxt < k_tiles, False)
    dn = kt + D_AHEAD
    _copy_scales(d_s.index(dn % (D_AHEAD + 1)), d_ptr, rn_c, dn, K, stride_dn, BLOCK_K)


@gluon.jit
def _tile_a(q_s, d_s, bars, bars_q, kt, first, STAGES: gl.constexpr, D_AHEAD: gl.constexpr, dtype: gl.constexpr,
            AL: gl.constexpr, RL: gl.constexpr):  # fmt: skip
    """W's tile kt dequantized into the operand-A layout, once its stage has landed (x's and W's tiles)."""
    st = kt % STAGES
    mbarrier.wait(bars.index(st), (kt // STAGES) & 1)
    mbarrier.wait(bars_q.index(st), (kt // STAGES) & 1)
    return _dequant_a(q_s.index(st), d_s.index(kt % (D_AHEAD + 1)), first, dtype, AL, RL)


@gluon.jit
def _dequant_a(q_tile, d_slot, first, dtype: gl.constexpr, AL: gl.constexpr, RL: gl.constexpr, AX: gl.constexpr = 1):
    """W tile [BLOCK_N, 64] = rnd_dtype(q * d) in the wgmma's operand-A layout, from the int8 tile and its rows' scale
    words (a row's two fp16 scales: the low half the first block's) in shared memory. The grad-input kernel's tile is
    W's transposed ([K rows, N columns], AX = 0): a word per column (in RL = the layout's columns), `first` marking
    the rows of the word's first block."""
    q = q_tile.load(AL)
    words = d_slot.load(RL)
    lo = (words & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    hi = ((words >> 16) & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    ds = gl.where(first, gl.expand_dims(lo, AX), gl.expand_dims(hi, AX))
    dc = gl.where(first, gl.expand_dims(lo * -32896.0, AX), gl.expand_dims(hi * -32896.0, AX))  # -(2^15 + 2^7) d
    ds, _ = gl.broadcast(ds, q)
    dc, _ = gl.broadcast(dc, q)
    return _prmt_dequant(q, ds, dc, dtype)


# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES >= 3: the W tile dequantized at step k is TMA-loaded at step k - STAGES + 2);
# 8 warps (two warpgroups along M)
# first: the best at every measured 3B / 8B shape, M = 2048 and 8192 (bench/results/h200_session12)
WGMMA_CONFIGS = [
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, STAGES=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, STAGES=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=6),
    dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, STAGES=4),
]

# the register-operand kernel (_q8_wgmma_rs_kernel), where K % 64 == 0: 8 warps, 16 W rows each (BLOCK_N = 128);
# first: the best at every measured 3B / 8B shape, M = 2048 and 8192 (69-78% of cuBLAS; BLOCK_N = 256 with two
# m64 instructions per warpgroup measured 51-59%, bench/results/h200_session13/call2)
RS_CONFIGS = [
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, STAGES=4, RS=True),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, STAGES=3, RS=True),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=6, RS=True),
]

# the warp-specialized kernel (_q8_wgmma_ws_kernel), where K % 64 == 0: a producer warp and two consumer warpgroups of
# 64 W rows (BLOCK_N = 128); 71-78% of cuBLAS at the measured shapes (BLOCK_M = 128: 49-57%, call4)
WS_CONFIGS = [
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, STAGES=4, WS=True),
]


# the warp-specialized kernel's input gradient (GRAD): dx tiles [BLOCK_M, 128], the reduction over W's rows in tiles of
# BLOCK_K = 64
WS_GRAD_CONFIGS = [
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, STAGES=4, WS=True, GRAD=True),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=6, WS=True, GRAD=True),
]


def _d_words(k: int, d, block_k: int = 64) -> bool:
    """W's scales can come as int32 words (a row's two fp16 scales of a 64-wide K tile): K % 64 == 0 and the rows
    4-byte aligned."""
    return block_k == 64 and k % 64 == 0 and d.stride(0) % 2 == 0 and d.data_ptr() % 4 == 0


def grad_readable(dy2, qs, d) -> bool:
    """Whether the input-gradient kernel can read these operands: dy2's rows in 16-byte multiples (TMA reads its
    tiles; N % 8 == 0 for bf16/fp16) and K % 64 == 0 with W's scale rows as int32 words (_d_words)."""
    return (dy2.shape[1] * dy2.element_size()) % 16 == 0 and _d_words(qs.shape[1], d)


def configs_for(k: int, d) -> list[dict]:
    """The configs that can compute a product with this K and these scales: where K % 64 == 0 the warp-specialized
    and register-operand kernels' first (faster at every measured shape, bench/results/h200_session13), then the
    shared-memory one's."""
    return WS_CONFIGS + RS_CONFIGS + WGMMA_CONFIGS if _d_words(k, d) else list(WGMMA_CONFIGS)


@functools.cache
def _smem_layout(block: tuple[int, int], dtype) -> gl.NVMMASharedLayout:
    """The shared-memory layout of a TMA tile [block] (made once: 27 us of host time each, two per launch,
    bench/results/h200_session16/call3, where an eager prefill is host-bound)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def _desc(t, block: tuple[int, int], dtype):
    """A TMA descriptor of the 2-D tensor t read in [block] tiles (dtype: its Gluon dtype). Made per launch: it holds
    the tensor, so a cache of them would keep activations alive."""
    return TensorDescriptor.from_tensor(t, list(block), _smem_layout(block, dtype))


def _act_desc(x2, block: tuple[int, int]):
    """The TMA descriptor of the bf16/fp16 activations x2 [M, K] in [block] tiles, over a contiguous copy where x2's
    rows are not where TMA can read them (unit column stride, 16-byte aligned rows)."""
    import torch

    if x2.stride(1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    return _desc(x2, block, gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16)


def wgmma_matmul(x2, qs, d, y, lora, cfg: dict, group_m: int = 8) -> None:
    """y[M, N] = x2[M, K] @ W.T (+ scale * t @ b.T), lora = (t [M, r], b [N, r], scale) in x2's dtype or None.
    x2 bf16/fp16 on an sm_90 GPU; y [M, N] with unit column stride. Launched through triton_util.launch (its
    compiled kernel kept per specialization: triton's dispatch cost ~150 us of host time per launch)."""

    m, k = x2.shape
    n = qs.shape[0]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    x_desc = _act_desc(x2, (bm, bk))
    q_desc = _desc(qs, (bn, bk), gl.int8)
    if lora is None:
        t, b, r, s = y, y, 0, 0.0  # dummies, never read without HAS_LORA
    else:
        t, b, s = lora
        r = b.shape[1]
    block_r = max(16, 1 << (max(r, 1) - 1).bit_length())
    d_words = _d_words(k, d, bk)
    grid = (-(-m // bm) * -(-n // bn),)
    if cfg.get("WS") or cfg.get("RS"):  # the register-operand kernels: same arguments, the scales as words
        if not d_words:
            raise ValueError("the register-operand kernel needs K % 64 == 0 and 4-byte aligned scale rows")
        kernel, warps = (_q8_wgmma_ws_kernel, 4) if cfg.get("WS") else (_q8_wgmma_rs_kernel, 8)
        const = dict(num_warps=warps)
    else:
        kernel, const = _q8_wgmma_kernel, dict(D_WORDS=d_words, num_warps=8)
    args = (x_desc, q_desc, d, y, t, b, m, n, k, d.stride(0), y.stride(0), t.stride(0), b.stride(0), r, float(s))
    const.update(STAGES=cfg["STAGES"], GROUP_M=group_m, HAS_LORA=lora is not None, BLOCK_R=block_r)
    triton_util.launch(kernel, grid, args, const)


def wgmma_grad_input(dy2, qs, d, dx, cfg: dict, group_m: int = 8) -> None:
    """dx[M, K] = dy2[M, N] @ W by the warp-specialized kernel (GRAD), dy2 bf16/fp16 on an sm_90 GPU with N % 8 == 0
    (TMA reads its rows), K % 64 == 0 and W's scale rows as int32 words (grad_readable); dx [M, K] with unit column
    stride, any float dtype."""
    m, n = dy2.shape
    k = qs.shape[1]
    if not grad_readable(dy2, qs, d):
        raise ValueError("the input-gradient kernel needs K % 64 == 0, 4-byte aligned scale rows and N % 8 == 0")
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    dy_desc = _act_desc(dy2, (bm, bk))
    q_desc = _desc(qs, (bk, bn), gl.int8)
    grid = (-(-m // bm) * -(-k // bn),)
    args = (dy_desc, q_desc, d, dx, dx, dx, m, n, k, d.stride(0), dx.stride(0), 0, 0, 0, 0.0)
    const = dict(num_warps=4, STAGES=cfg["STAGES"], GROUP_M=group_m, HAS_LORA=False, BLOCK_R=16, GRAD=True)
    triton_util.launch(_q8_wgmma_ws_kernel, grid, args, const)
