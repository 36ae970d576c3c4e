#!/usr/bin/env python3
"""Where the GPU time goes: torch.profiler kernel tables for the decode step, a 512-token prefill and a
training step, on the open_llama_3b-shaped q8_0 model (random weights). decode2: the decode step with
predict_gpu.py's two scaled adapters (where their cost goes); mega / mega2: the decode megakernel's greedy steps
(`predict --act-q8`) without / with them, per step.

    python bench/profile_gpu.py [--layers 26] [--what decode,decode2,mega,mega2,prefill,train]
                                [--out bench/results/profile_h200.json]

For each workload: wall time per call (graph replay where lorakit uses one, and eager), the sum of GPU
kernel time per call, and the kernels that take the most GPU time (per call, share of the total). The
gap between wall time and kernel time is launch/idle overhead.
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


def kernel_table(fn, calls: int, top: int = 18) -> dict:
    """Profile `calls` runs of fn; GPU kernel time per call by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows[e.key] = (rows.get(e.key, (0.0, 0))[0] + t / calls, e.count // calls)
    total = sum(t for t, _ in rows.values())
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "kernel_us_per_call": total,
        "top": [{"kernel": k[:200], "us": t, "count": c, "share": t / total} for k, (t, c) in ranked],
    }


def op_table(fn, calls: int, top: int = 30) -> list[dict]:
    """Profile `calls` eager runs of fn with input shapes: the torch ops (and autograd Functions) whose own
    GPU kernels take the most time, one row per (op, input shapes): which products and copies cost what."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and e.device_type.name == "CPU":
            rows.append({"op": e.key, "shapes": str(e.input_shapes)[:160], "us": t / calls, "count": e.count // calls})
    return sorted(rows, key=lambda r: -r["us"])[:top]


def wall(fn, calls: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def show(name: str, r: dict) -> None:
    print(f"\n== {name}: wall {r.get('wall_us', 0):.0f} us/call"
          + (f" (eager {r['eager_wall_us']:.0f})" if "eager_wall_us" in r else "")
          + f", kernels {r['kernel_us_per_call']:.0f} us/call")  # fmt: skip
    for k in r["top"]:
        print(f"{k['us']:9.1f} us {k['share']:6.1%} x{k['count']:<4g} {k['kernel'][:120]}")
    if "ops" in r:
        print("   torch ops by own GPU time, with input shapes (eager step):")
        for o in r["ops"]:
            print(f"{o['us']:9.1f} us x{o['count']:<4d} {o['op'][:40]:40s} {o['shapes'][:110]}")
    if "host" in r:
        print("   host (cProfile, one call, by own time):")
        for h in r["host"]:
            print(f"{h['tottime_us']:9.0f} us own {h['cumtime_us']:9.0f} us cum x{h['calls']:<5d} {h['fn']}")


def profile_decode(model, be, prompt=128, adapters=()) -> dict:
    from lorakit.decode import GraphDecoder
    from lorakit.generate import Generator

    dt = torch.bfloat16
    gen = Generator(model, be, adapters, n_ctx=prompt + 64, dtype=dt)
    cache = gen.new_cache()
    gen.logits(list(range(3, 3 + prompt)), cache, 0)
    graph = GraphDecoder(model, be, adapters, gen.rope, cache, dt)
    eager = GraphDecoder(model, be, adapters, gen.rope, cache, dt, use_graph=False)
    graph(5, prompt)
    eager(5, prompt)
    r = kernel_table(lambda: eager(5, prompt), 5)
    r["ops"] = op_table(lambda: eager(5, prompt), 5)
    r["wall_us"] = wall(lambda: graph(5, prompt), 50)
    r["eager_wall_us"] = wall(lambda: eager(5, prompt), 5)
    return r


def profile_mega(model, be, prompt=128, adapters=(), steps=64) -> dict:
    """`lorakit predict --act-q8 --temp 0`'s decode loop (MegaDecoder.tokens: the megakernel's captured greedy steps,
    the host one step behind): per step the wall time, the GPU kernels' time and each kernel's share (the gap
    between the two: the graph's launches and the host's token copies)."""
    from lorakit.decode_mega import MegaDecoder
    from lorakit.generate import Generator

    gen = Generator(model, be, adapters, n_ctx=prompt + 3 * steps + 8, dtype=torch.bfloat16, act_q8=True)
    cache = gen.new_cache()
    gen.logits(list(range(3, 3 + prompt)), cache, 0)
    step = MegaDecoder(model, be, gen.rope, cache, gen.adapters, greedy=True)
    list(step.tokens(5, prompt, 1))  # capture

    def run():
        list(step.tokens(5, prompt + 1, steps))

    r = kernel_table(run, 1)
    r["kernel_us_per_call"] /= steps
    for k in r["top"]:
        k["us"] /= steps
        k["count"] /= steps
    r["wall_us"] = wall(run, 2) / steps
    return r


def profile_prefill(model, be, n=512) -> dict:
    from lorakit.generate import Generator

    gen = Generator(model, be, (), n_ctx=n, dtype=torch.bfloat16)
    ids = list(range(3, 3 + n))

    def run():
        gen.logits(ids, gen.new_cache(), 0)

    run()
    r = kernel_table(run, 2)
    r["wall_us"] = wall(run, 3)
    r["host"] = host_table(run)
    return r


def host_table(fn, top: int = 25) -> list[dict]:
    """Python-side cost of one call of fn (cProfile, by own time): where launch overhead comes from."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    fn()
    torch.cuda.synchronize()
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        {"fn": f"{Path(f).name}:{line}:{name}", "calls": nc, "tottime_us": tt * 1e6, "cumtime_us": ct * 1e6}
        for (f, line, name), (_cc, nc, tt, ct, _callers) in rows
    ]


