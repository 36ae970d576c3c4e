"""A warp-specialized persistent chain of decode q8_0 products, in Gluon (sm_90), for bench/persistent_lab.py.

One program per SM walks every layer's four products (persistent_lab.SHAPES) in order. Its producer warp streams the
program's int8 weight tiles (TMA, [BLOCK_N, 64] boxes, KSUB per stage) and their scale words (cp.async) into a ring of
STAGES stages, for one product after the other, without waiting for any activation: a weight does not depend on the
previous product. The consumer warps wait for the previous product to be complete in every program (an arrival
counter per product, release / acquire), copy its output (this product's input x, <= 8640 bf16) into shared memory
once, and then for each of their (row block, K split) tasks dequantize the ring's tiles into the mma.sync operand
(q8_0_wgmma._dequant_a: the PRMT dequantization), multiply with x (mma m16n8k16, x in column 0 of an 8-column
operand) and release the stage. Split-K partials are summed by the last program of a row block, as q8_0_gemv_tc.
So HBM keeps streaming while the consumers wait at a product boundary, as long as the ring has room.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from lorakit.kernels.decode_mega import _wait_product
from lorakit.kernels.q8_0_wgmma import _dequant_a

BK: gl.constexpr = gl.constexpr(64)  # K per TMA box (one int32 scale word per row)
KW: gl.constexpr = gl.constexpr(4)  # consecutive K values per thread in the mma operands (4: one int8 word)


@gluon.jit
def _produce(q_desc, d_ptr, q_s, d_s, full, empty, row0, it, pid, P, N: gl.constexpr, K: gl.constexpr,
             S: gl.constexpr):  # fmt: skip
    """The producer's share of one product: every K step of every task of this program, into the ring."""
    BLOCK_N: gl.constexpr = q_desc.block_type.shape[0]
    STAGES: gl.constexpr = full.shape[0]
    KSUB: gl.constexpr = q_s.shape[0] // STAGES
    DL: gl.constexpr = gl.BlockedLayout([BLOCK_N // 32], [32], [1], [0])
    KT: gl.constexpr = K // BK
    STEPS: gl.constexpr = (KT + KSUB - 1) // KSUB
    PER: gl.constexpr = (STEPS + S - 1) // S  # K steps per split
    rows = gl.arange(0, BLOCK_N, layout=DL)
    for task in range(pid, ((N + BLOCK_N - 1) // BLOCK_N) * S, P):
        rb = task // S
        s0 = (task % S) * PER
        s1 = gl.minimum(s0 + PER, STEPS)
        rn = (row0 + gl.minimum(rb * BLOCK_N + rows, N - 1)).to(gl.int64)  # rows past N: its last row's scales
        for step in range(s0, s1):
            st = it % STAGES
            mbarrier.wait(empty.index(st), ((it // STAGES) & 1) ^ 1)
            for c in gl.static_range(KSUB):
                kt = gl.minimum(step * KSUB + c, KT - 1)  # a step past K's end copies a tile it will not use
                words = (d_ptr + rn * (K // 32) + kt * 2).to(gl.pointer_type(gl.int32), bitcast=True)
                async_copy.async_copy_global_to_shared(d_s.index(st * KSUB + c), words)
            async_copy.mbarrier_arrive(full.index(st))
            mbarrier.expect(full.index(st), KSUB * q_desc.block_type.nbytes)
            for c in gl.static_range(KSUB):
                kt = gl.minimum(step * KSUB + c, KT - 1)
                tma.async_copy_global_to_shared(q_desc, [row0 + rb * BLOCK_N, kt * BK], full.index(st),
                                                q_s.index(st * KSUB + c))  # fmt: skip
            it += 1
    return it


@gluon.jit
def _producer(q0, q1, q2, q3, d0, d1, d2, d3, q_s, d_s, full, empty, L, S0: gl.constexpr, S1: gl.constexpr,
              S2: gl.constexpr, S3: gl.constexpr):  # fmt: skip
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    it = 0
    for layer in range(L):
        it = _produce(q0, d0, q_s, d_s, full, empty, layer * 9600, it, pid, P, 9600, 3200, S0)
        it = _produce(q1, d1, q_s, d_s, full, empty, layer * 3200, it, pid, P, 3200, 3200, S1)
        it = _produce(q2, d2, q_s, d_s, full, empty, layer * 17280, it, pid, P, 17280, 3200, S2)
        it = _produce(q3, d3, q_s, d_s, full, empty, layer * 3200, it, pid, P, 3200, 8640, S3)


@gluon.jit
def _consume(act_ptr, x_off, y_off, x_s, q_s, d_s, full, empty, part_ptr, cnt_ptr, sync_ptr, j, it, pid, P,
             N: gl.constexpr, K: gl.constexpr, S: gl.constexpr, BLOCK_N: gl.constexpr, H: gl.constexpr,
             h: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """Consumer partition h of H's share of product j: y = act[x_off : + K] @ W.T into act[y_off : + N]; the
    partition takes the TMA boxes c % H == h of each stage, its sums are split-K partials of their own."""
    STAGES: gl.constexpr = full.shape[0]
    KSUB: gl.constexpr = q_s.shape[0] // STAGES
    KT: gl.constexpr = K // BK
    STEPS: gl.constexpr = (KT + KSUB - 1) // KSUB
    PER: gl.constexpr = (STEPS + S - 1) // S
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=KW)
    BL: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=KW)
    RL: gl.constexpr = gl.SliceLayout(1, AL)
    XL: gl.constexpr = gl.BlockedLayout([8], [32], [num_warps], [0])
    first = gl.expand_dims(gl.arange(0, BK, layout=gl.SliceLayout(0, AL)) < 32, 0)
    col0 = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, BL)) == 0, 0)
    out0 = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, mma)) == 0, 0)
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))

    XMAX: gl.constexpr = x_s.shape[0]
    x_rows = x_s._reinterpret(gl.bfloat16, [XMAX // BK, BK], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    _wait_product(sync_ptr, j, P)
    gl.thread_barrier()  # every consumer warp is done with the previous product's x
    CH: gl.constexpr = 256 * num_warps
    for c in gl.static_range((K + CH - 1) // CH):
        offs = c * CH + gl.arange(0, CH, layout=XL)
        xc = gl.load(act_ptr + x_off + offs, mask=offs < K, other=0.0, cache_modifier=".cg")
        x_s.slice(c * CH, CH).store(xc)
    gl.thread_barrier()

    for task in range(pid, ((N + BLOCK_N - 1) // BLOCK_N) * S, P):  # a last row block past N: TMA zeros or the
        rb = task // S  # next layer's rows, never stored
        sk = task % S
        s0 = sk * PER
        s1 = gl.minimum(s0 + PER, STEPS)
        acc = gl.zeros([BLOCK_N, 8], gl.float32, mma)
        for step in range(s0, s1):
            st = it % STAGES
            mbarrier.wait(full.index(st), (it // STAGES) & 1)
            for c in gl.static_range(h, KSUB, H):
                kt = step * KSUB + c
                if kt < KT:
                    w = _dequant_a(q_s.index(st * KSUB + c), d_s.index(st * KSUB + c), first, gl.bfloat16, AL, RL)
                    xv = x_rows.index(kt).load(gl.SliceLayout(1, BL))
                    xb, _ = gl.broadcast(gl.expand_dims(xv, 1), col0)
                    xb = gl.where(col0, xb, gl.zeros_like(xb))
                    acc = mma_v2(w, xb, acc)
            fence_async_shared()  # this thread's reads of the stage before the producer's TMA writes
            async_copy.mbarrier_arrive(empty.index(st), increment_count=False)  # one arrival per consumer thread
            it += 1
        y = gl.sum(gl.where(out0, acc, gl.zeros_like(acc)), axis=1)  # column 0: the product
        rn = rb * BLOCK_N + rows
        if S * H > 1:
            base = (rb * S * H).to(gl.int64) * BLOCK_N
            gl.store(part_ptr + base + (sk * H + h) * BLOCK_N + rows, y)
            gl.thread_barrier()
            if gl.atomic_add(cnt_ptr + rb, 1, sem="acq_rel", scope="gpu") == S * H - 1:
                tot = gl.load(part_ptr + base + rows, cache_modifier=".cg")
                for s in gl.static_range(1, S * H):
                    tot += gl.load(part_ptr + base + s * BLOCK_N + rows, cache_modifier=".cg")
                gl.atomic_xchg(cnt_ptr + rb, 0, sem="relaxed", scope="gpu")
                gl.store(act_ptr + y_off + rn, tot.to(gl.bfloat16), mask=rn < N)
        else:
            gl.store(act_ptr + y_off + rn, y.to(gl.bfloat16), mask=rn < N)
    gl.thread_barrier()  # every consumer warp's stores precede the arrival
    gl.atomic_add(sync_ptr + j, 1, sem="release", scope="gpu")
    return it


@gluon.jit
def _consumer(act_ptr, x_all, q_s, d_s, full, empty, part_ptr, cnt_ptr, sync_ptr, L, A0: gl.constexpr,
              A1: gl.constexpr, A2: gl.constexpr, A3: gl.constexpr, S0: gl.constexpr, S1: gl.constexpr,
              S2: gl.constexpr, S3: gl.constexpr, BLOCK_N: gl.constexpr, H: gl.constexpr, h: gl.constexpr,
              num_warps: gl.constexpr):  # fmt: skip
    pid = gl.program_id(0)
    P = gl.num_programs(0) * H  # arrivals per product: every consumer partition of every program
    x_s = x_all.index(h)
    it = 0
    for layer in range(L):
        j = layer * 4
        it = _consume(act_ptr, A3, A0, x_s, q_s, d_s, full, empty, part_ptr, cnt_ptr, sync_ptr, j, it, pid, P, 9600,
                      3200, S0, BLOCK_N, H, h,
                      num_warps)  # fmt: skip
        it = _consume(act_ptr, A0, A1, x_s, q_s, d_s, full, empty, part_ptr, cnt_ptr, sync_ptr, j + 1, it, pid, P,
                      3200, 3200, S1, BLOCK_N, H, h,
                      num_warps)  # fmt: skip
        it = _consume(act_ptr, A1, A2, x_s, q_s, d_s, full, empty, part_ptr, cnt_ptr, sync_ptr, j + 2, it, pid, P,
                      17280, 3200, S2, BLOCK_N, H, h,
                      num_warps)  # fmt: skip
        it = _consume(act_ptr, A2, A3, x_s, q_s, d_s, full, empty, part_ptr, cnt_ptr, sync_ptr, j + 3, it, pid, P,
                      3200, 8640, S3, BLOCK_N, H, h,
                      num_warps)  # fmt: skip
    # the last program out zeroes the product counters for the next launch (every program has passed every wait)
    if gl.atomic_add(sync_ptr + 4 * L, 1, sem="acq_rel", scope="gpu") == P - 1:  # P counts the partitions
        offs = gl.arange(0, 128, layout=gl.BlockedLayout([4], [32], [num_warps], [0]))
        gl.store(sync_ptr + offs, gl.zeros_like(offs), mask=offs <= 4 * L)


@gluon.jit
def _chain_ws_kernel(act_ptr, q0, q1, q2, q3, d0, d1, d2, d3, part_ptr, cnt_ptr, sync_ptr, L, A0: gl.constexpr,
                     A1: gl.constexpr, A2: gl.constexpr, A3: gl.constexpr, S0: gl.constexpr, S1: gl.constexpr,
                     S2: gl.constexpr, S3: gl.constexpr, STAGES: gl.constexpr, KSUB: gl.constexpr,
                     XMAX: gl.constexpr, PRODUCER_REGS: gl.constexpr, H: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                     num_warps: gl.constexpr):  # fmt: skip
    BLOCK_N: gl.constexpr = q0.block_type.shape[0]
    gl.static_assert(BLOCK_N == 16 * num_warps, "16 rows of W per consumer warp")
    q_s = gl.allocate_shared_memory(gl.int8, [STAGES * KSUB, BLOCK_N, BK], q0.layout)
    d_s = gl.allocate_shared_memory(gl.int32, [STAGES * KSUB, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    x_all = gl.allocate_shared_memory(gl.bfloat16, [H, XMAX], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=32 * num_warps * H)
    gl.static_assert(KSUB % H == 0, "each consumer partition takes KSUB / H boxes of a stage")
    H0: gl.constexpr = 0
    H1: gl.constexpr = 1
    # fmt: off
    if H == 1:
        gl.warp_specialize(
            [
                (_consumer, (act_ptr, x_all, q_s, d_s, full, empty, part_ptr, cnt_ptr, sync_ptr, L, A0, A1, A2, A3, S0,
                             S1, S2, S3, BLOCK_N, H, H0, num_warps)),
                (_producer, (q0, q1, q2, q3, d0, d1, d2, d3, q_s, d_s, full, empty, L, S0, S1, S2, S3)),
            ],
            [1],
            [PRODUCER_REGS],
        )
    else:
        gl.warp_specialize(
            [
                (_consumer, (act_ptr, x_all, q_s, d_s, full, empty, part_ptr, cnt_ptr, sync_ptr, L, A0, A1, A2, A3, S0,
                             S1, S2, S3, BLOCK_N, H, H0, num_warps)),
                (_consumer, (act_ptr, x_all, q_s, d_s, full, empty, part_ptr, cnt_ptr, sync_ptr, L, A0, A1, A2, A3, S0,
                             S1, S2, S3, BLOCK_N, H, H1, num_warps)),
                (_producer, (q0, q1, q2, q3, d0, d1, d2, d3, q_s, d_s, full, empty, L, S0, S1, S2, S3)),
            ],
            [num_warps, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )
    # fmt: on


def chain_ws(ws, act, part, cnt, sync, layers: int, offs, cfg: dict, n_sm: int) -> None:
    """Launch the chain: ws = [(qs, d)] per product kind ([L * N, K] int8, [L * N, K / 32] fp16)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if cfg.get("H", 1) != 1 and not cfg.get("try_partitions"):
        raise ValueError("two consumer partitions (H = 2) hung with triton 3.6 (h200_session15 call 5); "
                         "pass try_partitions=True to run them on another triton")  # fmt: skip
    bn = 16 * cfg["warps"]
    lay = gl.NVMMASharedLayout.get_default_for([bn, 64], gl.int8)
    qd = [TensorDescriptor.from_tensor(qs, [bn, 64], lay) for qs, _ in ws]
    s0, s1, s2, s3 = cfg["S"]
    _chain_ws_kernel[(n_sm,)](
        act, *qd, *(d for _, d in ws), part, cnt, sync, layers, A0=offs[0], A1=offs[1], A2=offs[2], A3=offs[3],
        S0=s0, S1=s1, S2=s2, S3=s3, STAGES=cfg["STAGES"], KSUB=cfg["KSUB"], XMAX=16384,
        PRODUCER_REGS=cfg.get("regs", 48), H=cfg.get("H", 1), CONSUMER_REGS=cfg.get("cregs", 96),
        num_warps=cfg["warps"],
    )  # fmt: skip
