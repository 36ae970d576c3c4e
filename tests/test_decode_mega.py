"""The decode megakernel (kernels/decode_mega.py) and its decoder (lorakit/decode_mega.py): `lorakit predict --act-q8`'s
decode steps on an sm_90 GPU. Off the GPU: the weights' tile-major layout, the split rule, when it applies, and that
the kernel builds for sm_90a (Gluon has no interpreter: the numbers are checked on the GPU only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit import decode_mega
from lorakit.backends import add_lora_terms
from lorakit.decode_mega import applies, lora_factors
from lorakit.kernels.decode_mega import pack_d, pack_lora, pad_scales, splits, tile_q
from lorakit.lora import lora_terms
from lorakit.model import KVCache, fused_members
from lorakit.quant import Q8Weight
from tests.test_decode import ARGS, _adapter, _model

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
needs_sm90 = pytest.mark.skipif(not SM90, reason="needs an sm_90+ GPU")


def test_tile_q_puts_each_tile_where_the_producer_reads_it():
    """Tile (layer, row block rb, K tile kt) at rows ((layer NB + rb) KC + kt) BLOCK_N (_produce's `row`), rows past
    n and K past k zero."""
    layers, n, k, bn, bkb = 2, 70, 160, 64, 128
    qs = torch.randint(-127, 128, (layers * n, k), dtype=torch.int8)
    t = tile_q(qs, n, bn, bkb)
    nb, kc = 2, 2
    padded = torch.zeros(layers, nb * bn, kc * bkb, dtype=torch.int8)
    padded[:, :n, :k] = qs.view(layers, n, k)
    assert t.shape == (layers * nb * kc * bn, bkb)
    for layer in range(layers):
        for rb in range(nb):
            for kt in range(kc):
                row = ((layer * nb + rb) * kc + kt) * bn
                want = padded[layer, rb * bn : (rb + 1) * bn, kt * bkb : (kt + 1) * bkb]
                assert torch.equal(t[row : row + bn], want)


def test_pack_d_puts_each_stage_scales_where_the_producer_reads_them():
    """A row block's [BLOCK_N, 8] scales of stage g at [((layer NB + rb) G + g) BLOCK_N 8 / 256] (DPACK), zeros past
    the row's K / 32 scales and past n."""
    layers, n, nb_k, bn = 2, 70, 11, 64  # K = 352: two stages, the second with 3 of 8 scales
    d = torch.rand(layers * n, nb_k).half() + 0.5
    p = pack_d(d, n, bn)
    g, rows = 2, bn * 8 // 256
    full = torch.zeros(layers, 2 * bn, 16, dtype=torch.float16)
    full[:, :n, :nb_k] = d.view(layers, n, nb_k)
    assert torch.equal(pad_scales(d)[:, nb_k:], torch.zeros(layers * n, 16 - nb_k, dtype=torch.float16))
    for layer in range(layers):
        for rb in range(2):
            for step in range(g):
                at = ((layer * 2 + rb) * g + step) * rows
                want = full[layer, rb * bn : (rb + 1) * bn, step * 8 : (step + 1) * 8]
                assert torch.equal(p[at : at + rows].reshape(bn, 8), want)


def test_splits_are_the_measured_ones_on_the_3b_step():
    """One stage per task, two where the product has fewer row blocks than half the SMs: the lab's best splits on
    the H200 (132 SMs)."""
    shapes = [(9600, 3200), (3200, 3200), (17280, 3200), (3200, 8640), (32000, 3200)]
    assert [splits(n, k, 132) for n, k in shapes] == [13, 7, 13, 17, 13]
    assert splits(120, 64, 132) == 1


def _cache(model, device="cpu", dtype=torch.float32):
    return KVCache.empty(model.args, 1, 32, dtype, torch.device(device))


TWO = [(_adapter(1), 0.7), (_adapter(2), -0.4)]  # two scaled adapters (rank 3, on every tensor but attn_v)


def test_lora_factors_give_each_weights_adapter_terms():
    """B (A x) of lora_factors' kind j, layer i, equals the adapters' terms of the product's weights (add_lora_terms,
    term by term, member by member), for two scaled adapters, a member without a term (attn_v) and the vocabulary."""
    model = _model()
    factors = lora_factors(model, TWO)
    terms = lora_terms(TWO)
    g = torch.Generator().manual_seed(5)
    a = model.args
    for j, kind in enumerate([*decode_mega.KINDS, "output"]):
        for i in range(a.n_layer if j < 4 else 1):
            name = f"blk.{i}.{kind}"
            members = fused_members(name) if kind in ("attn_qkv", "ffn_gate_up") else [f"{name}.weight"]
            if j == 4:
                members = ["output.weight"]
            k = model.tensors[members[0]].shape[1]
            x = torch.randn(1, k, generator=g)
            want = torch.cat([add_lora_terms(torch.zeros(1, model.tensors[m].shape[0]), x, terms.get(m, []))
                              for m in members], dim=-1)  # fmt: skip
            fa, fb = factors[j]
            got = fb[i] @ (fa[i] @ x[0])
            assert torch.allclose(got, want[0], atol=1e-5, rtol=1e-5), (kind, i)
    # rank 3 x 2 adapters per weight: q and k (v has none), gate and up, the others alone
    assert [f[0].shape[1] for f in factors] == [12, 6, 12, 6, 6]
    assert lora_factors(model, ()) == [None] * 5


def test_pack_lora_lays_out_the_factors_for_the_kernel():
    """Kind j's A at LOFF[j], B at LOFF[5 + j] of one flat buffer; R the ranks, RP their powers of two, RT the
    largest (at least 32: t's copies on lines of their own), TSL per kind a program's slice of K rounded up to a power
    of two, TR the rows of B at a time."""
    a0, b0 = torch.randn(2, 24, 3200), torch.randn(2, 9600, 24)
    a3, b3 = torch.randn(2, 5, 8640), torch.randn(2, 3200, 5)
    buf, dims = pack_lora([(a0, b0), None, None, (a3, b3), None], 132)
    assert dims["R"] == (24, 0, 0, 5, 0) and dims["RP"] == (32, 1, 1, 8, 1) and dims["RT"] == 32
    assert dims["TSL"] == (32, 1, 1, 128, 1)  # ceil(3200 / 132) = 25, ceil(8640 / 132) = 66
    assert dims["TR"] == (128, 1, 1, 32, 1)  # a program's rows of B: ceil(9600 / 132) = 73, ceil(3200 / 132) = 25
    off = dims["LOFF"]
    for j, t in ((0, a0), (5, b0), (3, a3), (8, b3)):
        assert torch.equal(buf[off[j] : off[j] + t.numel()].view(t.shape), t)
    assert pack_lora([None] * 5, 132)[0] is None


def test_applies_says_why_not(monkeypatch):
    model = _model()
    assert applies(model, (), _cache(model)) == "the decode megakernel needs an sm_90+ GPU"
    assert applies(model, TWO, _cache(model)) == "the decode megakernel needs an sm_90+ GPU"
    monkeypatch.setattr(decode_mega, "MAX_RANK", 5)
    assert "add up to 12" in applies(model, TWO, _cache(model))
    monkeypatch.setattr(decode_mega, "MAX_RANK", 64)
    tensors = dict(model.tensors)
    w = tensors["blk.1.ffn_down.weight"]
    tensors["blk.1.ffn_down.weight"] = torch.zeros(w.shape)
    floats = type(model)(model.args, tensors, "random", tied_output=False)
    assert applies(floats, (), _cache(floats)) == "blk.1.ffn_down is not q8_0"
    batch2 = KVCache.empty(model.args, 2, 32, torch.float32, torch.device("cpu"))
    assert "KV cache" in applies(model, (), batch2)
    monkeypatch.setenv("LORAKIT_MEGAKERNEL", "0")
    assert applies(model, (), _cache(model)) == "LORAKIT_MEGAKERNEL=0"


@pytest.fixture(scope="module")
def builds() -> list[dict]:
    """tests.decode_mega_build.builds() in a fresh process without TRITON_INTERPRET (which a test module may set)."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json, sys; sys.path.insert(0, '.'); import tests.decode_mega_build as b; print(json.dumps(b.builds()))"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_compiles_for_sm90_and_fits_shared_memory(builds):
    """The 3B step (bf16 cache) without and with adapter terms and the tests' small GQA model with them (fp32 cache)
    build for sm_90a: a cubin, <= 227 KiB of shared memory (the H100 / H200 per-block limit), the int8 tensor-core
    products and the TMA weight stream in the PTX."""
    assert [b["lora"] for b in builds] == [False, True, True]
    for b in builds:
        assert b["cubin"] and b["shared"] <= 227 * 1024 and b["imma"] > 0 and b["tma"] > 0, b


# ---- on the GPU ----------------------------------------------------------------------------------------------------


def _gpu_setup(adapters=(), dtype=torch.float32):
    from lorakit.backends.cuda_triton import CudaTritonBackend
    from lorakit.generate import Generator

    dev = torch.device("cuda")
    be = CudaTritonBackend(dev)
    model = _model().to(dev)
    adapters = [(ad.to(dev), s) for ad, s in adapters]
    return (
        be,
        model,
        Generator(model, be, adapters, n_ctx=48, dtype=dtype, act_q8=True),
        Generator(model, be, adapters, n_ctx=48, dtype=dtype),
    )


ATTENTION = {  # the kernel's attention knobs per case: keys per split (KPS) and per block (BLOCK_T)
    "one-split": {},  # the defaults: one split of one block at these positions
    "splits": dict(KPS=8, BLOCK_T=8),  # 2-4 splits of 1-2 blocks: the output product's programs combine the partials
    "one-split-blocks": dict(KPS=64, BLOCK_T=8),  # one split of 2-5 blocks
}


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize(
    "with_adapters, attention",
    [
        (False, "one-split"),
        (False, "splits"),
        (False, "one-split-blocks"),
        (True, "one-split"),
        (True, "splits"),
    ],
)
def test_megakernel_step_is_the_act_q8_step(with_adapters, attention):
    """Each decode step's logits (and the cache rows it writes) against the eager --act-q8 step (quant.q8_0_act_matmul
    for every product, the same arithmetic) on the same cache, for positions 11..34, with each of the ATTENTION
    cases' key splits and blocks. Both quantize the same fp32 activations; they differ by the order of fp32 sums
    and, where an activation lands within an ulp of a rounding boundary, by one q step of one block. Bound: a quarter
    of what the activation rounding itself does to the logits (the float path against --act-q8 on the same cache),
    which a wrong index, head or RoPE pair exceeds by far. With two scaled adapters (terms on every tensor: the
    norms' and the embedding's formed as the eager step forms them, the products' in float32 in the kernel)."""
    from lorakit.decode_mega import MegaDecoder

    be, model, gen, flt = _gpu_setup(TWO if with_adapters else ())
    prompt = torch.randint(3, ARGS.n_vocab, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = gen.new_cache()
    gen.logits(prompt, cache, 0)
    step = MegaDecoder(model, be, gen.rope, cache, gen.adapters)
    step.dims.update(ATTENTION[attention])
    tok = 5
    for pos in range(len(prompt), len(prompt) + 24):
        before = KVCache([k.clone() for k in cache.k], [v.clone() for v in cache.v])
        ref = gen.logits([tok], before, pos)
        floats = flt.logits([tok], KVCache([k.clone() for k in cache.k], [v.clone() for v in cache.v]), pos)
        got = step(tok, pos)
        rounding = (floats - ref).abs().max().item()
        assert rounding > 0
        assert (got - ref).abs().max().item() <= 0.25 * rounding, pos
        assert int(got.argmax()) == int(ref.argmax()), pos
        for i in range(ARGS.n_layer):
            for mine, want in ((cache.k[i], before.k[i]), (cache.v[i], before.v[i])):
                assert torch.allclose(mine[:, :, pos], want[:, :, pos], rtol=1e-3, atol=1e-4), (pos, i)
        tok = int(ref.argmax())


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("temp", [0.0, 0.8])
@pytest.mark.parametrize("with_adapters", [False, True], ids=["base", "2-adapters"])
def test_generate_with_the_megakernel_same_tokens(monkeypatch, temp, with_adapters):
    """Generator(act_q8=True).generate on the GPU: the megakernel's captured steps (greedy, or the seeded sampler's
    draw inside the step) give the eager --act-q8 steps' tokens, with and without two scaled adapters; a second
    generation reuses the first one's tile-major weights."""
    from lorakit.generate import SamplingParams

    _, _, gen, _ = _gpu_setup(TWO if with_adapters else ())
    params = SamplingParams(temp=temp, seed=3)
    prompt = [1, 7, 9, 11, 4]
    mega = list(gen.generate(prompt, 24, params))
    weights = gen._tiled["weights"]
    assert list(gen.generate(prompt, 24, params)) == mega and gen._tiled["weights"] is weights
    monkeypatch.setenv("LORAKIT_MEGAKERNEL", "0")
    eager = list(gen.generate(prompt, 24, params))
    assert mega == eager and len(mega) == 24


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("mega", ["1", "0"], ids=["megakernel", "eager-step"])
def test_launch_overlap_off_gives_the_same_tokens(monkeypatch, mega):
    """LORAKIT_LAUNCH_OVERLAP=0 (plain launches instead of programmatic dependent ones, greedy tokens copied to the
    host on the main stream instead of a side stream) is the A/B switch of the decode benchmarks: the same greedy
    tokens as with the overlap on, with the megakernel's graph and with the captured eager --act-q8 step, with two
    scaled adapters."""
    from lorakit.generate import SamplingParams

    _, _, gen, _ = _gpu_setup(TWO)
    monkeypatch.setenv("LORAKIT_MEGAKERNEL", mega)
    params = SamplingParams(temp=0.0, seed=3)
    prompt = [1, 7, 9, 11, 4]
    on = list(gen.generate(prompt, 24, params))
    monkeypatch.setenv("LORAKIT_LAUNCH_OVERLAP", "0")
    off = list(gen.generate(prompt, 24, params))
    assert on == off and len(on) == 24


@needs_sm90
@pytest.mark.gpu
def test_applies_on_the_gpu():
    _, model, gen, _ = _gpu_setup()
    cache = gen.new_cache()
    assert applies(model, (), cache) is None
    assert applies(model, [(ad.to(cache.k[0].device), s) for ad, s in TWO], cache) is None
    assert isinstance(model.fused["blk.0.attn_qkv"], Q8Weight)
