#!/usr/bin/env python3
"""Lab: a tiled q8_0 GEMM whose wgmma overlaps the next tile's dequantization, side by side with the shipped
fused kernel and cuBLAS. NOT YET RUN ON A GPU (written in session 9 after the GPU time was spent; see
bench/results/h200_session9/NOTES.md).

Why: the shipped tiled kernel (kernels/q8_0_gemm.py) reaches ~50% of cuBLAS at large M because triton waits for
every wgmma before it dequantizes the next tile (TTGIR `warp_group_dot_wait {pendings = 0}`): its 64-wide K tile
needs a 3-D reshape to broadcast the q8_0 scales, which puts the dequantized tile in a layout that goes through
shared memory before the MMA. This variant computes y.T = W @ x.T one q8_0 block (32 of K) per loop step, so the
scale broadcast is 2-D ([BLOCK_N, 1] over [BLOCK_N, 32]); compiled offline for sm_90 (triton 3.6), triton then
reads the int8 tile from shared memory straight in the MMA's A-operand layout and keeps one wgmma in flight
(`pendings = 1`) while the next tile is dequantized. The dequantization takes the pairs that layout gives each
thread (one 16-bit shared load): XOR 0x8080, one PRMT per element placing the byte into 2^23 + 256 (q + 128), one
FFMA with d / 256 and -(2^15 + 2^7) d (exact, as triton_util._dequant_words), one packed conversion per pair:
6.3 instructions per element in the sm_90 SASS for 128 x 256 tiles (the shipped kernel: 6.0, but serialized).

    python bench/gemm_lab.py [--m 2048,8192] [--out bench/results/gemm_lab_h200.json]

Checks every config against an fp64 product over the same bf16-rounded weight first (the pair placement of the
inline PTX is only verified here), then times GPU time per call (CUDA-graph replays) of each config, the shipped
fused kernel (config={"path": "gemm"}, autotuned) and cuBLAS on the pre-dequantized bf16 weight.
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

SHAPES = [(3200, 3200), (8640, 3200), (3200, 8640), (32000, 3200)]  # open_llama_3b (N, K)
# (BLOCK_M tokens = the MMA's N, BLOCK_N weight rows = the MMA's M, warps, stages)
CONFIGS = [(128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4), (64, 256, 8, 4)]

_PAIR_ASM = """{
    .reg .b32 u, f0, f1;
    xor.b32 u, $1, 0x8080;
    prmt.b32 f0, u, 0x4B000000, 0x7404;
    prmt.b32 f1, u, 0x4B000000, 0x7414;
    fma.rn.f32 f0, f0, $2, $4;
    fma.rn.f32 f1, f1, $3, $5;
    cvt.rn.bf16x2.f32 $0, f1, f0;
}"""
_PAIR_BF16: tl.constexpr = tl.constexpr(_PAIR_ASM)


@triton.jit
def _w_pairs(q, d):
    """int8 [BLOCK_N, 32] x fp16 [BLOCK_N] -> bf16 rnd(q * d), two elements per inline-PTX call."""
    df = d.to(tl.float32)
    dq = tl.broadcast_to((df * 0.00390625)[:, None], q.shape)  # d / 256
    dc = tl.broadcast_to((df * -32896.0)[:, None], q.shape)  # -(2^15 + 2^7) d
    return tl.inline_asm_elementwise(_PAIR_BF16, "=r,r,r,r,r,r", [q, dq, dc], dtype=tl.bfloat16, is_pure=True,
                                     pack=2)  # fmt: skip


@triton.jit
def _overlap_kernel(x_ptr, qs_ptr, d_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_dn, stride_ym,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """y[m-block, n-block] = (W[n-block] @ x[m-block].T).T, one q8_0 block of K per step."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (offs_m % M).to(tl.int64)  # wrapped rows keep the loads in bounds; the store is masked
    rn = (offs_n % N).to(tl.int64)
    o32 = tl.arange(0, 32)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + o32[None, :]
    q_ptrs = qs_ptr + rn[:, None] * stride_qn + o32[None, :]
    d_ptrs = d_ptr + rn * stride_dn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(0, K // 32):
        x = tl.load(x_ptrs)
        w = _w_pairs(tl.load(q_ptrs), tl.load(d_ptrs))
        acc = tl.dot(w, tl.trans(x), acc)
        x_ptrs += 32
        q_ptrs += 32
        d_ptrs += 1
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(tl.bfloat16), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


def overlap_matmul(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, cfg) -> torch.Tensor:
    bm, bn, warps, stages = cfg
    m, k = x.shape
    n = qs.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _overlap_kernel[grid](x, qs, d, y, m, n, k, x.stride(0), qs.stride(0), d.stride(0), y.stride(0),
                          BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=warps, num_stages=stages)  # fmt: skip
    return y


def bench_case(x, qs, d, wbf) -> dict:
    """Check every config against an fp64 product, then time them, the shipped fused kernel and cuBLAS."""
    from lorakit.kernels.q8_0_matmul import q8_0_matmul
    from triton.testing import do_bench_cudagraph

    m, k = x.shape
    n = qs.shape[0]
    ref = x.double() @ wbf.double().T
    bound = 2 * k * 2.0**-24 * (x.double().abs() @ wbf.double().abs().T) + 2 * 2.0**-8 * ref.abs() + 1e-30
    flops = 2 * m * n * k
    row = {"N": n, "K": k, "M": m}
    for cfg in CONFIGS:
        name = "overlap_{}x{}_w{}_s{}".format(*cfg)
        try:
            got = overlap_matmul(x, qs, d, cfg)
        except Exception as e:  # report and go on (e.g. out of shared memory)
            row[name] = f"error: {type(e).__name__}: {e}"[:160]
            continue
        worst = float(((got.double() - ref).abs() / bound).max())
        t = do_bench_cudagraph(lambda cfg=cfg: overlap_matmul(x, qs, d, cfg), rep=50)
        row[name] = {"err_over_bound": worst, "ok": worst <= 1.0, "ms": t, "tflops": flops / t / 1e9}
    fused = do_bench_cudagraph(lambda: q8_0_matmul(x, qs, d, config={"path": "gemm"}), rep=50)
    cublas = do_bench_cudagraph(lambda: x @ wbf.T, rep=50)
    row["fused_ms"], row["cublas_ms"] = fused, cublas
    row["fused_tflops"], row["cublas_tflops"] = flops / fused / 1e9, flops / cublas / 1e9
    return row


def main(argv=None) -> int:
    from lorakit.quant import quantize_q8_0

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="2048,8192")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gemm_lab_h200.json")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for n, k in SHAPES:
        w = quantize_q8_0(torch.randn(n, k) * k**-0.5)
        qs, d = w.qs.to(dev), w.d.to(dev)
        wbf = (qs.float().view(n, k // 32, 32) * d.float()[:, :, None]).view(n, k).to(torch.bfloat16)
        for m in (int(v) for v in a.m.split(",")):
            row = bench_case(torch.randn(m, k, device=dev).to(torch.bfloat16), qs, d, wbf)
            rows.append(row)
            ok = [v for key, v in row.items() if key.startswith("overlap") and isinstance(v, dict) and v["ok"]]
            best = max(ok, key=lambda v: v["tflops"], default=None)
            print(json.dumps(row), flush=True)
            print(f"{n:6d} {k:6d} {m:6d}  cuBLAS {row['cublas_tflops']:6.0f}  fused {row['fused_tflops']:6.0f} "
                  f"({row['fused_tflops'] / row['cublas_tflops']:.0%})  overlap best "
                  + ("-" if best is None else f"{best['tflops']:6.0f} ({best['tflops'] / row['cublas_tflops']:.0%})"),
                  flush=True)  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
