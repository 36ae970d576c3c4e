#!/usr/bin/env python3
"""One q8_0 product on the GPU, run three times, for Nsight Compute to profile the last launch
(bench/gpu_session.sh's ncu-* steps run it under `ncu --launch-skip 2 --launch-count 1`). The weight is random,
the activations bf16; the path and, for the Gluon kernel, its config are forced:

    python bench/ncu_kernel.py --path wgmma --cfg ws --m 2048 --n 9600 --k 3200
    python bench/ncu_kernel.py --path gemv_tc --m 1 --n 3200 --k 8640
    python bench/ncu_kernel.py --path gemv_tc --tiles 16/256/4/4 --m 1 --n 3200 --k 3200

Without --tiles a tuned path's first launches are the autotuner's; --tiles BLOCK_N/BLOCK_K/SPLIT_K/stages forces
the tensor-core GEMV's config so that every launch is the same.

Session 14 profiled the warp-specialized Gluon kernel this way (bench/results/h200_session14/call7_ncu_ws.txt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorakit.kernels.q8_0_matmul import q8_0_matmul  # noqa: E402
from lorakit.kernels.q8_0_wgmma import RS_CONFIGS, WGMMA_CONFIGS, WS_CONFIGS  # noqa: E402
from lorakit.quant import quantize_q8_0  # noqa: E402

GLUON = {"ws": WS_CONFIGS[0], "rs": RS_CONFIGS[0], "ss": WGMMA_CONFIGS[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", choices=["wgmma", "gemv_tc", "gemv", "large", "dequant"], required=True)
    p.add_argument("--cfg", choices=sorted(GLUON), default="ws", help="the Gluon kernel's form (--path wgmma)")
    p.add_argument("--m", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--tiles", help="--path gemv_tc: BLOCK_N/BLOCK_K/SPLIT_K/stages")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_kernel.py: needs a CUDA GPU", file=sys.stderr)
        return 1
    w = quantize_q8_0(torch.randn(args.n, args.k, device="cuda"))
    x = torch.randn(args.m, args.k, device="cuda").bfloat16()
    config = {"path": args.path, **(GLUON[args.cfg] if args.path == "wgmma" else {})}
    if args.tiles:
        bn, bk, sk, st = (int(v) for v in args.tiles.split("/"))
        config.update(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=bn // 16, num_stages=st)
    for _ in range(3):
        q8_0_matmul(x, w.qs, w.d, config=config)
    torch.cuda.synchronize()
    print(f"ran {args.path} {config} at {args.m} x {args.n} x {args.k} three times")
    return 0


if __name__ == "__main__":
    sys.exit(main())
