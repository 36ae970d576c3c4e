#!/usr/bin/env python3
"""Lab: do L2 prefetch hints for the next product's weight shorten a decode step?

Each of the step's 105 q8_0 products pays ~6.8 us of fixed cost (bench/results/h200_session10/NOTES.md), and
the small launches between them (add+RMSNorm, attention, SwiGLU: ~320 us per step) leave HBM idle. With a
decode.Prefetch plan, extra programs of the launches before each product ask L2 for the product's first bytes
(its first programs' rows): `tail` bytes from the previous product's launch, the next `gap` bytes from the small
launch right before it. For each plan this times a captured greedy decode step of the 3B q8_0 model (batch 1),
interleaved with the others over several rounds, without and with two scaled adapters, and checks that every
plan decodes the same tokens as no prefetch.

    python bench/prefetch_lab.py [--layers 26] [--rounds 3] [--out bench/results/prefetch_lab.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MB = 1 << 20
MAX_SPLITS = 16  # decode_ops.MAX_SPLITS as shipped
PLANS = {  # name -> (tail, gap, kind[, {"wo_tail": bytes for the output projections, "splits": attention splits}])
    "none": (0, 0, 2),
    "tail4+wo8": (4 * MB, 0, 2, {"wo_tail": 8 * MB}),
    "tail4+wo11": (4 * MB, 0, 2, {"wo_tail": 11 * MB}),
    "tail4+wo2": (4 * MB, 0, 2, {"wo_tail": 2 * MB}),
    "tail4+splits4": (4 * MB, 0, 2, {"splits": 4}),
    "tail4+splits2": (4 * MB, 0, 2, {"splits": 2}),
    "tail2": (2 * MB, 0, 2),
    "tail6": (6 * MB, 0, 2),
    "tail8": (8 * MB, 0, 2),
    "tail12": (12 * MB, 0, 2),
    "tail16": (16 * MB, 0, 2),
    "tail8-plain": (8 * MB, 0, 1),
    "tail4+gap2": (4 * MB, 2 * MB, 2),
    "tail8+gap2": (8 * MB, 2 * MB, 2),
    "gap4": (0, 4 * MB, 2),
    "gap8": (0, 8 * MB, 2),
    "gap16": (0, 16 * MB, 2),
    "gap32": (0, 32 * MB, 2),
    "gap8-plain": (0, 8 * MB, 1),
    "tail4": (4 * MB, 0, 2),
    "tail4+gap8": (4 * MB, 8 * MB, 2),
    "tail8+gap16": (8 * MB, 16 * MB, 2),
}


def run_plan(model, be, ads, gen, cache, plan, n: int) -> tuple[float, list[int]]:
    """(us per greedy step over n steps after a fresh capture, the first 32 tokens)."""
    from lorakit.kernels import decode_ops

    from lorakit.decode import GraphDecoder, Prefetch

    extra = plan[3] if len(plan) > 3 else {}
    decode_ops.MAX_SPLITS = extra.get("splits", MAX_SPLITS)  # read when the step is captured
    dec = GraphDecoder(model, be, ads, gen.rope, cache, torch.bfloat16, greedy=True, prefetch=Prefetch(*plan[:3]))
    if "wo_tail" in extra:  # the hints of the output projections (product 4 i + 1) take their own amount
        for i, (tail, gap) in enumerate(dec.hints[:-1]):
            if i % 4 == 1 and tail is not None:
                dec.hints[i] = (tail._replace(nbytes=extra["wo_tail"]), gap)
    toks = list(dec.tokens(5, 64, 32))  # capture + warm-up + the tokens to compare
    best = float("inf")
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        list(dec.tokens(5, 64, n))
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    del dec
    return best, toks


def main(argv=None) -> int:
    from finetune_gpu import random_q8_model, shapes
    from lorakit.backends import get_backend
    from predict_gpu import random_adapter

    from lorakit.generate import Generator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--ad-plans", default=None, help="the plans with adapters (default: --plans)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefetch_lab.json")
    a = ap.parse_args(argv)
    plans = {False: a.plans.split(","), True: (a.ad_plans or a.plans).split(",")}

    be = get_backend("cuda-triton")
    model = random_q8_model(shapes(a.layers), be.device)
    result = {"plans": {k: PLANS[k] for k in {*plans[False], *plans[True]}}, "runs": {}}
    for with_ads in (False, True):
        names = plans[with_ads]
        ads = []
        if with_ads:
            ads = [(random_adapter(model, 4, 1, be.device), 0.7), (random_adapter(model, 4, 2, be.device), 0.4)]
        gen = Generator(model, be, ads, n_ctx=256, dtype=torch.bfloat16)
        cache = gen.new_cache()
        gen.logits(list(range(3, 67)), cache, 0)
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
