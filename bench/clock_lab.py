#!/usr/bin/env python3
"""Is the fused q8_0 matmul's gap to cuBLAS a matter of clocks? Each product runs back to back (CUDA-graph
replays) for a few seconds while nvidia-smi samples the SM clock and the board power every 100 ms; the table
gives TFLOP/s, the mean SM clock and power over the run, and TFLOP/s per GHz (each as % of cuBLAS's), H200:

    python bench/clock_lab.py [--seconds 4] [--out bench/results/clock_lab_h200.json]

Products (9600 x 3200, the 3B model's gate/up shape, M = 2048 and 8192): cuBLAS bf16 on the dequantized weight,
the warp-specialized Gluon forward (WS_CONFIGS[0]), the input gradient by dequantize + cuBLAS and by the Gluon
kernel (WS_GRAD_CONFIGS[0]), and any experiment configs the kernel module has (DQ_CONFIGS, WS_PERM_CONFIGS).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from read_floor import lab_parser, save_rows  # noqa: E402

from lorakit.kernels import q8_0_wgmma  # noqa: E402
from lorakit.kernels.q8_0_matmul import q8_0_matmul_grad_input  # noqa: E402
from lorakit.quant import dequantize_q8_0, quantize_q8_0  # noqa: E402


def _sampled(fn, seconds: float) -> tuple[float, float, float]:
    """(ms per call, mean SM MHz, mean W) of fn replayed from a CUDA graph for about `seconds`."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    per_replay = time.perf_counter() - t0
    reps = max(1, int(seconds / max(per_replay, 1e-6)))
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "100"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    smi.terminate()
    out = smi.communicate()[0]
    samples = [[float(v) for v in ln.split(",")] for ln in out.strip().splitlines() if ln.count(",") == 1]
    samples = samples[2:-1] or samples  # the first samples may precede the load
    mhz = sum(s[0] for s in samples) / len(samples)
    watts = sum(s[1] for s in samples) / len(samples)
    return start.elapsed_time(end) / (reps * 20), mhz, watts


def main(argv=None) -> int:
    p = lab_parser(__doc__, "clock_lab_h200.json")
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        print("clock_lab.py: needs a CUDA GPU and nvidia-smi", file=sys.stderr)
        return 1
    n, k = 9600, 3200
    w = quantize_q8_0(torch.randn(n, k, device="cuda"))
    wb = dequantize_q8_0(w.qs, w.d, torch.bfloat16)
    fwd_cfgs = {"ws": q8_0_wgmma.WS_CONFIGS[0]}
    grad_cfgs = {"ws grad": q8_0_wgmma.WS_GRAD_CONFIGS[0]}
    for name, attr in (("dq", "DQ_CONFIGS"), ("perm", "WS_PERM_CONFIGS")):
        fwd_cfgs.update({f"{name}{i}": c for i, c in enumerate(getattr(q8_0_wgmma, attr, []))})
    for name, attr in (("dq grad", "DQ_GRAD_CONFIGS"), ("perm grad", "WS_GRAD_PERM_CONFIGS")):
        grad_cfgs.update({f"{name}{i}": c for i, c in enumerate(getattr(q8_0_wgmma, attr, []))})
    qs_perm = q8_0_wgmma.mma_ready_q8(w.qs) if hasattr(q8_0_wgmma, "mma_ready_q8") else None
    qs_perm_t = q8_0_wgmma.mma_ready_q8(w.qs, transposed=True) if qs_perm is not None else None
    rows = []
    print(f"{'M':>5} {'product':<14} {'TFLOP/s':>8} {'MHz':>6} {'W':>5}  % of cuBLAS: TFLOP/s, per GHz")
    for m in (2048, 8192):
        x = torch.randn(m, k, device="cuda").bfloat16()
        y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        dy = torch.randn(m, n, device="cuda").bfloat16()
        dx = torch.empty(m, k, dtype=torch.bfloat16, device="cuda")
        ops = {"cublas": partial(torch.matmul, x, wb.T, out=y), "cublas grad": partial(torch.matmul, dy, wb, out=dx),
               "dequant grad": partial(q8_0_matmul_grad_input, dy, w.qs, w.d, config={"path": "dequant"})}  # fmt: skip
        for name, cfg in fwd_cfgs.items():
            qs = qs_perm if cfg.get("PERM") else w.qs
            ops[name] = partial(q8_0_wgmma.wgmma_matmul, x, qs, w.d, y, None, cfg)
        for name, cfg in grad_cfgs.items():
            qs = qs_perm_t if cfg.get("PERM") else w.qs
            ops[name] = partial(q8_0_wgmma.wgmma_grad_input, dy, qs, w.d, dx, cfg)
        res = {name: _sampled(fn, args.seconds) for name, fn in ops.items()}
        flops = 2.0 * m * n * k
        for name, (ms, mhz, watts) in res.items():
            ref_ms, ref_mhz, _ = res["cublas grad" if "grad" in name else "cublas"]
            tf = flops / ms / 1e9
            pct = 100 * ref_ms / ms
            per_ghz = pct * ref_mhz / mhz
            print(f"{m:5d} {name:<14} {tf:8.0f} {mhz:6.0f} {watts:5.0f}  {pct:5.1f}% {per_ghz:5.1f}%", flush=True)
            rows.append(dict(m=m, n=n, k=k, product=name, ms=ms, sm_mhz=mhz, watts=watts, tflops=tf,
                             pct_cublas=pct, pct_cublas_per_clock=per_ghz))  # fmt: skip
    save_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
