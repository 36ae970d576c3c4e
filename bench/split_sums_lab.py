#!/usr/bin/env python3
"""A/B in one run: the captured greedy decode step of the 3B q8_0 model (batch 1, no adapter, bf16, positions from 64)
with its q|k|v, output and down products leaving the split-K reduction to their consumers (GraphDecoder(split_sums=
True), the default) and with every product reduced first (split_sums=False); interleaved rounds, a fresh capture
each, best of 3 per capture; the tokens of both must agree.

    python bench/split_sums_lab.py [--rounds 3] [--out bench/results/split_sums_lab.json]
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


def main(argv=None) -> int:
    from decode_tiles_lab import best_step_us, prompted
    from finetune_gpu import random_q8_model, shapes

    from lorakit.backends import get_backend
    from lorakit.decode import GraphDecoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "split_sums_lab.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("split_sums_lab.py: needs a CUDA GPU", file=sys.stderr)
        return 1
    be = get_backend("cuda-triton")
    model = random_q8_model(shapes(a.layers), be.device)
    _, gen, cache = prompted(model, be, False)
    times = {True: [], False: []}
    tokens = {}
    for _ in range(a.rounds):
        for split in (True, False):
            dec = GraphDecoder(model, be, [], gen.rope, cache, torch.bfloat16, greedy=True, split_sums=split)
            tokens[split] = list(dec.tokens(5, 64, 16))  # capture, warm-up, and the tokens to compare
            times[split].append(best_step_us(dec, 96, 3))
    same = tokens[True] == tokens[False]
    res = {
        "split_sums_us": min(times[True]),
        "reduced_us": min(times[False]),
        "rounds": {str(k): v for k, v in times.items()},
        "same_tokens": same,
    }
    res["speedup"] = res["reduced_us"] / res["split_sums_us"]
    print(f"split sums: {res['split_sums_us']:.1f} us per step ({1e6 / res['split_sums_us']:.0f} tok/s); reduced "
          f"first: {res['reduced_us']:.1f} us ({1e6 / res['reduced_us']:.0f} tok/s); x{res['speedup']:.3f}; "
          f"same tokens: {same}")  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
