#!/usr/bin/env python3
"""Where the q8_0 GEMV's time goes (GPU only): the decode GEMV with its per-element conversions swapped.

    python bench/gemv_lab.py [--out bench/results/gemv_lab_h200.json]

Variants of one kernel (same tiles, same loads), best of a few tile configs each, GPU time per call
(CUDA-graph replay) and GB/s on the q8_0 bytes, at the decode shapes of open_llama_3b:
  i2f+cvt   int8 -> fp32 by conversion instruction, rounding to bf16 by conversion (session 2's kernel)
  i2f+int   conversion instruction, rounding to bf16 by integer ops on the fp32 bits
  mag+cvt   int8 -> fp32 by integer add of a magic exponent (no conversion instruction), cvt rounding
            (what lorakit ships: triton_util._q8_f32)
  mag+int   magic conversion, integer rounding (no conversion instruction at all)
  mag+velt  magic conversion, rounding by Veltkamp's split in fp32 (t = v * 65537, t - (t - v): equal to
            the conversion for every q8_0 product, and slower than it on the H200)
  mag+none  magic conversion, no rounding (not lorakit's numerics: the cost of rounding)
  prmt+cvt  qs read as int32 words, each byte placed into a float's mantissa by one PRMT (inline PTX), x
            read in the matching order; cvt rounding (written after the last GPU run of session 3: not yet
            run; a failing variant is reported and skipped)
  roll      mag+cvt's arithmetic, G row blocks per program walked as one loop of K steps whose next step's loads
            are issued before this step's arithmetic (register prefetch across steps and row blocks)
  loadonly  the loads and an integer sum of the bytes (the bandwidth this load pattern can reach)
  tiled     lorakit's tensor-core tiled kernel at M = 1 (autotuned skinny tiles), for comparison
The exact variants compute the same W; their outputs differ from the shipped kernel's only by the order of
the fp32 sums (other tiles), so the table shows their largest difference in output ulps.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lorakit.kernels.triton_util import _q8_f32  # noqa: E402

HBM = 4.23e12
SHAPES = [(3200, 3200), (9600, 3200), (17280, 3200), (3200, 8640), (32000, 3200)]
CONFIGS = [  # BLOCK_N, KB, UNROLL, warps
    (4, 16, 2, 4),
    (8, 8, 2, 4),
    (8, 16, 1, 4),
    (4, 32, 1, 8),
    (2, 32, 1, 4),
    (16, 8, 2, 8),
    (4, 32, 2, 4),
    (8, 16, 2, 8),
]
VARIANTS = {"i2f+cvt": (0, 0), "i2f+int": (0, 1), "mag+cvt": (1, 0), "mag+int": (1, 1), "mag+velt": (1, 3),
            "mag+none": (1, 2), "prmt+cvt": (3, 0), "loadonly": (2, 2), "roll": (1, 0)}  # fmt: skip


@triton.jit
def _w(q, d, CONV: tl.constexpr, ROUND: tl.constexpr):
    if CONV == 0:
        f = q.to(tl.float32)
    else:
        f = _q8_f32(q)
    v = f * d.to(tl.float32)[:, :, None]
    if ROUND == 3:
        t = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [v, tl.full(v.shape, 65537.0, tl.float32)],
                                      dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
        v = t - (t - v)
    elif ROUND == 0:
        v = v.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 1:
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        v = b.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _program_rows(N, BLOCK_N: tl.constexpr, KB: tl.constexpr):
    """This program's output rows (and their in-bounds wrap for loads) and the q8_0 block offsets of a step."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_n, (offs_n % N).to(tl.int64), tl.arange(0, KB)


