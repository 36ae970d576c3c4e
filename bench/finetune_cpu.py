#!/usr/bin/env python3
"""CPU finetune benchmark: the seed's command on an open_llama_3b-shaped q8_0 model, 2 threads.

    python bench/finetune_cpu.py [--layers 26] [--iters 3] [--threads 2]

Runs `lorakit finetune` with the seed's settings (batch 4, ctx 64, r 4, all 12 tensor kinds) with and
without --use-checkpointing, in float32 and in bf16 compute, each in a fresh process, and reports
seconds per iteration (steady state: the mean over iterations after the first), tokens/s, peak RSS,
the loss difference bf16 vs f32, and the ratio to llama.cpp's finetune on this machine class
(90-92 s/iteration at --threads 2, spec §13.4). Prints a table and saves bench/results/finetune_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_S_PER_ITER = 91.0  # llama.cpp finetune, same shapes/settings, 2 threads (spec §13.4: 90-92 s)

_WRAP = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def _cpu_info() -> dict:
    """The host CPU's model name and whether it has AVX-512 BF16 (bf16 compute's speed depends on it), from
    /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    return {"cpu_model": model, "avx512_bf16": " avx512_bf16" in text}


def run_case(model: Path, data: Path, work: Path, iters: int, threads: int, ckpt: bool, dtype: str) -> dict:
    log = work / f"log-{ckpt}-{dtype}.jsonl"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lorakit.cli", "finetune", "--model-base", str(model),
           "--checkpoint-in", "", "--checkpoint-out", "", "--lora-out", "", "--train-data", str(data),
           "--save-every", "0", "--threads", str(threads), "--adam-iter", str(iters), "--batch", "4",
           "--ctx", "64", "--use-checkpointing" if ckpt else "--no-checkpointing", "--seed", "1",
           "--backend", "cpu-torch", "--compute-dtype", dtype, "--log-jsonl", str(log)]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"finetune failed:\n{p.stderr[-3000:]}")
    rss = int(p.stderr.split("PEAK_RSS_KB")[1].split()[0]) * 1024
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    t = [r["seconds"] for r in recs]
    steps = [b - a for a, b in zip(t, t[1:], strict=False)]
    steady = steps[1:] if len(steps) > 1 else steps
    s_per_iter = sum(steady) / len(steady)
    return {
        "checkpointing": ckpt,
        "compute_dtype": dtype,
        "s_per_iter": s_per_iter,
        "tokens_per_s": 4 * 64 / s_per_iter,
        "peak_rss_gb": rss / 2**30,
        "losses": [r["loss"] for r in recs],
        "wall_s": wall,
        "speedup_vs_llamacpp": LLAMACPP_S_PER_ITER / s_per_iter,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="existing model (default: generate)")
    ap.add_argument("--cases", default="f32:ckpt,f32:nockpt,bf16:ckpt,bf16:nockpt")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    model = a.model or ROOT / "out" / f"open_llama_3b-shape-{a.layers}L-q8_0.gguf"
    if not model.exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_model.py"), str(model),
                        "--layers", str(a.layers)], check=True)  # fmt: skip
    data = ROOT / "assets" / "shakespeare.txt"
    rows = []
    for case in a.cases.split(","):
        dtype, ck = case.split(":")
        rows.append(run_case(model, data, work, a.iters, a.threads, ck == "ckpt", dtype))
        r = rows[-1]
        print(
            f"{dtype:5s} {'ckpt' if r['checkpointing'] else 'no-ckpt':8s} {r['s_per_iter']:7.2f} s/iter "
            f"{r['tokens_per_s']:7.1f} tok/s  peak RSS {r['peak_rss_gb']:.2f} GiB  "
            f"{r['speedup_vs_llamacpp']:.2f}x llama.cpp",
            flush=True,
        )
    f32 = next((r for r in rows if r["compute_dtype"] == "f32"), None)
    for r in rows:
        if f32 is not None:
            r["max_loss_diff_vs_f32"] = max(abs(x - y) for x, y in zip(r["losses"], f32["losses"], strict=False))
    print()
    print(f"{'dtype':6s}{'ckpt':6s}{'s/iter':>9s}{'tok/s':>9s}{'RSS GiB':>9s}{'vs llama.cpp':>14s}{'|dloss|':>10s}")
    for r in rows:
        print(
            f"{r['compute_dtype']:6s}{'yes' if r['checkpointing'] else 'no':6s}{r['s_per_iter']:9.2f}"
            f"{r['tokens_per_s']:9.1f}{r['peak_rss_gb']:9.2f}{r['speedup_vs_llamacpp']:13.2f}x"
            f"{r.get('max_loss_diff_vs_f32', 0):10.4f}"
        )
    out = ROOT / "bench" / "results" / "finetune_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        **_cpu_info(),
        "cpus": os.cpu_count(),
        "threads": a.threads,
        "layers": a.layers,
        "iters": a.iters,
        "llamacpp_s_per_iter": LLAMACPP_S_PER_ITER,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
