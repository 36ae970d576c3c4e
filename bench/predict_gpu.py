#!/usr/bin/env python3
"""GPU predict benchmark: q8_0 decode and prefill on an open_llama_3b-shaped model (random weights).

    python bench/predict_gpu.py [--layers 26] [--new 256] [--prompt 128]

Batch 1, prompt 128, 256 new tokens (greedy), bf16 activations, CUDA-graph decode step, without
adapters and with two scaled adapters (r 4 on the 7 matrices, scales 0.7 and 0.4, unmerged);
prefill of 512 tokens through the batched q8_0 matmul (the lean prompt forward `lorakit predict` runs, and the
generic forward with the same numbers, side by side); then HF transformers `generate` (bf16, same
shape, random weights) in the same run (--skip-hf to leave it out). Reports tokens/s and % of the
bandwidth limit (q8_0 weight bytes per token at 4.23 TB/s). Saves bench/results/predict_h200.json.
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
HBM = 4.23e12
LLAMACPP_DECODE, LLAMACPP_PREFILL, HF_DECODE = 234.0, 16100.0, 36.0  # measured on the H200 (issue #5)


def random_adapter(model, rank: int, seed: int, device):
    from lorakit.lora import LoraAdapter, LoraPair, base_shape

    g = torch.Generator(device=device).manual_seed(seed)
    pairs = {}
    for name in model.args.expected_shapes():
        if name.startswith("blk.") and "norm" not in name:
            out_f, in_f = base_shape(model.args, name)
            a = torch.randn(in_f, rank, device=device, generator=g) * in_f**-0.5
            b = torch.randn(out_f, rank, device=device, generator=g) * 0.02
            pairs[name] = LoraPair(a, b, 1.0)
    return LoraAdapter(pairs, format="random")


def two_adapters(model, device) -> list:
    """The benchmarks' two scaled adapters: rank 4 at scales 0.7 and 0.4 (seeds 1 and 2)."""
    return [(random_adapter(model, 4, 1, device), 0.7), (random_adapter(model, 4, 2, device), 0.4)]


def weight_bytes(model) -> int:
    from lorakit.quant import Q8Weight

    total = 0
    for name, w in model.tensors.items():
        if name == "token_embd.weight":
            continue  # one row per token is read, not the matrix
        total += w.qs.numel() + 2 * w.d.numel() if isinstance(w, Q8Weight) else w.numel() * w.element_size()
    return total


def bench_decode(model, backend, adapters, prompt: int, new: int, dtype=torch.bfloat16, mode="host",
                 act_q8: bool = False) -> dict:  # fmt: skip
    """Decoding of `new` tokens after a random prompt: new - 1 timed steps after the graph's capture. mode "host":
    greedy, the host reads each step's argmax before launching the next; "device": greedy with the argmax and next
    position inside the step, the host one step behind (what `lorakit predict --temp 0` does); "sampled":
    `lorakit predict`'s default sampler chain (temp 0.8, top-k 40, top-p 0.95, min-p 0.05) as it runs it: every
    stage and the seeded draw inside the captured step (uniforms from the seeded generator handed over in
    advance), the host one step behind; "sampled-host": the same chain with the temperature and the draw on the
    host after each step (the way before session 10). act_q8: `lorakit predict --act-q8`'s steps (the decode
    megakernel, lorakit/decode_mega.py)."""
    from lorakit.decode import GraphDecoder
    from lorakit.generate import Generator, SamplingParams, draw

    on_device = mode in ("device", "sampled")
    params = SamplingParams(seed=1)

    gen = Generator(model, backend, adapters, n_ctx=prompt + new + 1, dtype=dtype, act_q8=act_q8)
    cache = gen.new_cache()
    ids = torch.randint(3, model.args.n_vocab, (prompt,)).tolist()
    logits = gen.logits(ids, cache, 0)
    sampler = params if mode.startswith("sampled") else None
    loop = dict(greedy=mode == "device", sampler=sampler, device_draw=mode == "sampled")
    if act_q8:
        from lorakit.decode_mega import MegaDecoder

        step = MegaDecoder(model, backend, gen.rope, cache, adapters, **loop)
    else:
        step = GraphDecoder(model, backend, adapters, gen.rope, cache, dtype, **loop)
    tok = int(torch.argmax(logits))
    rng = torch.Generator().manual_seed(1)
    if on_device:
        uniforms = torch.rand(new, generator=rng) if mode == "sampled" else None
        list(step.tokens(tok, prompt, 1, uniforms))  # capture
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        list(step.tokens(tok, prompt, new - 1, uniforms))
    else:
        logits = step(tok, prompt)  # capture
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for p in range(prompt + 1, prompt + new):
            tok = int(torch.argmax(logits)) if mode == "host" else draw(step.picks, params, rng)
            logits = step(tok, p)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = (new - 1) / dt
    wb = weight_bytes(model)
    return {"decode_tok_s": tps, "ms_per_token": 1e3 / tps, "bandwidth_limit_tok_s": HBM / wb,
            "pct_of_bandwidth_limit": tps * wb / HBM, "weight_bytes": wb}  # fmt: skip


