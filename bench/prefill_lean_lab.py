#!/usr/bin/env python3
"""How lean can an eager 512-token prefill's host side get? (open_llama_3b-shaped q8_0 model, random weights.)

    python bench/prefill_lean_lab.py [--layers 26] [--tokens 512] [--rounds 3] [--out bench/results/...json]

Variants, interleaved over `rounds` rounds (the host's speed drifts within a call):
- generic: Generator.logits (model_fns, fused_ops, model.block), as `lorakit predict` runs a prompt.
- lean: the same kernels called layer by layer straight through the backend (no model_fns / Packed / fused_ops
  layers), the residual sum folded into the next layer's add_rms_norm (one launch fewer per layer).
- CudaPrompt: the production runner (backends/cuda_prompt.py, Generator's lean_prompt): the kernels' unchecked
  entry points, one set of buffers per prompt, each product's path chosen once.
- lean, one path: lean with every product on the Gluon kernel (one launch per product).
Then each variant behind a GPU sleep (a prompt that waits for the GPU somewhere would wait for the sleep), the syncs
torch's debug mode reports, the host time per op of the lean variant, and the GPU time of CudaPrompt's prefill alone
(one CUDA-graph replay): the floor the host could reach. The logits must equal the generic ones (the same kernels in
the same order, same numbers).
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


def timed(fn, calls: int) -> tuple[float, float]:
    """(host ms/call, wall ms/call) over `calls` back-to-back calls, each ended by a synchronize."""
    host = wall = 0.0
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host += t1 - t0
        wall += t2 - t0
    return host / calls * 1e3, wall / calls * 1e3


def main(argv=None) -> int:
    from finetune_gpu import random_q8_model, shapes

    from lorakit import flash
    from lorakit.backends.cuda_triton import CudaTritonBackend
    from lorakit.fused_ops import joint_kv, qkv_heads
    from lorakit.generate import Generator
    from lorakit.model import pack_fused

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefill_lean_lab_h200.json")
    a = ap.parse_args(argv)

    base = CudaTritonBackend("cuda" if torch.cuda.is_available() else "cpu")
    be = base.eager_inference()
    sh = shapes(a.layers) if be.device.type == "cuda" else dict(vocab=96, embd=64, ff=96, layers=a.layers, heads=4)
    model = pack_fused(random_q8_model(sh, be.device))  # (on CUDA, random_q8_model packed them already)
    args, T, dt = model.args, a.tokens, torch.bfloat16
    gen = Generator(model, base, (), n_ctx=T, dtype=dt, lean_prompt=False)
    H, Hkv, D, eps = args.n_head, args.n_head_kv, args.head_dim, args.norm_eps
    Dp = flash.padded_head(D)
    scale = 1.0 / D**0.5
    layers = []
    for i in range(args.n_layer):
        g = {k: model.tensors[f"blk.{i}.{k}.weight"].to(dt) for k in ("attn_norm", "ffn_norm")}
        w = {k: model.fused[f"blk.{i}.{k}"] for k in ("attn_qkv", "ffn_gate_up")}
        w.update({k: model.weight(f"blk.{i}.{k}.weight") for k in ("attn_output", "ffn_down")})
        layers.append((g, w))
    out_norm = model.tensors["output_norm.weight"].to(dt)
    w_out, w_emb = model.weight("output.weight"), model.weight("token_embd.weight")
    mm = be._mm.q8_0_matmul
    wc = be._wcache

    clock: dict[str, list] = {}  # op -> [seconds, calls] of the timed lean forward

    def lean(ids, cache, config=None, timed=False):
        """The lean variant; timed: each op's host time into clock (a perf_counter pair per op)."""

        def op(name, fn, *a, **k):
            if not timed:
                return fn(*a, **k)
            t0 = time.perf_counter()
            r = fn(*a, **k)
            c = clock.setdefault(name, [0.0, 0])
            c[0] += time.perf_counter() - t0
            c[1] += 1
            return r

        def product(name, x, w):
            return op(f"product {name}", mm, x, w.qs, w.d, host_bound=True, dequant_cache=wc, config=config)

        t = ids if isinstance(ids, torch.Tensor) else torch.tensor([ids], dtype=torch.long, device=be.device)
        cos, sin = gen.rope[0][:T], gen.rope[1][:T]
        h = op("embedding", be.embedding, w_emb, t, dt)
        f_out = None
        for i, (g, w) in enumerate(layers):
            if f_out is None:
                a_ = op("rms_norm", be.rms_norm_fwd, h, g["attn_norm"], eps)[0]
            else:
                h, a_, _ = op("add_rms_norm (attn)", be.add_rms_norm_fwd, h, f_out, g["attn_norm"], eps)
            qkv = product("qkv", a_, w["attn_qkv"])
            padded = op("new_empty padded", qkv.new_empty, 1, T, H + 2 * Hkv, Dp)
            joint = op("joint_kv", joint_kv, cache.k[i], cache.v[i])
            op("rope_heads (q, k, v)", be.rope_heads, qkv.view(1, T, H + 2 * Hkv, D), cos, sin, H + Hkv, padded,
               last=joint[:, :, :T].transpose(1, 2))  # fmt: skip
            out_p, _, _ = op("flash.forward", flash.forward, *qkv_heads(padded, H, Hkv), scale)
            out = op("new_empty out", qkv.new_empty, 1, T, H * D)
            op("rope_heads (out)", be.rope_heads, out_p.transpose(1, 2)[..., :D], cos, sin, 0, out.view(1, T, H, D))
            o = product("attn_output", out, w["attn_output"])
            h, f, _ = op("add_rms_norm (ffn)", be.add_rms_norm_fwd, h, o, g["ffn_norm"], eps)
            gu = product("gate_up", f, w["ffn_gate_up"])
            s = op("silu_mul", be.silu_mul_fwd, *gu.chunk(2, dim=-1))
            f_out = product("down", s, w["ffn_down"])
        _, hn, _ = op("output norm", be.add_rms_norm_fwd, h, f_out, out_norm, eps)
        return mm(hn[:, -1:], w_out.qs, w_out.d, host_bound=True, dequant_cache=wc)[0, -1].float()

    # the production runner (backends/cuda_prompt.py): Generator.logits with lean_prompt (the default)
    runner = Generator(model, base, (), n_ctx=T, dtype=dt)
    assert runner.prompt is not None

    def prepared(ids, cache):
        return runner.logits(ids, cache, 0)

    ids = torch.randint(3, args.n_vocab, (T,)).tolist()
    rows = []
    with torch.no_grad():
        ref = gen.logits(ids, gen.new_cache(), 0)
        got = lean(ids, gen.new_cache())
        same = bool(torch.equal(ref, got))
        print(json.dumps({"lean logits == generic logits": same, "max_abs_diff": float((ref - got).abs().max())}))
        got = prepared(ids, gen.new_cache())
        same_p = bool(torch.equal(ref, got))
        diff = float((ref - got).abs().max())
        print(json.dumps({"CudaPrompt logits == generic logits": same_p, "max_abs_diff": diff}))
        same = same and same_p
        if be.device.type != "cuda":  # the interpreter (a check of the lean forward on a small model): no timing
            return 0 if same else 1
        one = {"path": "wgmma"}
        lean(ids, gen.new_cache(), one)
        variants = {
            "generic (Generator.logits)": lambda: gen.logits(ids, gen.new_cache(), 0),
            "lean": lambda: lean(ids, gen.new_cache()),
            "CudaPrompt (lean_prompt, the default)": lambda: prepared(ids, gen.new_cache()),
            "lean, every product on the Gluon kernel": lambda: lean(ids, gen.new_cache(), one),
        }
        gc.disable()
        for r in range(a.rounds):
            for name, fn in variants.items():
                fn()
                host, wall = timed(fn, 5)
                rows.append({"round": r, "case": name, "host_ms": host, "wall_ms": wall, "tok_s": T / wall * 1e3})
                print(json.dumps(rows[-1]), flush=True)
        gc.enable()
        # does anything wait for the GPU? Behind a ~0.5 s GPU sleep a host-bound prefill returns in its usual host
        # time; one that synchronizes somewhere waits for the sleep
        for name, fn in variants.items():
            torch.cuda.synchronize()
            torch.cuda._sleep(1_000_000_000)
            t0 = time.perf_counter()
            fn()
            host = (time.perf_counter() - t0) * 1e3
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
            rows.append({"case": f"{name}, behind a GPU sleep", "host_ms": host, "wall_ms": wall, "tok_s": 0.0})
            print(json.dumps(rows[-1]), flush=True)
        import warnings

        for name, fn in variants.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                fn()
                torch.cuda.set_sync_debug_mode("default")
            print(json.dumps({"case": name, "sync warnings": [str(w.message)[:200] for w in caught][:5],
                              "n": len(caught)}), flush=True)  # fmt: skip
        clock.clear()
        for _ in range(5):
            lean(ids, gen.new_cache(), timed=True)
            torch.cuda.synchronize()
        for name, (sec, n) in sorted(clock.items(), key=lambda kv: -kv[1][0]):
            rows.append({"case": f"lean op {name}", "host_ms": sec / 5 * 1e3, "wall_ms": 0.0, "tok_s": 0.0,
                         "us_per_call": sec / n * 1e6, "calls": n // 5})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        from host_lab import print_profile

        print("cProfile of CudaPrompt's prefill:")
        print_profile(lambda: prepared(ids, gen.new_cache()), 3, 30)
        # GPU time of CudaPrompt's prefill: one capture, replays
        cache = gen.new_cache()
        ids = torch.tensor([ids], dtype=torch.long, device=be.device)
        rows = runner.prompt.cache_rows(ids, cache, 0)

        def body():
            runner.prompt.last_hidden(ids, rows, runner.rope, runner.fns)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - t0) / 10 * 1e3
        rows.append({"case": "CudaPrompt, GPU time (graph replay)", "wall_ms": gpu, "tok_s": T / gpu * 1e3})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'case':48s}{'host ms':>9s}{'wall ms':>9s}{'tok/s':>9s}")
    for r in rows:
        print(f"{r['case']:48s}{r.get('host_ms', 0):9.2f}{r['wall_ms']:9.2f}{r['tok_s']:9.0f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": {"gpu": torch.cuda.get_device_name(), "tokens": T, "same": same},
                                 "rows": rows}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
