#!/usr/bin/env python3
"""GPU check of the q8_0 decode products at the Llama-3-8B and open_llama_3b shapes, M = 1 and 16: every
tensor-core gemv config (forced), its autotuned launch and the FMA gemv, against an fp64 product over the same
bf16 W, and whether the weight survives the calls unchanged.

    python bench/gemv_tc_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorakit.kernels.q8_0_matmul import q8_0_matmul  # noqa: E402
from lorakit.kernels.q8_0_tuning import _GEMV_TC_CONFIGS  # noqa: E402
from lorakit.quant import dequantize_q8_0, quantize_q8_0  # noqa: E402


def main() -> int:
    bad = 0
    for n, k in [(14336, 4096), (4096, 4096), (4096, 14336), (3200, 3200), (32000, 3200)]:
        g = torch.Generator(device="cuda").manual_seed(n * 7 + k)
        w = quantize_q8_0(torch.randn(n, k, device="cuda", generator=g))
        qs0, d0 = w.qs.clone(), w.d.clone()
        wb = dequantize_q8_0(w.qs, w.d, torch.bfloat16).double()
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            ref = x.double() @ wb.T
            runs = {"tuned": {}, "fma": {"path": "gemv"} if m <= 2 else {"path": "gemm"}}
            for c in _GEMV_TC_CONFIGS:
                kw = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                runs["tc" + "_".join(map(str, c.kwargs.values()))] = {"path": "gemv_tc", **kw}
            for name, cfg in runs.items():
                y = q8_0_matmul(x, w.qs, w.d, config=cfg or None)
                torch.cuda.synchronize()
                rel = float((y.double() - ref).abs().max() / ref.abs().max())
                zero = int((y == 0).sum())
                far = ((y.double() - ref).abs() > 0.05 * ref.abs().max()).nonzero()
                where = f" bad {far.shape[0]}: {far[:3].tolist()} .. {far[-2:].tolist()}" if far.numel() else ""
                ok = rel < 1e-2
                bad += not ok
                if not ok or name in ("tuned", "fma"):
                    verdict = "ok" if ok else "BAD"
                    print(f"{n}x{k} M={m} {name:18s} rel err {rel:.2e} zeros {zero} {verdict}{where}", flush=True)
            same = torch.equal(w.qs, qs0) and torch.equal(w.d, d0)
            print(f"{n}x{k} M={m} weight unchanged: {same}", flush=True)
            bad += not same
    print("bad:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
