#!/usr/bin/env python3
"""Lab: are the decode GEMVs' autotuned tiles the best ones inside a decode step?

The autotuner times each config on CUDA-graph replays of the product alone, where a weight of up to ~50 MB stays
in the H200's L2 between replays; in a decode step every weight comes cold from HBM, after a different kernel.
For each decode product key of the 3B q8_0 model (batch 1) this lab times every candidate config three ways:
  hot   - the product alone, graph replays (what the autotuner sees),
  cold  - the product alone after a 128 MB read that evicts L2 (graph replays of [evict, product] minus [evict]),
  step  - a whole captured greedy decode step with that config for this key and the tuned one for the others,
then times the step with the per-key winners of `step` against the tuned set, interleaved, 3 rounds.

    python bench/decode_tiles_lab.py [--adapters] [--layers 26] [--out bench/results/decode_tiles_lab.json]

--adapters: the same for the FMA GEMV keys a step with two scaled adapters uses.
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


def best_step_us(dec, n: int, rounds: int) -> float:
    """Microseconds per step of a greedy GraphDecoder's n tokens from position 64, the best of `rounds`."""
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        list(dec.tokens(5, 64, n))
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def prompted(model, be, with_adapters: bool):
    """(adapters, Generator, KV cache holding a 64-token prompt) for decode steps from position 64: none or
    predict_gpu's two scaled adapters, n_ctx 256, bf16."""
    from predict_gpu import two_adapters

    from lorakit.generate import Generator

    ads = two_adapters(model, be.device) if with_adapters else []
    gen = Generator(model, be, ads, n_ctx=256, dtype=torch.bfloat16)
    cache = gen.new_cache()
    gen.logits(list(range(3, 67)), cache, 0)
    return ads, gen, cache


def step_us(model, be, adapters, gen, cache, n: int = 96) -> float:
    """GPU decode: microseconds per greedy step (argmax in the step), after a fresh capture."""
    from lorakit.decode import GraphDecoder

    dec = GraphDecoder(model, be, adapters, gen.rope, cache, torch.bfloat16, greedy=True)
    list(dec.tokens(5, 64, 2))  # capture + warm-up
    return best_step_us(dec, n, 3)


def alone_us(x, w, evict) -> tuple[float, float]:
    """The product alone, graph replays: (L2-hot us, cold us = [evict, product] - [evict])."""
    from triton.testing import do_bench_cudagraph

    from lorakit.kernels.q8_0_matmul import q8_0_matmul

    def mm():
        return q8_0_matmul(x, w.qs, w.d)

    def ev():
        return evict.sum(dtype=torch.int32)

    mm()
    hot = do_bench_cudagraph(mm, rep=20) * 1e3
    both = do_bench_cudagraph(lambda: (ev(), mm()), rep=40) * 1e3
    return hot, both - do_bench_cudagraph(ev, rep=40) * 1e3


def main(argv=None) -> int:
    from finetune_gpu import random_q8_model, shapes

    from lorakit.backends import get_backend
    from lorakit.kernels import q8_0_tuning
    from lorakit.quant import Q8Weight

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--adapters", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decode_tiles_lab.json")
    a = ap.parse_args(argv)

    be = get_backend("cuda-triton")
    model = random_q8_model(shapes(a.layers), be.device)
    ads, gen, cache = prompted(model, be, a.adapters)
    base = step_us(model, be, ads, gen, cache)  # also autotunes every decode key
    kind = "gemv" if a.adapters else "gemv_tc"
    cands = q8_0_tuning._GEMV_CONFIGS if a.adapters else q8_0_tuning._GEMV_TC_CONFIGS
    best_map = q8_0_tuning._BEST
    keys = [k for k in best_map if k[0] == kind and k[1] == 1 and k[6] == a.adapters]
    tuned = {k: best_map[k] for k in keys}
    print(f"tuned step: {base:.1f} us; keys: {[(k[2], k[3]) for k in keys]}", flush=True)

    weights = {}
    for mod in (model.tensors, model.fused):
        for w in mod.values():
            if isinstance(w, Q8Weight):
                weights.setdefault(tuple(w.qs.shape), w)
    evict = torch.empty(128 << 20, dtype=torch.uint8, device=be.device)

    def set_cfg(key, cfg):
        best_map[key] = cfg
        q8_0_tuning._META.pop(key, None)

    rows = []
    winners = {}
    for key in keys:
        n, k = key[2], key[3]
        w = weights.get((n, k))
        x = torch.randn(1, k, dtype=torch.bfloat16, device=be.device)
        per = []
        for cfg in cands:
            set_cfg(key, cfg)
            r = {"N": n, "K": k, "config": {**cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages}}
            try:
                if w is not None and not a.adapters:
                    r["hot_us"], r["cold_us"] = alone_us(x, w, evict)
                r["step_us"] = step_us(model, be, ads, gen, cache)
            except Exception as e:  # a config that does not fit: report and go on
                r["error"] = f"{type(e).__name__}: {e}"[:160]
            per.append(r)
            print(json.dumps(r), flush=True)
        set_cfg(key, tuned[key])
        ok = [(r["step_us"], i) for i, r in enumerate(per) if "step_us" in r]
        winners[key] = cands[min(ok)[1]]
        rows += per

    rounds = []
    for _ in range(3):
        for k in keys:
            set_cfg(k, tuned[k])
        t_tuned = step_us(model, be, ads, gen, cache, n=160)
        for k in keys:
            set_cfg(k, winners[k])
        t_win = step_us(model, be, ads, gen, cache, n=160)
        rounds.append({"tuned_us": t_tuned, "winners_us": t_win})
        print(json.dumps(rounds[-1]), flush=True)

    print(f"\n{'N':>6s}{'K':>6s}  {'BLOCK_N':>7s}{'BLOCK_K/KB':>11s}{'SPLIT/UNR':>10s}{'st':>3s}"
          f"{'hot us':>8s}{'cold us':>8s}{'step us':>9s}")  # fmt: skip
    for r in rows:
        c = r["config"]
        tag = " *" if any(c == {**winners[k].kwargs, "warps": winners[k].num_warps, "stages": winners[k].num_stages}
                          and (k[2], k[3]) == (r["N"], r["K"]) for k in keys) else ""  # fmt: skip
        print(f"{r['N']:6d}{r['K']:6d}  {c['BLOCK_N']:7d}{c.get('BLOCK_K', c.get('KB')):11d}"
              f"{c.get('SPLIT_K', c.get('UNROLL')):10d}{c['stages']:3d}{r.get('hot_us', float('nan')):8.1f}"
              f"{r.get('cold_us', float('nan')):8.1f}{r.get('step_us', float('nan')):9.1f}{tag}"
              f"{'  ' + r['error'] if 'error' in r else ''}")  # fmt: skip
    for k in keys:
        print(f"{k[2]}x{k[3]}: tuned {tuned[k].kwargs} -> step winner {winners[k].kwargs}")
    tt = min(r["tuned_us"] for r in rounds)
    tw = min(r["winners_us"] for r in rounds)
    print(f"step: tuned {tt:.1f} us ({1e6 / tt:.0f} tok/s), winners {tw:.1f} us ({1e6 / tw:.0f} tok/s)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"rows": rows, "rounds": rounds, "adapters": a.adapters,
                                 "tuned": {str(k): str(v) for k, v in tuned.items()},
                                 "winners": {str(k): str(v) for k, v in winners.items()}}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
