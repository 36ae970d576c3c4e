#!/usr/bin/env python3
"""Lab (#5): do the decode step's q8_0 products reach more of HBM in one persistent launch than in ~105 launches?

The decode step pays ~6.8 us of fixed cost per product (bench/results/h200_session10/NOTES.md): ramp-up, tail,
split-K reduction, launch. This lab times the step's chain of products alone, the 3B shapes (per layer: q|k|v
9600 x 3200, o 3200 x 3200, gate|up 17280 x 3200, down 3200 x 8640; each product's input is the first K values of
the previous one's output), two ways on the same weights:

  launched    - q8_0_matmul per product (the tuned tensor-core GEMV, PDL), captured in one CUDA graph; with and
                without the decode step's 4 MiB L2 hint for the next product;
  persistent  - one launch of P = SMs x PER_SM programs that walks every layer's four products in order: each
                product's (row block, K split) tasks go round robin over the programs, split-K partials are
                summed by the last program of a row block (as q8_0_gemv_tc does), and a grid barrier (an arrival
                counter, acquire/release) separates consecutive products. Before waiting at a barrier a program
                may ask L2 for the first weight lines of its next task (PF lines per row), so HBM keeps
                streaming across the barrier.

The persistent kernel's outputs are checked against the launched chain's for one layer (same fp32 sums up to
order). Timing: CUDA-graph replays of the whole chain, best of rounds, us per 26-layer chain and TB/s on the
q8_0 bytes.

    python bench/persistent_lab.py [--layers 26] [--out bench/results/persistent_lab.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lorakit.kernels.q8_0_gemv_tc import _tc_range  # noqa: E402
from lorakit.kernels.triton_util import _PF_LAST, Prefetch  # noqa: E402

SHAPES = [(9600, 3200), (3200, 3200), (17280, 3200), (3200, 8640)]  # (N, K) per layer, in order
HBM = 4.23e12


@triton.jit
def _grid_barrier(bar_ptr, target, MAX_SPIN: tl.constexpr):
    """Every program arrives (release), then waits until `target` arrivals in all (acquire)."""
    tl.debug_barrier()  # every thread's stores precede the arrival
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    n = tl.load(bar_ptr, volatile=True)
    spins = 0
    while (n < target) & (spins < MAX_SPIN):
        n = tl.load(bar_ptr, volatile=True)
        spins += 1
    tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _pf_task(qs_ptr, d_ptr, task, N: tl.constexpr, K: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, PF: tl.constexpr):  # fmt: skip
    """Ask L2 (evict_last) for the first PF 128-byte lines of each of the task's rows, and their scales."""
    if task < (N // BLOCK_N) * SPLIT:
        pid_n = task // SPLIT
        pid_k = task % SPLIT
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        lines = tl.arange(0, PF)
        q = qs_ptr + rows[:, None] * K + pid_k * per_split + lines[None, :] * 128
        tl.inline_asm_elementwise(_PF_LAST, "=r,l", [q], dtype=tl.int32, is_pure=False, pack=1)
        d = d_ptr + rows * (K // 32) + pid_k * per_split // 32
        tl.inline_asm_elementwise(_PF_LAST, "=r,l", [d.to(tl.pointer_type(tl.int8))], dtype=tl.int32, is_pure=False,
                                  pack=1)  # fmt: skip


@triton.jit
def _product(x_ptr, y_ptr, qs_ptr, d_ptr, part_ptr, cnt_ptr, pid, P, N: tl.constexpr, K: tl.constexpr,
             SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """y[0, :N] = x[0, :K] @ W.T (bf16 out), this program's tasks of the product (round robin over P)."""
    NB: tl.constexpr = N // BLOCK_N
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < 1
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 32)
    offs_tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + offs_m[None, :]
    for task in range(pid, NB * SPLIT, P):
        pid_n = task // SPLIT
        pid_k = task % SPLIT
        k_lo = pid_k * per_split
        k_hi = tl.minimum(K, k_lo + per_split)
        k_full = k_lo + tl.maximum(k_hi - k_lo, 0) // BLOCK_K * BLOCK_K
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        x_ptrs = x_ptr + offs_m[None, :] * K + (k_lo + offs_k)[:, None]  # rows past 0 masked
        q_ptrs = qs_ptr + rn[:, None] * K + (k_lo + offs_k)[None, :]
        d_ptrs = d_ptr + rn[:, None] * (K // 32) + (k_lo // 32 + offs_kb)[None, :]
        d_ptrs = tl.max_contiguous(tl.multiple_of(d_ptrs, [4, 4]), [1, BLOCK_K // 32])
        acc = _tc_range(x_ptrs, q_ptrs, d_ptrs, mask_m, k_lo, k_full, k_hi, offs_k, offs_kb, BLOCK_N, BLOCK_K,
                        BLOCK_M, False)  # fmt: skip
        y_ptrs = y_ptr + offs_m[None, :] * 0 + rn[:, None]
        if SPLIT > 1:
            tile = (pid_n * SPLIT).to(tl.int64) * (BLOCK_N * BLOCK_M)
            tl.store(part_ptr + tile + pid_k * (BLOCK_N * BLOCK_M) + offs_tile, acc)
            tl.debug_barrier()
            if tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                acc = tl.load(part_ptr + tile + offs_tile, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT):
                    acc += tl.load(part_ptr + tile + s * (BLOCK_N * BLOCK_M) + offs_tile, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
                tl.store(y_ptrs, acc.to(tl.bfloat16), mask=mask_m[None, :])
        else:
            tl.store(y_ptrs, acc.to(tl.bfloat16), mask=mask_m[None, :])


@triton.jit
def _stage(x_ptr, y_ptr, qs, d, lo, qs_next, d_next, lo_next, part_ptr, cnt_ptr, bar_ptr, target, pid, P,
           N: tl.constexpr, K: tl.constexpr, S: tl.constexpr, NN: tl.constexpr, NK: tl.constexpr, NS: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, PF: tl.constexpr,
           MAX_SPIN: tl.constexpr):  # fmt: skip
    """One product of layer lo ([N, K], S splits; its weights are layer lo's rows of qs / d), the L2 hint for the next
    one's ([NN, NK], NS splits, layer lo_next) first lines, and the grid barrier after it."""
    _product(x_ptr, y_ptr, qs + lo * N * K, d + lo * N * (K // 32), part_ptr, cnt_ptr, pid, P, N, K, S, BLOCK_N,
             BLOCK_K, BLOCK_M)  # fmt: skip
    if PF > 0:
        _pf_task(qs_next + lo_next * NN * NK, d_next + lo_next * NN * (NK // 32), pid, NN, NK, NS, BLOCK_N, BLOCK_K, PF)
    _grid_barrier(bar_ptr, target, MAX_SPIN)


@triton.jit
def _chain_kernel(act_ptr, qs0, d0, qs1, d1, qs2, d2, qs3, d3, part_ptr, cnt_ptr, bar_ptr, L,
                  A0: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, A3: tl.constexpr,
                  S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, PF: tl.constexpr,
                  MAX_SPIN: tl.constexpr):  # fmt: skip
    """The chain of L layers x 4 products in one launch; act_ptr holds the four outputs (offsets A0..A3, bf16), the
    first layer's input in the last one's."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    for layer in range(L):
        lo = layer.to(tl.int64)
        nxt = tl.minimum(lo + 1, L - 1)  # the next layer's (the last layer hints its own first product again)
        _stage(act_ptr + A3, act_ptr + A0, qs0, d0, lo, qs1, d1, lo, part_ptr, cnt_ptr, bar_ptr, (layer * 4 + 1) * P,
               pid, P, 9600, 3200, S0, 3200, 3200, S1, BLOCK_N, BLOCK_K, BLOCK_M, PF, MAX_SPIN)  # fmt: skip
        _stage(act_ptr + A0, act_ptr + A1, qs1, d1, lo, qs2, d2, lo, part_ptr, cnt_ptr, bar_ptr, (layer * 4 + 2) * P,
               pid, P, 3200, 3200, S1, 17280, 3200, S2, BLOCK_N, BLOCK_K, BLOCK_M, PF, MAX_SPIN)  # fmt: skip
        _stage(act_ptr + A1, act_ptr + A2, qs2, d2, lo, qs3, d3, lo, part_ptr, cnt_ptr, bar_ptr, (layer * 4 + 3) * P,
               pid, P, 17280, 3200, S2, 3200, 8640, S3, BLOCK_N, BLOCK_K, BLOCK_M, PF, MAX_SPIN)  # fmt: skip
        _stage(act_ptr + A2, act_ptr + A3, qs3, d3, lo, qs0, d0, nxt, part_ptr, cnt_ptr, bar_ptr, (layer * 4 + 4) * P,
               pid, P, 3200, 8640, S3, 9600, 3200, S0, BLOCK_N, BLOCK_K, BLOCK_M, PF, MAX_SPIN)  # fmt: skip
    # the last program out resets the barrier for the next launch (every program has passed every wait)
    if tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu") == P - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed")
        tl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed")


OFFS = (0, 9600, 9600 + 3200, 9600 + 3200 + 17280)  # A0..A3 in the activation buffer


def make_weights(layers: int, device):
    """Per kind: qs int8 [L * N, K], d fp16 [L * N, K / 32]; y ~ N(0, 1) for x ~ N(0, 1) (d = 1 / (73 sqrt K))."""
    ws = []
    for n, k in SHAPES:
        qs = torch.randint(-127, 128, (layers * n, k), dtype=torch.int8, device=device)
        d = torch.full((layers * n, k // 32), 1.0 / (73.0 * k**0.5), dtype=torch.float16, device=device)
        d *= torch.rand_like(d) + 0.5
        ws.append((qs, d))
    return ws


def launched_chain(ws, x0, layers: int, prefetch_mib: int):
    """The products one launch each (q8_0_matmul), the outputs of the last layer."""
    from lorakit.kernels.q8_0_matmul import q8_0_matmul

    x = x0
    outs = []
    flat = [(layer, j) for layer in range(layers) for j in range(4)]
    for i, (layer, j) in enumerate(flat):
        n, k = SHAPES[j]
        qs, d = ws[j]
        pf = None
        if prefetch_mib and i + 1 < len(flat):
            nl, nj = flat[i + 1]
            nn = SHAPES[nj][0]
            pf = Prefetch(ws[nj][0][nl * nn : (nl + 1) * nn], ws[nj][1][nl * nn : (nl + 1) * nn], 0, prefetch_mib << 20)
        y = q8_0_matmul(x[:, :k], qs[layer * n : (layer + 1) * n], d[layer * n : (layer + 1) * n], prefetch=pf)
        outs.append(y)
        x = y
    return outs[-4:]


def fresh_act(x0):
    """The four outputs' buffer (bf16, offsets OFFS), the first layer's input x0 in the last one's place."""
    act = torch.zeros(sum(n for n, _ in SHAPES), dtype=torch.bfloat16, device=x0.device)
    act[OFFS[3] : OFFS[3] + 3200] = x0[0]
    return act


def persistent_setup(x0, cfg: dict):
    """(act, split-K partials, counters, barrier words) for the Triton persistent kernel."""
    bn, bm = cfg["BLOCK_N"], 8
    nblk = max(n // bn for n, _ in SHAPES)
    part = torch.empty(nblk * max(cfg["S"]) * bn * bm, dtype=torch.float32, device=x0.device)
    cnt = torch.zeros(nblk, dtype=torch.int32, device=x0.device)
    bar = torch.zeros(2, dtype=torch.int32, device=x0.device)
    return fresh_act(x0), part, cnt, bar


def ws_setup(x0, cfg: dict):
    """(act, split-K partials, counters, product counters) for the Gluon kernel (bench/persistent_ws.py)."""
    bn = 16 * cfg["warps"]
    nblk = max(-(-n // bn) for n, _ in SHAPES)
    part = torch.empty(nblk * max(cfg["S"]) * cfg.get("H", 1) * bn, dtype=torch.float32, device=x0.device)
    cnt = torch.zeros(nblk, dtype=torch.int32, device=x0.device)
    sync = torch.zeros(128, dtype=torch.int32, device=x0.device)
    return fresh_act(x0), part, cnt, sync


def max_rel_err(act, ref) -> float:
    """The largest |difference| / (|reference| + 0.01) of the four outputs against the launched chain's ref."""
    err = 0.0
    for j, y in enumerate(ref):
        got = act[OFFS[j] : OFFS[j] + SHAPES[j][0]].float()
        err = max(err, ((got - y[0].float()).abs() / (y[0].float().abs() + 1e-2)).max().item())
    return err


def check_and_time(name: str, cfg: dict, setup, run, ref, layers: int, report) -> None:
    """One persistent form, its buffers from setup(): one layer by run(bufs, 1) checked against ref (outputs; the
    counters and sync words back at zero unless its barriers' waits were left out), then timed over `layers`; a form
    that does not build or fit is reported and skipped."""
    try:
        bufs = setup()
        run(bufs, 1)
        torch.cuda.synchronize()
        err = max_rel_err(bufs[0], ref)
        if not cfg.get("nobar") and any(int(t.count_nonzero()) for t in bufs[2:]):
            raise RuntimeError("sync words not reset")
        us = graph_us(lambda: run(bufs, layers))
        report(name, us, {"max_rel_err_1layer": err, "cfg": cfg})
        print(f"    one layer vs launched: max rel err {err:.3g}", flush=True)
    except Exception as e:
        print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def i8_form(name: str, cfg: dict, ws, x0, ref, layers: int, n_sm: int, report) -> None:
    """The q8_0-activation chain (bench/persistent_ws_i8.py): one layer checked against its own arithmetic in float64
    (persistent_ws_i8.reference_i8, each product fed the fp32 input the kernel had) and compared with the launched
    float chain (max |difference| / max |output| per product), then timed over `layers`, its outputs' zeroing
    included (and timed alone)."""
    from persistent_ws_i8 import RS, chain_i8, prepare, reference_i8

    try:
        ws_prep = prepare(ws, SHAPES, cfg)
        y32 = torch.zeros(4 * layers + 1, RS.value, dtype=torch.float32, device=x0.device)
        y32[0, :3200] = x0[0].float()
        sync = torch.zeros(128 * 32, dtype=torch.int32, device=x0.device)

        def run(n):
            y32[1:].zero_()
            chain_i8(ws_prep, y32, sync, n, cfg, n_sm)

        run(1)
        torch.cuda.synchronize()
        if int(sync.count_nonzero()):
            raise RuntimeError("sync words not reset")
        own, vs_float = 0.0, []
        for j, (n, k) in enumerate(SHAPES):
            want = reference_i8(y32[j, :k], ws[j][0][:n], ws[j][1][:n])
            got = y32[j + 1, :n].double()
            own = max(own, ((got - want).abs() / (want.abs() + 1e-2)).max().item())
            fl = ref[j][0].double()
            vs_float.append(((got - fl).abs().max() / fl.abs().max()).item())
        print(f"    one layer vs its own arithmetic (float64): max rel err {own:.3g}; vs the float chain, max |diff| / "
              f"max |y| per product: {', '.join(f'{e:.3g}' for e in vs_float)}", flush=True)  # fmt: skip
        zero_us = graph_us(lambda: y32[1:].zero_())
        us = graph_us(lambda: run(layers))
        report(name, us, {"cfg": cfg, "max_rel_err_own_arithmetic": own, "vs_float_chain": vs_float,
                          "zeroing_us": zero_us})  # fmt: skip
        print(f"    of which the outputs' zeroing alone: {zero_us:.1f} us", flush=True)
    except Exception as e:
        print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def persistent_chain(ws, act, part, cnt, bar, layers: int, cfg: dict, n_sm: int):
    args = [act]
    for qs, d in ws:
        args += [qs, d]
    s0, s1, s2, s3 = cfg["S"]
    _chain_kernel[(n_sm * cfg["PER_SM"],)](
        *args, part, cnt, bar, layers, A0=OFFS[0], A1=OFFS[1], A2=OFFS[2], A3=OFFS[3], S0=s0, S1=s1, S2=s2, S3=s3,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_M=8, PF=cfg["PF"],
        MAX_SPIN=0 if cfg.get("nobar") else 1 << 18,
        num_warps=cfg["BLOCK_N"] // 16, num_stages=cfg["stages"])  # fmt: skip


CONFIGS = [  # BLOCK_N, BLOCK_K, stages, PER_SM, splits (qkv, o, gate|up, down), PF lines per row
    dict(BLOCK_N=32, BLOCK_K=128, stages=4, PER_SM=4, S=(4, 8, 2, 8), PF=0),
    dict(BLOCK_N=32, BLOCK_K=128, stages=4, PER_SM=4, S=(4, 8, 2, 8), PF=2),
    dict(BLOCK_N=16, BLOCK_K=256, stages=4, PER_SM=8, S=(2, 4, 1, 4), PF=2),
    dict(BLOCK_N=16, BLOCK_K=256, stages=4, PER_SM=16, S=(4, 8, 2, 8), PF=2),
    dict(BLOCK_N=16, BLOCK_K=128, stages=6, PER_SM=12, S=(4, 5, 2, 9), PF=4),
    # nobar: the barriers' waits left out (wrong numbers): what the waits cost
    dict(BLOCK_N=16, BLOCK_K=256, stages=4, PER_SM=8, S=(2, 4, 1, 4), PF=2, nobar=True),
    dict(BLOCK_N=16, BLOCK_K=256, stages=4, PER_SM=16, S=(4, 8, 2, 8), PF=2, nobar=True),
]
I8_CONFIGS = [  # bench/persistent_ws_i8.py: consumer warps (16 W rows each), ring stages of 256 K, splits; BKB: K per
    # TMA box; TILED: W tile-major (a stage one TMA box); DPACK: a stage's scales contiguous; ROT: task rotation;
    # BACKOFF: ns between polls at a product boundary; probe 1: the consumers skip the products (the weight stream
    # alone), probe 2: no wait for the previous product, probe 3: both (all give wrong numbers)
    dict(warps=4, STAGES=12, S=(13, 7, 13, 17), BKB=128, DPACK=True, TILED=True, ROT=37),
    dict(warps=4, STAGES=12, S=(13, 7, 13, 17), BKB=128, DPACK=True, TILED=True, ROT=37, probe=1),
    dict(warps=4, STAGES=12, S=(13, 7, 13, 17), BKB=128, DPACK=True, TILED=True, ROT=37, probe=2),
    dict(warps=4, STAGES=12, S=(13, 7, 13, 17), BKB=128, DPACK=True, TILED=True, ROT=37, probe=3),
    dict(warps=4, STAGES=4, S=(13, 7, 13, 17), BKB=128, DPACK=True, TILED=True, ROT=37, probe=3),
]
WS_CONFIGS = [  # bench/persistent_ws.py: consumer warps (16 W rows each), ring stages x TMA boxes per stage, splits;
    # one program per SM (H = 2, two consumer partitions, hung in session 15's call 5)
    dict(warps=8, STAGES=16, KSUB=1, S=(5, 5, 2, 5)),
    dict(warps=16, STAGES=8, KSUB=1, S=(5, 5, 2, 5)),
    dict(warps=16, STAGES=4, KSUB=2, S=(5, 5, 2, 5)),
    dict(warps=16, STAGES=8, KSUB=1, S=(10, 10, 4, 9)),
]


def graph_us(fn, rounds: int = 5, reps: int = 10) -> float:
    """Best over rounds of the mean of `reps` CUDA-graph replays of fn, in microseconds."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    best = float("inf")
    for _ in range(rounds):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        e0.record()
        for _ in range(reps):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        best = min(best, e0.elapsed_time(e1) / reps * 1e3)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--ws-cfg", type=int, default=None, help="only this WS_CONFIGS entry (for Nsight Compute)")
    p.add_argument("--i8-cfg", type=int, default=None, help="only this I8_CONFIGS entry (for Nsight Compute)")
    p.add_argument(
        "--which", choices=["all", "triton", "ws", "i8"], default="all", help="which persistent kernels to run"
    )
    p.add_argument("--out", default=str(ROOT / "bench/results/persistent_lab.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("persistent_lab.py: needs a CUDA GPU", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    torch.manual_seed(0)
    ws = make_weights(args.layers, dev)
    nbytes = args.layers * sum(n * k + n * k // 16 for n, k in SHAPES)
    x0 = torch.randn(1, 3200, device=dev).bfloat16()
    rows = []

    def report(name, us, extra=None):
        r = {"name": name, "us": us, "TB/s": nbytes / us / 1e6, "pct_hbm": 100 * nbytes / us / 1e6 / (HBM / 1e12)}
        r.update(extra or {})
        rows.append(r)
        print(f"{name:<44s} {us:9.1f} us  {r['TB/s']:5.2f} TB/s  {r['pct_hbm']:5.1f}% of HBM", flush=True)

    # one-layer check of every persistent config against the launched chain
    ref = launched_chain(ws, x0, 1, 0)
    # the i8 forms first: the launched chain's L2 hint leaves a persisting L2 carve-out in the process
    i8_cfgs = I8_CONFIGS if args.i8_cfg is None else [I8_CONFIGS[args.i8_cfg]]
    for cfg in i8_cfgs if args.which in ("all", "i8") else []:
        i8_form(f"persistent-i8 {cfg}", cfg, ws, x0, ref, args.layers, n_sm, report)
    words = [t.view(torch.int32) for qd in ws for t in qd]  # the chain's bytes as int32 words
    report(
        "torch: sum of every weight and scale word (a read of the same bytes)",
        graph_us(lambda: [w.sum() for w in words]),
    )
    for pf in (0, 4):
        report(
            f"launched (q8_0_matmul, hint {pf} MiB)", graph_us(lambda pf=pf: launched_chain(ws, x0, args.layers, pf))
        )
    for cfg in CONFIGS if args.which in ("all", "triton") else []:
        run = lambda b, n, c=cfg: persistent_chain(ws, *b, n, c, n_sm)  # noqa: E731
        setup = lambda c=cfg: persistent_setup(x0, c)  # noqa: E731
        check_and_time(f"persistent {cfg}", cfg, setup, run, ref, args.layers, report)
    from persistent_ws import chain_ws

    ws_cfgs = WS_CONFIGS if args.ws_cfg is None else [WS_CONFIGS[args.ws_cfg]]
    for cfg in ws_cfgs if args.which in ("all", "ws") else []:
        run = lambda b, n, c=cfg: chain_ws(ws, *b, n, OFFS, c, n_sm)  # noqa: E731
        setup = lambda c=cfg: ws_setup(x0, c)  # noqa: E731
        check_and_time(f"persistent-ws {cfg}", cfg, setup, run, ref, args.layers, report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"layers": args.layers, "bytes": nbytes, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
