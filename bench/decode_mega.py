"""The decode megakernel (lab): one persistent launch for a whole q8_0 decode step of a llama model, with llama.cpp's
arithmetic for every q8_0 product (`lorakit predict --act-q8`'s spec: activations quantized to q8_0 per 32-block,
integer block sums), for bench/decode_mega_lab.py.

Built on bench/persistent_ws_i8.py's warp-specialized chain: a producer warp per SM streams every product's weight
stages (256 K x 64 rows of int8, TMA) into a shared-memory ring without waiting for any activation, the consumer
warps take the SM's tasks (row block x split of K) with int8 tensor-core products, and add their split sums by
fire-and-forget fp32 atomics. What the chain did not have, the step's other ops, lives in the phases between the
products (counters per phase, one release arrival per program, polled; `phase` below is the counter's index):

  per layer l (c = 5 l):
    c     q|k|v product (9600 x 3200): input RMSNorm(h) * attn_norm, formed by every program while quantizing it
    c + 1 attention (H x SA programs: head, key split): RoPE of q and k from the fp32 q|k|v sums, the new k, v row
          into the bf16 cache (split 0), the online softmax over its key blocks; partial (acc, m, l) per split
    c + 2 output product (3200 x 3200): input the heads' combined partials; adds into h (the residual)
    c + 3 gate|up product (17280 x 3200): input RMSNorm(h) * ffn_norm
    c + 4 down product (3200 x 8640): input silu(gate) * up; adds into h
  5 L   output product (32000 x 3200): input RMSNorm(h) * output_norm, into the logits

h (fp32, the residual stream) starts as the token's embedding row; the q|k|v and gate|up sums (per layer regions)
and the logits must be zero before the launch (they are sums of atomics). Quantization: quant.quantize_act_q8_0
(round half to even of x * (127 / amax), scale fp16(amax / 127)). Lab limits: H == Hkv, one token, E, F, V as given
by the weights (K multiples of 256 or zero-padded by the TMA boxes), n_ctx * D rows of the cache per head.
"""

from __future__ import annotations

import torch
from persistent_ws import _wait_product
from persistent_ws_i8 import GK, SYNC_STRIDE, XMAX, _produce, _tasks
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

BLOCK_D: gl.constexpr = gl.constexpr(128)  # a head's values in registers (D <= 128)


@gluon.jit
def _rint(v):
    return gl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=f,f", [v], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _put_q8(x, c, xq_s, dx_s, ROWS: gl.constexpr):
    """Chunk c of the input ([ROWS, 32] fp32, zeros past K) quantized as quant.quantize_act_q8_0 into xq_s / dx_s."""
    amax = gl.max(gl.abs(x), axis=1)
    inv = gl.where(amax > 0.0, gl.div_rn(gl.full_like(amax, 127.0), amax), gl.zeros_like(amax))
    q = _rint(x * gl.expand_dims(inv, 1)).to(gl.int8)
    xq_s.slice(c * ROWS, ROWS).store(q)
    dx_s.slice(c * ROWS, ROWS).store(gl.div_rn(amax, gl.full_like(amax, 127.0)).to(gl.float16).to(gl.float32))


@gluon.jit
def _chunk_offsets(c, ROWS: gl.constexpr, XB: gl.constexpr):
    blk = c * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, XB))
    return gl.expand_dims(blk * 32, 1) + gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, XB)), 0)


