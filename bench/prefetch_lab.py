#!/usr/bin/env python3
"""Lab: do L2 prefetch hints for the next product's weight shorten a decode step?

Each of the step's 105 q8_0 products pays ~6.8 us of fixed cost (bench/results/h200_session10/NOTES.md). With a
decode.PrefetchPlan, extra programs at the end of each product's launch ask L2 for the first `tail` bytes of the
next product's weight (the rows its first programs read). For each plan this times a captured greedy decode step
of the 3B q8_0 model (batch 1), interleaved with the others over several rounds, without and with two scaled
adapters, and checks that every plan decodes the same tokens as no prefetch. (Session 11 also measured the small
launches between the products prefetching, the products' own first programs prefetching, and the tensor-core GEMV
forming t = x @ a; those variants are in its NOTES.md and the git history.)

    python bench/prefetch_lab.py [--layers 26] [--rounds 3] [--out bench/results/prefetch_lab.json]
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

MB = 1 << 20
MAX_SPLITS = 16  # decode_ops.MAX_SPLITS as shipped
PLANS = {  # name -> (tail, kind[, {"wo_tail": bytes for the output projections, "splits": attention splits}])
    "none": (0, 2),
    "tail2": (2 * MB, 2),
    "tail4": (4 * MB, 2),
    "tail6": (6 * MB, 2),
    "tail8": (8 * MB, 2),
    "tail12": (12 * MB, 2),
    "tail16": (16 * MB, 2),
    "tail8-plain": (8 * MB, 1),
    "tail4+wo2": (4 * MB, 2, {"wo_tail": 2 * MB}),
    "tail4+wo8": (4 * MB, 2, {"wo_tail": 8 * MB}),
    "tail4+wo11": (4 * MB, 2, {"wo_tail": 11 * MB}),
    "tail4+splits4": (4 * MB, 2, {"splits": 4}),
    "tail4+splits2": (4 * MB, 2, {"splits": 2}),
}


def run_plan(model, be, ads, gen, cache, plan, n: int) -> tuple[float, list[int]]:
    """(us per greedy step over n steps after a fresh capture, the first 32 tokens)."""
    from decode_tiles_lab import best_step_us

    from lorakit.decode import GraphDecoder, PrefetchPlan
    from lorakit.kernels import decode_ops

    extra = plan[2] if len(plan) > 2 else {}
    decode_ops.MAX_SPLITS = extra.get("splits", MAX_SPLITS)  # read when the step is captured
    dec = GraphDecoder(model, be, ads, gen.rope, cache, torch.bfloat16, greedy=True, prefetch=PrefetchPlan(*plan[:2]))
    if "wo_tail" in extra:  # the hints of the output projections (product 4 i + 1) take their own amount
        for i, hint in enumerate(dec.hints[:-1]):
            if i % 4 == 1 and hint is not None:
                dec.hints[i] = hint._replace(nbytes=extra["wo_tail"])
    toks = list(dec.tokens(5, 64, 32))  # capture + warm-up + the tokens to compare
    return best_step_us(dec, n, 2), toks


def main(argv=None) -> int:
    from decode_tiles_lab import prompted
    from finetune_gpu import random_q8_model, shapes

    from lorakit.backends import get_backend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--ad-plans", default=None, help="the plans with adapters (default: --plans)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefetch_lab.json")
    a = ap.parse_args(argv)
    ad_plans = a.plans if a.ad_plans is None else a.ad_plans
    plans = {False: [p for p in a.plans.split(",") if p], True: [p for p in ad_plans.split(",") if p]}

    be = get_backend("cuda-triton")
    model = random_q8_model(shapes(a.layers), be.device)
    result = {"plans": {k: PLANS[k] for k in {*plans[False], *plans[True]}}, "runs": {}}
    for with_ads in (False, True):
        names = plans[with_ads]
        ads, gen, cache = prompted(model, be, with_ads)
        times = {k: [] for k in names}
        ref = None
        same = {}
        for r in range(a.rounds):
            for k in names:
                us, toks = run_plan(model, be, ads, gen, cache, PLANS[k], n=160)
                ref = toks if ref is None else ref
                same[k] = same.get(k, True) and toks == ref
                times[k].append(us)
                print(json.dumps({"adapters": with_ads, "round": r, "plan": k, "us": round(us, 1),
                                  "same_tokens": toks == ref}), flush=True)  # fmt: skip
        tag = "two adapters" if with_ads else "no adapters"
        base = min(times["none"]) if "none" in times else None
        print(f"\n{tag}: us per step (best of {a.rounds} rounds), tok/s, vs none, same tokens")
        for k in names:
            t = min(times[k])
            ratio = f"{base / t:6.3f}x" if base else ""
            print(f"  {k:14s}{t:9.1f}{1e6 / t:8.0f}  {ratio}  {same[k]}")
        result["runs"]["adapters" if with_ads else "base"] = {"us": times, "same_tokens": same}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    return 0 if all(all(r["same_tokens"].values()) for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
