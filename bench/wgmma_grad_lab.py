#!/usr/bin/env python3
"""The input gradient dx = dy @ W over q8_0 storage on the H200, side by side in one run: cuBLAS bf16 on the
pre-dequantized weight, dequantize + cuBLAS (the "dequant" path), the triton tiled kernel (q8_0_gemm's transposed
product, autotuned) and the Gluon warp-specialized kernel (kernels/q8_0_wgmma.py, GRAD: W's transposed tile as the
wgmma's register operand A), each of its configs; beside them the forward's warp-specialized kernel against
cuBLAS at the same shape (x [M, K] @ W.T).

  1. checks first: every Gluon config against an fp64 product over the same bf16 W (odd shapes: M = 37 / 300, N not
     a multiple of 64, K = 64 * odd; max |err| / max |ref|), and that the weight is unchanged;
  2. times each (triton.testing.do_bench_cudagraph, median) at open_llama_3b and Llama-3-8B layer shapes, M in
     {256, 2048, 8192}: TFLOP/s and % of cuBLAS.

    python bench/wgmma_grad_lab.py [--quick] [--out bench/results/wgmma_grad_lab_h200.json]
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from wgmma_lab import SHAPES, _tflops, checked, wgmma_args  # noqa: E402  (N, K) of W [N, K]: dx [M, K] = dy [M, N] @ W

from lorakit.kernels.q8_0_matmul import q8_0_matmul_grad_input  # noqa: E402
from lorakit.kernels.q8_0_wgmma import WS_CONFIGS, WS_GRAD_CONFIGS, wgmma_grad_input, wgmma_matmul  # noqa: E402
from lorakit.quant import dequantize_q8_0, quantize_q8_0  # noqa: E402


def check() -> int:
    bad = 0
    for m, n, k in [(300, 200, 192), (37, 136, 64), (2048, 3200, 3200), (1000, 1000, 1088), (513, 8640, 3200),
                    (300, 96, 8640), (4096, 4096, 4096), (77, 3200, 8640)]:  # fmt: skip
        g = torch.Generator(device="cuda").manual_seed(m + n + k)
        w = quantize_q8_0(torch.randn(n, k, device="cuda", generator=g))
        qs0, d0 = w.qs.clone(), w.d.clone()
        wb = dequantize_q8_0(w.qs, w.d, torch.bfloat16).double()
        dy = torch.randn(m, n, device="cuda", generator=g).bfloat16()
        ref = dy.double() @ wb
        for cfg in WS_GRAD_CONFIGS:
            dx = torch.empty(m, k, dtype=torch.bfloat16, device="cuda")
            wgmma_grad_input(dy, w.qs, w.d, dx, cfg)
            bad += not checked(f"{m}x{n}x{k} {cfg}", dx, ref, w, qs0, d0)
    return bad


def main(argv=None) -> int:
    args = wgmma_args(__doc__, "wgmma_grad_lab_h200.json", argv)
    from triton.testing import do_bench_cudagraph

    bad = check()
    print("check bad:", bad, flush=True)
    rows = []
    shapes = SHAPES[:2] if args.quick else SHAPES
    print(f"{'M':>5} {'N':>6} {'K':>6} {'cublas':>7} {'deq+cuB':>7} {'triton':>7} {'gluon':>7}  TFLOP/s; "
          "% of cuBLAS: dequant, triton, gluon configs")  # fmt: skip
    for n, k in shapes:
        w = quantize_q8_0(torch.randn(n, k, device="cuda"))
        wb = dequantize_q8_0(w.qs, w.d, torch.bfloat16)
        for m in (256, 2048, 8192):
            dy = torch.randn(m, n, device="cuda").bfloat16()
            dx = torch.empty(m, k, dtype=torch.bfloat16, device="cuda")
            tf = partial(_tflops, 2.0 * m * n * k)
            t_cub = do_bench_cudagraph(partial(torch.matmul, dy, wb, out=dx), rep=40)
            t_deq = do_bench_cudagraph(partial(q8_0_matmul_grad_input, dy, w.qs, w.d, config={"path": "dequant"}),
                                       rep=40)  # fmt: skip
            t_tri = None
            if not args.no_triton:
                q8_0_matmul_grad_input(dy, w.qs, w.d, config={"path": "gemm"})  # autotune outside the timing
                t_tri = do_bench_cudagraph(partial(q8_0_matmul_grad_input, dy, w.qs, w.d, config={"path": "gemm"}),
                                           rep=40)  # fmt: skip
            per = {}
            for cfg in WS_GRAD_CONFIGS:
                wgmma_grad_input(dy, w.qs, w.d, dx, cfg)
                per[str(cfg)] = do_bench_cudagraph(partial(wgmma_grad_input, dy, w.qs, w.d, dx, cfg), rep=40)
            x = torch.randn(m, k, device="cuda").bfloat16()
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            t_fcub = do_bench_cudagraph(partial(torch.matmul, x, wb.T, out=y), rep=40)
            wgmma_matmul(x, w.qs, w.d, y, None, WS_CONFIGS[0])
            t_fws = do_bench_cudagraph(partial(wgmma_matmul, x, w.qs, w.d, y, None, WS_CONFIGS[0]), rep=40)
            best = min(per, key=per.get)
            tri = f"{tf(t_tri):7.0f}" if t_tri else f"{'-':>7}"
            pcts = (
                [100 * t_cub / t_deq]
                + ([100 * t_cub / t_tri] if t_tri else [])
                + [100 * t_cub / t for t in per.values()]
            )
            print(f"{m:5d} {n:6d} {k:6d} {tf(t_cub):7.0f} {tf(t_deq):7.0f} {tri} {tf(per[best]):7.0f}  "
                  + " ".join(f"{v:.0f}%" for v in pcts)
                  + f"  | fwd ws {100 * t_fcub / t_fws:.0f}%", flush=True)  # fmt: skip
            rows.append(dict(m=m, n=n, k=k, cublas_ms=t_cub, dequant_ms=t_deq, triton_ms=t_tri, gluon_ms=per,
                             best=best, best_pct_cublas=100 * t_cub / per[best], fwd_cublas_ms=t_fcub,
                             fwd_ws_ms=t_fws))  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), check_bad=bad, rows=rows), indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