@triton.jit
def _lab_kernel(x_ptr, qs_ptr, d_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, KB: tl.constexpr, UNROLL: tl.constexpr,
                CONV: tl.constexpr, ROUND: tl.constexpr):  # fmt: skip
    BLOCK_K: tl.constexpr = KB * 32
    offs_n, rn, offs_b = _program_rows(N, BLOCK_N, KB)
    offs_j = tl.arange(0, 32)
    kk0 = offs_b[:, None] * 32 + offs_j[None, :]
    acc = tl.zeros((BLOCK_N, KB, 32), dtype=tl.float32)
    iacc = tl.zeros((BLOCK_N, KB, 32), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):
            kk = k0 + u * BLOCK_K + kk0
            kb = (k0 + u * BLOCK_K) // 32 + offs_b
            x = tl.load(x_ptr + kk[None, :, :], mask=(kk < K)[None, :, :], other=0.0)
            q = tl.load(qs_ptr + rn[:, None, None] * K + kk[None, :, :], mask=(kk < K)[None, :, :], other=0)
            d = tl.load(d_ptr + rn[:, None] * (K // 32) + kb[None, :], mask=(kb * 32 < K)[None, :], other=0.0)
            if CONV == 2:
                iacc += q.to(tl.int32) + d.to(tl.int16, bitcast=True).to(tl.int32)[:, :, None]
            else:
                acc += _w(q, d, CONV, ROUND) * x.to(tl.float32)
    if CONV == 2:
        y = tl.sum(tl.sum(iacc, axis=2), axis=1).to(tl.float32)
    else:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(y_ptr + offs_n, y.to(tl.bfloat16), mask=offs_n < N)


@triton.jit
def _prmt_term(w, dd, x_ptr, kw, K, I: tl.constexpr, ASM: tl.constexpr):
    """W * x for byte I of every word: one PRMT puts the byte into the float 2^23 + byte (bytes [b, 0, 0, 0x4B])."""
    xi = tl.load(x_ptr + kw[None, :, :] * 4 + I, mask=(kw * 4 < K)[None, :, :], other=0.0)
    bits = tl.inline_asm_elementwise(ASM, "=r,r", [w], dtype=tl.float32, is_pure=True, pack=1)
    v = (bits - 8388736.0) * dd
    return v.to(tl.bfloat16).to(tl.float32) * xi.to(tl.float32)


@triton.jit
def _prmt_kernel(x_ptr, qw_ptr, d_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, KB: tl.constexpr, UNROLL: tl.constexpr):
    BLOCK_K: tl.constexpr = KB * 32
    offs_n, rn, offs_b = _program_rows(N, BLOCK_N, KB)
    offs_w = tl.arange(0, 8)
    kw0 = offs_b[:, None] * 8 + offs_w[None, :]  # word index within the step
    acc = tl.zeros((BLOCK_N, KB, 8), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):
            ks = k0 + u * BLOCK_K
            kw = ks // 4 + kw0
            kb = ks // 32 + offs_b
            w = tl.load(qw_ptr + rn[:, None, None] * (K // 4) + kw[None, :, :], mask=(kw * 4 < K)[None, :, :], other=0)
            d = tl.load(d_ptr + rn[:, None] * (K // 32) + kb[None, :], mask=(kb * 32 < K)[None, :], other=0.0)
            w = w ^ -2139062144  # 0x80808080: each byte q + 128
            dd = d.to(tl.float32)[:, :, None]
            acc += _prmt_term(w, dd, x_ptr, kw, K, 0, "prmt.b32 $0, $1, 0x4B000000, 0x7440;")
            acc += _prmt_term(w, dd, x_ptr, kw, K, 1, "prmt.b32 $0, $1, 0x4B000000, 0x7441;")
            acc += _prmt_term(w, dd, x_ptr, kw, K, 2, "prmt.b32 $0, $1, 0x4B000000, 0x7442;")
            acc += _prmt_term(w, dd, x_ptr, kw, K, 3, "prmt.b32 $0, $1, 0x4B000000, 0x7443;")
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(y_ptr + offs_n, y.to(tl.bfloat16), mask=offs_n < N)


@triton.jit
def _roll_load(x_ptr, qs_ptr, d_ptr, i, pid, N, K, n_k, G: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr):
    """Step i of a program's flattened (row block, K step) walk: x [1, KB, 32], q [BLOCK_N, KB, 32], d [BLOCK_N, KB]."""
    blk = pid * G + i // n_k
    ks = (i % n_k) * (KB * 32)
    rn = ((blk * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_b = tl.arange(0, KB)
    kk = ks + offs_b[:, None] * 32 + tl.arange(0, 32)[None, :]
    kb = ks // 32 + offs_b
    x = tl.load(x_ptr + kk[None, :, :], mask=(kk < K)[None, :, :], other=0.0)
    q = tl.load(qs_ptr + rn[:, None, None] * K + kk[None, :, :], mask=(kk < K)[None, :, :], other=0)
    d = tl.load(d_ptr + rn[:, None] * (K // 32) + kb[None, :], mask=(kb * 32 < K)[None, :], other=0.0)
    return x, q, d


@triton.jit
def _roll_kernel(x_ptr, qs_ptr, d_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, KB: tl.constexpr, G: tl.constexpr):
    """G row blocks per program, walked as one flattened loop of K steps with the next step's loads issued
    before this step's arithmetic (register prefetch: loads stay in flight across row blocks and steps)."""
    pid = tl.program_id(0)
    n_k = tl.cdiv(K, KB * 32)
    total = G * n_k
    xc, qc, dc = _roll_load(x_ptr, qs_ptr, d_ptr, 0, pid, N, K, n_k, G, BLOCK_N, KB)
    acc = tl.zeros((BLOCK_N, KB, 32), dtype=tl.float32)
    for i in range(total):
        xn, qn, dn = _roll_load(x_ptr, qs_ptr, d_ptr, tl.minimum(i + 1, total - 1), pid, N, K, n_k, G, BLOCK_N, KB)
        acc += _w(qc, dc, 1, 0) * xc.to(tl.float32)
        if i % n_k == n_k - 1:
            offs_n = (pid * G + i // n_k) * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.store(y_ptr + offs_n, tl.sum(tl.sum(acc, axis=2), axis=1).to(tl.bfloat16), mask=offs_n < N)
            acc = tl.zeros((BLOCK_N, KB, 32), dtype=tl.float32)
        xc, qc, dc = xn, qn, dn


ROLL_CONFIGS = [  # BLOCK_N, KB, G, warps
    (4, 16, 4, 4),
    (8, 8, 4, 4),
    (4, 16, 8, 4),
    (8, 16, 2, 8),
    (4, 32, 2, 8),
    (2, 32, 8, 4),
    (8, 8, 8, 4),
    (16, 8, 2, 8),
    (4, 8, 8, 2),
    (8, 16, 4, 8),
]


def best_of(name: str, n: int, nbytes: int, ref: torch.Tensor, configs, launch, exact: bool) -> dict:
    """The fastest of `configs` for launch(y, cfg) writing y [1, n] (GPU time, CUDA-graph replay; a config that
    does not compile is reported and skipped), with its output's largest difference from ref in bf16 ulps
    where the variant computes lorakit's W."""
    ulp = ref.float().abs().clamp_min(1e-30) * 2.0**-8
    best = None
    for cfg in configs:
        y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        run = functools.partial(launch, y, cfg)
        try:
            run()
        except Exception as e:  # a variant that does not compile is reported, not fatal
            print(f"{name} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        diff = float(((y.float() - ref.float()).abs() / ulp).max()) if exact else None
        t = triton.testing.do_bench_cudagraph(run, rep=20)
        if best is None or t < best[0]:
            best = (t, cfg, diff)
    if best is None:
        return {"us": float("nan"), "GBps": float("nan"), "cfg": None, "max_diff_ulps": None}
    t, cfg, diff = best
    return {"us": t * 1e3, "GBps": nbytes / t / 1e6, "cfg": cfg, "max_diff_ulps": diff}


def bench_shape(n: int, k: int, variants: dict) -> dict:
    from lorakit.kernels.q8_0_matmul import q8_0_matmul

    qs = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    d = (torch.rand(n, k // 32, device="cuda") * 0.01 + 1e-3).half()
    x = torch.randn(1, k, device="cuda").bfloat16()
    qw = qs.view(torch.int32)
    ref = q8_0_matmul(x, qs, d)
    shipped = triton.testing.do_bench_cudagraph(lambda: q8_0_matmul(x, qs, d), rep=30)
    q8_0_matmul(x, qs, d, config={"path": "gemm"})  # autotune
    tiled = triton.testing.do_bench_cudagraph(lambda: q8_0_matmul(x, qs, d, config={"path": "gemm"}), rep=30)
    row = {"N": n, "K": k, "bytes": n * k * 34 // 32, "shipped_us": shipped * 1e3, "tiled_us": tiled * 1e3}
    for name, (conv, rnd) in variants.items():
        if name == "roll":

            def launch(y, cfg):
                bn, kb, g, w = cfg
                _roll_kernel[(triton.cdiv(triton.cdiv(n, bn), g),)](x, qs, d, y, n, k, BLOCK_N=bn, KB=kb, G=g,
                                                                    num_warps=w)  # fmt: skip

            row[name] = best_of(name, n, row["bytes"], ref, ROLL_CONFIGS, launch, True)
            continue

        def launch(y, cfg, conv=conv, rnd=rnd):
            bn, kb, un, w = cfg
            if conv == 3:
                _prmt_kernel[(triton.cdiv(n, bn),)](x, qw, d, y, n, k, BLOCK_N=bn, KB=kb, UNROLL=un, num_warps=w)
                return
            _lab_kernel[(triton.cdiv(n, bn),)](x, qs, d, y, n, k, BLOCK_N=bn, KB=kb, UNROLL=un, CONV=conv,
                                               ROUND=rnd, num_warps=w)  # fmt: skip

        row[name] = best_of(name, n, row["bytes"], ref, CONFIGS, launch, rnd in (0, 1, 3) and conv != 2)
    return row


def _timed_tc(row: dict, name: str, prod, ref: torch.Tensor, nbytes: int) -> float | None:
    """row[name] = GPU time of prod() (CUDA-graph replay), GB/s, largest difference from ref in bf16 ulps."""
    try:
        y = prod()
        torch.cuda.synchronize()
    except Exception as e:  # a config that does not compile is reported, not fatal
        print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None
    t = triton.testing.do_bench_cudagraph(prod, rep=30)
    ulp = ref.float().abs().clamp_min(1e-30) * 2.0**-8
    diff = float(((y.float() - ref.float()).abs() / ulp).max())
    row[name] = {"us": t * 1e3, "GBps": nbytes / t / 1e6, "max_diff_ulps": diff}
    return t


def bench_tc(m: int, n: int, k: int) -> dict:
    """--tc: the tensor-core gemv (q8_0_gemv_tc) at every config of its autotune list, forced, next to the default
    path ("tc_tuned": the autotuned tensor-core gemv; with a LoRA term at M <= 2 the FMA gemv, which forms t in its
    launch) and the FMA gemv (M <= 2) or the tiled skinny kernel (autotuned), with and without a LoRA term (r = 16;
    the forced tensor-core configs take t from a torch matmul): GPU time per call (CUDA-graph replay), GB/s on the
    q8_0 bytes, and each output's largest difference from the reference kernel's in bf16 ulps. (The session-8
    results were taken while the tensor-core gemv still formed t in its launch.)"""
    from lorakit.kernels.q8_0_matmul import q8_0_matmul
    from lorakit.kernels.q8_0_tuning import _GEMV_TC_CONFIGS

    qs = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    d = (torch.rand(n, k // 32, device="cuda") * 0.01 + 1e-3).half()
    x = torch.randn(m, k, device="cuda").bfloat16()
    a = (torch.randn(k, 16, device="cuda") * 0.05).bfloat16()
    b = (torch.randn(n, 16, device="cuda") * 0.05).bfloat16()
    nbytes = n * k * 34 // 32
    row = {"M": m, "N": n, "K": k, "bytes": nbytes}
    ref_path = "gemv" if m <= 2 else "gemm"
    for la, tag in (((), ""), ((a, b, 0.5), "+lora")):
        ref = q8_0_matmul(x, qs, d, *la, config={"path": ref_path})  # autotunes
        _timed_tc(row, ref_path + tag, functools.partial(q8_0_matmul, x, qs, d, *la, config={"path": ref_path}),
                  ref, nbytes)  # fmt: skip
        _timed_tc(row, "tc_tuned" + tag, functools.partial(q8_0_matmul, x, qs, d, *la), ref, nbytes)  # default path
        best = None
        for c in _GEMV_TC_CONFIGS:
            kw = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            name = "tc_" + "_".join(str(v) for v in (kw["BLOCK_N"], kw["BLOCK_K"], kw["SPLIT_K"], kw["num_stages"]))
            prod = functools.partial(q8_0_matmul, x, qs, d, *la, config={"path": "gemv_tc", **kw})
            t = _timed_tc(row, name + tag, prod, ref, nbytes)
            if t is not None and (best is None or t < best[0]):
                best = (t, name)
        row["tc_best" + tag] = best[1] if best else None
    return row


def main_tc(out: Path) -> int:
    torch.manual_seed(0)
    rows = []
    for m in (1, 16):
        for n, k in SHAPES:
            row = bench_tc(m, n, k)
            rows.append(row)
            ref = "gemv" if m <= 2 else "gemm"
            for tag in ("", "+lora"):
                r0, tt = row[ref + tag], row["tc_tuned" + tag]
                bb = row[row["tc_best" + tag] + tag] if row["tc_best" + tag] else None
                print(f"M={m:2d} {n:6d}x{k:<5d}{tag:6s} {ref} {r0['us']:6.1f}us {r0['GBps']:5.0f}GB/s | tc tuned "
                      f"{tt['us']:6.1f}us {tt['GBps']:5.0f}GB/s ({tt['us'] / r0['us']:.2f}x time, diff "
                      f"{tt['max_diff_ulps']:.1f} ulp) | best forced {row['tc_best' + tag]} "
                      f"{bb['us'] if bb else float('nan'):6.1f}us", flush=True)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gemv_lab_h200.json")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ",".join(VARIANTS))
    ap.add_argument("--tc", action="store_true", help="the tensor-core gemv's configs instead (bench_tc)")
    a = ap.parse_args(argv)
    if a.tc:
        return main_tc(a.out)
    variants = {v: VARIANTS[v] for v in a.variants.split(",")}
    torch.manual_seed(0)
    rows = []
    for n, k in SHAPES:
        row = bench_shape(n, k, variants)
        rows.append(row)
        print(f"{n:6d}x{k:<5d} shipped {row['shipped_us']:6.1f}us tiled {row['tiled_us']:6.1f}us "
              + " ".join(f"{v}:{row[v]['us']:5.1f}us/{row[v]['GBps']:5.0f}" for v in variants), flush=True)  # fmt: skip
        print(
            "   max diff vs shipped (output ulps): "
            + " ".join(f"{v}:{row[v]['max_diff_ulps']:.1f}" for v in variants if row[v]["max_diff_ulps"] is not None)
        )
    print("\n(us per call, GB/s on the q8_0 bytes)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