@gluon.jit
def _quantize_norm(h_ptr, g_ptr, eps, xq_s, dx_s, K: gl.constexpr, num_warps: gl.constexpr):
    """RMSNorm(h[:K]) * g, quantized: h * (1 / sqrt(mean(h^2) + eps)) * g in fp32 (h read past L1: other SMs add
    into it)."""
    XB: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])
    ROWS: gl.constexpr = 8 * num_warps * 4  # blocks per chunk
    CH: gl.constexpr = (K + ROWS * 32 - 1) // (ROWS * 32)
    if CH == 1:  # the row in registers: one read of h
        offs = _chunk_offsets(0, ROWS, XB)
        x = gl.load(h_ptr + offs, mask=offs < K, other=0.0, cache_modifier=".cg")
        r = 1.0 / gl.sqrt_rn(gl.sum(gl.sum(x * x, axis=1), axis=0) / K + eps)
        _put_q8(x * r * gl.load(g_ptr + offs, mask=offs < K, other=0.0), 0, xq_s, dx_s, ROWS)
        return
    ss = 0.0
    for c in gl.static_range(CH):
        offs = _chunk_offsets(c, ROWS, XB)
        x = gl.load(h_ptr + offs, mask=offs < K, other=0.0, cache_modifier=".cg")
        ss += gl.sum(gl.sum(x * x, axis=1), axis=0)
    r = 1.0 / gl.sqrt_rn(ss / K + eps)
    for c in gl.static_range(CH):
        offs = _chunk_offsets(c, ROWS, XB)
        x = gl.load(h_ptr + offs, mask=offs < K, other=0.0, cache_modifier=".cg")
        g = gl.load(g_ptr + offs, mask=offs < K, other=0.0)
        _put_q8(x * r * g, c, xq_s, dx_s, ROWS)


