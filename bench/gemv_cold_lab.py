#!/usr/bin/env python3
"""Does the decode GEMV's tuner pick the right config? The autotuner times each tensor-core GEMV config
(q8_0_tuning._GEMV_TC_CONFIGS) by replaying one product, so a weight smaller than L2 (50 MB) is read from L2;
in a decode step every weight comes from HBM. This times every config both ways at the float decode step's
products (M = 1, packed q/k/v and gate/up as lorakit runs them), hot (the same copy each call) and cold (copies
cycled past L2, as bench/read_floor.py), and reports per shape the hot-best config's cold time against the
cold-best config's. H200:

    python bench/gemv_cold_lab.py [--out bench/results/gemv_cold_lab_h200.json]
    python bench/gemv_cold_lab.py --sweep --shapes 3200x3200,4096x4096   # beside the tuner's configs, a wider set

--sweep adds configs outside the tuner's list: split counts that divide K's tiles evenly (3, 5, 6, 10, ...), K tiles of
64 with deeper pipelines.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_floor import cold_ms, hot_cold_ms, lab_parser, save_rows  # noqa: E402

from lorakit.kernels.q8_0_matmul import q8_0_matmul  # noqa: E402
from lorakit.kernels.q8_0_tuning import _GEMV_TC_CONFIGS  # noqa: E402
from lorakit.quant import quantize_q8_0  # noqa: E402

# (N, K): open_llama_3b's packed q/k/v, o, packed gate/up, down, output; Llama-3-8B's packed q/k/v, o, down
SHAPES = [(9600, 3200), (3200, 3200), (17280, 3200), (3200, 8640), (32000, 3200), (6144, 4096), (4096, 4096),
          (4096, 14336)]  # fmt: skip
# --sweep: (BLOCK_N, BLOCK_K, stages) x SPLIT_K
SWEEP_TILES = [(16, 64, 6), (16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 3)]
SWEEP_SPLITS = [3, 4, 5, 6, 8, 10, 16]


def main(argv=None) -> int:
    p = lab_parser(__doc__, "gemv_cold_lab_h200.json")
    p.add_argument("--sweep", action="store_true", help="also time the wider config set (SWEEP_TILES x SWEEP_SPLITS)")
    p.add_argument("--sweep-tiles", help="--sweep's BLOCK_N/BLOCK_K/stages triples, e.g. 16/256/3,32/128/3")
    p.add_argument("--sweep-splits", help="--sweep's SPLIT_K values, e.g. 3,5,8")
    p.add_argument("--m", type=int, default=1, help="rows of x (1 to 16)")
    p.add_argument("--shapes", help="N x K pairs, e.g. 3200x3200,4096x4096 (default: the decode step's)")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    if not torch.cuda.is_available():
        print("gemv_cold_lab.py: needs a CUDA GPU", file=sys.stderr)
        return 1
    cfgs = [dict(path="gemv_tc", **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in _GEMV_TC_CONFIGS]
    if args.sweep:
        tiles = (
            [tuple(int(v) for v in t.split("/")) for t in args.sweep_tiles.split(",")]
            if args.sweep_tiles
            else SWEEP_TILES
        )
        splits = [int(v) for v in args.sweep_splits.split(",")] if args.sweep_splits else SWEEP_SPLITS
        known = {(c["BLOCK_N"], c["BLOCK_K"], c["SPLIT_K"], c["num_stages"]) for c in cfgs}
        cfgs += [dict(path="gemv_tc", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=bn // 16, num_stages=st)
                 for bn, bk, st in tiles for sk in splits if (bn, bk, sk, st) not in known]  # fmt: skip
    names = [f"{c['BLOCK_N']}/{c['BLOCK_K']}/{c['SPLIT_K']}/{c['num_stages']}" for c in cfgs]
    rows = []
    print(f"us per product at M = {args.m} (config BLOCK_N/BLOCK_K/SPLIT_K/stages); hot: one copy, cold: past L2")
    for n, k in shapes:
        w = quantize_q8_0(torch.randn(n, k, device="cuda"))
        copies = min(32, -(-200_000_000 // (n * k)))
        ws = [(w.qs.clone(), w.d.clone()) for _ in range(copies)]
        x = torch.randn(args.m, k, device="cuda").bfloat16()
        ref = q8_0_matmul(x, w.qs, w.d, config=cfgs[0])
        hot, cold = {}, {}
        for name, cfg in zip(names, cfgs, strict=True):
            y = q8_0_matmul(x, w.qs, w.d, config=cfg)
            if (y.float() - ref.float()).abs().max() > 1e-2 * ref.float().abs().max():
                print(f"  {n}x{k} {name}: result differs", flush=True)
            hot[name], cold[name] = (
                1e3 * t for t in hot_cold_ms([partial(q8_0_matmul, x, qs, d, config=cfg) for qs, d in ws])
            )
        q8_0_matmul(x, w.qs, w.d)  # the tuner's own choice (timed hot), for reference
        t_tuned = 1e3 * cold_ms([partial(q8_0_matmul, x, qs, d) for qs, d in ws])
        hot_best = min(hot, key=hot.get)
        cold_best = min(cold, key=cold.get)
        gain = 100 * (cold[hot_best] / cold[cold_best] - 1)
        print(f"{n:6d} x {k:6d}: hot-best {hot_best:>14} {hot[hot_best]:6.2f} hot {cold[hot_best]:6.2f} cold | "
              f"cold-best {cold_best:>14} {cold[cold_best]:6.2f} cold ({gain:+.0f}%) | tuned path cold "
              f"{t_tuned:6.2f}", flush=True)  # fmt: skip
        print("    " + "  ".join(f"{nm}: {hot[nm]:.1f}/{cold[nm]:.1f}" for nm in names), flush=True)
        rows.append(dict(n=n, k=k, copies=copies, hot_us=hot, cold_us=cold, hot_best=hot_best, cold_best=cold_best,
                         tuned_cold_us=t_tuned))  # fmt: skip
        del ws
    save_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
