#!/usr/bin/env python3
"""GPU finetune benchmark: lorakit (q8_0 base, cuda-triton) vs HF transformers + PEFT LoRA (bf16),
both on an open_llama_3b-shaped model with random weights, side by side in one process.

    python bench/finetune_gpu.py [--layers 26] [--steps 6] [--skip-peft] [--skip-compile]

Settings (batch x ctx, gradient checkpointing): 4 x 64 with checkpointing (the seed's setting),
8 x 512 without and with checkpointing. lorakit runs with PEFT's 7 targets (q,k,v,o,gate,up,down;
`--rank-X 0` for the other kinds) and with llama.cpp's full 12 tensor kinds. PEFT: r 4 on the same
7 targets, AdamW, eager and under torch.compile. Reports tokens/s, peak GPU memory, MFU
(4·N FLOPs/token without checkpointing, 6·N with; N = base parameters; H200 dense bf16 peak 989 TFLOP/s)
and ratios to compiled PEFT. Saves bench/results/finetune_h200.json.
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
PEAK_BF16 = 989e12
SETTINGS = [(4, 64, True), (8, 512, False), (8, 512, True)]
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shapes(layers: int) -> dict:
    return dict(vocab=32000, embd=3200, ff=8640, layers=layers, heads=32)


def n_params(s: dict) -> int:
    E, F, V, L = s["embd"], s["ff"], s["vocab"], s["layers"]
    return L * (4 * E * E + 3 * E * F + 2 * E) + 2 * V * E + E


def random_q8_model(s: dict, device):
    from lorakit.model import LlamaModel, ModelArgs
    from lorakit.quant import Q8Weight

    args = ModelArgs(n_vocab=s["vocab"], n_embd=s["embd"], n_ff=s["ff"], n_head=s["heads"],
                     n_head_kv=s["heads"], n_layer=s["layers"], norm_eps=1e-6)  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, shape in args.expected_shapes().items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, device=device)
        else:
            qs = torch.randint(-127, 128, shape, dtype=torch.int8, device=device, generator=g)
            d = torch.full((shape[0], shape[1] // 32), shape[1] ** -0.5 / 73.3, dtype=torch.float16, device=device)
            tensors[name] = Q8Weight(qs, d)
    return LlamaModel(args, tensors, "random", tied_output=False).to(device)  # packs q/k/v, gate/up on CUDA


def bench_lorakit(s: dict, batch: int, ctx: int, ckpt: bool, kinds: str, steps: int, graph: bool = True) -> dict:
    """The trainer's own step (forward, backward, fused AdamW, one host sync for the loss) on cuda-triton:
    replayed as one CUDA graph (lorakit.train_graph.GraphedStep, the trainer's default) or eager."""
    import numpy as np

    from lorakit.backends import AdamHyper, get_backend
    from lorakit.lora import LoraRanks, lora_shapes
    from lorakit.lora_init import init_lora
    from lorakit.model import rope_tables
    from lorakit.train import flat_lora, flat_views, loss_and_backward
    from lorakit.train_graph import GraphedStep

    be = get_backend("cuda-triton")
    torch.cuda.reset_peak_memory_stats()
    model = random_q8_model(s, be.device)
    off = {} if kinds == "12" else {"token_embd": 0, "output": 0, "output_norm": 0, "attn_norm": 0, "ffn_norm": 0}
    ranks = LoraRanks.default(4, **off)
    lora = init_lora(lora_shapes(model.args, ranks), seed=1)
    # as the trainer holds them: LoRA tensors and moments are views of one flat buffer each
    params = flat_lora(lora, be.device)
    flat = [t for ab in params.values() for t in ab]
    rope = rope_tables(model.args, ctx, be.device)
    m = flat_views([torch.zeros_like(t) for t in flat], be.device)
    v = flat_views([torch.zeros_like(t) for t in flat], be.device)
    decayed = [t.shape[0] > 1 for t in flat]
    rng = np.random.default_rng(0)

    def step_fn(x, y):  # the trainer's micro-step
        return loss_and_backward(model, be, params, torch.bfloat16, rope, x, y, ckpt)

    graphed = GraphedStep(step_fn, flat) if graph else None

    def step(i: int) -> float:
        xi = rng.integers(0, s["vocab"], (batch, ctx))
        yi = rng.integers(0, s["vocab"], (batch, ctx))
        if graphed is not None:
            loss, grads = graphed(xi, yi)
        else:
            loss = step_fn(torch.from_numpy(xi).cuda(), torch.from_numpy(yi).cuda())
            grads = [t.grad for t in flat]
        with torch.no_grad():
            be.adamw_step(flat, grads, m, v, decayed, AdamHyper(1e-3, 0.1, 0.9, 0.999, 1e-8, 1.0, 1.0, i + 1))
        if graphed is None:
            for t in flat:
                t.grad = None
        return float(loss)  # the trainer reads every loss (llama.cpp's convergence tests)

    for i in range(2):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(i + 2)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    name = f"lorakit ({kinds} kinds{'' if graph else ', eager'})"
    out = {"peer": name, "tokens_per_s": batch * ctx / dt, "s_per_step": dt,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss}  # fmt: skip
    return out


def bench_peft(s: dict, batch: int, ctx: int, ckpt: bool, compiled: bool, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.cuda.reset_peak_memory_stats()
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["embd"], intermediate_size=s["ff"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["heads"], max_position_embeddings=2048, rms_norm_eps=1e-6,
                      torch_dtype=torch.bfloat16)  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=PEFT_TARGETS, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    fwd = torch.compile(model) if compiled else model
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        x = torch.randint(0, s["vocab"], (batch, ctx), device="cuda", generator=gen)
        out = fwd(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(3 if compiled else 2):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    res = {"peer": "PEFT compiled" if compiled else "PEFT eager", "tokens_per_s": batch * ctx / dt, "s_per_step": dt,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss.detach())}  # fmt: skip
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--settings", default="all", help="'all' or e.g. '4x64c,8x512'")
    ap.add_argument(
        "--peers",
        default="lorakit7,lorakit12,peft,peftc",
        help="which peers to run (lorakit7e: lorakit eager, without the CUDA graph)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune_h200.json")
    a = ap.parse_args(argv)
    s = shapes(a.layers)
    N = n_params(s)
    settings = SETTINGS
    if a.settings != "all":
        settings = [(int(t.split("x")[0]), int(t.split("x")[1].rstrip("c")), t.endswith("c"))
                    for t in a.settings.split(",")]  # fmt: skip
    rows = []
    for batch, ctx, ckpt in settings:
        every = {"lorakit7": ("lorakit", "7"), "lorakit12": ("lorakit", "12"), "lorakit7e": ("eager", "7"),
                 "peft": ("peft", False), "peftc": ("peft", True)}  # fmt: skip
        runs = [every[p] for p in a.peers.split(",")]
        runs = [r for r in runs if not (r[0] == "peft" and (a.skip_peft or (r[1] and a.skip_compile)))]
        for kind, opt in runs:
            gc.collect()
            torch.cuda.empty_cache()
            try:
                if kind in ("lorakit", "eager"):
                    r = bench_lorakit(s, batch, ctx, ckpt, opt, a.steps, graph=kind == "lorakit")
                else:
                    r = bench_peft(s, batch, ctx, ckpt, opt, a.steps)
            except Exception as e:  # report and continue: one failing peer must not hide the others
                r = {"peer": f"{kind} {opt}", "error": f"{type(e).__name__}: {e}"[:300]}
            r.update(batch=batch, ctx=ctx, checkpointing=ckpt)
            if "tokens_per_s" in r:
                r["mfu"] = r["tokens_per_s"] * (6 if ckpt else 4) * N / PEAK_BF16
            rows.append(r)
            print(json.dumps(r), flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps({"meta": {"partial": True}, "rows": rows}, indent=2))  # survives a timeout
    for batch, ctx, ckpt in settings:
        peer = next((r for r in rows if (r["batch"], r["ctx"], r["checkpointing"]) == (batch, ctx, ckpt)
                     and r.get("peer") == "PEFT compiled" and "tokens_per_s" in r), None)  # fmt: skip
        for r in rows:
            if (r["batch"], r["ctx"], r["checkpointing"]) == (batch, ctx, ckpt) and peer and "tokens_per_s" in r:
                r["speed_vs_compiled_peft"] = r["tokens_per_s"] / peer["tokens_per_s"]
                r["memory_vs_compiled_peft"] = r["peak_gib"] / peer["peak_gib"]
    print(f"\n{'setting':14s}{'peer':22s}{'tok/s':>10s}{'peak GiB':>10s}{'MFU':>7s}{'x PEFTc':>9s}{'mem x':>7s}")
    for r in rows:
        st = f"{r['batch']}x{r['ctx']}{' ckpt' if r['checkpointing'] else ''}"
        if "error" in r:
            print(f"{st:14s}{r['peer']:22s}  error: {r['error'][:60]}")
            continue
        print(
            f"{st:14s}{r['peer']:22s}{r['tokens_per_s']:10.0f}{r['peak_gib']:10.2f}{r['mfu']:7.1%}"
            f"{r.get('speed_vs_compiled_peft', float('nan')):9.2f}{r.get('memory_vs_compiled_peft', float('nan')):7.2f}"
        )
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers, "params": N}
    from lorakit.kernels.q8_0_matmul import tuned_choices

    # the path measured for each product shape (which products took "wgmma", "dequant", "large", ...)
    meta["paths"] = {k: v for k, v in tuned_choices().items() if k.startswith(("('fwd'", "('grad'"))}
    out = a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