@gluon.jit
def _quantize_swiglu(gu_ptr, xq_s, dx_s, K: gl.constexpr, num_warps: gl.constexpr):
    """silu(gate) * up of the packed [gate | up] sums (K each), quantized."""
    XB: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])
    ROWS: gl.constexpr = 8 * num_warps * 4
    for c in gl.static_range((K + ROWS * 32 - 1) // (ROWS * 32)):
        offs = _chunk_offsets(c, ROWS, XB)
        g = gl.load(gu_ptr + offs, mask=offs < K, other=0.0, cache_modifier=".cg")
        u = gl.load(gu_ptr + K + offs, mask=offs < K, other=0.0, cache_modifier=".cg")
        _put_q8(g / (1.0 + gl.exp(-g)) * u, c, xq_s, dx_s, ROWS)


@gluon.jit
def _quantize_row(x_ptr, xq_s, dx_s, K: gl.constexpr, num_warps: gl.constexpr):
    """x_ptr[:K] (fp32, read past L1), quantized."""
    XB: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])
    ROWS: gl.constexpr = 8 * num_warps * 4
    for c in gl.static_range((K + ROWS * 32 - 1) // (ROWS * 32)):
        offs = _chunk_offsets(c, ROWS, XB)
        _put_q8(gl.load(x_ptr + offs, mask=offs < K, other=0.0, cache_modifier=".cg"), c, xq_s, dx_s, ROWS)


@gluon.jit
def _rope(src, d, md, c, sn):
    """One head at src (fp32, read past L1), its pairs (x[2i], x[2i + 1]) turned by (c, sn)[i] (ggml RoPE mode 0),
    element by element: even d: x c - x' s, odd d: x' s + x c, x' the pair's other value."""
    x = gl.load(src + d, mask=md, other=0.0, cache_modifier=".cg")
    xp = gl.load(src + (d ^ 1), mask=md, other=0.0, cache_modifier=".cg")
    return gl.where(d % 2 == 0, x * c - xp * sn, xp * sn + x * c)


@gluon.jit
def _attention(qkv_ptr, ws_ptr, cnt_ptr, attn_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos, n_ctx, qk_scale, hd, s,
               H: gl.constexpr, D: gl.constexpr, SA: gl.constexpr, BLOCK_T: gl.constexpr,
               num_warps: gl.constexpr):  # fmt: skip
    """Head hd, key split s (key blocks s, s + SA, ... of BLOCK_T keys among 0..pos): q and the new k rotated, the
    new k and v rounded to the cache's bf16 (split 0 writes them to row pos; the row's key comes from registers),
    scores q.k * qk_scale (log2 units), online softmax; the partial (acc[D], m, l) into ws[hd, s], then a ticket from
    the head's counter (acq_rel): the head's last split combines the partials (o = sum_s 2^(m_s - m) acc_s /
    sum_s 2^(m_s - m) l_s) into attn[hd * D:][:D] and resets the counter. Returns whether this program wrote the
    head's output."""
    AL: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [num_warps, 1], [1, 0])
    d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, AL))
    md = d < D
    c = gl.load(cos_ptr + pos * (D // 2) + d // 2, mask=md, other=0.0)
    sn = gl.load(sin_ptr + pos * (D // 2) + d // 2, mask=md, other=0.0)
    q = _rope(qkv_ptr + hd * D, d, md, c, sn)
    k_new = _rope(qkv_ptr + (H + hd) * D, d, md, c, sn).to(gl.bfloat16)
    v_new = gl.load(qkv_ptr + (2 * H + hd) * D + d, mask=md, other=0.0, cache_modifier=".cg").to(gl.bfloat16)
    head = hd.to(gl.int64) * n_ctx * D
    if s == 0:
        gl.store(kc_ptr + head + pos * D + d, k_new, mask=md)
        gl.store(vc_ptr + head + pos * D + d, v_new, mask=md)
    kn = gl.expand_dims(k_new.to(gl.float32), 0)
    vn = gl.expand_dims(v_new.to(gl.float32), 0)
    qe = gl.expand_dims(q, 0)
    n = pos + 1
    m_i = gl.max(gl.full_like(q, float("-inf")), axis=0)
    l_i = gl.sum(gl.zeros_like(q), axis=0)
    acc = gl.zeros_like(q)
    for t0 in range(s * BLOCK_T, n, SA * BLOCK_T):
        t = t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, AL))
        mt = gl.expand_dims(t < n, 1)
        tile = mt & gl.expand_dims(md, 0)
        rows = head + gl.expand_dims(t * D, 1) + gl.expand_dims(d, 0)
        new = gl.expand_dims(t == pos, 1)
        kt = gl.where(new, kn, gl.load(kc_ptr + rows, mask=tile, other=0.0).to(gl.float32))
        vt = gl.where(new, vn, gl.load(vc_ptr + rows, mask=tile, other=0.0).to(gl.float32))
        sc = gl.where(t < n, gl.sum(kt * qe, axis=1) * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(sc, axis=0))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(sc - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=0)
        acc = acc * alpha + gl.sum(gl.expand_dims(p, 1) * vt, axis=0)
        m_i = m_new
    if SA == 1:
        gl.store(attn_ptr + hd * D + d, gl.div_rn(acc, l_i + gl.zeros_like(acc)), mask=md)
        return True
    row = ws_ptr + (hd * SA + s) * (D + 2)
    gl.store(row + d, acc, mask=md)
    gl.store(row + D + d, gl.where(d == 0, m_i, l_i) + gl.zeros_like(acc), mask=d < 2)
    gl.thread_barrier()  # every thread's partial stores precede the ticket (the atomic's release)
    last = gl.atomic_add(cnt_ptr + hd, 1, sem="acq_rel", scope="gpu") == SA - 1
    if last:  # the head's last split combines the SA partials (a fixed order, whichever split comes last)
        sp = gl.arange(0, SA, layout=gl.SliceLayout(1, AL))
        rows = ws_ptr + (hd * SA + gl.expand_dims(sp, 1)) * (D + 2)
        m_s = gl.load(ws_ptr + (hd * SA + sp) * (D + 2) + D, cache_modifier=".cg")
        l_s = gl.load(ws_ptr + (hd * SA + sp) * (D + 2) + D + 1, cache_modifier=".cg")
        a_s = gl.load(rows + gl.expand_dims(d, 0), mask=gl.expand_dims(md, 0), other=0.0, cache_modifier=".cg")
        w = gl.exp2(m_s - gl.max(m_s, axis=0))  # 0 for an empty split (m = -inf)
        o = gl.sum(a_s * gl.expand_dims(w, 1), axis=0)
        gl.store(attn_ptr + hd * D + d, gl.div_rn(o, gl.sum(l_s * w, axis=0) + gl.zeros_like(o)), mask=md)
        gl.atomic_xchg(cnt_ptr + hd, 0, sem="relaxed", scope="gpu")  # ready for the next layer
    return last


@gluon.jit
def _prefetch_kv(kc_ptr, vc_ptr, pos, n_ctx, hd, s, D: gl.constexpr, SA: gl.constexpr, BLOCK_T: gl.constexpr,
                 num_warps: gl.constexpr):  # fmt: skip
    """Ask L2 for the cache rows 0..pos - 1 of head hd's key split s (k and v): they do not depend on this token,
    so their HBM latency can pass while the q|k|v product finishes. One prefetch per 96 bytes of a row (every 128-byte
    line a row of D bf16 touches)."""
    PL: gl.constexpr = gl.BlockedLayout([1, 1], [8, 4], [num_warps, 1], [1, 0])
    part = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, PL)) * 48, 0)
    head = hd.to(gl.int64) * n_ctx * D
    for t0 in range(s * BLOCK_T, pos, SA * BLOCK_T):
        t = gl.expand_dims(t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, PL)), 1)
        ok = (t < pos) & (part < D)
        off = head + t * D + gl.minimum(part, D - 1)
        for base in gl.static_range(2):
            ptr = (kc_ptr if base == 0 else vc_ptr) + off
            gl.inline_asm_elementwise("@$2 prefetch.global.L2 [$1];\n    mov.u32 $0, 0;", "=r,l,b", [ptr, ok],
                                      dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _stamp(trace_ptr, pid, k, TRACE: gl.constexpr):
    """TRACE: the global timer (ns) at event k of program pid into trace_ptr[pid, k] (int64 [P, 12 L + 2])."""
    if TRACE:
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=gl.int64, is_pure=False,
                                      pack=1)  # fmt: skip
        gl.store(trace_ptr + k, t)


