#!/usr/bin/env python3
"""The LoRA products of a training step, alone: what rank-r GEMMs over [tokens, in/out] activations cost, and
whether padding the factors to a wider rank (zero columns: the same numbers) lets cuBLAS pick faster kernels.

    python bench/lora_lab.py [--tokens 4096] [--r 4] [--pad 1,8,16] [--out bench/results/lora_lab_h200.json]

open_llama_3b's packed products at 8 x 512 tokens (bf16): qkv (3200 -> 9600, rank 3r as one block term),
o (3200 -> 3200, r), gate_up (3200 -> 17280, 2r), down (8640 -> 3200, r). Per product and rank it times the five
ops of LoraLinear (forward t = x a; backward dyb = dy b, da = x^T dyb, db = dy^T t, dx += dyb a^T) and reports
microseconds and the bandwidth on the large operand. A padded row also checks that its first r columns equal
the unpadded result (zero columns add exact zeros).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PRODUCTS = {"qkv": (3200, 9600, 3), "o": (3200, 3200, 1), "gate_up": (3200, 17280, 2), "down": (8640, 3200, 1)}


def timed(fn, reps: int) -> float:
    """Median microseconds of fn over reps runs (CUDA events; wall clock on CPU)."""
    import time

    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


def bench_product(name: str, tokens: int, r: int, pad_to: int, dev, reps: int) -> dict:
    n_in, n_out, members = PRODUCTS[name]
    rank = r * members
    width = -(-rank // pad_to) * pad_to
    g = torch.Generator(device=dev).manual_seed(0)
    dt = torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev).to(dt)

    x, dy, dx = rnd(tokens, n_in), rnd(tokens, n_out), rnd(tokens, n_in)
    a, b = torch.zeros(n_in, width, device=dev, dtype=dt), torch.zeros(n_out, width, device=dev, dtype=dt)
    a[:, :rank], b[:, :rank] = rnd(n_in, rank), rnd(n_out, rank)
    t, dyb = x @ a, dy @ b
    ops = {
        "t = x a": lambda: x @ a,
        "dyb = dy b": lambda: dy @ b,
        "da = x^T dyb": lambda: x.T @ dyb,
        "db = dy^T t": lambda: dy.T @ t,
        "dx += dyb a^T": lambda: dx.addmm_(dyb, a.T),
    }
    big = {"t = x a": x, "dyb = dy b": dy, "da = x^T dyb": x, "db = dy^T t": dy, "dx += dyb a^T": dx}
    row = {"product": name, "rank": rank, "width": width, "ops": {}}
    for op, fn in ops.items():
        us = timed(fn, reps)
        nbytes = big[op].numel() * big[op].element_size() * (2 if op.startswith("dx") else 1)
        row["ops"][op] = {"us": us, "gb_s": nbytes / us / 1e3}
    row["total_us"] = sum(o["us"] for o in row["ops"].values())
    # zero columns add exact zeros: the padded products' first `rank` columns are the unpadded ones
    row["same_numbers"] = bool(
        torch.equal((x @ a)[:, :rank], x @ a[:, :rank]) and torch.equal((x.T @ dyb)[:, :rank], x.T @ dyb[:, :rank])
    )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--r", type=int, default=4, help="the LoRA rank per member")
    ap.add_argument("--pad", default="1,8,16", help="pad the factors' rank to a multiple of these")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_lab_h200.json")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [bench_product(name, a.tokens, a.r, int(p), dev, a.reps) for name in PRODUCTS for p in a.pad.split(",")]
    print(f"{'product':8s} {'rank':>4s} {'width':>5s} " + " ".join(f"{op:>14s}" for op in rows[0]["ops"]) + "   total")
    for r in rows:
        cells = " ".join(f"{o['us']:8.1f} {o['gb_s']:5.0f}" for o in r["ops"].values())
        same = "" if r["same_numbers"] else "  NOT the same numbers"
        print(f"{r['product']:8s} {r['rank']:4d} {r['width']:5d} {cells} {r['total_us']:8.1f}{same}")
    print("(each op: microseconds, GB/s on its large operand)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"tokens": a.tokens, "r": a.r, "device": str(dev), "rows": rows}, indent=1))
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