def bench_prefill(model, backend, n: int = 512, dtype=torch.bfloat16, lean: bool = True) -> dict:
    """A 512-token prompt's tok/s: lean, as `lorakit predict` runs it (backends/cuda_prompt.py); else through the
    generic forward (model.forward_hidden over model_fns and fused_ops; the same numbers)."""
    from lorakit.generate import Generator

    gen = Generator(model, backend, (), n_ctx=n, dtype=dtype, lean_prompt=lean)
    ids = torch.randint(3, model.args.n_vocab, (n,)).tolist()
    for _ in range(2):  # warm-up (llama-bench: one warm-up run, then the mean of 5)
        gen.logits(ids, gen.new_cache(), 0)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen.logits(ids, gen.new_cache(), 0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    return {"prefill_tok_s": n / mean, "prefill_tok_s_best": n / min(times), "prefill_tokens": n}


def bench_hf(layers: int, prompt: int, new: int) -> dict:
    """HF transformers `generate` (greedy, bf16, default dynamic cache) on the same shape, random weights:
    decode tok/s = (new - 1) tokens over the time beyond a 1-token generate (the prefill)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=3200, intermediate_size=8640, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                      rms_norm_eps=1e-6, torch_dtype=torch.bfloat16)  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(3, 32000, (1, prompt), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(4)  # warm-up
    t1, tn = run(1), run(new)
    return {"decode_tok_s": (new - 1) / (tn - t1)}


def main(argv=None) -> int:
    from lorakit.backends import get_backend

    sys.path.insert(0, str(ROOT / "bench"))
    from finetune_gpu import random_q8_model, shapes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "predict_h200.json")
    ap.add_argument("--skip-hf", action="store_true", help="skip HF transformers generate (same run, same shape)")
    ap.add_argument("--only-prefill", action="store_true", help="just the 512-token prefill")
    ap.add_argument("--only-mega", action="store_true", help="just the megakernel's greedy decode, without and with "
                    "the two adapters (printed, not saved)")  # fmt: skip
    a = ap.parse_args(argv)
    be = get_backend("cuda-triton")
    model = random_q8_model(shapes(a.layers), be.device)
    rows = []
    if a.only_prefill:
        r = bench_prefill(model, be)
        print(json.dumps({"case": "prefill 512", **r}), flush=True)
        return 0
    if not a.only_mega:  # prefill first, as in `lorakit predict` (a fresh process: the prompt, then the decode steps)
        for lean, how in ((True, ""), (False, ", generic forward"), (True, ", again")):
            r = bench_prefill(model, be, lean=lean)
            rows.append({"case": f"prefill 512{how}", **r, "vs_llamacpp": r["prefill_tok_s"] / LLAMACPP_PREFILL})
            print(json.dumps(rows[-1]), flush=True)
    ads = two_adapters(model, be.device)
    mega_modes = (("device", "argmax on GPU"), ("sampled", "default sampling"))[: 1 if a.only_mega else 2]
    for name, adapters in (("", ()), (", 2 scaled adapters", ads)):
        for mode, how in mega_modes:
            r = bench_decode(model, be, adapters, a.prompt, a.new, mode=mode, act_q8=True)
            rows.append({"case": f"decode, --act-q8 (megakernel){name}, {how}", **r,
                         "vs_llamacpp": r["decode_tok_s"] / LLAMACPP_DECODE})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    if a.only_mega:
        return 0
    for name, adapters in (("no adapter", ()), ("2 scaled adapters", ads)):
        for mode, how in (("host", "host argmax"), ("device", "argmax on GPU"), ("sampled", "default sampling"),
                          ("sampled-host", "default sampling, draw on host")):  # fmt: skip
            r = bench_decode(model, be, adapters, a.prompt, a.new, mode=mode)
            rows.append({"case": f"decode, {name}, {how}", **r, "vs_llamacpp": r["decode_tok_s"] / LLAMACPP_DECODE})
            print(json.dumps(rows[-1]), flush=True)
    for lean, how in ((True, ""), (False, ", generic forward")):
        r = bench_prefill(model, be, lean=lean)
        rows.append({"case": f"prefill 512{how}, after the decode runs", **r,
                     "vs_llamacpp": r["prefill_tok_s"] / LLAMACPP_PREFILL})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if not a.skip_hf:
        del model
        torch.cuda.empty_cache()
        try:
            r = bench_hf(a.layers, a.prompt, a.new)
            rows.append({"case": "HF transformers generate", **r, "vs_llamacpp": r["decode_tok_s"] / LLAMACPP_DECODE})
        except Exception as e:  # report and continue
            rows.append({"case": "HF transformers generate", "error": f"{type(e).__name__}: {e}"[:200]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'case':60s}{'tok/s':>10s}{'% BW limit':>12s}{'x llama.cpp':>13s}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:60s}  error: {r['error'][:60]}")
            continue
        tps = r.get("decode_tok_s", r.get("prefill_tok_s"))
        pct = r.get("pct_of_bandwidth_limit")
        print(f"{r['case']:60s}{tps:10.0f}{'' if pct is None else f'{pct:.0%}':>12s}{r['vs_llamacpp']:12.2f}x")
    print(
        f"(issue #5's measurements on the H200: HF transformers generate {HF_DECODE:.0f} tok/s; llama.cpp CUDA "
        f"{LLAMACPP_DECODE:.0f} tok/s decode, {LLAMACPP_PREFILL:.0f} tok/s prefill)"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": {"gpu": torch.cuda.get_device_name(), "layers": a.layers}, "rows": rows},
                                indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
