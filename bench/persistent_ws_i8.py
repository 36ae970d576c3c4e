"""The warp-specialized persistent chain of decode q8_0 products (bench/persistent_ws.py) with llama.cpp's arithmetic:
activations quantized to q8_0 and integer tensor-core products, for bench/persistent_lab.py (`--which i8`).

Why: session 15's chain kept HBM streaming across product boundaries (a producer warp fills a ring of weight tiles
without waiting for any activation) but its consumers could not keep up: dequantizing a weight costs them ~4.6
instructions per element, and eight consumer warps per SM do not issue that at HBM speed. llama.cpp does not
dequantize weights for a q8_0 product at all: it quantizes the activation row to q8_0 (blocks of 32, scale amax / 127
stored as fp16, q = round(x / scale)) and sums integer products per block (CPU: vec_dot_q8_0_q8_0; CUDA: mmvq on
q8_1). Here the consumers do the same on the tensor cores, per stage of 256 K (four TMA boxes of [BLOCK_N, 64] int8):
one int8 mma (m16n8k32, K = 64 per box) per box, with x's two 32-blocks of box c in columns 2c and 2c + 1 of the
B operand (zeros elsewhere), so that after the four boxes column j holds block j's integer sum for every row
(exact in int32); then y += sum_j float(isum_j) * dw[row, j] * dx[j], the row scales coming as one [BLOCK_N, 8]
fp16 TMA box per stage (the scales stored padded to whole stages of 8 blocks, zeros past K).

Per element of W this is ~1/4 instruction per consumer thread instead of ~4.6. The numbers are llama.cpp's (up to
the order of the fp32 sums), not lorakit's float path: activation quantization adds ~0.6% relative noise per
product (tests/test_llamacpp_reference.py measures what it does to logits).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from lorakit.kernels.decode_mega import (
    SYNC_STRIDE,
    _produce,
    _ring,
    _tasks,
    _wait_product,
    pack_d,
    pad_scales,
    tile_q,
)

RS: gl.constexpr = gl.constexpr(17280)  # y32's region stride: region 0 the chain's input, region j + 1 product j's


@gluon.jit
def _producer(q0, q1, q2, q3, qt0, qt1, qt2, qt3, d0, d1, d2, d3, q_s, d_s, full, empty, L, S0: gl.constexpr,
              S1: gl.constexpr, S2: gl.constexpr, S3: gl.constexpr, TILED: gl.constexpr, DPACK: gl.constexpr,
              ROT: gl.constexpr):  # fmt: skip
    """pid's tasks of every product; with ROT, product j's tasks go round robin from program (pid + j ROT) % P, so
    that the programs that take one task more than others differ from product to product."""
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    it = 0
    for layer in range(L):
        j = layer * 4
        it = _produce(q0, qt0, d0, q_s, d_s, full, empty, layer, it, (pid + j * ROT) % P, P, 9600, 3200, S0, TILED,
                      DPACK)  # fmt: skip
        it = _produce(q1, qt1, d1, q_s, d_s, full, empty, layer, it, (pid + (j + 1) * ROT) % P, P, 3200, 3200, S1,
                      TILED, DPACK)  # fmt: skip
        it = _produce(q2, qt2, d2, q_s, d_s, full, empty, layer, it, (pid + (j + 2) * ROT) % P, P, 17280, 3200, S2,
                      TILED, DPACK)  # fmt: skip
        it = _produce(q3, qt3, d3, q_s, d_s, full, empty, layer, it, (pid + (j + 3) * ROT) % P, P, 3200, 8640, S3,
                      TILED, DPACK)  # fmt: skip


@gluon.jit
def _quantize_x(x_ptr, xq_s, dx_s, K: gl.constexpr, num_warps: gl.constexpr):
    """x = x_ptr[:K] (fp32) as q8_0 blocks, llama.cpp's quantize_row_q8_0: scale d = amax / 127, q = round(x / d)
    half away from zero (x * (1 / d), IEEE divisions), the scale kept as fp16; into xq_s (int8 [XMAX / 32, 32]) and
    dx_s (fp32 [XMAX / 32]); blocks past K are zeros."""
    XB: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])
    ROWS: gl.constexpr = 8 * num_warps * 4  # blocks per chunk
    for c in gl.static_range((K + ROWS * 32 - 1) // (ROWS * 32)):
        blk = c * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, XB))
        offs = gl.expand_dims(blk * 32, 1) + gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, XB)), 0)
        x = gl.load(x_ptr + offs, mask=offs < K, other=0.0, cache_modifier=".cg")
        d = gl.div_rn(gl.max(gl.abs(x), axis=1), gl.full_like(x, 127.0, shape=[ROWS], layout=gl.SliceLayout(1, XB)))
        inv = gl.where(d > 0.0, gl.div_rn(gl.full_like(d, 1.0), d), gl.zeros_like(d))
        v = x * gl.expand_dims(inv, 1)
        r = gl.floor(gl.abs(v) + 0.5)
        q = gl.where(v < 0.0, -r, r).to(gl.int8)
        xq_s.slice(c * ROWS, ROWS).store(q)
        dx_s.slice(c * ROWS, ROWS).store(d.to(gl.float16).to(gl.float32))


@gluon.jit
def _consume(y32_ptr, xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, j, it, pid, P, N: gl.constexpr, K: gl.constexpr,
             S: gl.constexpr, BLOCK_N: gl.constexpr, PROBE: gl.constexpr, ROT: gl.constexpr, BACKOFF: gl.constexpr,
             num_warps: gl.constexpr):  # fmt: skip
    """The consumers' share of product j: region j + 1 of y32 (fp32, zeros before) += region j[:K] @ W.T, with q8_0
    activations. A task adds its split's sums atomically (fire and forget: no round trip per task; the order of a
    row's S additions varies, so the fp32 sums may differ in the last bit between runs)."""
    if PROBE < 2:  # probes 2, 3: no waiting for the previous product (wrong numbers: what the waits cost)
        _wait_product(sync_ptr, j, P, SYNC_STRIDE, BACKOFF)  # each counter on a 128-byte line of its own
    gl.thread_barrier()  # every consumer warp is done with the previous product's x
    _quantize_x(y32_ptr + j.to(gl.int64) * RS, xq_s, dx_s, K, num_warps)
    gl.thread_barrier()

    y_ptr = y32_ptr + (j + 1).to(gl.int64) * RS
    it = _tasks(y_ptr, xq_s, dx_s, q_s, d_s, full, empty, it, (pid + j * ROT) % P, P, N, K, S, BLOCK_N, PROBE, False,
                num_warps)  # fmt: skip
    gl.thread_barrier()  # every consumer warp's additions precede the arrival
    gl.atomic_add(sync_ptr + j * SYNC_STRIDE, 1, sem="release", scope="gpu")
    return it


