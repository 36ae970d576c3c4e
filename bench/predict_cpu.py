#!/usr/bin/env python3
"""CPU predict benchmark: `lorakit predict` (cpu-torch) vs llama-cpp-python on the same q8_0 model.

    python bench/predict_cpu.py [--model out/open_llama_3b-shape-26L-q8_0.gguf] [--new 16] [--threads 2]

Batch 1, the same prompt ids for all, greedy, 2 threads, side by side in one run: lorakit as predict runs it
(decode products through the fused compiled loop, backends/cpu_gemv.py), with the specification's sliced
products (LORAKIT_CPU_FUSED=0), with --act-q8 (llama.cpp's arithmetic), and llama-cpp-python. llama.cpp
multiplies q8_0 weights with activations quantized to q8_0 (integer dot products, AVX-512 VNNI where there is
one). Saves bench/results/predict_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "out" / "open_llama_3b-shape-26L-q8_0.gguf")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if not a.model.exists():
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "bench/make_model.py"), str(a.model)], check=True)
    from lorakit.backends import get_backend
    from lorakit.generate import Generator, SamplingParams
    from lorakit.model import load_model
    from tests.llama_ref import LlamaCppRunner

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, 32000, a.prompt - 1).tolist()
    rows = []

    model = load_model(a.model)

    def run_lorakit(peer: str, fused: bool, act_q8: bool = False) -> None:
        os.environ["LORAKIT_CPU_FUSED"] = "1" if fused else "0"  # read when the backend's inference ops are made
        gen = Generator(model, get_backend("cpu-torch"), (), n_ctx=a.prompt + a.new + 1, act_q8=act_q8)
        list(gen.generate(ids[:4], 2, SamplingParams(temp=0)))  # the fused loop's first build (cached on disk)
        t0 = time.perf_counter()
        out = list(gen.generate(ids, a.new, SamplingParams(temp=0)))
        total = time.perf_counter() - t0
        st = gen.stats
        rows.append({"peer": peer, "prefill_tok_s": a.prompt / st.prefill_s,
                     "decode_tok_s": (len(out) - 1) / st.decode_s if len(out) > 1 else None, "total_s": total,
                     "ids": out})  # fmt: skip
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ids"}), flush=True)

    run_lorakit("lorakit, sliced products (LORAKIT_CPU_FUSED=0)", fused=False)
    run_lorakit("lorakit predict (cpu-torch, f32)", fused=True)
    run_lorakit("lorakit predict --act-q8", fused=True, act_q8=True)
    os.environ.pop("LORAKIT_CPU_FUSED")

    ref = LlamaCppRunner(a.model, n_ctx=a.prompt + a.new + 1, kv_f32=False, n_threads=a.threads)
    t0 = time.perf_counter()
    ref.llm.reset()
    ref.llm.eval(ids)
    t1 = time.perf_counter()
    got = []
    for _ in range(a.new):
        tok = int(np.argmax(ref.llm.scores[ref.llm.n_tokens - 1]))
        got.append(tok)
        if len(got) < a.new:
            ref.llm.eval([tok])
    t2 = time.perf_counter()
    rows.append({"peer": "llama-cpp-python 0.3.36", "prefill_tok_s": a.prompt / (t1 - t0),
                 "decode_tok_s": (a.new - 1) / (t2 - t1), "total_s": t2 - t0, "ids": got})  # fmt: skip
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "ids"}), flush=True)
    print(f"\n{'peer':52s}{'prefill tok/s':>15s}{'decode tok/s':>14s}{'x llama.cpp':>12s}{'same ids':>10s}")
    for r in rows:
        same = next((i for i, (x, y) in enumerate(zip(r["ids"], got, strict=False)) if x != y), len(got))
        r["decode_vs_llamacpp"] = r["decode_tok_s"] / rows[-1]["decode_tok_s"]
        r["same_leading_ids"] = same
        print(f"{r['peer']:52s}{r['prefill_tok_s']:15.2f}{r['decode_tok_s']:14.2f}{r['decode_vs_llamacpp']:12.2f}"
              f"{same:>7d}/{a.new}")  # fmt: skip
    print("same ids: leading greedy ids equal to llama.cpp's (random weights: near-ties)")
    out_path = ROOT / "bench" / "results" / "predict_cpu.json"
    out_path.write_text(json.dumps({"meta": {"threads": a.threads, "model": a.model.name}, "rows": rows}, indent=2))
    print(f"saved {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
