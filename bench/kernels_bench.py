"""Benchmark the q8_0 Triton kernels on a GPU (written for the H200) against cuBLAS.

For each weight shape (N, K) of open_llama_3b and Llama-3-8B and each M it
  1. checks correctness first: the fused kernels vs an fp64 product over the same bf16-rounded
     dequantized weight (max |err| / max |ref|, and max |err| over the elementwise bound of
     tests/test_kernels.py), forward, forward + LoRA and grad-input;
  2. times GPU time per call (triton.testing.do_bench_cudagraph, median: graph replays, so Python
     launch overhead is excluded; --eager times eager launches instead) of:
       q8 fwd      q8_0_matmul(x, qs, d)   (the path lorakit picks: gemv / fused tiled / dequant + cuBLAS)
       fused fwd   the fused tiled tensor-core kernel alone (config={"path": "gemm"})
       q8 fwd+lora q8_0_matmul(x, qs, d, a, b, s), r = 16
       q8 grad     q8_0_matmul_grad_input(dy, qs, d)
       cublas      x @ W_bf16.T and dy @ W_bf16 on a pre-dequantized bf16 weight
       deq+mm      dequantize_q8_0(qs, d, bf16) then the cuBLAS matmul (what cpu-torch does)
plus the eager per-call wall time of q8 fwd and cuBLAS (what an eager decode step pays), and prints
TFLOP/s, % of cuBLAS, and for small M the effective bandwidth on the q8_0 bytes
(N*K*34/32) as GB/s and % of the H200's 4.23 TB/s (measured copy bandwidth; 4.8 TB/s datasheet).
Results go to bench/results/kernels_h200.json.

Usage: python bench/kernels_bench.py [--models 3b,8b] [--m 1,16,256,2048,8192] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

SHAPES = {
    # (N, K) = (out, in) of the q8_0 weights
    "3b": [(3200, 3200), (8640, 3200), (3200, 8640), (32000, 3200)],
    "8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
}
M_VALUES = [1, 16, 256, 2048, 8192]
HBM_BYTES_PER_S = 4.23e12
RANK = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="3b,8b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma list of M (tokens)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="activation dtype")
    p.add_argument("--quick", action="store_true", help="first shape of each model, M in {1, 16, 2048}")
    p.add_argument("--no-grad", action="store_true", help="skip the grad-input timings")
    p.add_argument("--rep", type=int, default=50, help="do_bench rep (ms)")
    p.add_argument("--eager", action="store_true", help="time eager launches instead of CUDA-graph replays")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels_h200.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("kernels_bench: no CUDA GPU visible to torch; nothing to run", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    from lorakit.kernels import q8_0_matmul as qmm
    from lorakit.kernels.q8_0_matmul import q8_0_matmul, q8_0_matmul_grad_input
    from lorakit.quant import dequantize_q8_0, quantize_q8_0

    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    u_out = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    models = [s.strip() for s in args.models.split(",") if s.strip()]
    ms = [int(v) for v in args.m.split(",") if v.strip()]
    if args.quick:
        ms = [m for m in ms if m in (1, 16, 2048)] or ms[:1]
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)

    def meta():
        return {
            "device": props.name,
            "sms": props.multi_processor_count,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "dtype": str(dtype),
            "timing": "eager do_bench" if args.eager else "do_bench_cudagraph (GPU time)",
            "hbm_bytes_per_s_assumed": HBM_BYTES_PER_S,
            "elapsed_s": time.time() - t_start,
            "tuned_configs": {str(k): short_cfg(v) for k, v in qmm._BEST.items()},
        }

    rows = []
    t_start = time.time()

    def bench(fn, *fargs, **fkw):
        """GPU time (ms, median) of one call, replayed from a CUDA graph: no Python launch overhead."""
        if args.eager:
            return do_bench(lambda: fn(*fargs, **fkw), rep=args.rep, return_mode="median")
        return do_bench_cudagraph(lambda: fn(*fargs, **fkw), rep=args.rep, return_mode="median")

    def eager(fn, *fargs, **fkw):
        """Wall time per call launched from Python (what an eager decode step pays)."""
        return do_bench(lambda: fn(*fargs, **fkw), rep=args.rep, return_mode="median")

    def deq_mm(x, qs, d):
        return x @ dequantize_q8_0(qs, d, dtype).T

    for model in models:
        shapes = SHAPES[model][:1] if args.quick else SHAPES[model]
        for n, k in shapes:
            g = torch.Generator(device=dev).manual_seed(n * 7 + k)
            w = quantize_q8_0(torch.randn(n, k, device=dev, generator=g))
            qs, d = w.qs, w.d
            w_bf = dequantize_q8_0(qs, d, dtype)
            a = torch.randn(k, RANK, device=dev, generator=g) * 0.05
            b = torch.randn(n, RANK, device=dev, generator=g) * 0.05
            for m in ms:
                x = torch.randn(m, k, device=dev, generator=g).to(dtype)
                dy = torch.randn(m, n, device=dev, generator=g).to(dtype)
                row = {"model": model, "N": n, "K": k, "M": m, "dtype": str(dtype).replace("torch.", "")}

                # ---- correctness first (fp64 reference on the same bf16-rounded W) ----
                ref = x.double() @ w_bf.double().T
                mag = x.double().abs() @ w_bf.double().abs().T
                got = q8_0_matmul(x, qs, d)  # first call per shape autotunes
                got2 = q8_0_matmul(x, qs, d)  # later calls launch the tuned config directly
                row["deterministic"] = bool(torch.equal(got, got2))
                err = torch.maximum((got.double() - ref).abs(), (got2.double() - ref).abs())
                row["fwd_rel_err"] = float(err.max() / ref.abs().max())
                row["fwd_err_over_bound"] = float(
                    (err / (2 * k * 2.0**-24 * mag + 2 * u_out * ref.abs() + 1e-30)).max()
                )
                t_ref = x.double() @ a.to(dtype).double()
                lref = ref + 0.5 * (t_ref @ b.to(dtype).double().T)
                got = q8_0_matmul(x, qs, d, a, b, 0.5)
                row["lora_rel_err"] = float((got.double() - lref).abs().max() / lref.abs().max())
                del ref, mag, got, got2, err, t_ref, lref
                if not args.no_grad:
                    gref = dy.double() @ w_bf.double()
                    gmag = dy.double().abs() @ w_bf.double().abs()
                    got = q8_0_matmul_grad_input(dy, qs, d)
                    got2 = q8_0_matmul_grad_input(dy, qs, d)
                    row["deterministic"] &= bool(torch.equal(got, got2))
                    err = torch.maximum((got.double() - gref).abs(), (got2.double() - gref).abs())
                    row["grad_rel_err"] = float(err.max() / gref.abs().max())
                    row["grad_err_over_bound"] = float(
                        (err / (2 * n * 2.0**-24 * gmag + 2 * u_out * gref.abs() + 1e-30)).max()
                    )
                    del gref, gmag, got, got2, err
                row["ok"] = (
                    row["fwd_err_over_bound"] <= 1 and row.get("grad_err_over_bound", 0) <= 1 and row["deterministic"]
                )
                torch.cuda.empty_cache()

                # ---- timings ----
                flops = 2.0 * m * n * k
                q8_bytes = n * k * 34 / 32
                row["t_q8_fwd_ms"] = bench(q8_0_matmul, x, qs, d)
                row["eager_q8_fwd_ms"] = eager(q8_0_matmul, x, qs, d)
                row["eager_cublas_fwd_ms"] = eager(torch.matmul, x, w_bf.T)
                row["t_q8_lora_ms"] = bench(q8_0_matmul, x, qs, d, a, b, 0.5)
                row["t_fused_fwd_ms"] = bench(q8_0_matmul, x, qs, d, config={"path": "gemm"})
                if not args.no_grad:
                    row["t_fused_grad_ms"] = bench(q8_0_matmul_grad_input, dy, qs, d, config={"path": "gemm"})
                row["t_cublas_fwd_ms"] = bench(torch.matmul, x, w_bf.T)
                row["t_deq_mm_ms"] = bench(deq_mm, x, qs, d)
                if not args.no_grad:
                    row["t_q8_grad_ms"] = bench(q8_0_matmul_grad_input, dy, qs, d)
                    row["t_cublas_grad_ms"] = bench(torch.matmul, dy, w_bf)
                for key in [kk for kk in row if kk.startswith("t_")]:
                    row[key.replace("t_", "tflops_").replace("_ms", "")] = flops / (row[key] * 1e-3) / 1e12
                row["fwd_pct_cublas"] = 100 * row["t_cublas_fwd_ms"] / row["t_q8_fwd_ms"]
                row["fused_fwd_pct_cublas"] = 100 * row["t_cublas_fwd_ms"] / row["t_fused_fwd_ms"]
                row["paths"] = {key: val for key, val in qmm.tuned_choices().items() if f", {n}, {k}," in key}
                if not args.no_grad:
                    row["grad_pct_cublas"] = 100 * row["t_cublas_grad_ms"] / row["t_q8_grad_ms"]
                row["q8_fwd_GBps"] = q8_bytes / (row["t_q8_fwd_ms"] * 1e-3) / 1e9
                row["q8_fwd_pct_hbm"] = 100 * q8_bytes / (row["t_q8_fwd_ms"] * 1e-3) / HBM_BYTES_PER_S
                rows.append(row)
                print_row(row)
                save(args.out, meta(), rows)
            torch.cuda.empty_cache()

    save(args.out, meta(), rows)
    print_table(rows)
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


def short_cfg(cfg) -> str:
    kw = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{kw} warps={cfg.num_warps} stages={cfg.num_stages}"


def save(path, meta, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1))


def print_row(r):
    grad = f" g {r['t_q8_grad_ms'] * 1e3:.1f}us {r['grad_pct_cublas']:.0f}%" if "t_q8_grad_ms" in r else ""
    print(
        f"{r['N']}x{r['K']} M={r['M']} ok={r['ok']} e={r['fwd_rel_err']:.0e}/{r['fwd_err_over_bound']:.2f} "
        f"f {r['t_q8_fwd_ms'] * 1e3:.1f}us {r['fwd_pct_cublas']:.0f}% {r['q8_fwd_GBps']:.0f}GB/s "
        f"L {r['t_q8_lora_ms'] * 1e3:.1f}us{grad} eager {r['eager_q8_fwd_ms'] * 1e3:.0f}us",
        flush=True,
    )


def print_table(rows):
    cols = [
        ("N", lambda r: str(r["N"])),
        ("K", lambda r: str(r["K"])),
        ("M", lambda r: str(r["M"])),
        ("ok", lambda r: "yes" if r["ok"] else "NO"),
        ("fwd us", lambda r: f"{r['t_q8_fwd_ms'] * 1e3:.1f}"),
        ("TF/s", lambda r: f"{r['tflops_q8_fwd']:.1f}"),
        ("cuBLAS", lambda r: f"{r['tflops_cublas_fwd']:.1f}"),
        ("%cuB", lambda r: f"{r['fwd_pct_cublas']:.0f}"),
        ("fused%", lambda r: f"{r['fused_fwd_pct_cublas']:.0f}"),
        ("deq+mm", lambda r: f"{r['t_deq_mm_ms'] * 1e3:.1f}"),
        ("+lora", lambda r: f"{r['t_q8_lora_ms'] * 1e3:.1f}"),
        ("gTF/s", lambda r: f"{r['tflops_q8_grad']:.1f}" if "tflops_q8_grad" in r else "-"),
        ("g%cuB", lambda r: f"{r['grad_pct_cublas']:.0f}" if "grad_pct_cublas" in r else "-"),
        ("GB/s", lambda r: f"{r['q8_fwd_GBps']:.0f}" if r["M"] <= 16 else "-"),
        ("% HBM", lambda r: f"{r['q8_fwd_pct_hbm']:.0f}" if r["M"] <= 16 else "-"),
    ]
    widths = [max(len(name), *(len(f(r)) for r in rows)) if rows else len(name) for name, f in cols]
    print("  ".join(name.rjust(wd) for (name, _), wd in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(f(r).rjust(wd) for (_, f), wd in zip(cols, widths, strict=True)))
    if rows:
        geo = math.exp(sum(math.log(r["fwd_pct_cublas"]) for r in rows) / len(rows))
        print(f"geometric mean of fwd % of cuBLAS: {geo:.0f}%")


if __name__ == "__main__":
    sys.exit(main())
