"""The decode megakernel: a whole q8_0 decode step of a llama model in one persistent launch (sm_90, Gluon), with
llama.cpp's arithmetic for every q8_0 product (`lorakit predict --act-q8`'s spec, quant.q8_0_act_matmul: the input
row quantized to q8_0 per 32-block by quant.quantize_act_q8_0, integer block sums, fp32 scaling).

Why one launch: a decode step on the 3B shape is ~105 products and ~100 small ops; launched one by one (CUDA graph,
programmatic dependent launches) each product pays ~7 us of fixed cost and the step stays near 40% of HBM
(lorakit/decode.py). Here one program per SM runs the whole step:

  * a producer warp streams every product's weight stages (256 K x 64 rows of int8, tile-major, one TMA box per
    stage, and the stage's [64, 8] fp16 scales) into a shared-memory ring without waiting for any activation (a
    weight does not depend on the previous product), so HBM keeps streaming across the step's phases;
  * the consumer warps (4) take the SM's tasks of each product (row block x split of the K stages; a program's tasks
    are a contiguous range of the split-major order, so they span one or two splits): the product's input is
    quantized by each program into shared memory only over its K range (the RMSNorm-fed ones after a sum of squares
    over all of h; every program quantizing the whole SwiGLU row took 6-7 us per layer, session 20), each stage is
    one int8 tensor-core mma per 128-K box with x's 32-blocks in the 8 columns of the B operand (column j holds block
    j's integer sum), y += isum * d_w * d_x; a task adds its split's sums into fp32 outputs by fire-and-forget
    atomics;
  * between products, phases wait on arrival counters (one release arrival per program, polled):

    per layer l (phase c = 5 l):
      c     q|k|v (packed) product: input RMSNorm(h) * attn_norm, formed by every program as it quantizes it
      c + 1 attention, by H x ns programs (head, key split; ns = ceil((pos + 1) / KPS), at most SA): RoPE (ggml
            mode 0) of q and the new k from the fp32 q|k|v sums, the new k and v rows into the KV cache (one
            program per kv head), online softmax over the split's key blocks (the cache rows asked of L2 before the
            q|k|v wait), the split's partial (acc, m, l) stored, an arrival (H ns per phase)
      c + 2 output product: input the heads' row, combined from the partials by each program over its K range
            as it quantizes it (one L2 round trip; each head's last split combining them after a ticket took two
            more, session 21); added into h (the residual)
      c + 3 gate|up (packed) product: input RMSNorm(h) * ffn_norm
      c + 4 down product: input silu(gate) * up; added into h
    5 L   output product: input RMSNorm(h) * output_norm, into the logits

Adapters (unmerged, float32): a product with adapter terms (all of them as one term, A [R, K] and B [N, R] with the
scales in B, lora.fused_lora_term) adds B (A x) of its float input x. A third partition, one warp per program
(_lora_worker), does it beside the consumers: once the product's input is ready it sums its slice of K of t = A x
into t by atomics, arrives at the phase's t word, waits for every program's part, adds B t to its share of the
product's rows and arrives at the product's counter, whose readers then wait for 2 P arrivals. That chain is a few
L2 round trips and a wait for every program, which would stall the weight stream in the consumers; beside them it
overlaps the product's tasks. The output product's input, the heads' row, the warp combines over its slice of K from
the heads' attention partials as the output product's programs do.

h (fp32, the residual stream) starts as the token's embedding row; the q|k|v and gate|up sums (one region per layer),
the adapters' t and the logits are sums of atomics: the first two must be zero before the launch (zeroing them in the
kernel measured no faster, session 21), the logits each program zeroes its share of as it starts. Everything between the
products is fp32 (llama.cpp's CPU build keeps activations in fp32 too); the cache keeps its dtype. The phase counters
are zeroed by the last program out, so a launch leaves them as it found them; a wait that never completes (programs not
co-resident) gives up after ~2^22 polls and sets the error word (sync[(5 L + 1) * SYNC_STRIDE]).

Numerics: the same arithmetic as quant.q8_0_act_matmul up to the order of the fp32 sums (split-K atomics add in any
order), and RMSNorm / SwiGLU / RoPE / softmax in fp32 in another order than torch; an activation that lands within
an ulp of a quantization boundary can round the other way (one q step of one block), which the tests' bounds allow.

Lab forms (bench/persistent_ws_i8.py, bench/decode_mega_lab.py) use _produce / _tasks with other layouts, PROBE
(skip parts: wrong numbers, what they cost) and TRACE (global-timer stamps per phase).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

GK: gl.constexpr = gl.constexpr(256)  # K per ring stage
XMAX: gl.constexpr = gl.constexpr(16384)  # the longest input row the shared buffers hold
SYNC_STRIDE: gl.constexpr = gl.constexpr(32)  # int32 words between two counters (128 bytes)
BLOCK_D: gl.constexpr = gl.constexpr(128)  # a head's values in registers (D <= 128)
MAX_SPINS: gl.constexpr = gl.constexpr(1 << 22)


@gluon.jit
def _wait_product(sync_ptr, j, P, STRIDE: gl.constexpr = 1, BACKOFF: gl.constexpr = 0):
    """Until P arrivals at sync word (j - 1) * STRIDE (nothing to wait for at j = 0); acquire what they published.
    BACKOFF > 0: nanosleep between polls. Gives up after MAX_SPINS polls (programs that are not all resident would
    otherwise spin forever); returns the count last read (>= P unless it gave up)."""
    n = P
    if j > 0:
        n = gl.load(sync_ptr + (j - 1) * STRIDE, volatile=True)
        spins = 0
        while (n < P) & (spins < MAX_SPINS):
            if BACKOFF > 0:
                n = gl.inline_asm_elementwise(f"nanosleep.u32 {BACKOFF}; mov.b32 $0, $1;", "=r,r", [n], dtype=gl.int32,
                                              is_pure=False, pack=1)  # fmt: skip
            n = gl.load(sync_ptr + (j - 1) * STRIDE, volatile=True)
            spins += 1
        gl.atomic_add(sync_ptr + (j - 1) * STRIDE, 0, sem="acquire", scope="gpu")
    return n


@gluon.jit
def _load_stage(q_desc, qt_desc, d_desc, q_s, d_s, full, st, layer, rb, step, N: gl.constexpr, K: gl.constexpr,
                TILED: gl.constexpr, DPACK: gl.constexpr):  # fmt: skip
    """The TMA copies of one ring stage (row block rb, K stage `step` of layer `layer`'s weight) into slot st, with the
    full barrier's byte count. Row-major W ([L * N, K]; q_desc boxes [BLOCK_N, BKB]): boxes past K come as zeros
    (TMA's out-of-bounds fill). TILED W (tile_q: each [BLOCK_N, BKB] tile contiguous, a row block's tiles in K order):
    a stage's tiles are one contiguous box (q_desc: [KSUB * BLOCK_N, BKB]); a last stage with fewer tiles takes them
    one by one (qt_desc) and the consumers skip the rest. Scales: padded row-major ([L * N, 8 G]) or DPACK (pack_d: a
    stage's [BLOCK_N, 8] contiguous)."""
    BKB: gl.constexpr = q_desc.block_type.shape[1]
    KSUB: gl.constexpr = GK // BKB
    BLOCK_N: gl.constexpr = qt_desc.block_type.shape[0]
    STAGES: gl.constexpr = full.shape[0]
    STEPS: gl.constexpr = (K + GK - 1) // GK
    KC: gl.constexpr = (K + BKB - 1) // BKB  # tiles along K
    LAST: gl.constexpr = KC - (STEPS - 1) * KSUB  # tiles in the last stage
    NB: gl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    DROWS: gl.constexpr = d_desc.block_type.shape[0]
    FULL_BYTES: gl.constexpr = KSUB * qt_desc.block_type.nbytes + d_desc.block_type.nbytes
    LAST_BYTES: gl.constexpr = LAST * qt_desc.block_type.nbytes + d_desc.block_type.nbytes
    q_stage = q_s._reinterpret(gl.int8, [STAGES, KSUB * BLOCK_N, BKB], q_desc.layout)
    if TILED:
        row = ((layer * NB + rb) * KC + step * KSUB) * BLOCK_N
        part = (LAST < KSUB) & (step == STEPS - 1)
        mbarrier.expect(full.index(st), FULL_BYTES, pred=not part)
        mbarrier.expect(full.index(st), LAST_BYTES, pred=part)
        tma.async_copy_global_to_shared(q_desc, [row, 0], full.index(st), q_stage.index(st), pred=not part)
        for c in gl.static_range(LAST if LAST < KSUB else 0):
            tma.async_copy_global_to_shared(qt_desc, [row + c * BLOCK_N, 0], full.index(st),
                                            q_s.index(st * KSUB + c), pred=part)  # fmt: skip
    else:
        mbarrier.expect(full.index(st), FULL_BYTES)
        for c in gl.static_range(KSUB):
            tma.async_copy_global_to_shared(qt_desc, [layer * N + rb * BLOCK_N, step * GK + c * BKB],
                                            full.index(st), q_s.index(st * KSUB + c))  # fmt: skip
    if DPACK:
        tma.async_copy_global_to_shared(d_desc, [((layer * NB + rb) * STEPS + step) * DROWS, 0], full.index(st),
                                        d_s.index(st))  # fmt: skip
    else:
        tma.async_copy_global_to_shared(d_desc, [layer * N + rb * BLOCK_N, step * 8], full.index(st),
                                        d_s.index(st))  # fmt: skip


@gluon.jit
def _span(N: gl.constexpr, K: gl.constexpr, S: gl.constexpr, BLOCK_N: gl.constexpr):
    """This program's tasks of a product in the split-major order (task = split NB + row block, NB row blocks): the
    contiguous range [lo, hi) = [pid T / P, (pid + 1) T / P) of the T = NB S tasks (one or two splits, so the program
    quantizes only their K range of the input), and that range's 32-blocks [b0, b1) (b0 == b1 without tasks)."""
    NB: gl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    STEPS: gl.constexpr = (K + GK - 1) // GK
    PER: gl.constexpr = (STEPS + S - 1) // S
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    lo = pid * (NB * S) // P
    hi = (pid + 1) * (NB * S) // P
    b0 = (lo // NB) * (PER * GK // 32)
    b1 = gl.minimum((gl.maximum(hi - 1, lo) // NB + 1) * (PER * GK // 32), (K + 31) // 32)
    if hi == lo:
        b1 = b0
    return lo, hi, b0, b1


@gluon.jit
def _task_range(first, P, N: gl.constexpr, K: gl.constexpr, S: gl.constexpr, BLOCK_N: gl.constexpr,
                SPAN: gl.constexpr):  # fmt: skip
    """(start, stop, step) of this program's tasks of a product: _span's contiguous range of the split-major order
    (SPAN), or first, first + P, ... of the row-block-major order."""
    if SPAN:
        lo, hi, _, _ = _span(N, K, S, BLOCK_N)
        return lo, hi, 1
    else:
        return first, ((N + BLOCK_N - 1) // BLOCK_N) * S, P


@gluon.jit
def _task_at(task, NB: gl.constexpr, S: gl.constexpr, SPAN: gl.constexpr):
    """(row block, split) of a task: split-major (SPAN) or row-block-major."""
    if SPAN:
        return task % NB, task // NB
    else:
        return task // S, task % S


@gluon.jit
def _produce(q_desc, qt_desc, d_desc, q_s, d_s, full, empty, layer, it, pid, P, N: gl.constexpr, K: gl.constexpr,
             S: gl.constexpr, TILED: gl.constexpr, DPACK: gl.constexpr, NOLOAD: gl.constexpr = False,
             SPAN: gl.constexpr = False):  # fmt: skip
    """The producer's share of one product: every stage (256 K) of tasks pid, pid + P, ... (SPAN: _span's range)
    into the ring (_load_stage). NOLOAD (lab probe): each stage marked full without a copy (no weight stream)."""
    BLOCK_N: gl.constexpr = qt_desc.block_type.shape[0]
    STAGES: gl.constexpr = full.shape[0]
    STEPS: gl.constexpr = (K + GK - 1) // GK
    PER: gl.constexpr = (STEPS + S - 1) // S
    NB: gl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    lo, hi, stride = _task_range(pid, P, N, K, S, BLOCK_N, SPAN)
    for task in range(lo, hi, stride):
        rb, sp = _task_at(task, NB, S, SPAN)
        s0 = sp * PER
        s1 = gl.minimum(s0 + PER, STEPS)
        for step in range(s0, s1):
            st = it % STAGES
            mbarrier.wait(empty.index(st), ((it // STAGES) & 1) ^ 1)
            if NOLOAD:
                mbarrier.arrive(full.index(st))
            else:
                _load_stage(q_desc, qt_desc, d_desc, q_s, d_s, full, st, layer, rb, step, N, K, TILED, DPACK)
            it += 1
    return it


@gluon.jit
def _tasks(y_ptr, xq_s, dx_s, q_s, d_s, full, empty, it, first, P, N: gl.constexpr, K: gl.constexpr, S: gl.constexpr,
           BLOCK_N: gl.constexpr, PROBE: gl.constexpr, ADD: gl.constexpr, num_warps: gl.constexpr,
           SPAN: gl.constexpr = False):  # fmt: skip
    """Tasks first, first + P, ... of the product y[:N] (+)= x[:K] @ W.T, x already quantized in
    xq_s / dx_s, W's stages from the ring (full / empty, `it` the ring position): task = (row block, split of the K
    stages). A task adds its split's sums atomically (fire and forget: no round trip per task; the order of a row's S
    additions varies, so the fp32 sums may differ in the last bit between runs); with S == 1 it stores them, unless ADD
    (y += the product: a residual, or a LoRA term added too). PROBE 1: the stages consumed without their arithmetic,
    2: no additions into y (wrong numbers). SPAN: this program's tasks are the contiguous range _span of the
    split-major order (task = split NB + row block), not first, first + P, ... Returns the ring position."""
    STAGES: gl.constexpr = full.shape[0]
    STEPS: gl.constexpr = (K + GK - 1) // GK
    PER: gl.constexpr = (STEPS + S - 1) // S
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    BL: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    BKB: gl.constexpr = q_s.shape[2]
    KSUB: gl.constexpr = GK // BKB
    KC: gl.constexpr = (K + BKB - 1) // BKB
    cols = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, BL)), 0)
    blk = gl.expand_dims(gl.arange(0, BKB, layout=gl.SliceLayout(1, BL)) // 32, 1)  # a box row's block in the box
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    xq_boxes = xq_s._reinterpret(gl.int8, [XMAX // BKB, BKB], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    dx_steps = dx_s._reinterpret(gl.float32, [XMAX // GK, 8], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    NB: gl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    lo, hi, stride = _task_range(first, P, N, K, S, BLOCK_N, SPAN)
    for task in range(lo, hi, stride):  # rows past N: never stored
        rb, sp = _task_at(task, NB, S, SPAN)
        s0 = sp * PER
        s1 = gl.minimum(s0 + PER, STEPS)
        acc = gl.zeros([BLOCK_N, 8], gl.float32, mma)
        for step in range(s0, s1):
            st = it % STAGES
            mbarrier.wait(full.index(st), (it // STAGES) & 1)
            isum = gl.zeros([BLOCK_N, 8], gl.int32, mma)
            for c in gl.static_range(KSUB if PROBE % 2 == 0 else 0):
                if (KC % KSUB == 0) or (step * KSUB + c < KC):  # a box past K: zeros, or (TILED) not copied
                    a = q_s.index(st * KSUB + c).load(AL)
                    xv = xq_boxes.index(step * KSUB + c).load(gl.SliceLayout(1, BL))
                    xb, sel = gl.broadcast(gl.expand_dims(xv, 1), cols == (BKB // 32) * c + blk)
                    mask = gl.where(sel, -1, 0).to(gl.int8)
                    b = gl.inline_asm_elementwise("and.b32 $0, $1, $2;", "=r,r,r", [xb, mask], dtype=gl.int8,
                                                  is_pure=True, pack=4)  # one AND per register  # fmt: skip
                    isum = mma_v2(a, b, isum)
            dw = d_s.index(st)._reinterpret(gl.float16, [BLOCK_N, 8], flat).load(mma).to(gl.float32)
            fence_async_shared()  # this thread's reads of the stage before the producer's TMA writes
            async_copy.mbarrier_arrive(empty.index(st), increment_count=False)  # one arrival per consumer thread
            dx = dx_steps.index(step).load(gl.SliceLayout(0, mma))
            acc += isum.to(gl.float32) * dw * gl.expand_dims(dx, 0)
            it += 1
        rn = rb * BLOCK_N + rows
        if (PROBE // 2) % 2 == 1:
            pass
        elif ADD or S > 1:
            gl.atomic_add(y_ptr + rn, gl.sum(acc, axis=1), mask=rn < N, sem="relaxed", scope="gpu")
        else:
            gl.store(y_ptr + rn, gl.sum(acc, axis=1), mask=rn < N)
    return it


# -- the inputs of the products: formed and quantized by each program -----------------------------------------------


@gluon.jit
def _rint(v):
    return gl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=f,f", [v], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _q8(x, xq_dst, dx_dst):
    """[ROWS, 32] fp32 32-blocks quantized as quant.quantize_act_q8_0 (q = round half to even of x * (127 / amax),
    scale fp16(amax / 127)) into xq_dst ([ROWS, 32] int8) / dx_dst ([ROWS] fp32)."""
    amax = gl.max(gl.abs(x), axis=1)
    inv = gl.where(amax > 0.0, gl.div_rn(gl.full_like(amax, 127.0), amax), gl.zeros_like(amax))
    xq_dst.store(_rint(x * gl.expand_dims(inv, 1)).to(gl.int8))
    dx_dst.store(gl.div_rn(amax, gl.full_like(amax, 127.0)).to(gl.float16).to(gl.float32))


@gluon.jit
def _chunks(xq_s, dx_s, RB: gl.constexpr):
    """The quantized input row's buffers as chunks of RB 32-blocks: int8 [XMAX / (32 RB), RB, 32] and their scales
    fp32 [XMAX / (32 RB), RB] (chunk c = blocks [c RB, (c + 1) RB))."""
    xq_c = xq_s._reinterpret(gl.int8, [XMAX // (32 * RB), RB, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    dx_c = dx_s._reinterpret(gl.float32, [XMAX // (32 * RB), RB], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    return xq_c, dx_c


@gluon.jit
def _quantize_swiglu_span(x_ptr, xq_s, dx_s, b0, b1, K: gl.constexpr, num_warps: gl.constexpr):
    """Blocks [b0, b1) of the down product's input quantized (_span's range: the only ones this program's tasks
    read): silu(gate) * up of the packed [gate | up] sums at x_ptr (K each); fp32 read past L1. In chunks of
    8 num_warps blocks on the chunk grid (a chunk's blocks outside the range are written as zeros): the range's
    first two chunks asked for together (a range that crossed a chunk's edge took one more L2 round trip, 1.6 us
    for the last programs of the 3B step's down product, session 22), the rest after them."""
    XB: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])
    RB: gl.constexpr = 8 * num_warps
    xq_c, dx_c = _chunks(xq_s, dx_s, RB)
    c0 = b0 // RB
    x0 = _swiglu_values(x_ptr, c0, b0, b1, K, RB, XB)
    x1 = _swiglu_values(x_ptr, c0 + 1, b0, b1, K, RB, XB)
    _q8(x0, xq_c.index(c0), dx_c.index(c0))
    if (c0 + 1) * RB < b1:
        _q8(x1, xq_c.index(c0 + 1), dx_c.index(c0 + 1))
    for c in range(c0 + 2, (b1 + RB - 1) // RB):
        _q8(_swiglu_values(x_ptr, c, b0, b1, K, RB, XB), xq_c.index(c), dx_c.index(c))


@gluon.jit
def _swiglu_values(x_ptr, c, b0, b1, K: gl.constexpr, RB: gl.constexpr, XB: gl.constexpr):
    """_quantize_swiglu_span's input values of chunk c ([RB, 32], zeros outside blocks [b0, b1))."""
    blk = c * RB + gl.arange(0, RB, layout=gl.SliceLayout(1, XB))
    offs = gl.expand_dims(blk * 32, 1) + gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, XB)), 0)
    m = gl.expand_dims((blk >= b0) & (blk < b1), 1) & (offs < K)
    x = gl.load(x_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
    u = gl.load(x_ptr + K + offs, mask=m, other=0.0, cache_modifier=".cg")
    return x / (1.0 + gl.exp(-x)) * u


@gluon.jit
def _partials(ws_ptr, ns, c, b0, b1, H: gl.constexpr, D: gl.constexpr, SA: gl.constexpr, RB: gl.constexpr,
              num_warps: gl.constexpr):  # fmt: skip
    """The heads' attention partials (_attention's acc[D], m, l at ws[head, s]) for the elements of chunk c
    (RB 32-blocks of the heads' row) inside blocks [b0, b1): m, l and acc [SA, RB, 32] (splits past ns, and
    elements outside the range: m = -inf, l = acc = 0), all asked for at once; and the range mask [RB, 32]."""
    L3: gl.constexpr = gl.BlockedLayout([SA, 1, 4], [1, 4, 8], [1, num_warps, 1], [2, 1, 0])
    X2: gl.constexpr = gl.SliceLayout(0, L3)
    blk = c * RB + gl.arange(0, RB, layout=gl.SliceLayout(1, X2))
    e = gl.expand_dims(blk * 32, 1) + gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, X2)), 0)
    ok = gl.expand_dims((blk >= b0) & (blk < b1), 1) & (e < H * D)
    sp = gl.expand_dims(gl.expand_dims(gl.arange(0, SA, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3))), 1), 2)
    m, lsum, acc = _load_partials(ws_ptr, ns, gl.expand_dims(e, 0), gl.expand_dims(ok, 0), sp, D, SA)
    return m, lsum, acc, ok


@gluon.jit
def _load_partials(ws_ptr, ns, e, ok, sp, D: gl.constexpr, SA: gl.constexpr):
    """m, l and acc of the heads' attention partials at ws[head, s] for elements e of the heads' row (ok their mask)
    and splits sp (broadcast together; splits past ns and elements outside ok: m = -inf, l = acc = 0)."""
    row = ws_ptr + (e // D) * (SA * (D + 2)) + sp * (D + 2)
    live = ok & (sp < ns)
    m = gl.load(row + D, mask=live, other=float("-inf"), cache_modifier=".cg")
    lsum = gl.load(row + D + 1, mask=live, other=0.0, cache_modifier=".cg")
    acc = gl.load(row + e % D, mask=live, other=0.0, cache_modifier=".cg")
    return m, lsum, acc


@gluon.jit
def _combined(m, lsum, acc, ok):
    """o = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s (m the largest m_s) of _partials' [SA, RB, 32]; 0
    outside the range."""
    w = gl.exp2(m - gl.expand_dims(gl.max(m, axis=0), 0))  # 0 for a split past ns
    num = gl.sum(w * acc, axis=0)
    den = gl.sum(w * lsum, axis=0)
    return gl.where(ok, gl.div_rn(num, gl.where(ok, den, 1.0)), 0.0)


@gluon.jit
def _combined_at(ws_ptr, ns, e, ok, D: gl.constexpr, SA: gl.constexpr, num_warps: gl.constexpr):
    """The heads' row at elements e (a 1-D slice, ok its mask) combined from the ns attention partials at ws_ptr with
    _combined's arithmetic (the output product's programs' values, bit for bit)."""
    L2: gl.constexpr = gl.BlockedLayout([SA, 1], [1, 32], [1, num_warps], [0, 1])
    e2 = gl.expand_dims(gl.convert_layout(e, gl.SliceLayout(0, L2)), 0)
    ok2 = gl.expand_dims(gl.convert_layout(ok, gl.SliceLayout(0, L2)), 0)
    sp = gl.expand_dims(gl.arange(0, SA, layout=gl.SliceLayout(1, L2)), 1)
    m, lsum, acc = _load_partials(ws_ptr, ns, e2, ok2, sp, D, SA)
    return _combined(m, lsum, acc, gl.convert_layout(ok, gl.SliceLayout(0, L2)))


@gluon.jit
def _combine_span(ws_ptr, ns, xq_s, dx_s, b0, b1, H: gl.constexpr, D: gl.constexpr, SA: gl.constexpr,
                  num_warps: gl.constexpr):  # fmt: skip
    """The output product's input, the heads' row, over blocks [b0, b1) (_span's range) combined from the heads' ns
    attention partials (_partials, _combined) and quantized, in chunks of 4 num_warps blocks (a chunk's blocks
    outside the range written as zeros): the range's first two chunks' partials asked for together (a program whose
    tasks span two splits of the 3B step's output product), the rest (none there) after them."""
    RB: gl.constexpr = 4 * num_warps
    xq_c, dx_c = _chunks(xq_s, dx_s, RB)
    c0 = b0 // RB
    m0, l0, a0, ok0 = _partials(ws_ptr, ns, c0, b0, b1, H, D, SA, RB, num_warps)
    m1, l1, a1, ok1 = _partials(ws_ptr, ns, c0 + 1, b0, b1, H, D, SA, RB, num_warps)
    _q8(_combined(m0, l0, a0, ok0), xq_c.index(c0), dx_c.index(c0))
    if (c0 + 1) * RB < b1:
        _q8(_combined(m1, l1, a1, ok1), xq_c.index(c0 + 1), dx_c.index(c0 + 1))
    for c in range(c0 + 2, (b1 + RB - 1) // RB):
        m, lsum, acc, ok = _partials(ws_ptr, ns, c, b0, b1, H, D, SA, RB, num_warps)
        _q8(_combined(m, lsum, acc, ok), xq_c.index(c), dx_c.index(c))


@gluon.jit
def _quantize_norm_span(h_ptr, g_ptr, eps, xq_s, dx_s, b0, b1, K: gl.constexpr, num_warps: gl.constexpr):
    """RMSNorm(h[:K]) * g, h * (1 / sqrt(mean(h^2) + eps)) * g in fp32 (h read past L1: other SMs add into it),
    quantized only over blocks [b0, b1) (_span's range; the whole row took ~0.5 us more per product, session 20):
    the range's first two chunks of 8 num_warps blocks are loaded with the row, the rest (none where a program's
    tasks span at most two splits of at most two stages) after it."""
    XB: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])
    RB: gl.constexpr = 8 * num_warps
    xq_c, dx_c = _chunks(xq_s, dx_s, RB)
    c0 = b0 // RB
    blk = c0 * RB + gl.arange(0, RB, layout=gl.SliceLayout(1, XB))
    offs0 = gl.expand_dims(blk * 32, 1) + gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, XB)), 0)
    m0 = gl.expand_dims((blk >= b0) & (blk < b1), 1) & (offs0 < K)
    m1 = gl.expand_dims(blk + RB < b1, 1) & (offs0 + RB * 32 < K)
    x0 = gl.load(h_ptr + offs0, mask=m0, other=0.0, cache_modifier=".cg")
    g0 = gl.load(g_ptr + offs0, mask=m0, other=0.0)
    x1 = gl.load(h_ptr + RB * 32 + offs0, mask=m1, other=0.0, cache_modifier=".cg")
    g1 = gl.load(g_ptr + RB * 32 + offs0, mask=m1, other=0.0)
    r = _rstd_rows(h_ptr, K, eps, num_warps)
    _q8(x0 * r * g0, xq_c.index(c0), dx_c.index(c0))
    if (c0 + 1) * RB < b1:
        _q8(x1 * r * g1, xq_c.index(c0 + 1), dx_c.index(c0 + 1))
    for c in range(c0 + 2, (b1 + RB - 1) // RB):
        offs = offs0 + (c - c0) * (RB * 32)
        m = gl.expand_dims(blk + (c - c0) * RB < b1, 1) & (offs < K)
        x = gl.load(h_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
        _q8(x * r * gl.load(g_ptr + offs, mask=m, other=0.0), xq_c.index(c), dx_c.index(c))


@gluon.jit
def _rstd_rows(h_ptr, K: gl.constexpr, eps, num_warps: gl.constexpr):
    """1 / sqrt(mean(h[:K]^2) + eps) (h read past L1; the sum over a [32 num_warps, 32] register tile per chunk)."""
    XB: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])
    ROWS: gl.constexpr = 8 * num_warps * 4
    ss = 0.0
    for c in gl.static_range((K + ROWS * 32 - 1) // (ROWS * 32)):
        offs = _chunk_offsets(c, ROWS, XB)
        x = gl.load(h_ptr + offs, mask=offs < K, other=0.0, cache_modifier=".cg")
        ss += gl.sum(gl.sum(x * x, axis=1), axis=0)
    return 1.0 / gl.sqrt_rn(ss / K + eps)


@gluon.jit
def _chunk_offsets(c, ROWS: gl.constexpr, XB: gl.constexpr):
    blk = c * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, XB))
    return gl.expand_dims(blk * 32, 1) + gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, XB)), 0)


# -- the adapters' low-rank terms: y += B (A x) -------------------------------------------------------------------


@gluon.jit
def _lora_slice(K: gl.constexpr, TSL: gl.constexpr, num_warps: gl.constexpr):
    """This program's slice of K for t = A x (program p: [p sl, (p + 1) sl), sl = ceil(K / P) <= TSL): its offsets
    and mask, in the [RP, TSL] layout of A's slice."""
    LT: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
    pid = gl.program_id(0)
    sl = (K + gl.num_programs(0) - 1) // gl.num_programs(0)
    k = pid * sl + gl.arange(0, TSL, layout=gl.SliceLayout(0, LT))
    return k, (k < (pid + 1) * sl) & (k < K)


@gluon.jit
def _lora_early(a_ptr, b_ptr, K: gl.constexpr, N: gl.constexpr, R: gl.constexpr, RP: gl.constexpr,
                TSL: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """Before the wait for a product's input (their latency passes while the program waits; the weight stream
    saturates HBM, so each load from it takes microseconds): this program's slice of A ([R, K] fp32 row-major) in
    registers ([RP, TSL]; 0.0 without a term, R == 0), and its rows of B (_lora_rows) asked of L2."""
    a = 0.0
    if R > 0:
        LT: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
        k, mk = _lora_slice(K, TSL, num_warps)
        r = gl.arange(0, RP, layout=gl.SliceLayout(1, LT))
        a = gl.load(a_ptr + gl.expand_dims(r * K, 1) + gl.expand_dims(k, 0),
                    mask=gl.expand_dims(r < R, 1) & gl.expand_dims(mk, 0), other=0.0)  # fmt: skip
        _prefetch_rows(b_ptr, N, R, num_warps)
    return a


@gluon.jit
def _prefetch_rows(b_ptr, N: gl.constexpr, R: gl.constexpr, num_warps: gl.constexpr):
    """Ask L2 for this program's rows of B ([N, R] fp32; _lora_rows' share)."""
    PL: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    pid = gl.program_id(0)
    rn = (N + gl.num_programs(0) - 1) // gl.num_programs(0)
    hi = gl.minimum((pid + 1) * rn, N) * R
    for e0 in range(pid * rn * R, hi, 32 * 32 * num_warps):  # one 128-byte line (32 floats) per thread
        e = e0 + gl.arange(0, 32 * num_warps, layout=PL) * 32
        gl.inline_asm_elementwise("@$2 prefetch.global.L2 [$1];\n    mov.u32 $0, 0;", "=r,l,b", [b_ptr + e, e < hi],
                                  dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _lora_rows(y_ptr, b_ptr, t_ptr, N: gl.constexpr, R: gl.constexpr, RP: gl.constexpr, RT: gl.constexpr,
               TR: gl.constexpr, TG: gl.constexpr, num_warps: gl.constexpr, PROBE: gl.constexpr = 0):  # fmt: skip
    """y[n] += B[n] . t for this program's share of the rows n ([p rn, (p + 1) rn), rn = ceil(N / P); TR rows at a
    time: one round of loads where TR >= rn), by atomics (B [N, R] fp32 row-major with the adapters' scales in it;
    t complete: the sum of its TG copies, RT apart)."""
    LB: gl.constexpr = gl.BlockedLayout([1, RP], [32, 1], [num_warps, 1], [1, 0])
    pid = gl.program_id(0)
    rn = (N + gl.num_programs(0) - 1) // gl.num_programs(0)
    r = gl.arange(0, RP, layout=gl.SliceLayout(0, LB))
    g = gl.arange(0, TG, layout=gl.SliceLayout(1, LB))
    tg = gl.load(t_ptr + gl.expand_dims(g * RT, 1) + gl.expand_dims(r, 0), mask=gl.expand_dims(r < R, 0), other=0.0,
                 cache_modifier=".cg")  # fmt: skip
    t = gl.expand_dims(gl.sum(tg, axis=0), 0)
    for n0 in range(pid * rn, gl.minimum((pid + 1) * rn, N), TR):
        n = n0 + gl.arange(0, TR, layout=gl.SliceLayout(1, LB))
        mn = (n < (pid + 1) * rn) & (n < N)
        b = gl.load(b_ptr + gl.expand_dims(n * R, 1) + gl.expand_dims(r, 0),
                    mask=gl.expand_dims(mn, 1) & gl.expand_dims(r < R, 0), other=0.0)  # fmt: skip
        if (PROBE // 32) % 2 == 0:  # probe 32: B t formed, not added
            gl.atomic_add(y_ptr + n, gl.sum(b * t, axis=1), mask=mn, sem="relaxed", scope="gpu")
        else:
            gl.store(y_ptr + n, gl.sum(b * t, axis=1), mask=mn & (n < 0))


@gluon.jit
def _rstd(x_ptr, K: gl.constexpr, eps, num_warps: gl.constexpr):
    """1 / sqrt(mean(x[:K]^2) + eps) (x read past L1)."""
    XL: gl.constexpr = gl.BlockedLayout([8], [32], [num_warps], [0])
    CH: gl.constexpr = 256 * num_warps
    ss = 0.0
    for c in gl.static_range((K + CH - 1) // CH):
        offs = c * CH + gl.arange(0, CH, layout=XL)
        x = gl.load(x_ptr + offs, mask=offs < K, other=0.0, cache_modifier=".cg")
        ss += gl.sum(x * x, axis=0)
    return 1.0 / gl.sqrt_rn(ss / K + eps)


@gluon.jit
def _lora_chain(y_ptr, a, b_ptr, t_ptr, x_ptr, g_ptr, eps, sync_ptr, err_ptr, tw, K: gl.constexpr, N: gl.constexpr,
                R: gl.constexpr, RP: gl.constexpr, RT: gl.constexpr, TR: gl.constexpr, MODE: gl.constexpr,
                TSL: gl.constexpr, PROBE: gl.constexpr, num_warps: gl.constexpr, TG: gl.constexpr, tr_ptr=None,
                TRACE: gl.constexpr = False, ns=1, D: gl.constexpr = 1, SA: gl.constexpr = 1):  # fmt: skip
    """y[:N] += B (A x) once the product's input is ready: this program's part of t = A x over its slice of K (a
    from _lora_early; x the product's fp32 input: MODE 0 the row x_ptr[:K], 1 RMSNorm(x_ptr[:K]) * g, 2
    silu(x_ptr[:K]) * x_ptr[K:2 K], 3 the heads' row combined from their ns attention partials at x_ptr, as the
    output product's programs combine it: _combined_at) added into t's copy p % TG by atomics, its arrival at sync
    word tw, the wait for every program's part, then B t for its share of the rows (_lora_rows). Probes (wrong
    numbers): 16 nothing, 32 B t not added, 64 no wait for t, 128 the code there but never run. TRACE: stamps 1-3 at
    tr_ptr (t's part added, t complete, rows added)."""
    if (PROBE // 16) % 2 == 1:
        return
    run = True
    if (PROBE // 128) % 2 == 1:  # probe 128: the same code, never run (what its size costs)
        run = tw < 0
    if run:
        LT: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
        k, mk = _lora_slice(K, TSL, num_warps)
        if MODE == 3:
            x = gl.convert_layout(_combined_at(x_ptr, ns, k, mk, D, SA, num_warps), gl.SliceLayout(0, LT))
        else:
            x = gl.load(x_ptr + k, mask=mk, other=0.0, cache_modifier=".cg")
        if MODE == 1:
            x = x * _rstd(x_ptr, K, eps, num_warps) * gl.load(g_ptr + k, mask=mk, other=0.0)
        if MODE == 2:
            x = x / (1.0 + gl.exp(-x)) * gl.load(x_ptr + K + k, mask=mk, other=0.0, cache_modifier=".cg")
        r = gl.arange(0, RP, layout=gl.SliceLayout(1, LT))
        t_mine = t_ptr + (gl.program_id(0) % TG) * RT
        gl.atomic_add(t_mine + r, gl.sum(a * gl.expand_dims(x, 0), axis=1), mask=r < R, sem="relaxed", scope="gpu")
        _arrive(sync_ptr, tw)
        _stamp(tr_ptr, tw, 1, TRACE)
        if (PROBE // 64) % 2 == 0:  # probe 64: no wait for the others' parts of t
            _wait(sync_ptr, err_ptr, tw, gl.num_programs(0), PROBE)
        _stamp(tr_ptr, tw, 2, TRACE)
        _lora_rows(y_ptr, b_ptr, t_ptr, N, R, RP, RT, TR, TG, num_warps, PROBE)
        _stamp(tr_ptr, tw, 3, TRACE)


@gluon.jit
def _lora_worker(h_ptr, y32_ptr, logits_ptr, ws_ptr, pos_ptr, g_ptr, lora_ptr, t_ptr, sync_ptr, L, eps,
                 E: gl.constexpr, F: gl.constexpr, V: gl.constexpr, H: gl.constexpr, HKV: gl.constexpr,
                 D: gl.constexpr, SA: gl.constexpr, KPS: gl.constexpr, R: gl.constexpr,
                 RP: gl.constexpr, LOFF: gl.constexpr, RT: gl.constexpr, TSL: gl.constexpr, TR: gl.constexpr,
                 PROBE: gl.constexpr, TG: gl.constexpr, NW: gl.constexpr, trace_ptr, TRACE: gl.constexpr,
                 PDL: gl.constexpr):  # fmt: skip
    """The adapters' terms, on a warp of their own beside the consumers (a chain of L2 round trips and a wait for
    every program would stall the weight stream there): per product with a term, once its input is ready,
    _lora_chain into the product's sums and one more arrival at the product's counter (the product's readers wait
    for 2 P). The output product's input: the heads' row, combined from their attention partials over the program's
    slice as the output product's programs combine it (_lora_chain MODE 3).
    TRACE: per layer 8 stamps after the consumers' (at 16 L + 2 + 8 layer): the q|k|v chain's input ready, t's part
    added, t complete, rows added; the same for the down product's chain."""
    TS: gl.constexpr = TG * RT  # t of phase c at t_ptr + c TS
    P = gl.num_programs(0)
    pid = gl.program_id(0)
    if PDL:
        _grid_dep(pid, True)  # the previous kernel's writes (the token's embedding row) before any read
    err = sync_ptr + (5 * L + 1) * SYNC_STRIDE
    tw = 5 * L + 2
    NQ: gl.constexpr = (H + 2 * HKV) * D
    RSL: gl.constexpr = NQ + 2 * F
    ns = _key_splits(gl.load(pos_ptr).to(gl.int32), SA, KPS)
    for layer in range(L):
        c = layer * 5
        y_l = y32_ptr + layer.to(gl.int64) * RSL
        trw = trace_ptr + pid * (24 * L + 3) + 16 * L + 2 + 8 * layer
        if R[0] > 0:
            a = _lora_early(lora_ptr + LOFF[0] + layer * (R[0] * E), lora_ptr + LOFF[5] + layer * (NQ * R[0]), E, NQ,
                            R[0], RP[0], TSL[0], NW)  # fmt: skip
            if layer > 0:
                _wait(sync_ptr, err, c - 1, P * (1 + (R[3] > 0)), PROBE)
            _stamp(trw, pid, 0, TRACE)
            _lora_chain(y_l, a, lora_ptr + LOFF[5] + layer * (NQ * R[0]), t_ptr + c * TS, h_ptr,
                        g_ptr + (2 * layer) * E, eps, sync_ptr, err, tw + c, E, NQ, R[0], RP[0], RT, TR[0], 1, TSL[0],
                        PROBE, NW, TG, trw, TRACE)  # fmt: skip
            _arrive(sync_ptr, c)
        if R[1] > 0:
            b_o = lora_ptr + LOFF[6] + layer * (E * R[1])
            a = _lora_early(lora_ptr + LOFF[1] + layer * (R[1] * H * D), b_o, H * D, E, R[1], RP[1], TSL[1], NW)
            _wait(sync_ptr, err, c + 1, H * ns, PROBE)  # every split's partial written
            _lora_chain(h_ptr, a, b_o, t_ptr + (c + 2) * TS, ws_ptr, g_ptr, eps, sync_ptr, err, tw + c + 2, H * D, E,
                        R[1], RP[1], RT, TR[1], 3, TSL[1], PROBE, NW, TG, ns=ns, D=D, SA=SA)  # fmt: skip
            _arrive(sync_ptr, c + 2)
        if R[2] > 0:
            a = _lora_early(lora_ptr + LOFF[2] + layer * (R[2] * E), lora_ptr + LOFF[7] + layer * (2 * F * R[2]), E,
                            2 * F, R[2], RP[2], TSL[2], NW)  # fmt: skip
            _wait(sync_ptr, err, c + 2, P * (1 + (R[1] > 0)), PROBE)
            _lora_chain(y_l + NQ, a, lora_ptr + LOFF[7] + layer * (2 * F * R[2]), t_ptr + (c + 3) * TS, h_ptr,
                        g_ptr + (2 * layer + 1) * E, eps, sync_ptr, err, tw + c + 3, E, 2 * F, R[2], RP[2], RT,
                        TR[2], 1, TSL[2], PROBE, NW, TG)  # fmt: skip
            _arrive(sync_ptr, c + 3)
        if R[3] > 0:
            a = _lora_early(lora_ptr + LOFF[3] + layer * (R[3] * F), lora_ptr + LOFF[8] + layer * (E * R[3]), F, E,
                            R[3], RP[3], TSL[3], NW)  # fmt: skip
            _wait(sync_ptr, err, c + 3, P * (1 + (R[2] > 0)), PROBE)
            _stamp(trw, pid, 4, TRACE)
            _lora_chain(h_ptr, a, lora_ptr + LOFF[8] + layer * (E * R[3]), t_ptr + (c + 4) * TS, y_l + NQ, g_ptr,
                        eps, sync_ptr, err, tw + c + 4, F, E, R[3], RP[3], RT, TR[3], 2, TSL[3], PROBE, NW, TG,
                        trw + 4, TRACE)  # fmt: skip
            _arrive(sync_ptr, c + 4)
    if R[4] > 0:
        a = _lora_early(lora_ptr + LOFF[4], lora_ptr + LOFF[9], E, V, R[4], RP[4], TSL[4], NW)
        _wait(sync_ptr, err, 5 * L - 1, P * (1 + (R[3] > 0)), PROBE)
        _lora_chain(logits_ptr, a, lora_ptr + LOFF[9], t_ptr + 5 * L * TS, h_ptr, g_ptr + (2 * L) * E, eps, sync_ptr,
                    err, tw + 5 * L, E, V, R[4], RP[4], RT, TR[4], 1, TSL[4], PROBE, NW, TG)  # fmt: skip
    _done(sync_ptr, L, 2 * P, NW)  # the worker runs only with terms: every program's consumers and this warp


@gluon.jit
def _done(sync_ptr, L, count, num_warps: gl.constexpr):
    """The last of `count` arrivals (every program's consumers, and its adapters' warp) zeroes the phase counters,
    the done counter and the t arrivals for the next launch (everyone has passed every wait); the error word
    stays."""
    gl.thread_barrier()
    if gl.atomic_add(sync_ptr + 5 * L * SYNC_STRIDE, 1, sem="acq_rel", scope="gpu") == count - 1:
        offs = gl.arange(0, 2048, layout=gl.BlockedLayout([64 // num_warps], [32], [num_warps], [0]))
        gl.store(sync_ptr + offs * SYNC_STRIDE, gl.zeros_like(offs), mask=(offs <= 10 * L + 2) & (offs != 5 * L + 1))


# -- attention ----------------------------------------------------------------------------------------------------


@gluon.jit
def _rope(src, d, md, c, sn):
    """One head at src (fp32, read past L1), its pairs (x[2i], x[2i + 1]) turned by (c, sn)[i] (ggml RoPE mode 0),
    element by element: even d: x c - x' s, odd d: x' s + x c, x' the pair's other value."""
    x = gl.load(src + d, mask=md, other=0.0, cache_modifier=".cg")
    xp = gl.load(src + (d ^ 1), mask=md, other=0.0, cache_modifier=".cg")
    return gl.where(d % 2 == 0, x * c - xp * sn, xp * sn + x * c)


@gluon.jit
def _key_splits(pos, SA: gl.constexpr, KPS: gl.constexpr):
    """The key splits of a head at position pos: ceil((pos + 1) / KPS), at most SA (a split's key blocks are L2
    round trips one after another: one block per split is fastest at these positions, session 21)."""
    return gl.minimum((pos + KPS) // KPS, SA)


@gluon.jit
def _attend_block(kc_ptr, vc_ptr, t0, pos, kn, vn, qe, qk_scale, m_i, l_i, acc, D: gl.constexpr,
                  BLOCK_T: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """The online softmax over keys t0..t0 + BLOCK_T - 1: the cached k and v rows below pos (kc_ptr / vc_ptr), row
    pos the new kn / vn (not in the cache yet), rows past pos none; the running max m_i, sum l_i and acc = sum_t
    2^(s_t - m_i) v_t, updated."""
    AL: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [num_warps, 1], [1, 0])
    d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, AL))
    t = t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, AL))
    rows = gl.expand_dims(t * D, 1) + gl.expand_dims(d, 0)
    m = gl.expand_dims(t < pos, 1) & gl.expand_dims(d < D, 0)
    kt = gl.load(kc_ptr + rows, mask=m, other=0.0)
    vt = gl.load(vc_ptr + rows, mask=m, other=0.0)
    new = gl.expand_dims(t == pos, 1)
    sc = gl.sum(gl.where(new, kn, kt.to(gl.float32)) * qe, axis=1)
    sc = gl.where(t <= pos, sc * qk_scale, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(sc, axis=0))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(sc - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=0)
    acc = acc * alpha + gl.sum(gl.expand_dims(p, 1) * gl.where(new, vn, vt.to(gl.float32)), axis=0)
    return m_new, l_i, acc


@gluon.jit
def _prefetch_kv(kc_ptr, vc_ptr, pos, t_first, t_step, D: gl.constexpr, BLOCK_T: gl.constexpr,
                 num_warps: gl.constexpr):  # fmt: skip
    """Ask L2 for the cache rows below pos of the key blocks at t_first, t_first + t_step, ... of a kv head
    (kc_ptr / vc_ptr: the head's rows): they do not depend on this token, so their latency can pass while the
    q|k|v product finishes. One prefetch per 96 bytes of a row (every 128-byte line the row touches)."""
    PL: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [num_warps, 1], [1, 0])
    STEP: gl.constexpr = 768 // kc_ptr.dtype.element_ty.primitive_bitwidth  # 96 bytes
    part = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, PL)) * STEP, 0)
    for t0 in range(t_first, pos, t_step):
        t = gl.expand_dims(t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, PL)), 1)
        ok = (t < pos) & (part < D)
        off = t * D + gl.minimum(part, D - 1)
        for base in gl.static_range(2):
            ptr = (kc_ptr if base == 0 else vc_ptr) + off
            gl.inline_asm_elementwise("@$2 prefetch.global.L2 [$1];\n    mov.u32 $0, 0;", "=r,l,b", [ptr, ok],
                                      dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _attention(qkv_ptr, ws_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos, qk_scale, hd, kv, s, ns, H: gl.constexpr,
               HKV: gl.constexpr, D: gl.constexpr, SA: gl.constexpr, BLOCK_T: gl.constexpr,
               num_warps: gl.constexpr):  # fmt: skip
    """Head hd (kv head kv; kc_ptr / vc_ptr its cache rows), key split s of ns (key blocks s, s + ns, ... of BLOCK_T
    keys among 0..pos): q and the new k rotated, the new k and v rounded to the cache's dtype (the first program of
    the kv head's first split writes them to row pos; the row's key comes from registers), scores q.k * qk_scale
    (log2 units), online softmax. The partial (acc[D], m, l) into ws[hd, s], for the output product's programs (and
    the adapters' warp) to combine (_combine_span: o = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s)."""
    AL: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [num_warps, 1], [1, 0])
    cdt: gl.constexpr = kc_ptr.dtype.element_ty
    d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, AL))
    md = d < D
    c = gl.load(cos_ptr + pos * (D // 2) + d // 2, mask=md, other=0.0)
    sn = gl.load(sin_ptr + pos * (D // 2) + d // 2, mask=md, other=0.0)
    q = _rope(qkv_ptr + hd * D, d, md, c, sn)
    k_new = _rope(qkv_ptr + (H + kv) * D, d, md, c, sn).to(cdt)
    v_new = gl.load(qkv_ptr + (H + HKV + kv) * D + d, mask=md, other=0.0, cache_modifier=".cg").to(cdt)
    if (s == 0) & (hd % (H // HKV) == 0):
        gl.store(kc_ptr + pos * D + d, k_new, mask=md)
        gl.store(vc_ptr + pos * D + d, v_new, mask=md)
    kn = gl.expand_dims(k_new.to(gl.float32), 0)
    vn = gl.expand_dims(v_new.to(gl.float32), 0)
    qe = gl.expand_dims(q, 0)
    n = pos + 1
    m_i = gl.max(gl.full_like(q, float("-inf")), axis=0)
    l_i = gl.sum(gl.zeros_like(q), axis=0)
    acc = gl.zeros_like(q)
    for t0 in range(s * BLOCK_T, n, ns * BLOCK_T):
        m_i, l_i, acc = _attend_block(kc_ptr, vc_ptr, t0, pos, kn, vn, qe, qk_scale, m_i, l_i, acc, D, BLOCK_T,
                                      num_warps)  # fmt: skip
    row = ws_ptr + (hd * SA + s) * (D + 2)
    gl.store(row + d, acc, mask=md)
    gl.store(row + D + d, gl.where(d == 0, m_i, l_i) + gl.zeros_like(acc), mask=d < 2)


# -- phases ---------------------------------------------------------------------------------------------------------


@gluon.jit
def _zero_share(ptr, N, num_warps: gl.constexpr):
    """ptr[:N] (fp32) = 0 over this program's share, [p per, (p + 1) per) with per = ceil(N / P)."""
    ZL: gl.constexpr = gl.BlockedLayout([4], [32], [num_warps], [0])
    BLK: gl.constexpr = 128 * num_warps
    per = (N + gl.num_programs(0) - 1) // gl.num_programs(0)
    lo = gl.program_id(0) * per
    hi = gl.minimum(lo + per, N)
    for o in range(lo, hi, BLK):
        offs = o + gl.arange(0, BLK, layout=ZL)
        gl.store(ptr + offs, gl.zeros([BLK], gl.float32, ZL), mask=offs < hi)


@gluon.jit
def _stamp(trace_ptr, pid, k, TRACE: gl.constexpr):
    """TRACE: the global timer (ns) at event k of this program into trace_ptr[k] (the program's row)."""
    if TRACE:
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=gl.int64, is_pure=False,
                                      pack=1)  # fmt: skip
        gl.store(trace_ptr + k, t)


@gluon.jit
def _grid_dep(x, WAIT: gl.constexpr):
    """Programmatic dependent launch (the kernel launched with launch_pdl): WAIT, until the previous kernel in the
    stream has finished and its writes are visible; else, let the next kernel launch (it waits for this one)."""
    if WAIT:
        gl.inline_asm_elementwise("griddepcontrol.wait; mov.b32 $0, $1;", "=r,r", [x], dtype=gl.int32, is_pure=False,
                                  pack=1)  # fmt: skip
    else:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.b32 $0, $1;", "=r,r", [x], dtype=gl.int32,
                                  is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _arrive(sync_ptr, phase, RELAXED: gl.constexpr = False):
    """One arrival at the phase's counter, releasing every consumer warp's stores and additions before it. RELAXED
    (lab probe 1024, wrong ordering): no release fence, what the fence costs."""
    gl.thread_barrier()  # every consumer warp's stores / additions precede the arrival
    if RELAXED:
        gl.atomic_add(sync_ptr + phase * SYNC_STRIDE, 1, sem="relaxed", scope="gpu")
    else:
        gl.atomic_add(sync_ptr + phase * SYNC_STRIDE, 1, sem="release", scope="gpu")


@gluon.jit
def _wait(sync_ptr, err_ptr, phase, count, PROBE: gl.constexpr):
    """Until `count` arrivals at `phase`; then every warp of the partition may read what they published. A wait that
    gives up sets the error word. PROBE 4: no waits (wrong numbers: what the waits cost)."""
    if (PROBE // 4) % 2 == 0:
        if _wait_product(sync_ptr + phase * SYNC_STRIDE, 1, count) < count:
            gl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")
    gl.thread_barrier()


@gluon.jit
def _consumer(h_ptr, y32_ptr, logits_ptr, ws_ptr, cache_ptr, cos_ptr, sin_ptr, pos_ptr, g_ptr, lora_ptr, t_ptr, xq_s,
              dx_s, q_s, d_s, full, empty, sync_ptr, L, n_ctx, eps, qk_scale, S: gl.constexpr, E: gl.constexpr,
              F: gl.constexpr, V: gl.constexpr, H: gl.constexpr, HKV: gl.constexpr, D: gl.constexpr,
              SA: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, PROBE: gl.constexpr,
              R: gl.constexpr, RP: gl.constexpr, LOFF: gl.constexpr, RT: gl.constexpr, TG: gl.constexpr, trace_ptr,
              TRACE: gl.constexpr, KPS: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """Per phase: wait, form and quantize the product's input, the program's tasks, arrive. With adapter terms
    (_lora_worker adds them): a product's sums by atomics, its readers wait for 2 P arrivals. The adapters' factors of
    product kind j (R[j] > 0): A at lora_ptr + LOFF[j] ([L, R, K]), B at lora_ptr + LOFF[5 + j] ([L, N, R]); t of
    phase c at t_ptr + c TG RT (TG copies, RT apart)."""
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    if PDL:
        _grid_dep(pid, True)  # the previous kernel's writes (the token's embedding row) before any read
    pos = gl.load(pos_ptr).to(gl.int32)
    tr = trace_ptr + pid * (24 * L + 3)  # 16 L + 2 stamps, then the adapters' warp's 8 L, then the SM's id
    if TRACE:
        smid = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=gl.int32, is_pure=False, pack=1)
        gl.store(tr + 24 * L + 2, smid.to(gl.int64))
    err = sync_ptr + (5 * L + 1) * SYNC_STRIDE
    TP: gl.constexpr = (PROBE // 8) % 2 + 2 * ((PROBE // 512) % 2)  # probe 8: no arithmetic, 512: no additions
    RLX: gl.constexpr = (PROBE // 1024) % 2 == 1  # probe 1024: arrivals without their release fence
    NQ: gl.constexpr = (H + 2 * HKV) * D
    RSL: gl.constexpr = NQ + 2 * F  # a layer's fp32 region: q|k|v sums, then gate|up sums
    G: gl.constexpr = H // HKV
    M0: gl.constexpr = 1 + (R[0] > 0)  # arrivals per program at a product's counter: 2 with an adapter term
    M1: gl.constexpr = 1 + (R[1] > 0)
    M2: gl.constexpr = 1 + (R[2] > 0)
    M3: gl.constexpr = 1 + (R[3] > 0)
    # the logits: first added into after a wait that follows every program's start (no memset before the launch)
    _zero_share(logits_ptr, V, num_warps)
    it = 0
    for layer in range(L):
        c = layer * 5
        y_l = y32_ptr + layer.to(gl.int64) * RSL
        if layer > 0:
            _wait(sync_ptr, err, c - 1, P * M3, PROBE)
        _stamp(tr, pid, 16 * layer, TRACE)
        _, _, b0, b1 = _span(NQ, E, S[0], BLOCK_N)
        _quantize_norm_span(h_ptr, g_ptr + (2 * layer) * E, eps, xq_s, dx_s, b0, b1, E, num_warps)
        gl.thread_barrier()
        _stamp(tr, pid, 16 * layer + 12, TRACE)
        it = _tasks(y_l, xq_s, dx_s, q_s, d_s, full, empty, it, 0, P, NQ, E, S[0], BLOCK_N, TP, R[0] > 0, num_warps,
                    True)  # fmt: skip
        _stamp(tr, pid, 16 * layer + 1, TRACE)
        _arrive(sync_ptr, c, RLX)
        _stamp(tr, pid, 16 * layer + 10, TRACE)
        ns = _key_splits(pos, SA, KPS)
        if pid < H * SA:
            hd = pid // SA
            s = pid % SA
            if s < ns:
                kc = cache_ptr + ((layer * 2 * HKV + hd // G).to(gl.int64) * n_ctx) * D  # the kv head's k rows
                vc = kc + (HKV * n_ctx) * D
                _prefetch_kv(kc, vc, pos, (s + ns) * BLOCK_T, ns * BLOCK_T, D, BLOCK_T, num_warps)
                _stamp(tr, pid, 16 * layer + 11, TRACE)
                _wait(sync_ptr, err, c, P * M0, PROBE)
                _stamp(tr, pid, 16 * layer + 2, TRACE)
                if PROBE % 2 == 0:  # probe 1: no attention (wrong numbers)
                    _attention(y_l, ws_ptr, kc, vc, cos_ptr, sin_ptr, pos, qk_scale, hd, hd // G, s, ns, H, HKV, D, SA,
                               BLOCK_T, num_warps)  # fmt: skip
                    _stamp(tr, pid, 16 * layer + 3, TRACE)
                _arrive(sync_ptr, c + 1, RLX)
        _wait(sync_ptr, err, c + 1, H * ns, PROBE)  # every split's partial written
        _stamp(tr, pid, 16 * layer + 4, TRACE)
        _, _, b0, b1 = _span(E, H * D, S[1], BLOCK_N)
        _combine_span(ws_ptr, ns, xq_s, dx_s, b0, b1, H, D, SA, num_warps)
        gl.thread_barrier()
        _stamp(tr, pid, 16 * layer + 13, TRACE)
        it = _tasks(h_ptr, xq_s, dx_s, q_s, d_s, full, empty, it, 0, P, E, H * D, S[1], BLOCK_N, TP, True, num_warps,
                    True)  # fmt: skip
        _stamp(tr, pid, 16 * layer + 5, TRACE)
        _arrive(sync_ptr, c + 2, RLX)
        _wait(sync_ptr, err, c + 2, P * M1, PROBE)
        _stamp(tr, pid, 16 * layer + 6, TRACE)
        _, _, b0, b1 = _span(2 * F, E, S[2], BLOCK_N)
        _quantize_norm_span(h_ptr, g_ptr + (2 * layer + 1) * E, eps, xq_s, dx_s, b0, b1, E, num_warps)
        gl.thread_barrier()
        _stamp(tr, pid, 16 * layer + 14, TRACE)
        it = _tasks(y_l + NQ, xq_s, dx_s, q_s, d_s, full, empty, it, 0, P, 2 * F, E, S[2], BLOCK_N, TP, R[2] > 0,
                    num_warps, True)  # fmt: skip
        _stamp(tr, pid, 16 * layer + 7, TRACE)
        _arrive(sync_ptr, c + 3, RLX)
        _wait(sync_ptr, err, c + 3, P * M2, PROBE)
        _stamp(tr, pid, 16 * layer + 8, TRACE)
        _, _, b0, b1 = _span(E, F, S[3], BLOCK_N)
        _quantize_swiglu_span(y_l + NQ, xq_s, dx_s, b0, b1, F, num_warps)
        gl.thread_barrier()
        _stamp(tr, pid, 16 * layer + 15, TRACE)
        it = _tasks(h_ptr, xq_s, dx_s, q_s, d_s, full, empty, it, 0, P, E, F, S[3], BLOCK_N, TP, True, num_warps, True)
        _stamp(tr, pid, 16 * layer + 9, TRACE)
        _arrive(sync_ptr, c + 4, RLX)
    _wait(sync_ptr, err, 5 * L - 1, P * M3, PROBE)
    if PDL:  # every program is resident by now (all arrived): the next kernel may launch and wait for this one
        _grid_dep(pid, False)
    _stamp(tr, pid, 16 * L, TRACE)
    _, _, b0, b1 = _span(V, E, S[4], BLOCK_N)
    _quantize_norm_span(h_ptr, g_ptr + (2 * L) * E, eps, xq_s, dx_s, b0, b1, E, num_warps)
    gl.thread_barrier()
    _tasks(logits_ptr, xq_s, dx_s, q_s, d_s, full, empty, it, 0, P, V, E, S[4], BLOCK_N, TP,
           R[4] > 0, num_warps, True)  # fmt: skip
    _stamp(tr, pid, 16 * L + 1, TRACE)
    _done(sync_ptr, L, P * (1 + (R[0] + R[1] + R[2] + R[3] + R[4] > 0)), num_warps)


@gluon.jit
def _producer(q0, q1, q2, q3, q4, qt0, qt1, qt2, qt3, qt4, d0, d1, d2, d3, d4, q_s, d_s, full, empty, L,
              S: gl.constexpr, E: gl.constexpr, F: gl.constexpr, V: gl.constexpr, H: gl.constexpr,
              HKV: gl.constexpr, D: gl.constexpr, PROBE: gl.constexpr):  # fmt: skip
    """This program's tasks of every product (_span's ranges), in the consumers' order (the attention phases take
    no weights). PROBE 256: no copies (_produce's NOLOAD)."""
    NL: gl.constexpr = (PROBE // 256) % 2 == 1
    P = gl.num_programs(0)
    NQ: gl.constexpr = (H + 2 * HKV) * D
    it = 0
    for layer in range(L):
        it = _produce(q0, qt0, d0, q_s, d_s, full, empty, layer, it, 0, P, NQ, E, S[0], True, True, NL, True)
        it = _produce(q1, qt1, d1, q_s, d_s, full, empty, layer, it, 0, P, E, H * D, S[1], True, True, NL, True)
        it = _produce(q2, qt2, d2, q_s, d_s, full, empty, layer, it, 0, P, 2 * F, E, S[2], True, True, NL, True)
        it = _produce(q3, qt3, d3, q_s, d_s, full, empty, layer, it, 0, P, E, F, S[3], True, True, NL, True)
    _produce(q4, qt4, d4, q_s, d_s, full, empty, 0, it, 0, P, V, E, S[4], True, True, NL, True)


@gluon.jit
def _ring(q0, qt0, d0, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """The shared memory of a persistent chain: the weight ring (STAGES stages of 256 K x BLOCK_N int8 in TMA tiles
    and their scale boxes, full / empty barriers: one TMA arrival, one arrival per consumer thread) and the quantized
    input row (xq_s int8 [XMAX / 32, 32], dx_s fp32 scales)."""
    BLOCK_N: gl.constexpr = qt0.block_type.shape[0]
    BKB: gl.constexpr = q0.block_type.shape[1]
    q_s = gl.allocate_shared_memory(gl.int8, [STAGES * (GK // BKB), BLOCK_N, BKB], qt0.layout)
    d_s = gl.allocate_shared_memory(gl.float16, [STAGES] + d0.block_type.shape, d0.layout)
    xq_s = gl.allocate_shared_memory(gl.int8, [XMAX // 32, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    dx_s = gl.allocate_shared_memory(gl.float32, [XMAX // 32], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=32 * num_warps)
    return q_s, d_s, xq_s, dx_s, full, empty


@gluon.jit
def _decode_step_kernel(h_ptr, y32_ptr, logits_ptr, ws_ptr, cache_ptr, cos_ptr, sin_ptr, pos_ptr, g_ptr, lora_ptr,
                        t_ptr, q0, q1, q2, q3, q4, qt0, qt1, qt2, qt3, qt4, d0, d1, d2, d3, d4,
                        sync_ptr, L, n_ctx, eps, qk_scale, S: gl.constexpr, E: gl.constexpr, F: gl.constexpr,
                        V: gl.constexpr, H: gl.constexpr, HKV: gl.constexpr, D: gl.constexpr, SA: gl.constexpr,
                        BLOCK_T: gl.constexpr, STAGES: gl.constexpr, PROBE: gl.constexpr,
                        R: gl.constexpr, RP: gl.constexpr, LOFF: gl.constexpr, RT: gl.constexpr, TSL: gl.constexpr,
                        TR: gl.constexpr, TG: gl.constexpr, LNW: gl.constexpr,
                        LREG: gl.constexpr, trace_ptr, TRACE: gl.constexpr, KPS: gl.constexpr, PDL: gl.constexpr,
                        num_warps: gl.constexpr):  # fmt: skip
    BLOCK_N: gl.constexpr = qt0.block_type.shape[0]
    gl.static_assert(BLOCK_N == 16 * num_warps, "16 rows of W per consumer warp")
    q_s, d_s, xq_s, dx_s, full, empty = _ring(q0, qt0, d0, STAGES, num_warps)
    # fmt: off
    # two calls with the same first partitions: a partition list cannot be a value in Gluon code, nor can an
    # argument tuple that holds constexpr tuples (S, R, ...: "cannot convert to tensor", session 21); without
    # adapters the kernel is the one measured before them (no third partition)
    if R[0] + R[1] + R[2] + R[3] + R[4] > 0:  # with the adapters' warp
        gl.warp_specialize(
            [
                (_consumer, (h_ptr, y32_ptr, logits_ptr, ws_ptr, cache_ptr, cos_ptr, sin_ptr, pos_ptr, g_ptr,
                             lora_ptr, t_ptr, xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, L, n_ctx, eps, qk_scale,
                             S, E, F, V, H, HKV, D, SA, BLOCK_T, BLOCK_N, PROBE, R, RP, LOFF, RT, TG, trace_ptr,
                             TRACE, KPS, PDL, num_warps)),
                (_producer, (q0, q1, q2, q3, q4, qt0, qt1, qt2, qt3, qt4, d0, d1, d2, d3, d4, q_s, d_s, full, empty,
                             L, S, E, F, V, H, HKV, D, PROBE)),
                (_lora_worker, (h_ptr, y32_ptr, logits_ptr, ws_ptr, pos_ptr, g_ptr, lora_ptr, t_ptr, sync_ptr, L, eps,
                                E, F, V, H, HKV, D, SA, KPS, R, RP, LOFF, RT, TSL, TR, PROBE, TG, LNW, trace_ptr,
                                TRACE, PDL)),
            ],
            [1, LNW],
            [48, LREG],
        )
    else:
        gl.warp_specialize(
            [
                (_consumer, (h_ptr, y32_ptr, logits_ptr, ws_ptr, cache_ptr, cos_ptr, sin_ptr, pos_ptr, g_ptr,
                             lora_ptr, t_ptr, xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, L, n_ctx, eps, qk_scale,
                             S, E, F, V, H, HKV, D, SA, BLOCK_T, BLOCK_N, PROBE, R, RP, LOFF, RT, TG, trace_ptr,
                             TRACE, KPS, PDL, num_warps)),
                (_producer, (q0, q1, q2, q3, q4, qt0, qt1, qt2, qt3, qt4, d0, d1, d2, d3, d4, q_s, d_s, full, empty,
                             L, S, E, F, V, H, HKV, D, PROBE)),
            ],
            [1],
            [48],
        )
    # fmt: on


# -- host side ------------------------------------------------------------------------------------------------------

WARPS = 4  # consumer warps: BLOCK_N = 64 rows of W per task
BLOCK_N_ROWS = 16 * WARPS
BKB = 128  # K per TMA tile (a stage: two tiles)
STAGES = 12  # 229.6 KB of shared memory with the input row's buffers (8: ~1% slower, session 20)
BLOCK_T = 64  # keys per attention block
KPS = 64  # keys per split of a head's attention: ceil((pos + 1) / KPS) splits, at most SA


def sync_words(layers: int) -> int:
    """int32 words (each SYNC_STRIDE apart) of the kernel's sync buffer: 5 L phase counters, the done counter, the
    error word, then the adapters' t arrivals per phase (5 L + 1)."""
    return 10 * layers + 3


TG = 1  # copies of each t (program p adds into copy p % TG; 8: no faster, session 19)
LNW = 1  # warps of the adapters' partition (registers: LREG[LNW]; 2: no faster, session 19)
LREG = {1: 96, 2: 128}


def t_words(layers: int, rt: int) -> int:
    """fp32 words of the adapters' t buffer: TG copies (rt apart) per phase."""
    return (5 * layers + 1) * TG * rt


def pack_lora(factors, programs: int) -> tuple[torch.Tensor | None, dict]:
    """The adapters' factors per product kind (q|k|v, output, gate|up, down, vocabulary): None, or (A [L, R, K], B
    [L, N, R]) fp32 (B with the adapters' scales), as one flat buffer, and the kernel's dims for them (R, RP: R's
    power of two, LOFF: the factors' offsets in the buffer, RT: the stride of t's TG copies (a phase's t takes TG RT
    words), TSL: per kind a program's slice of K for t, rounded up to a power of two, TR: per kind the rows of B an
    adapters' warp takes at a time)."""
    parts, loff, ranks, ks, ns = [], [0] * 10, [0] * 5, [1] * 5, [1] * 5
    n = 0
    for j, f in enumerate(factors):
        if f is None:
            continue
        a, b = f
        ranks[j], ks[j], ns[j] = a.shape[1], a.shape[2], b.shape[1]
        for i, t in ((j, a), (5 + j, b)):
            loff[i] = n
            parts.append(t.reshape(-1).float())
            n += t.numel()
    rp = [1 << max(0, r - 1).bit_length() for r in ranks]
    tsl = [1 << (-(-k // programs) - 1).bit_length() if r else 1 for r, k in zip(ranks, ks, strict=True)]
    # a program's rows of B, rounded up to a power of two (the launcher takes them in rounds of at most 64 registers
    # per thread)
    tr = [1 << (-(-n // programs) - 1).bit_length() for n in ns]
    dims = dict(R=tuple(ranks), RP=tuple(rp), LOFF=tuple(loff), RT=max(32, *rp), TSL=tuple(tsl), TR=tuple(tr))
    return (torch.cat(parts) if parts else None), dims


def pad_scales(d: torch.Tensor) -> torch.Tensor:
    """d fp16 [rows, K / 32] -> [rows, 8 * ceil(K / 256)] with zeros past K: whole stages of 8 scales per row, so
    that a stage's scales are one 16-byte TMA box row."""
    rows, nb = d.shape
    out = torch.zeros(rows, -(-nb // 8) * 8, dtype=d.dtype, device=d.device)
    out[:, :nb] = d
    return out


def _pad_rows(t: torch.Tensor, n: int, block_n: int) -> torch.Tensor:
    """[L * n, C] -> [L, ceil(n / block_n) * block_n, C], zero rows after each layer's n."""
    rows, cols = t.shape
    layers = rows // n
    nb = -(-n // block_n) * block_n
    if nb == n:
        return t.view(layers, n, cols)
    out = torch.zeros(layers, nb, cols, dtype=t.dtype, device=t.device)
    out[:, :n] = t.view(layers, n, cols)
    return out


def tile_q(qs: torch.Tensor, n: int, block_n: int, bkb: int) -> torch.Tensor:
    """qs int8 [L * n, K] -> [L * NB * KC * block_n, bkb]: every [block_n, bkb] tile contiguous, a row block's
    KC = ceil(K / bkb) tiles in K order (K padded with zeros to KC * bkb, rows to NB = ceil(n / block_n) blocks)."""
    k = qs.shape[1]
    kc = -(-k // bkb)
    t = _pad_rows(qs, n, block_n)
    pad = torch.zeros(*t.shape[:2], kc * bkb, dtype=qs.dtype, device=qs.device)
    pad[..., :k] = t
    layers, nbn = t.shape[:2]
    t = pad.view(layers, nbn // block_n, block_n, kc, bkb).permute(0, 1, 3, 2, 4).contiguous()
    return t.view(-1, bkb)


def pack_d(d: torch.Tensor, n: int, block_n: int) -> torch.Tensor:
    """d fp16 [L * n, K / 32] -> [L * NB * G * block_n * 8 / 256, 256]: a row block's [block_n, 8] scales of each
    stage of 256 K (G = ceil(K / 256) stages, zeros past K and past n) contiguous, in stage order."""
    p = _pad_rows(pad_scales(d), n, block_n)
    layers, nbn, g8 = p.shape
    t = p.view(layers, nbn // block_n, block_n, g8 // 8, 8).permute(0, 1, 3, 2, 4).contiguous()
    return t.view(-1, 256)


def splits(n: int, k: int, programs: int) -> int:
    """A product's splits of its K stages: one stage per task, two where the product has fewer row blocks than half
    the programs (bench/results/h200_session17: 13 / 7 / 13 / 17 / 13 for the 3B step's q|k|v, output, gate|up, down,
    vocabulary products)."""
    steps = -(-k // 256)
    per = 2 if -(-n // BLOCK_N_ROWS) < programs / 2 else 1
    return -(-steps // per)


def descriptors(weights):
    """TMA descriptors of weights [(q tile_q'd, d pack_d'd)] per product kind: (stage boxes, tile boxes, scale
    boxes)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    qlay = gl.NVMMASharedLayout.get_default_for([BLOCK_N_ROWS, BKB], gl.int8)
    flat16 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    qd = [TensorDescriptor.from_tensor(q, [BLOCK_N_ROWS * 256 // BKB, BKB], qlay) for q, _ in weights]
    qt = [TensorDescriptor.from_tensor(q, [BLOCK_N_ROWS, BKB], qlay) for q, _ in weights]
    dd = [TensorDescriptor.from_tensor(d, [BLOCK_N_ROWS * 8 // 256, 256], flat16) for _, d in weights]
    return qd, qt, dd


def _launch_pdl(device) -> dict:
    """A programmatic dependent launch (sm_90): the producer streams the first weights while the previous kernel (the
    token's embedding row) finishes; the consumers and the adapters' warp wait for it (_grid_dep) before any read."""
    from .triton_util import overlap_pdl

    return {"PDL": False, **overlap_pdl(device)}


def decode_step(bufs: dict, descs, dims: dict, programs: int, probe: int = 0) -> None:
    """One launch. dims: L, E, F, V, H, HKV, D, eps, S (splits per product kind), SA (the most key splits per head),
    with adapters pack_lora's R, RP, LOFF, RT, TSL, TR; labs may set BLOCK_T, STAGES, TG, LNW and KPS (keys per key
    split) too. bufs: h (fp32 [E], the embedding row), y32 (fp32 [L, (H + 2 HKV) D + 2 F], zeros), logits (fp32 [V];
    zeroed by the launch), ws (fp32 [H, SA, D + 2]), cache (the KV cache buffer [L, 2 HKV, n_ctx, D], each layer's v
    heads after its k heads), cos / sin (fp32 [n_ctx, D / 2]), pos (int32 or int64 [1]), gains (fp32 [2 L + 1, E]:
    attn_norm, ffn_norm per layer, output_norm), sync (int32 zeros [sync_words(L) * SYNC_STRIDE]; its error word set
    if a wait gave up); with adapters lora (pack_lora's buffer) and t (fp32 [t_words(L, RT)], zeros); optional trace
    (int64 [programs, 24 L + 3], TRACE stamps, then the program's SM)."""
    qd, qt, dd = descs
    trace = bufs.get("trace")
    ranks = dims.get("R", (0,) * 5)
    lora = dict(R=tuple(ranks), RP=tuple(dims.get("RP", (1,) * 5)), LOFF=tuple(dims.get("LOFF", (0,) * 10)),
                RT=dims.get("RT", 1), TSL=tuple(dims.get("TSL", (1,) * 5)),
                TG=dims.get("TG", TG), LNW=dims.get("LNW", LNW))  # fmt: skip
    lora["LREG"] = LREG[lora["LNW"]]
    lora["TR"] = tuple(max(32 * lora["LNW"], min(t, 2048 * lora["LNW"] // p))
                       for t, p in zip(dims.get("TR", (1,) * 5), lora["RP"], strict=True))  # fmt: skip
    _decode_step_kernel[(programs,)](
        bufs["h"], bufs["y32"], bufs["logits"], bufs["ws"], bufs["cache"], bufs["cos"], bufs["sin"], bufs["pos"],
        bufs["gains"], bufs["lora"] if any(ranks) else bufs["h"], bufs["t"] if any(ranks) else bufs["h"], *qd, *qt, *dd,
        bufs["sync"], dims["L"], bufs["cache"].shape[-2], dims["eps"], 1.4426950408889634 / dims["D"] ** 0.5,
        S=tuple(dims["S"]), E=dims["E"], F=dims["F"], V=dims["V"], H=dims["H"], HKV=dims["HKV"], D=dims["D"],
        SA=dims["SA"], BLOCK_T=dims.get("BLOCK_T", BLOCK_T), STAGES=dims.get("STAGES", STAGES), PROBE=probe, **lora,
        trace_ptr=bufs["sync"] if trace is None else trace, TRACE=trace is not None, KPS=dims.get("KPS", KPS),
        num_warps=WARPS, **_launch_pdl(bufs["h"].device),
    )  # fmt: skip
