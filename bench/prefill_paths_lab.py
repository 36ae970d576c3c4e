#!/usr/bin/env python3
"""Lab: the q8_0 product paths at a prefill's size (M = 512 rows, open_llama_3b's packed shapes), GPU time and host
time per eager call side by side, against cuBLAS on the pre-dequantized weight.

A prefill launches op by op, so both matter: the GPU time of the product (CUDA-graph replays,
do_bench_cudagraph) and what the host spends per call (back-to-back eager calls without synchronizing). For each
shape it also reports the path lorakit's measured choice takes for a prefill (q8_0_matmul(host_bound=True)).

    python bench/prefill_paths_lab.py [--m 512] [--out bench/results/prefill_paths_lab.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = [(9600, 3200), (3200, 3200), (17280, 3200), (3200, 8640), (32000, 3200)]  # q|k|v, o, gate|up, down, output
PATHS = ("gemm", "wgmma", "dequant")


def shape_row(n: int, k: int, m: int) -> dict:
    """Every path's GPU time, host time per eager call and max relative error at one shape."""
    import triton
    from host_lab import host_wall

    from lorakit.kernels import q8_0_matmul as qmm
    from lorakit.quant import quantize_q8_0

    w = quantize_q8_0(torch.randn(n, k) * k**-0.5)
    qs, d = w.qs.cuda(), w.d.cuda()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wb = qmm.q8_0_dequantize(qs, d, torch.bfloat16)
    ref = (x @ wb.T).float()
    row = {"N": n, "K": k, "M": m, "flop": 2.0 * m * n * k}
    calls = {f"q8 {p}": (lambda p=p: qmm.q8_0_matmul(x, qs, d, config={"path": p})) for p in PATHS}
    calls["q8 prefill choice"] = lambda: qmm.q8_0_matmul(x, qs, d, host_bound=True)
    calls["cublas"] = lambda: x @ wb.T
    for name, fn in calls.items():
        err = (fn().float() - ref).abs().max().item() / ref.abs().max().item()
        gpu = triton.testing.do_bench_cudagraph(fn, rep=30)
        row[name] = {"gpu_us": gpu * 1e3, "host_us": host_wall(fn, 40)[0], "max_rel_err": err}
    row["choice"] = {key: val for key, val in qmm.tuned_choices().items() if f", {n}, {k}," in key}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefill_paths_lab.json")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for n, k in SHAPES:
        rows.append(shape_row(n, k, a.m))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nM = {a.m}: GPU us (TFLOP/s, % of cuBLAS) | host us per eager call")
    names = [*(f"q8 {p}" for p in PATHS), "q8 prefill choice", "cublas"]
    print(f"{'N x K':>13s}" + "".join(f"{nm:>30s}" for nm in names))
    for r in rows:
        cb = r["cublas"]["gpu_us"]
        cells = []
        for nm in names:
            g, h = r[nm]["gpu_us"], r[nm]["host_us"]
            cells.append(f"{g:7.1f} ({r['flop'] / g / 1e6:4.0f}, {cb / g:4.0%}) | {h:5.1f}")
        print(f"{r['N']:>6d} x {r['K']:<5d}" + "".join(f"{c:>30s}" for c in cells))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
