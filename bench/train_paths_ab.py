"""The seed's GPU finetune setting (batch 4 x ctx 64, checkpointing, 7 kinds) with the product paths the chooser
measured against the same step with them overridden, side by side in one process.

Session 31 measured the 4 x 64 step 15% slower on main than on session 6's code on the same H200 (8,352 / 8,457
against 9,852 / 9,889 tok/s, alternating; bench/results/h200_session31/). At its 256 rows the chooser takes the fused
forward kernels, timed one product at a time with the weight dequantized inside the dequantize + cuBLAS path's
time; in the step the backward's input gradient dequantizes the weight anyway (DequantCache), so that comparison
may mislead (session 25's profile: the fused kernel 53 us against cuBLAS's 28 us on the dequantized weight).

Variants (the chooser's own cache of measured paths, rewritten between runs; nothing else changes):
  chooser      the paths as measured
  fwd-dequant  every forward product whose candidates include dequantize + cuBLAS (>= 256 rows) takes it
  all-dequant  the same for the input gradients too
Each is timed twice (interleaved) as the benchmark times lorakit (bench/finetune_gpu.py: the graphed step and the
fused AdamW), then profiled once (kernel table of one eager step, bench/profile_gpu.py).

    python bench/train_paths_ab.py [--layers 26] [--steps 8] [--out bench/results/train_paths_ab_h200.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_gpu import bench_lorakit, random_q8_model, shapes  # noqa: E402
from profile_gpu import profile_train, show  # noqa: E402
from read_floor import lab_parser, save_rows  # noqa: E402

VARIANTS = ("chooser", "fwd-dequant", "all-dequant")


def overridden(measured: dict, variant: str, min_m: int) -> dict:
    """The chooser's path cache for `variant`: keys (op, m, n, k, in dtype, out dtype, ...) of the products with
    at least min_m rows and one dtype (where dequantize + cuBLAS is a candidate) set to "dequant"."""
    ops = {"chooser": (), "fwd-dequant": ("fwd",), "all-dequant": ("fwd", "grad")}[variant]
    return {key: "dequant" if key[0] in ops and key[1] >= min_m and key[4] == key[5] else path
            for key, path in measured.items()}  # fmt: skip


def main(argv=None) -> int:
    p = lab_parser(__doc__, "train_paths_ab_h200.json")
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("train_paths_ab.py: needs a CUDA GPU", file=sys.stderr)
        return 1
    from lorakit.backends import get_backend
    from lorakit.kernels import q8_0_tuning
    from lorakit.kernels.q8_0_matmul import DEQUANT_MIN_M

    s = shapes(args.layers)
    bench_lorakit(s, 4, 64, True, "7", 1)  # the chooser measures every product of the step
    measured = dict(q8_0_tuning._PATH)

    def use(variant: str) -> None:
        q8_0_tuning._PATH.clear()
        q8_0_tuning._PATH.update(overridden(measured, variant, DEQUANT_MIN_M))

    rows = []
    for rep in range(2):
        for variant in VARIANTS:
            use(variant)
            r = bench_lorakit(s, 4, 64, True, "7", args.steps)
            rows.append(dict(variant=variant, rep=rep, **r))
            print(f"{variant:12s} rep {rep}: {r['tokens_per_s']:8.0f} tok/s  {r['peak_gib']:.2f} GiB", flush=True)
    be = get_backend("cuda-triton")
    model = random_q8_model(s, be.device)
    profiles = {}
    for variant in VARIANTS:
        use(variant)
        profiles[variant] = profile_train(model, be, 4, 64, True)
        show(variant, profiles[variant])
    print("\nvariant        tok/s (runs)          vs chooser")
    base = [r["tokens_per_s"] for r in rows if r["variant"] == "chooser"]
    for variant in VARIANTS:
        tps = [r["tokens_per_s"] for r in rows if r["variant"] == variant]
        print(f"{variant:12s} {' / '.join(f'{t:7.0f}' for t in tps)}   {sum(tps) / sum(base):.3f}x")
    save_rows(args.out, rows, measured={str(k): v for k, v in measured.items()}, profiles=profiles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