@gluon.jit
def _consumer(y32_ptr, xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, L, S0: gl.constexpr, S1: gl.constexpr,
              S2: gl.constexpr, S3: gl.constexpr, BLOCK_N: gl.constexpr, PROBE: gl.constexpr, ROT: gl.constexpr,
              BACKOFF: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    it = 0
    for layer in range(L):
        j = layer * 4
        it = _consume(y32_ptr, xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, j, it, pid, P, 9600, 3200, S0, BLOCK_N,
                      PROBE, ROT, BACKOFF, num_warps)  # fmt: skip
        it = _consume(y32_ptr, xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, j + 1, it, pid, P, 3200, 3200, S1,
                      BLOCK_N, PROBE, ROT, BACKOFF, num_warps)  # fmt: skip
        it = _consume(y32_ptr, xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, j + 2, it, pid, P, 17280, 3200, S2,
                      BLOCK_N, PROBE, ROT, BACKOFF, num_warps)  # fmt: skip
        it = _consume(y32_ptr, xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, j + 3, it, pid, P, 3200, 8640, S3,
                      BLOCK_N, PROBE, ROT, BACKOFF, num_warps)  # fmt: skip
    # the last program out zeroes the product counters for the next launch (every program has passed every wait)
    if gl.atomic_add(sync_ptr + 4 * L * SYNC_STRIDE, 1, sem="acq_rel", scope="gpu") == P - 1:
        offs = gl.arange(0, 128, layout=gl.BlockedLayout([4], [32], [num_warps], [0]))
        gl.store(sync_ptr + offs * SYNC_STRIDE, gl.zeros_like(offs), mask=offs <= 4 * L)


@gluon.jit
def _chain_i8_kernel(y32_ptr, q0, q1, q2, q3, qt0, qt1, qt2, qt3, d0, d1, d2, d3, sync_ptr, L, S0: gl.constexpr,
                     S1: gl.constexpr, S2: gl.constexpr, S3: gl.constexpr, STAGES: gl.constexpr,
                     PRODUCER_REGS: gl.constexpr, PROBE: gl.constexpr, TILED: gl.constexpr, DPACK: gl.constexpr,
                     ROT: gl.constexpr, BACKOFF: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    BLOCK_N: gl.constexpr = qt0.block_type.shape[0]
    gl.static_assert(BLOCK_N == 16 * num_warps, "16 rows of W per consumer warp")
    q_s, d_s, xq_s, dx_s, full, empty = _ring(q0, qt0, d0, STAGES, num_warps)
    # fmt: off
    gl.warp_specialize(
        [
            (_consumer, (y32_ptr, xq_s, dx_s, q_s, d_s, full, empty, sync_ptr, L, S0, S1, S2, S3, BLOCK_N, PROBE,
                         ROT, BACKOFF, num_warps)),
            (_producer, (q0, q1, q2, q3, qt0, qt1, qt2, qt3, d0, d1, d2, d3, q_s, d_s, full, empty, L, S0, S1, S2, S3,
                          TILED, DPACK, ROT)),
        ],
        [1],
        [PRODUCER_REGS],
    )
    # fmt: on


def prepare(ws, shapes, cfg: dict):
    """The weights in the layout cfg asks for: [(q, d)] per product kind ((N, K) in shapes; see tile_q, pack_d,
    pad_scales)."""
    bn, bkb = 16 * cfg["warps"], cfg.get("BKB", 64)
    out = []
    for (qs, d), (n, _) in zip(ws, shapes, strict=True):
        q = tile_q(qs, n, bn, bkb) if cfg.get("TILED") else qs
        out.append((q, pack_d(d, n, bn) if cfg.get("DPACK") else pad_scales(d)))
    return out


def chain_i8(ws_prep, y32, sync, layers: int, cfg: dict, n_sm: int) -> None:
    """Launch the chain: ws_prep = prepare(ws, cfg); y32 fp32 [4 * layers + 1, RS], region 0 the input, the others
    zeros (the products add their splits' sums into them)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    bn, bkb = 16 * cfg["warps"], cfg.get("BKB", 64)
    qlay = gl.NVMMASharedLayout.get_default_for([bn, bkb], gl.int8)
    flat16 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    dbox = [bn * 8 // 256, 256] if cfg.get("DPACK") else [bn, 8]
    qt = [TensorDescriptor.from_tensor(q, [bn, bkb], qlay) for q, _ in ws_prep]
    qd = [TensorDescriptor.from_tensor(q, [bn * 256 // bkb, bkb], qlay) for q, _ in ws_prep] if cfg.get("TILED") else qt
    dd = [TensorDescriptor.from_tensor(d, dbox, flat16) for _, d in ws_prep]
    s0, s1, s2, s3 = cfg["S"]
    _chain_i8_kernel[(n_sm,)](
        y32, *qd, *qt, *dd, sync, layers, S0=s0, S1=s1, S2=s2, S3=s3, STAGES=cfg["STAGES"],
        PRODUCER_REGS=cfg.get("regs", 48), PROBE=cfg.get("probe", 0), TILED=bool(cfg.get("TILED")),
        DPACK=bool(cfg.get("DPACK")), ROT=cfg.get("ROT", 0), BACKOFF=cfg.get("BACKOFF", 0), num_warps=cfg["warps"],
    )  # fmt: skip


def reference_i8(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in float64 on the host's terms: x (fp32 [K]) quantized as _quantize_x does,
    y[n] = sum_b d[n, b] * dx[b] * sum_k qs[n, b, k] * xq[b, k]."""
    k = x.numel()
    xb = x.float().view(k // 32, 32)
    dx = xb.abs().amax(1) / 127.0
    inv = torch.where(dx > 0, 1.0 / dx, torch.zeros_like(dx))
    v = xb * inv[:, None]
    xq = torch.where(v < 0, -torch.floor(v.abs() + 0.5), torch.floor(v.abs() + 0.5))
    dx = dx.half().double()
    isum = (qs.view(qs.shape[0], k // 32, 32).double() * xq.double()[None]).sum(-1)
    return (isum * d.double() * dx[None]).sum(-1)