@gluon.jit
def _arrive(sync_ptr, phase):
    gl.thread_barrier()  # every consumer warp's stores / additions precede the arrival
    gl.atomic_add(sync_ptr + phase * SYNC_STRIDE, 1, sem="release", scope="gpu")


@gluon.jit
def _ld_acquire(ptr):
    return gl.inline_asm_elementwise("ld.acquire.gpu.global.u32 $0, [$1];", "=r,l", [ptr], dtype=gl.int32,
                                     is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _wait(sync_ptr, phase, count, PROBE: gl.constexpr = 0, ACQ: gl.constexpr = False):
    """Until `count` arrivals at `phase` (acquire); then every consumer warp may read what they published. ACQ: poll
    with acquire loads (no acquire atomic after the polls: one round trip less). Probe 4: no waits (wrong numbers:
    what the waits cost)."""
    if (PROBE // 4) % 2 == 0:
        if ACQ:
            ptr = sync_ptr + phase * SYNC_STRIDE
            n = _ld_acquire(ptr)
            spins = 0
            while (n < count) & (spins < 1 << 20):  # a lab guard: a broken barrier gives wrong numbers, not a hang
                n = _ld_acquire(ptr)
                spins += 1
        else:
            _wait_product(sync_ptr + phase * SYNC_STRIDE, 1, count)
    gl.thread_barrier()


@gluon.jit
def _mega_consumer(h_ptr, y32_ptr, logits_ptr, ws_ptr, cnt_ptr, attn_ptr, cache_ptr, cos_ptr, sin_ptr, pos_ptr, g_ptr,
                   xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, L, n_ctx, eps, qk_scale, S: gl.constexpr,
                   E: gl.constexpr, F: gl.constexpr, V: gl.constexpr, H: gl.constexpr, D: gl.constexpr,
                   SA: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, ROT: gl.constexpr,
                   PFKV: gl.constexpr, PROBE: gl.constexpr, trace_ptr, TRACE: gl.constexpr, ACQ: gl.constexpr,
                   SMJ: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    pos = gl.load(pos_ptr)
    tr = trace_ptr + pid * (12 * L + 2)
    TP: gl.constexpr = 1 if (PROBE // 8) % 2 == 1 else 0  # probe 8: the tasks without their arithmetic
    NQ: gl.constexpr = 3 * E
    RSL: gl.constexpr = 3 * E + 2 * F  # a layer's fp32 region: q|k|v sums, then gate|up sums
    it = 0
    for layer in range(L):
        c = layer * 5
        y_l = y32_ptr + layer.to(gl.int64) * RSL
        if layer > 0:
            _wait(sync_ptr, c - 1, P, PROBE, ACQ)
        _stamp(tr, pid, 12 * layer, TRACE)
        _quantize_norm(h_ptr, g_ptr + (2 * layer) * E, eps, xq_s, dx_s, E, num_warps)
        gl.thread_barrier()
        it = _tasks(y_l, xq_s, dx_s, q_s, d_s, full, empty, it, (pid + c * ROT) % P, P, NQ, E, S[0], BLOCK_N, TP,
                    False, num_warps, SMJ)  # fmt: skip
        _stamp(tr, pid, 12 * layer + 1, TRACE)
        _arrive(sync_ptr, c)
        _stamp(tr, pid, 12 * layer + 10, TRACE)
        if pid < H * SA:
            kc = cache_ptr + (layer * 2 * H).to(gl.int64) * n_ctx * D
            if PFKV:
                _prefetch_kv(kc, kc + H * n_ctx * D, pos, n_ctx, pid // SA, pid % SA, D, SA, BLOCK_T, num_warps)
                _stamp(tr, pid, 12 * layer + 11, TRACE)
            _wait(sync_ptr, c, P, PROBE, ACQ)
            _stamp(tr, pid, 12 * layer + 2, TRACE)
            if PROBE % 2 == 0:  # probe 1: no attention (wrong numbers)
                if _attention(y_l, ws_ptr, cnt_ptr, attn_ptr, kc, kc + H * n_ctx * D, cos_ptr, sin_ptr, pos, n_ctx,
                              qk_scale, pid // SA, pid % SA, H, D, SA, BLOCK_T, num_warps):  # fmt: skip
                    _stamp(tr, pid, 12 * layer + 3, TRACE)
                    _arrive(sync_ptr, c + 1)
            elif pid % SA == 0:
                _arrive(sync_ptr, c + 1)
        _wait(sync_ptr, c + 1, H, PROBE, ACQ)  # every head's output written
        _stamp(tr, pid, 12 * layer + 4, TRACE)
        _quantize_row(attn_ptr, xq_s, dx_s, E, num_warps)
        gl.thread_barrier()
        it = _tasks(h_ptr, xq_s, dx_s, q_s, d_s, full, empty, it, (pid + (c + 2) * ROT) % P, P, E, E, S[1], BLOCK_N,
                    TP, True, num_warps, SMJ)  # fmt: skip
        _stamp(tr, pid, 12 * layer + 5, TRACE)
        _arrive(sync_ptr, c + 2)
        _wait(sync_ptr, c + 2, P, PROBE, ACQ)
        _stamp(tr, pid, 12 * layer + 6, TRACE)
        _quantize_norm(h_ptr, g_ptr + (2 * layer + 1) * E, eps, xq_s, dx_s, E, num_warps)
        gl.thread_barrier()
        it = _tasks(y_l + NQ, xq_s, dx_s, q_s, d_s, full, empty, it, (pid + (c + 3) * ROT) % P, P, 2 * F, E, S[2],
                    BLOCK_N, TP, False, num_warps, SMJ)  # fmt: skip
        _stamp(tr, pid, 12 * layer + 7, TRACE)
        _arrive(sync_ptr, c + 3)
        _wait(sync_ptr, c + 3, P, PROBE, ACQ)
        _stamp(tr, pid, 12 * layer + 8, TRACE)
        _quantize_swiglu(y_l + NQ, xq_s, dx_s, F, num_warps)
        gl.thread_barrier()
        it = _tasks(h_ptr, xq_s, dx_s, q_s, d_s, full, empty, it, (pid + (c + 4) * ROT) % P, P, E, F, S[3], BLOCK_N,
                    TP, True, num_warps, SMJ)  # fmt: skip
        _stamp(tr, pid, 12 * layer + 9, TRACE)
        _arrive(sync_ptr, c + 4)
    _wait(sync_ptr, 5 * L - 1, P, PROBE, ACQ)
    _stamp(tr, pid, 12 * L, TRACE)
    _quantize_norm(h_ptr, g_ptr + (2 * L) * E, eps, xq_s, dx_s, E, num_warps)
    gl.thread_barrier()
    _tasks(logits_ptr, xq_s, dx_s, q_s, d_s, full, empty, it, (pid + 5 * L * ROT) % P, P, V, E, S[4], BLOCK_N, TP,
           False, num_warps, SMJ)  # fmt: skip
    _stamp(tr, pid, 12 * L + 1, TRACE)
    # the last program out zeroes the phase counters for the next launch (every program has passed every wait)
    gl.thread_barrier()
    if gl.atomic_add(sync_ptr + 5 * L * SYNC_STRIDE, 1, sem="acq_rel", scope="gpu") == P - 1:
        offs = gl.arange(0, 1024, layout=gl.BlockedLayout([8], [32], [num_warps], [0]))
        gl.store(sync_ptr + offs * SYNC_STRIDE, gl.zeros_like(offs), mask=offs <= 5 * L)


@gluon.jit
def _mega_producer(q0, q1, q2, q3, q4, qt0, qt1, qt2, qt3, qt4, d0, d1, d2, d3, d4, q_s, d_s, full, empty, L,
                   S: gl.constexpr, E: gl.constexpr, F: gl.constexpr, V: gl.constexpr, ROT: gl.constexpr,
                   TILED: gl.constexpr, DPACK: gl.constexpr, SMJ: gl.constexpr):  # fmt: skip
    """pid's tasks of every product in the consumers' order (the attention phases take no weights)."""
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    it = 0
    for layer in range(L):
        c = layer * 5
        it = _produce(q0, qt0, d0, q_s, d_s, full, empty, layer, it, (pid + c * ROT) % P, P, 3 * E, E, S[0], TILED,
                      DPACK, SMJ)  # fmt: skip
        it = _produce(q1, qt1, d1, q_s, d_s, full, empty, layer, it, (pid + (c + 2) * ROT) % P, P, E, E, S[1], TILED,
                      DPACK, SMJ)  # fmt: skip
        it = _produce(q2, qt2, d2, q_s, d_s, full, empty, layer, it, (pid + (c + 3) * ROT) % P, P, 2 * F, E, S[2],
                      TILED, DPACK, SMJ)  # fmt: skip
        it = _produce(q3, qt3, d3, q_s, d_s, full, empty, layer, it, (pid + (c + 4) * ROT) % P, P, E, F, S[3], TILED,
                      DPACK, SMJ)  # fmt: skip
    _produce(q4, qt4, d4, q_s, d_s, full, empty, 0, it, (pid + 5 * L * ROT) % P, P, V, E, S[4], TILED, DPACK, SMJ)


@gluon.jit
def _mega_kernel(h_ptr, y32_ptr, logits_ptr, ws_ptr, cnt_ptr, attn_ptr, cache_ptr, cos_ptr, sin_ptr, pos_ptr, g_ptr,
                 q0, q1, q2, q3, q4, qt0, qt1, qt2, qt3, qt4, d0, d1, d2, d3, d4, sync_ptr, L, n_ctx, eps, qk_scale,
                 S: gl.constexpr, E: gl.constexpr, F: gl.constexpr, V: gl.constexpr, H: gl.constexpr,
                 D: gl.constexpr, SA: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr,
                 PRODUCER_REGS: gl.constexpr, TILED: gl.constexpr, DPACK: gl.constexpr, ROT: gl.constexpr,
                 PFKV: gl.constexpr, PROBE: gl.constexpr, trace_ptr, TRACE: gl.constexpr, ACQ: gl.constexpr,
                 SMJ: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    BLOCK_N: gl.constexpr = qt0.block_type.shape[0]
    gl.static_assert(BLOCK_N == 16 * num_warps, "16 rows of W per consumer warp")
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
    # fmt: off
    gl.warp_specialize(
        [
            (_mega_consumer, (h_ptr, y32_ptr, logits_ptr, ws_ptr, cnt_ptr, attn_ptr, cache_ptr, cos_ptr, sin_ptr,
                              pos_ptr, g_ptr, xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, L, n_ctx, eps, qk_scale, S,
                              E, F, V, H, D, SA, BLOCK_T, BLOCK_N, ROT, PFKV, PROBE, trace_ptr, TRACE,
                              ACQ, SMJ, num_warps)),
            (_mega_producer, (q0, q1, q2, q3, q4, qt0, qt1, qt2, qt3, qt4, d0, d1, d2, d3, d4, q_s, d_s, full, empty,
                              L, S, E, F, V, ROT, TILED, DPACK, SMJ)),
        ],
        [1],
        [PRODUCER_REGS],
    )
    # fmt: on


def descriptors(ws_prep, cfg: dict):
    """TMA descriptors (stage boxes, tile boxes, scale boxes) of prepared weights (persistent_ws_i8.prepare)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    bn, bkb = 16 * cfg["warps"], cfg.get("BKB", 128)
    qlay = gl.NVMMASharedLayout.get_default_for([bn, bkb], gl.int8)
    flat16 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    dbox = [bn * 8 // 256, 256] if cfg.get("DPACK") else [bn, 8]
    qt = [TensorDescriptor.from_tensor(q, [bn, bkb], qlay) for q, _ in ws_prep]
    qd = [TensorDescriptor.from_tensor(q, [bn * 256 // bkb, bkb], qlay) for q, _ in ws_prep] if cfg.get("TILED") else qt
    dd = [TensorDescriptor.from_tensor(d, dbox, flat16) for _, d in ws_prep]
    return qd, qt, dd


def mega_step(bufs: dict, descs, cfg: dict, dims: dict, n_sm: int) -> None:
    """One launch: bufs h (the embedding row, fp32 [E]), y32 ([L, 3E + 2F] zeros), logits ([V] zeros), ws
    ([H, SA, D + 2]), cnt (int32 [H] zeros; left zero), attn (fp32 [E]), cache (bf16 [L, 2H, n_ctx, D]), cos / sin
    ([n_ctx, D / 2]), pos (int32 [1]), gains ([2L + 1, E]: attn_norm, ffn_norm per layer, output_norm), sync (int32
    zeros, >= (5L + 1) * 32); with trace (int64 [P, 12 L + 2]) the consumers' event times (_stamp)."""
    qd, qt, dd = descs
    L, H, D = dims["L"], dims["H"], dims["D"]
    _mega_kernel[(n_sm,)](
        bufs["h"], bufs["y32"], bufs["logits"], bufs["ws"], bufs["cnt"], bufs["attn"], bufs["cache"], bufs["cos"],
        bufs["sin"], bufs["pos"], bufs["gains"], *qd, *qt, *dd, bufs["sync"], L, bufs["cache"].shape[2], dims["eps"],
        1.4426950408889634 / D**0.5, S=tuple(cfg["S"]), E=dims["E"], F=dims["F"], V=dims["V"], H=H, D=D, SA=cfg["SA"],
        BLOCK_T=cfg["BLOCK_T"], STAGES=cfg["STAGES"], PRODUCER_REGS=cfg.get("regs", 48), TILED=bool(cfg.get("TILED")),
        DPACK=bool(cfg.get("DPACK")), ROT=cfg.get("ROT", 0), PFKV=bool(cfg.get("PFKV")), PROBE=cfg.get("probe", 0),
        trace_ptr=bufs.get("trace", bufs["sync"]), TRACE="trace" in bufs, ACQ=bool(cfg.get("ACQ")),
        SMJ=bool(cfg.get("SPLIT_MAJOR")), num_warps=cfg["warps"],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the same step on the host's terms (float64 on the device), for the lab's checks
# --------------------------------------------------------------------------------------------------


def q8_act_product(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """y = W x with x quantized as quant.quantize_act_q8_0 (from x rounded to fp32), integer block sums, float64."""
    from lorakit.quant import quantize_act_q8_0

    k = x.numel()
    xq, dx = quantize_act_q8_0(x.float().view(1, k))
    isum = (qs.view(qs.shape[0], k // 32, 32).double() * xq.view(k // 32, 32).double()[None]).sum(-1)
    return (isum * d.double() * dx.double().view(1, -1)).sum(-1)


def reference_step(ws, gains, cache, cos, sin, h0, pos: int, dims: dict):
    """The megakernel's step in float64 (weights ws: [(qs, d)] per kind, layers stacked): returns (logits, the first
    layer's q|k|v sums, h after the first layer); writes the new k, v rows (bf16) into `cache` as the kernel does."""
    L, E, F, H, D, eps = dims["L"], dims["E"], dims["F"], dims["H"], dims["D"], dims["eps"]

    def norm(h, g):
        return h / torch.sqrt((h * h).mean() + eps) * g.double()

    def w(kind, layer):
        qs, d = ws[kind]
        n = (3 * E, E, 2 * F, E, qs.shape[0])[kind]  # rows per layer (ws may hold more layers than L)
        return qs[layer * n : (layer + 1) * n], d[layer * n : (layer + 1) * n]

    h = h0.double()
    c, s = cos[pos].double().repeat_interleave(2), sin[pos].double().repeat_interleave(2)
    first = {}
    for layer in range(L):
        qkv = q8_act_product(norm(h, gains[2 * layer]), *w(0, layer))
        x = qkv.view(3 * H, D)
        even = x[:, 0::2].repeat_interleave(2, dim=1)
        odd = x[:, 1::2].repeat_interleave(2, dim=1)
        sign = torch.tensor([-1.0, 1.0], dtype=torch.float64, device=x.device).repeat(D // 2)
        rot = torch.where(sign < 0, even * c - odd * s, even * s + odd * c)
        q, k_new, v_new = rot[:H], rot[H : 2 * H], x[2 * H :]
        kc, vc = cache[layer, :H], cache[layer, H:]
        kc[:, pos] = k_new.to(torch.bfloat16)
        vc[:, pos] = v_new.to(torch.bfloat16)
        sc = torch.einsum("hd,htd->ht", q, kc[:, : pos + 1].double()) / D**0.5
        att = torch.einsum("ht,htd->hd", torch.softmax(sc, dim=-1), vc[:, : pos + 1].double()).reshape(E)
        h = h + q8_act_product(att, *w(1, layer))
        gu = q8_act_product(norm(h, gains[2 * layer + 1]), *w(2, layer))
        g, u = gu[:F], gu[F:]
        h = h + q8_act_product(g * torch.sigmoid(g) * u, *w(3, layer))
        if layer == 0:
            first = {"qkv": qkv, "h": h.clone()}
    return q8_act_product(norm(h, gains[2 * L]), *w(4, 0)), first
