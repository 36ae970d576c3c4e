#!/usr/bin/env python3
"""The Gluon q8_0 matmul (kernels/q8_0_wgmma.py: dequantization overlapping the previous tile's wgmma) against
cuBLAS bf16 on the pre-dequantized weight and the triton tiled kernel (q8_0_gemm, autotuned), side by side in
one run, H200.

  1. checks first: every config against an fp64 product over the same bf16 W (odd shapes, with and without
     LoRA; max |err| / max |ref|), and that the weight is unchanged;
  2. times each config (triton.testing.do_bench_cudagraph, median) at open_llama_3b and Llama-3-8B layer shapes,
     M in {2048, 8192}: TFLOP/s and % of cuBLAS.

    python bench/wgmma_lab.py [--quick] [--out bench/results/wgmma_lab_h200.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from read_floor import lab_parser  # noqa: E402

from lorakit.kernels.q8_0_matmul import q8_0_matmul  # noqa: E402
from lorakit.kernels.q8_0_wgmma import RS_CONFIGS, WGMMA_CONFIGS, WS_CONFIGS, wgmma_matmul  # noqa: E402
from lorakit.quant import dequantize_q8_0, quantize_q8_0  # noqa: E402

SHAPES = [(9600, 3200), (8640, 3200), (3200, 8640), (3200, 3200), (14336, 4096), (4096, 14336), (4096, 4096)]


def _tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def check() -> int:
    bad = 0
    for m, n, k, r in [(300, 200, 224, 0), (37, 130, 96, 4), (2048, 3200, 3200, 0), (1000, 1000, 1056, 16),
                       (513, 8640, 3200, 4), (4096, 4096, 4096, 0), (300, 200, 192, 0), (37, 130, 64, 32),
                       (1000, 1000, 8640, 16), (2048, 3200, 8640, 0)]:  # fmt: skip
        g = torch.Generator(device="cuda").manual_seed(m + n + k + r)
        w = quantize_q8_0(torch.randn(n, k, device="cuda", generator=g))
        qs0, d0 = w.qs.clone(), w.d.clone()
        wb = dequantize_q8_0(w.qs, w.d, torch.bfloat16).double()
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        ref = x.double() @ wb.T
        lora = None
        if r:
            a = (torch.randn(k, r, device="cuda", generator=g) / k**0.5).bfloat16()
            b = torch.randn(n, r, device="cuda", generator=g).bfloat16()
            t = x @ a
            lora = (t, b, 0.5)
            ref = ref + 0.5 * (t.double() @ b.double().T)
        for cfg in WGMMA_CONFIGS + (RS_CONFIGS + WS_CONFIGS if k % 64 == 0 else []):
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            wgmma_matmul(x, w.qs, w.d, y, lora, cfg)
            bad += not checked(f"{m}x{n}x{k} r={r} {cfg}", y, ref, w, qs0, d0)
    return bad


def checked(label: str, out, ref, w, qs0, d0) -> bool:
    """Whether a product out is within 1e-2 of the fp64 ref (max |err| / max |ref|) and left the weight (qs0, d0 its
    copies) unchanged; prints the check."""
    torch.cuda.synchronize()
    rel = float((out.double() - ref).abs().max() / ref.abs().max())
    ok = rel < 1e-2 and torch.equal(w.qs, qs0) and torch.equal(w.d, d0)
    print(f"check {label}: rel err {rel:.2e} {'ok' if ok else 'BAD'}", flush=True)
    return ok


def wgmma_args(doc: str, out_name: str, argv=None) -> argparse.Namespace:
    """The Gluon labs' command line (this one's and wgmma_grad_lab's): read_floor.lab_parser's --out
    (bench/results/out_name by default), --quick, --no-triton."""
    p = lab_parser(doc, out_name)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-triton", action="store_true", help="skip the triton tiled kernel (its autotuning)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = wgmma_args(__doc__, "wgmma_lab_h200.json", argv)
    from triton.testing import do_bench_cudagraph

    bad = check()
    print("check bad:", bad, flush=True)
    rows = []
    shapes = SHAPES[:2] if args.quick else SHAPES
    print(f"{'M':>5} {'N':>6} {'K':>6} {'cublas':>8} {'triton':>8} {'best gluon':>10}  config      % cuBLAS (triton)")
    for n, k in shapes:
        w = quantize_q8_0(torch.randn(n, k, device="cuda"))
        wb = dequantize_q8_0(w.qs, w.d, torch.bfloat16)
        for m in (2048, 8192):
            x = torch.randn(m, k, device="cuda").bfloat16()
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            flops = 2.0 * m * n * k
            t_cub = do_bench_cudagraph(partial(torch.matmul, x, wb.T, out=y), rep=40)
            t_tri = None
            if not args.no_triton:
                q8_0_matmul(x, w.qs, w.d, config={"path": "gemm"})  # autotune outside the timing
                t_tri = do_bench_cudagraph(partial(q8_0_matmul, x, w.qs, w.d, config={"path": "gemm"}), rep=40)
            per = {}
            for cfg in WGMMA_CONFIGS + RS_CONFIGS + WS_CONFIGS:
                wgmma_matmul(x, w.qs, w.d, y, None, cfg)
                per[str(cfg)] = do_bench_cudagraph(partial(wgmma_matmul, x, w.qs, w.d, y, None, cfg), rep=40)
            best = min(per, key=per.get)
            tf = partial(_tflops, flops)
            tri = f"{tf(t_tri):8.0f}" if t_tri else f"{'-':>8}"
            tri_pct = f"({100 * t_cub / t_tri:.0f}%)" if t_tri else ""
            print(f"{m:5d} {n:6d} {k:6d} {tf(t_cub):8.0f} {tri} {tf(per[best]):10.0f}  {best} "
                  f"{100 * t_cub / per[best]:.0f}% {tri_pct}", flush=True)  # fmt: skip
            print("      " + "  ".join(f"{i}:{100 * t_cub / t:.0f}%" for i, t in enumerate(per.values())), flush=True)
            rows.append(dict(m=m, n=n, k=k, cublas_ms=t_cub, triton_ms=t_tri, gluon_ms=per, best=best))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), check_bad=bad, rows=rows), indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
