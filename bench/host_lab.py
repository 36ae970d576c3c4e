#!/usr/bin/env python3
"""Where the host time of an eager 512-token prefill goes (open_llama_3b-shaped q8_0 model, random weights).

    python bench/host_lab.py [--layers 26] [--tokens 512] [--out bench/results/host_lab_h200.json]

The prefill launches op by op, so the host (Python + launch) can be the limit rather than the GPU. For each
op the prefill calls, it times `calls` back-to-back calls without synchronizing: host us/call (until the
Python call returns) next to wall us/call (until the GPU is done). Where host >= wall the op is host-bound.
Then the same for one whole layer (model.block) and the whole prefill (Generator.logits). First the whole
prefill with Python's cyclic collector paused (as Generator.logits runs it) and running, before and after
gc.freeze() (as `lorakit predict` does once the model is loaded): host time and the collections' time.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def host_wall(fn, calls: int) -> tuple[float, float]:
    """(host us/call, wall us/call) over `calls` back-to-back calls after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def print_profile(fn, calls: int, top: int) -> None:
    """cProfile of `calls` calls of fn: the top functions by own time, us per call."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"{'own us':>9s}{'cum us':>9s}{'calls':>7s}  function (per prefill)")
    for (file, line, name), (_, ncalls, tt, ct, _) in rows:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        print(f"{tt / calls * 1e6:9.0f}{ct / calls * 1e6:9.0f}{ncalls // calls:7d}  {name} ({where})")


def cpu_mhz() -> float:
    """The mean clock of the host's cores now (/proc/cpuinfo; 0 where it does not say)."""
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except OSError:
        return 0.0
    return sum(mhz) / len(mhz) if mhz else 0.0


def series(fn, calls: int) -> list[dict]:
    """`calls` prefills one after another, each synchronized: its wall ms, the process's CPU ms, involuntary context
    switches (preemption) and the CUDA allocator's cudaMalloc count so far (a prefill that only gets faster after
    many calls: the host warming up, or the code?)."""
    import resource

    rows = []
    for i in range(calls):
        r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        r1, c1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        rows.append({"call": i, "wall_ms": (t1 - t0) * 1e3, "cpu_ms": (c1 - c0) * 1e3,
                     "preempted": r1.ru_nivcsw - r0.ru_nivcsw, "waits": r1.ru_nvcsw - r0.ru_nvcsw,
                     "cuda_mallocs": torch.cuda.memory_stats().get("num_device_alloc", 0),
                     "mhz": cpu_mhz() if i % 10 == 9 else None})  # fmt: skip
    return rows