def profile_train(model, be, batch: int, ctx: int, ckpt: bool) -> dict:
    import numpy as np

    from lorakit.lora import LoraRanks, lora_shapes
    from lorakit.lora_init import init_lora
    from lorakit.model import rope_tables
    from lorakit.train import flat_lora, loss_and_backward
    from lorakit.train_graph import GraphedStep

    off = {"token_embd": 0, "output": 0, "output_norm": 0, "attn_norm": 0, "ffn_norm": 0}
    lora = init_lora(lora_shapes(model.args, LoraRanks.default(4, **off)), seed=1)
    rope = rope_tables(model.args, ctx, be.device)
    xi = np.random.default_rng(0).integers(0, model.args.n_vocab, (batch, ctx))

    def make_step():
        # own leaf tensors per use: the eager steps' gradient nodes belong to the default stream, which a
        # capture may not depend on
        params = flat_lora(lora, be.device)  # as the trainer holds them
        flat = [t for ab in params.values() for t in ab]
        return (lambda x, y: loss_and_backward(model, be, params, torch.bfloat16, rope, x, y, ckpt)), flat

    step, flat = make_step()

    x = torch.from_numpy(xi).cuda()

    def eager():
        step(x, x)
        for t in flat:
            t.grad = None

    eager()
    r = kernel_table(eager, 2)
    r["ops"] = op_table(eager, 1)
    r["eager_wall_us"] = wall(eager, 2)
    g = GraphedStep(*make_step())
    g(xi, xi)
    r["wall_us"] = wall(lambda: g(xi, xi), 5)
    return r


def main(argv=None) -> int:
    from finetune_gpu import random_q8_model, shapes

    from lorakit.backends import get_backend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--what", default="decode,prefill,train")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile_h200.json")
    a = ap.parse_args(argv)
    be = get_backend("cuda-triton")
    model = random_q8_model(shapes(a.layers), be.device)
    out = {}
    for what in a.what.split(","):
        if what == "decode":
            out["decode"] = profile_decode(model, be)
        elif what == "decode2":  # predict_gpu.py's two scaled adapters: where the adapters' cost goes
            from predict_gpu import two_adapters

            out["decode2 (2 adapters)"] = profile_decode(model, be, adapters=two_adapters(model, be.device))
        elif what in ("mega", "mega2"):  # the megakernel's greedy steps, without / with the two scaled adapters
            from predict_gpu import two_adapters

            ads = two_adapters(model, be.device) if what == "mega2" else ()
            out[what] = profile_mega(model, be, adapters=ads)
        elif what == "prefill":
            out["prefill 512"] = profile_prefill(model, be)
        elif what == "train":
            out["train 4x64 ckpt"] = profile_train(model, be, 4, 64, True)
            out["train 8x512"] = profile_train(model, be, 8, 512, False)
        for name in [k for k in out if k.startswith(what)]:
            show(name, out[name])
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
