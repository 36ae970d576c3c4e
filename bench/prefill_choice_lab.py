#!/usr/bin/env python3
"""Lab: why the 512-token prefill's speed differs between fresh processes (21k-42k tok/s in session 34).

The lean prompt forward takes each product's path from choose_path(wall=True): the wall time of back-to-back
eager calls, measured once per process. This lab prints the paths the process chose, then times the prefill
with those paths and with each path forced on every host-bound product where it is a candidate, alternating
over rounds (the choices are seeded in q8_0_tuning's per-process table, which is what a measurement fills).

    python bench/prefill_choice_lab.py [--layers 26] [--rounds 3] [--iters 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def prefill_times(gen, ids: list[int], iters: int, host: list[float] | None = None) -> list[float]:
    """Wall seconds of `iters` prompts (each synchronized); host: gets the seconds until each call returned (the
    launches are asynchronous: the host's share, unless the launch queue filled)."""
    gen.logits(ids, gen.new_cache(), 0)  # warm-up
    out = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen.logits(ids, gen.new_cache(), 0)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
        if host is not None:
            host.append(t1 - t0)
    return out


def main(argv=None) -> int:
    from finetune_gpu import random_q8_model, shapes

    from lorakit.backends import get_backend
    from lorakit.generate import Generator
    from lorakit.kernels import q8_0_tuning as tuning

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", action="append", default=[], help="cProfile 5 prompts of this config (repeatable)")
    a = ap.parse_args(argv)
    be = get_backend("cuda-triton")
    model = random_q8_model(shapes(a.layers), be.device)
    n = 512
    gen = Generator(model, be, (), n_ctx=n, dtype=torch.bfloat16, lean_prompt=True)
    ids = torch.randint(3, model.args.n_vocab, (n,)).tolist()
    t = prefill_times(gen, ids, a.iters)  # the first prompt measures the paths
    keys = [k for k in tuning._PATH if k[0] == "fwd" and k[8]]  # host-bound forward products
    auto = {k: tuning._PATH[k] for k in keys}
    chosen = {f"{k[2]}x{k[3]}": p for k, p in auto.items()}  # by the product's N x K
    print(json.dumps({"first": n / statistics.mean(t), "chosen": chosen}))
    forced = {p: {**auto, **{k: p for k in keys if p != "wgmma" or k[9]}} for p in ("dequant", "large", "wgmma")}
    # "wgmma" only where the Gluon kernel can compute the product (key[9]); "ffn-dequant": dequantize + cuBLAS for
    # the two feed-forward products (gate|up, down: 85% of the weight bytes), the tiled kernel for the rest
    ffn = {k: "dequant" if k[2] == 2 * model.args.n_ff or k[3] == model.args.n_ff else "large" for k in keys}
    configs = {"chosen": auto, **forced, "ffn-dequant": ffn}
    res: dict[str, list[float]] = {c: [] for c in configs}
    host: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(a.rounds):
        for c, paths in configs.items():
            tuning._PATH.update(paths)
            res[c] += prefill_times(gen, ids, a.iters, host[c])
    for c in a.profile:
        tuning._PATH.update(configs[c])
        prefill_times(gen, ids, 2)
        prof = cProfile.Profile()
        prof.enable()
        prefill_times(gen, ids, 5)
        prof.disable()
        print(f"== cProfile, {c}, 5 prompts")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    tuning._PATH.update(auto)
    rows = []
    for c, ts in res.items():
        rows.append({"config": c, "mean_tok_s": n / statistics.mean(ts), "median_tok_s": n / statistics.median(ts),
                     "best_tok_s": n / min(ts), "worst_tok_s": n / max(ts),
                     "host_ms_median": 1e3 * statistics.median(host[c])})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        a.out.write_text(json.dumps({"chosen": chosen, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
