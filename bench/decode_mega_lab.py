#!/usr/bin/env python3
"""Lab (#5): the whole decode step in one persistent launch (kernels/decode_mega.py) against lorakit's shipped decode
step (GraphDecoder: ~210 launches in one CUDA graph), on the open_llama_3b shape with random q8_0 weights.

    python bench/decode_mega_lab.py [--layers 26] [--pos 255] [--cfg N] [--out FILE]

Checks first (the megakernel against its arithmetic in float64, reference_step below): one layer (its q|k|v
sums, h after it, the logits), then every layer (the logits and their argmax). Then times, in one run: the
megakernel's step as a CUDA graph (the embedding row's copy, the zeroing of its sums, the launch, the argmax), per
config; the launched float chain of the layers' products (persistent_lab.launched_chain, 4 MiB hints); lorakit's
GraphDecoder greedy decode (`lorakit predict --temp 0`'s loop, bench/predict_gpu.bench_decode) on a model of the
same shape. Prints a table, saves JSON.
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

E, F, V, H, D = 3200, 8640, 32000, 32, 100
SHAPES = [(3 * E, E), (E, E), (2 * F, E), (E, F), (V, E)]  # (N, K): q|k|v, output, gate|up, down; the vocabulary
HBM = 4.23e12
BASE = dict(S=(13, 7, 13, 17, 13), SA=4)  # kernels/decode_mega.splits and the key splits the decoder takes
CONFIGS = [  # BASE: splits of the K stages per product kind, attention key splits per head (H * SA programs); the
    # kernel's BLOCK_T (keys per attention block), STAGES (ring) may be set too; probes (wrong
    # numbers, timed only; bits): 1 no attention, 4 no waits, 8 no products' arithmetic (the stream alone); the
    # adapters' warps: 16 only wait and arrive, 32 add no B t, 64 do not wait for t, 128 have their code but never run
    # it. LORA r: random adapter terms of rank r on the 7 matrices (two rank-4 adapters: 8; the packed products' terms
    # block-diagonal as lora.fused_lora_term forms them: ranks 3 r, r, 2 r, r); TG: copies of t, LNW: the adapters'
    # warps; 256: no weight stream (the producer marks each stage full without copying it: the consumers' work on
    # stale shared memory and the phases' synchronisation alone). KPS: keys per attention split (ceil((pos + 1) /
    # KPS) splits, at most SA; 64: a split per 64-key block, as before session 21); probe 512: the tasks
    # add nothing into the products' sums (no atomics); 1024: the arrivals without their release fence
    BASE,
    dict(BASE, LORA=8),
    dict(BASE, probe=256),
    dict(BASE, KPS=128),
    dict(BASE, KPS=256),
    dict(BASE, KPS=512),
    dict(BASE, probe=512),
    dict(BASE, probe=8),
    dict(BASE, probe=520),
    dict(BASE, probe=4),
    dict(BASE, STAGES=8),
    dict(BASE, probe=1024),
    dict(BASE, probe=1536),
]


def make_lora(layers: int, r: int, device) -> list:
    """Random adapter factors per product kind (kernels.decode_mega.pack_lora's input): A ~ N(0, 1 / K), B ~ N(0,
    0.01 / R), block-diagonal over the packed products' members (q, k, v; gate, up), none on the vocabulary."""
    g = torch.Generator(device=device).manual_seed(1)
    out = []
    for (n, k), m in zip(SHAPES[:4], (3, 1, 2, 1), strict=True):
        a = torch.randn(layers, m * r, k, device=device, generator=g) / k**0.5
        b = torch.zeros(layers, n, m * r, device=device)
        for j in range(m):
            rows = slice(j * n // m, (j + 1) * n // m)
            b[:, rows, j * r : (j + 1) * r] = 0.1 * torch.randn(layers, n // m, r, device=device, generator=g) / r**0.5
        out.append((a, b))
    return out + [None]


def make_inputs(layers: int, n_ctx: int, pos: int, device):
    """Random weights (y ~ N(0, 1) for x ~ N(0, 1), persistent_lab.make_weights), norm gains ~ 1, the cache's rows
    before pos ~ N(0, 1) in bf16, RoPE tables (base 10000), the embedding row."""
    g = torch.Generator(device=device).manual_seed(0)
    ws = []
    for i, (n, k) in enumerate(SHAPES):
        rows = n * (layers if i < 4 else 1)
        qs = torch.randint(-127, 128, (rows, k), dtype=torch.int8, device=device, generator=g)
        d = torch.full((rows, k // 32), 1.0 / (73.0 * k**0.5), dtype=torch.float16, device=device)
        d *= torch.rand(d.shape, device=device, generator=g).half() + 0.5
        ws.append((qs, d))
    gains = 1.0 + 0.1 * torch.randn(2 * layers + 1, E, device=device, generator=g)
    cache = torch.zeros(layers, 2 * H, n_ctx, D, dtype=torch.bfloat16, device=device)
    cache[:, :, :pos] = torch.randn(layers, 2 * H, pos, D, device=device, generator=g).bfloat16()
    inv = 10000.0 ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2.0 / D)
    ang = torch.arange(n_ctx, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float().to(device), ang.sin().float().to(device)
    x0 = torch.randn(E, device=device, generator=g)
    return ws, gains, cache, cos, sin, x0


def mega_dims(layers: int, cfg: dict, lora_dims: dict) -> dict:
    return dict(L=layers, E=E, F=F, V=V, H=H, HKV=H, D=D, eps=1e-6, **lora_dims,
                **{k: v for k, v in cfg.items() if k not in ("probe", "LORA")})  # fmt: skip


def buffers(layers, gains, cache, cos, sin, x0, pos, cfg, device, lora=None, rt=1) -> dict:
    from lorakit.kernels.decode_mega import sync_words, t_words

    return {
        "lora": lora,
        "t": torch.zeros(t_words(layers, rt), device=device),
        "h": x0.clone(),
        "y32": torch.zeros(layers, 3 * E + 2 * F, device=device),
        "logits": torch.zeros(V, device=device),
        "ws": torch.zeros(H, cfg["SA"], D + 2, device=device),
        "cache": cache,
        "cos": cos,
        "sin": sin,
        "pos": torch.tensor([pos], dtype=torch.int64, device=device),  # MegaDecoder's position tensor
        "gains": gains,
        "sync": torch.zeros(sync_words(layers) * 32, dtype=torch.int32, device=device),
    }


EVENTS = [
    "layer start (q|k|v input)",
    "q|k|v tasks done",
    "attention start",
    "attention done (head written)",
    "output input",
    "output tasks done",
    "gate|up input",
    "gate|up tasks done",
    "down input",
    "down tasks done",
    "q|k|v arrival done",
    "cache rows asked of L2 (PFKV)",
    "q|k|v input quantized",
    "output input quantized",
    "gate|up input quantized",
    "down input quantized",
]
# the adapters' warp's stamps (decode_mega._lora_worker), 8 per layer after the consumers' 16 L + 2
WORKER_EVENTS = [
    "adapters: q|k|v input ready",
    "adapters: q|k|v t part added",
    "adapters: q|k|v t complete",
    "adapters: q|k|v rows added",
    "adapters: down input ready",
    "adapters: down t part added",
    "adapters: down t complete",
    "adapters: down rows added",
]


def timeline(trace: torch.Tensor, layers: int) -> list[dict]:
    """The consumers' and the adapters' warps' event times (decode_mega._stamp) of a typical layer: per event, over the
    programs that record it, the earliest, median and latest time after the layer's earliest start (us), averaged
    over the middle layers; then the layer's period and the vocabulary product."""
    t = trace.double()
    rows = []
    mids = range(1, layers - 1)
    events = list(enumerate(EVENTS))
    events += [(16 * layers + 2 + k, name) for k, name in enumerate(WORKER_EVENTS)]  # + 8 layer, not 16 layer
    for k, name in events:
        stats = []
        for layer in mids:
            ref = t[:, 16 * layer].min()
            v = t[:, k + (16 if k < 16 else 8) * layer]
            v = v[v > 0] - ref
            if v.numel() == 0:
                continue
            stats.append([v.min().item(), v.median().item(), v.max().item()])
        if not stats:
            continue
        m = torch.tensor(stats).mean(0) / 1e3
        rows.append({"event": name, "first_us": m[0].item(), "median_us": m[1].item(), "last_us": m[2].item()})
    period = [(t[:, 16 * (layer + 1)].min() - t[:, 16 * layer].min()).item() / 1e3 for layer in mids]
    rows.append({"event": "layer period", "median_us": sum(period) / len(period)})
    fin = (t[:, 16 * layers + 1].max() - t[:, 16 * layers].min()).item() / 1e3
    rows.append({"event": "vocabulary product (first input to last task)", "median_us": fin})
    return rows


def imbalance(trace: torch.Tensor, layers: int) -> list[dict]:
    """Per product of a layer: each program's time from its input quantized to its tasks done (stamps 12 -> 1,
    13 -> 5, 14 -> 7, 15 -> 9) over the middle layers; are the slow programs the same ones in every layer?"""
    t = trace.double()
    sm = trace[:, 24 * layers + 2].tolist()
    out = []
    for name, a, b in (("q|k|v", 12, 1), ("output", 13, 5), ("gate|up", 14, 7), ("down", 15, 9)):
        d = torch.stack([(t[:, 16 * i + b] - t[:, 16 * i + a]) / 1e3 for i in range(1, layers - 1)], 1)  # [P, layers]
        even, odd = d[:, 0::2].mean(1), d[:, 1::2].mean(1)
        corr = torch.corrcoef(torch.stack([even, odd]))[0, 1].item()
        means = d.mean(1)
        slow = means.argsort(descending=True)[:8].tolist()
        out.append({"product": name, "mean_us": means.mean().item(), "slowest_us": means.max().item(), "corr": corr,
                    "slow_sms": [sm[i] for i in slow]})  # fmt: skip
    return out


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def main(argv=None) -> int:
    from persistent_lab import graph_us, launched_chain

    from lorakit.kernels.decode_mega import decode_step, descriptors, pack_d, pack_lora, tile_q

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--pos", type=int, default=255, help="the token's position (keys 0..pos)")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--cfg", default=None, help="only these CONFIGS entries (comma-separated indices)")
    p.add_argument("--skip-shipped", action="store_true", help="leave out lorakit's GraphDecoder")
    p.add_argument("--launch-only", action="store_true", help="also time each config's launch alone")
    p.add_argument("--out", default=str(ROOT / "bench/results/decode_mega_lab.json"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_mega_lab.py: needs a CUDA GPU", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    L = a.layers
    ws, gains, cache0, cos, sin, x0 = make_inputs(L, a.n_ctx, a.pos, dev)
    nbytes = sum(q.numel() + 2 * d.numel() for q, d in ws)
    limit = HBM / nbytes
    rows = []

    def report(name, us, extra=None):
        r = {"name": name, "us": us, "tok_s": 1e6 / us, "pct_limit": 100 * 1e6 / us / limit, **(extra or {})}
        rows.append(r)
        print(f"{name:<60s} {us:9.1f} us  {r['tok_s']:7.1f} tok/s  {r['pct_limit']:5.1f}% of the limit", flush=True)

    print(f"weights {nbytes / 1e9:.3f} GB, bandwidth limit {limit:.0f} tok/s at {HBM / 1e12:.2f} TB/s", flush=True)
    cfgs = CONFIGS if a.cfg is None else [CONFIGS[int(i)] for i in a.cfg.split(",")]
    for cfg in cfgs:
        name = f"megakernel {cfg}"
        try:
            descs = descriptors(
                [(tile_q(q, n, 64, 128), pack_d(d, n, 64)) for (q, d), (n, _) in zip(ws, SHAPES, strict=True)]
            )
            checks = {}
            factors = make_lora(L, cfg["LORA"], dev) if cfg.get("LORA") else [None] * 5
            for n in (1, L) if not cfg.get("probe") else ():  # one layer, then all of them
                few = [None if f is None else (f[0][:n], f[1][:n]) for f in factors]
                lora, lora_dims = pack_lora(few, n_sm)
                dims = mega_dims(n, cfg, lora_dims)
                b = buffers(n, gains, cache0.clone(), cos, sin, x0, a.pos, cfg, dev, lora, lora_dims["RT"])
                decode_step(b, descs, dims, n_sm)
                torch.cuda.synchronize()
                if int(b["sync"].count_nonzero()):
                    raise RuntimeError("phase counters not reset")
                ref_cache = cache0.clone()
                want, first = reference_step(ws, gains, ref_cache, cos, sin, x0, a.pos, dims, few)
                checks[f"logits_{n}"] = rel(b["logits"], want)
                checks[f"argmax_equal_{n}"] = int(b["logits"].argmax()) == int(want.argmax())
                checks[f"cache_row_{n}"] = rel(b["cache"][:n, :, a.pos].float(), ref_cache[:n, :, a.pos].double())
                if n == 1:
                    checks["qkv_1"] = rel(b["y32"][0, : 3 * E], first["qkv"])
                    checks["h_1"] = rel(b["h"], first["h"])
            print(f"{name}: checks (max |diff| / max |reference|, float64 reference of the same arithmetic): "
                  f"{json.dumps(checks)}", flush=True)  # fmt: skip
            lora, lora_dims = pack_lora(factors, n_sm)
            dims = mega_dims(L, cfg, lora_dims)
            b = buffers(L, gains, cache0.clone(), cos, sin, x0, a.pos, cfg, dev, lora, lora_dims["RT"])

            def step(b=b, descs=descs, cfg=cfg, dims=dims):
                b["h"].copy_(x0)
                b["y32"].zero_()
                b["t"].zero_()
                b["logits"].zero_()
                decode_step(b, descs, dims, n_sm, cfg.get("probe", 0))
                return torch.argmax(b["logits"])

            us = graph_us(step)
            if a.launch_only:  # the launch alone (its sums not zeroed: wrong numbers, timed only)
                alone = graph_us(lambda b=b, descs=descs, dims=dims: decode_step(b, descs, dims, n_sm))
                report(f"{name} (the launch alone)", alone)
            b["trace"] = torch.zeros(n_sm, 24 * L + 3, dtype=torch.int64, device=dev)
            step()
            torch.cuda.synchronize()
            tl = timeline(b["trace"].cpu(), L)
            spread = imbalance(b["trace"].cpu(), L)
            del b["trace"]
            print("    a layer's timeline (us after its first program starts; first / median / last program):")
            for r in tl:
                print(f"      {r['event']:<48s} {r.get('first_us', float('nan')):7.2f} {r['median_us']:7.2f} "
                      f"{r.get('last_us', float('nan')):7.2f}")  # fmt: skip
            print(
                "    the tasks' time per program (input quantized -> tasks done), middle layers: mean over programs,"
                " the slowest program's mean, and the split-half correlation of the programs' means (odd vs even"
                " layers; near 1: the same programs are slow in every layer); the slowest programs' SMs"
            )
            for r in spread:
                print(f"      {r['product']:<10s} mean {r['mean_us']:6.2f}  slowest {r['slowest_us']:6.2f}  "
                      f"corr {r['corr']:5.2f}  SMs {r['slow_sms']}")  # fmt: skip
            report(name, us, {"cfg": cfg, "checks": checks, "timeline": tl, "imbalance": spread})
            del descs
        except Exception as e:
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    chain_ws = [(q, d) for q, d in ws[:4]]
    x_b = x0.view(1, E).bfloat16()
    report("launched float chain of the layers' products only (4 MiB hints)",
           graph_us(lambda: launched_chain(chain_ws, x_b, L, 4)))  # fmt: skip
    if not a.skip_shipped:
        from finetune_gpu import random_q8_model, shapes
        from predict_gpu import bench_decode

        from lorakit.backends import get_backend

        del ws
        torch.cuda.empty_cache()
        be = get_backend("cuda-triton")
        model = random_q8_model(shapes(L), be.device)
        r = bench_decode(model, be, (), a.pos, 129, mode="device")
        report(f"lorakit GraphDecoder greedy (prompt {a.pos}, 128 steps)", r["ms_per_token"] * 1e3)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"layers": L, "pos": a.pos, "weight_bytes": nbytes, "rows": rows}, indent=1))
    return 0


def q8_act_product(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """y = W x with x quantized as quant.quantize_act_q8_0 (from x rounded to fp32), integer block sums, float64."""
    from lorakit.quant import quantize_act_q8_0

    k = x.numel()
    xq, dx = quantize_act_q8_0(x.float().view(1, k))
    isum = (qs.view(qs.shape[0], k // 32, 32).double() * xq.view(k // 32, 32).double()[None]).sum(-1)
    return (isum * d.double() * dx.double().view(1, -1)).sum(-1)


def reference_step(ws, gains, cache, cos, sin, h0, pos: int, dims: dict, factors=None):
    """The megakernel's step in float64 (weights ws: [(qs, d)] per kind, layers stacked; adapter factors per kind as
    make_lora gives them, each product + B (A x) of its float input): returns (logits, the first layer's q|k|v sums,
    h after the first layer); writes the new k, v rows (bf16) into `cache` as the kernel does."""
    L, E, F, H, D, eps = dims["L"], dims["E"], dims["F"], dims["H"], dims["D"], dims["eps"]
    factors = factors or [None] * 5

    def product(x, kind, layer):
        y = q8_act_product(x, *w(kind, layer))
        if factors[kind] is not None:
            a, b = (f[layer].double() for f in factors[kind])
            y = y + b @ (a @ x.double())
        return y

    def norm(h, g):
        return h / torch.sqrt((h * h).mean() + eps) * g.double()

    def w(kind, layer):
        qs, d = ws[kind]
        n = (3 * E, E, 2 * F, E, qs.shape[0])[kind]  # rows per layer (ws may hold more layers than L)
        return qs[layer * n : (layer + 1) * n], d[layer * n : (layer + 1) * n]

    h = h0.double()
    c, s = cos[pos].double().repeat_interleave(2), sin[pos].double().repeat_interleave(2)
    first = {}
    for layer in range(L):
        qkv = product(norm(h, gains[2 * layer]), 0, layer)
        x = qkv.view(3 * H, D)
        even = x[:, 0::2].repeat_interleave(2, dim=1)
        odd = x[:, 1::2].repeat_interleave(2, dim=1)
        sign = torch.tensor([-1.0, 1.0], dtype=torch.float64, device=x.device).repeat(D // 2)
        rot = torch.where(sign < 0, even * c - odd * s, even * s + odd * c)
        q, k_new, v_new = rot[:H], rot[H : 2 * H], x[2 * H :]
        kc, vc = cache[layer, :H], cache[layer, H:]
        kc[:, pos] = k_new.to(torch.bfloat16)
        vc[:, pos] = v_new.to(torch.bfloat16)
        sc = torch.einsum("hd,htd->ht", q, kc[:, : pos + 1].double()) / D**0.5
        att = torch.einsum("ht,htd->hd", torch.softmax(sc, dim=-1), vc[:, : pos + 1].double()).reshape(E)
        h = h + product(att, 1, layer)
        gu = product(norm(h, gains[2 * layer + 1]), 2, layer)
        g, u = gu[:F], gu[F:]
        h = h + product(g * torch.sigmoid(g) * u, 3, layer)
        if layer == 0:
            first = {"qkv": qkv, "h": h.clone()}
    return product(norm(h, gains[2 * L]), 4, 0), first


if __name__ == "__main__":
    sys.exit(main())