def main(argv=None) -> int:
    import triton
    import triton.language as tl
    from finetune_gpu import random_q8_model, shapes

    from lorakit import flash
    from lorakit.backends import get_backend
    from lorakit.fused_ops import qkv_heads
    from lorakit.generate import Generator
    from lorakit.lora import model_fns
    from lorakit.model import block

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--profile", type=int, default=40, help="cProfile's top N functions (own time) of a prefill")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "host_lab_h200.json")
    ap.add_argument("--series", type=int, default=0, help="only this many prefills in a row, each timed (wall, CPU, "
                    "preemptions, cudaMallocs, clock)")  # fmt: skip
    a = ap.parse_args(argv)

    @triton.jit
    def _bare(p0, p1, p2, p3, n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11, B: tl.constexpr):
        tl.store(p0 + tl.arange(0, B), tl.load(p1 + tl.arange(0, B)))

    be = get_backend("cuda-triton").eager_inference()
    model = random_q8_model(shapes(a.layers), be.device)
    args, T, dt = model.args, a.tokens, torch.bfloat16
    gen = Generator(model, be, (), n_ctx=T, dtype=dt)
    linear, norm, _ = gen.fns
    ops = gen.ops
    cos, sin = gen.rope[0][:T], gen.rope[1][:T]
    dev = be.device
    E, H, D = args.n_embd, args.n_head, args.head_dim
    x = torch.randn(1, T, E, device=dev, dtype=dt)
    qkv = linear(x, "blk.0.attn_qkv")
    whole = qkv.whole
    g = torch.randn(1, T, args.n_ff, device=dev, dtype=dt)
    w_n = norm("blk.0.attn_norm.weight")
    p0 = torch.zeros(64, device=dev)
    padded = whole.new_empty(1, T, 3 * H, flash.padded_head(D))
    be.rope_heads(whole.view(1, T, 3 * H, D), cos, sin, 2 * H, padded)
    q8 = model.fused["blk.0.attn_qkv"]
    cache = gen.new_cache()
    ids = torch.randint(3, args.n_vocab, (T,)).tolist()

    compiled = _bare[(1,)](p0, p0, p0, p0, *range(1, 13), B=16)
    runner = compiled[(1, 1, 1)]
    stream = torch.cuda.current_stream().cuda_stream
    cases = {
        "compiled-kernel launch (16 args)": lambda: runner(p0, p0, p0, p0, *range(1, 13), 16, stream=stream),
        "triton bare launch (16 args)": lambda: _bare[(1,)](p0, p0, p0, p0, *range(1, 13), B=16),
        "torch.empty [T, 9600]": lambda: torch.empty(T, 9600, device=dev, dtype=dt),
        "torch add [T, E]": lambda: x + x,
        "rms_norm_fwd": lambda: be.rms_norm_fwd(x, w_n, 1e-6),
        "ops.rms_norm (autograd Function)": lambda: ops.rms_norm(x, w_n, 1e-6),
        "ops.add_rms_norm": lambda: ops.add_rms_norm(x, x, w_n, 1e-6),
        "rope_heads (q, k, v -> padded)": lambda: be.rope_heads(whole.view(1, T, 3 * H, D), cos, sin, 2 * H, padded),
        "flash.forward": lambda: flash.forward(*qkv_heads(padded, H, H), D**-0.5),
        "ops.causal_attention (+ cache write)": lambda: ops.causal_attention(qkv, cos, sin, H, H, (cache.k[0],
                                                                                                   cache.v[0])),
        "q8_0_matmul qkv (backend.matmul)": lambda: be.matmul(x, q8),
        "linear qkv (model_fns, packed)": lambda: linear(x, "blk.0.attn_qkv"),
        "linear attn_output": lambda: linear(x, "blk.0.attn_output.weight"),
        "ops.silu_mul": lambda: ops.silu_mul(g, g),
        "block (one layer)": lambda: block(args, 0, x, linear, norm, cos, sin, cache, 0, ops),
    }  # fmt: skip
    rows = []
    with torch.no_grad():
        prefill = lambda: gen.logits(ids, gen.new_cache(), 0)  # noqa: E731 - the collector paused (generate.gc_paused)
        running = lambda: Generator.logits.__wrapped__(gen, ids, gen.new_cache(), 0)  # noqa: E731 - ... or not
        if a.series:
            print(f"host clock at the start: {cpu_mhz():.0f} MHz", flush=True)
            rows = series(prefill, a.series)
            for r in rows:
                print(json.dumps(r), flush=True)
            a.out.write_text(json.dumps({"meta": {"gpu": torch.cuda.get_device_name(), "tokens": T}, "series": rows},
                                        indent=2))  # fmt: skip
            return 0
        gc_s = [0.0, 0]

        def gc_clock(phase, info, t0=[0.0]):  # noqa: B006 - the start time between the two calls
            if phase == "start":
                t0[0] = time.perf_counter()
            else:
                gc_s[0] += time.perf_counter() - t0[0]
                gc_s[1] += info["generation"] == 2

        gc.callbacks.append(gc_clock)
        gc_cases = (
            ("first, GC running", running),
            ("GC paused", prefill),
            ("GC running", running),
            ("GC paused, after gc.freeze()", prefill),
            ("GC running, after gc.freeze()", running),
        )
        for what, fn in gc_cases:
            if what == "GC paused, after gc.freeze()":
                gc.freeze()  # what lorakit predict does once the model is loaded
            gc_s[:] = [0.0, 0]
            host, wall = host_wall(fn, 5)
            rows.append({"case": f"prefill {T} {what}", "host_us": host, "wall_us": wall, "tok_s": T / wall * 1e6,
                         "gc_ms_per_call": gc_s[0] / 7 * 1e3, "full_gcs": gc_s[1]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        gc.callbacks.remove(gc_clock)
        if a.profile:
            print_profile(prefill, 3, a.profile)
        for name, fn in cases.items():
            host, wall = host_wall(fn, a.calls)
            rows.append({"case": name, "host_us": host, "wall_us": wall})
            print(json.dumps(rows[-1]), flush=True)
        host, wall = host_wall(prefill, 5)
        rows.append({"case": f"prefill {T} (Generator.logits)", "host_us": host, "wall_us": wall,
                     "tok_s": T / wall * 1e6})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        # the products' paths chosen by GPU time alone (as for CUDA-graph replays) instead of eager wall time
        gen.fns = model_fns(model, get_backend("cuda-triton"), (), dt)
        host, wall = host_wall(prefill, 5)
        rows.append({"case": f"prefill {T}, paths by GPU time", "host_us": host, "wall_us": wall,
                     "tok_s": T / wall * 1e6})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'case':40s}{'host us':>10s}{'wall us':>10s}")
    for r in rows:
        print(f"{r['case']:40s}{r['host_us']:10.1f}{r['wall_us']:10.1f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": {"gpu": torch.cuda.get_device_name(), "tokens": T}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
