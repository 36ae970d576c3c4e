"""The single-token decode step (lorakit.decode.GraphDecoder, eager here) against the batched KV-cached
forward (model.forward_hidden), on both backends: cpu-torch and cuda-triton (Triton's CPU interpreter
without a GPU). A tiny random q8_0 llama with GQA, two scaled adapters on every tensor kind (norms and
token_embd included), packed q/k/v and gate/up weights (model.pack_fused) with block-diagonal LoRA terms.

Tolerance: both paths compute the same ops in float32 with different association (fused LoRA term with
the scale folded into b, fp32 attention with an online softmax vs SDPA, one GEMV vs three products).
Each op's result moves by at most ~K * 2^-24 relative to its magnitude (K <= 96 terms here), i.e.
< 6e-6; through 2 layers and the output product the logits move by under 1e-5 of their largest
magnitude, and greedy tokens are equal. bf16: every op rounds to 8 significant bits, so the two
association orders can differ by a few bf16 ulps per op; we compare logits to 2^-8 * 8 (8 bf16 ulps of
the largest magnitude: one per op in the longest chain of non-linear ops, norm -> product -> add, per
layer) and do not require equal argmax.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from lorakit.backends.cpu_torch import CpuTorchBackend  # noqa: E402
from lorakit.decode import GraphDecoder, PrefetchPlan  # noqa: E402
from lorakit.generate import Generator  # noqa: E402
from lorakit.lora import LoraAdapter, LoraPair, base_shape  # noqa: E402
from lorakit.model import LlamaModel, ModelArgs, pack_fused  # noqa: E402
from lorakit.quant import quantize_q8_0  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
ARGS = ModelArgs(n_vocab=120, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, n_layer=2, norm_eps=1e-5)
# as many key/value as query heads, head size 12 (not a multiple of 8): the GPU path's fused attention
MHA_ARGS = ModelArgs(n_vocab=120, n_embd=96, n_ff=96, n_head=8, n_head_kv=8, n_layer=2, norm_eps=1e-5)
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _model(args: ModelArgs = ARGS) -> LlamaModel:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in args.expected_shapes().items():
        if len(shape) == 1:
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            tensors[name] = quantize_q8_0(torch.randn(shape, generator=g) * shape[1] ** -0.5)
    return LlamaModel(args, tensors, "random", tied_output=False)


def _adapter(seed: int, args: ModelArgs = ARGS) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name in args.expected_shapes():
        if "attn_v" in name:
            continue  # a member of a packed weight without a LoRA
        out_f, in_f = base_shape(args, name)
        r = 1 if out_f == 1 else 3
        pairs[name] = LoraPair(torch.randn(in_f, r, generator=g) * 0.2, torch.randn(out_f, r, generator=g) * 0.2)
    return LoraAdapter(pairs, format="random")


def _backends():
    out = [pytest.param(CpuTorchBackend, id="cpu-torch")]
    try:
        from lorakit.backends.cuda_triton import CudaTritonBackend
        from lorakit.kernels import q8_0_matmul
    except ImportError:
        return out
    if CUDA or q8_0_matmul.interpreting():
        out.append(pytest.param(lambda: CudaTritonBackend(DEVICE), id="cuda-triton"))
    return out


@pytest.mark.parametrize("make_backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("args", [ARGS, MHA_ARGS], ids=["gqa", "mha"])
def test_decode_step_matches_batched_forward(make_backend, dtype, args):
    be = make_backend()
    dev = be.device
    model = pack_fused(_model(args).to(dev))
    assert model.fused, "q/k/v and gate/up should be packed"
    ads = [(_adapter(1, args).to(dev), 0.7), (_adapter(2, args).to(dev), 0.4)]
    gen = Generator(model, be, ads, n_ctx=12, dtype=dtype)
    prompt = [1, 17, 5, 99, 42]
    ref_cache, dec_cache = gen.new_cache(), gen.new_cache()
    gen.logits(prompt, ref_cache, 0)
    gen.logits(prompt, dec_cache, 0)
    step = GraphDecoder(model, be, ads, gen.rope, dec_cache, dtype, use_graph=False)
    tok = 7
    for pos in range(len(prompt), 12):
        ref = gen.logits([tok], ref_cache, pos)
        got = step(tok, pos)
        scale = ref.abs().max().item()
        tol = 1e-5 * scale if dtype == torch.float32 else 8 * 2.0**-8 * scale
        err = (got - ref).abs().max().item()
        assert err <= tol, f"pos {pos}: max |diff| {err:.3g} > {tol:.3g} ({dtype})"
        if dtype == torch.float32:
            assert int(got.argmax()) == int(ref.argmax())
        tok = int(ref.argmax())
    # the step wrote the same cache rows as the batched forward
    for i in range(args.n_layer):
        for a, b in ((dec_cache.k[i], ref_cache.k[i]), (dec_cache.v[i], ref_cache.v[i])):
            kv_tol = 1e-5 if dtype == torch.float32 else 4 * 2.0**-8
            assert (a.float() - b.float()).abs().max().item() <= kv_tol * max(1.0, b.float().abs().max().item())


@pytest.mark.parametrize("make_backend", _backends())
def test_generator_forms_lora_terms_once(make_backend, monkeypatch):
    """A generation's adapters are fixed (model_fns(frozen=True)): each packed weight's block-diagonal LoRA term,
    and the other weights' terms as the backend combines them (Backend.fuse_loras), are formed on first use and
    reused by later prompts, with the numbers of forming them at every product."""
    from lorakit import lora

    be = make_backend()
    model = pack_fused(_model().to(be.device))
    ads = [(_adapter(1).to(be.device), 0.7), (_adapter(2).to(be.device), 0.4)]
    formed = []
    real = lora.fused_lora_term
    monkeypatch.setattr(lora, "fused_lora_term", lambda *a: formed.append(1) or real(*a))
    gen = Generator(model, be, ads, n_ctx=12, dtype=torch.bfloat16)
    prompt = [1, 17, 5, 99, 42]
    first = gen.logits(prompt, gen.new_cache(), 0)
    assert len(formed) == len(model.fused)  # q|k|v and gate|up of every layer, once
    again = gen.logits(prompt, gen.new_cache(), 0)
    assert len(formed) == len(model.fused) and torch.equal(again, first)
    gen.fns = lora.model_fns(model, be, ads, torch.bfloat16)  # not frozen: the terms formed at every product
    assert torch.equal(gen.logits(prompt, gen.new_cache(), 0), first)
    assert len(formed) == 2 * len(model.fused)


def test_unpacked_model_decodes_like_packed():
    """Without packed weights (a model not on CUDA) the step runs the members one by one: same logits."""
    be = CpuTorchBackend()
    plain = _model()
    packed = pack_fused(plain)
    ads = [(_adapter(3), 0.5)]
    outs = []
    for model in (plain, packed):
        gen = Generator(model, be, ads, n_ctx=8, dtype=torch.float32)
        cache = gen.new_cache()
        gen.logits([1, 2, 3], cache, 0)
        step = GraphDecoder(model, be, ads, gen.rope, cache, torch.float32, use_graph=False)
        outs.append(step(4, 3))
    assert not plain.fused
    diff = (outs[0] - outs[1]).abs().max().item()
    assert diff <= 1e-4 * outs[0].abs().max().item()


def test_pack_fused_views_share_storage():
    packed = pack_fused(_model())
    qkv = packed.fused["blk.0.attn_qkv"]
    q, k, v = (packed.tensors[f"blk.0.attn_{m}.weight"] for m in "qkv")
    assert q.qs.untyped_storage().data_ptr() == qkv.qs.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([q.qs, k.qs, v.qs]), qkv.qs) and torch.equal(torch.cat([q.d, k.d, v.d]), qkv.d)
    assert qkv.shape == (ARGS.n_embd + 2 * ARGS.n_embd_kv, ARGS.n_embd)
    assert packed.fused["blk.1.ffn_gate_up"].shape == (2 * ARGS.n_ff, ARGS.n_embd)


def _two_prompted_caches(make_backend, dtype=torch.float32, with_adapter: bool = True):
    """(backend, packed tiny model, one adapter (or none), its Generator (n_ctx 12), the prompt, two caches holding
    the prompt, the prompt's last logits): for comparing a step-by-step host loop with a decoder's own tokens."""
    be = make_backend()
    model = pack_fused(_model().to(be.device))
    ads = [(_adapter(1).to(be.device), 0.7)] if with_adapter else []
    gen = Generator(model, be, ads, n_ctx=12, dtype=dtype)
    prompt = [1, 17, 5, 99, 42]
    caches = [gen.new_cache(), gen.new_cache()]
    logits = [gen.logits(prompt, c, 0) for c in caches][0]
    return be, model, ads, gen, prompt, caches, logits


@pytest.mark.parametrize("make_backend", _backends())
def test_greedy_steps_take_their_token_on_the_device(make_backend):
    """GraphDecoder(greedy=True): each step's argmax and next position are formed inside the step, and
    tokens() yields the same tokens (and leaves the same cache) as host argmax step by step (a CUDA graph
    on a GPU, eager here)."""
    be, model, ads, gen, prompt, caches, logits = _two_prompted_caches(make_backend)
    first = int(torch.argmax(logits))
    host = GraphDecoder(model, be, ads, gen.rope, caches[0], torch.float32)
    want, tok = [], first
    for pos in range(len(prompt), 11):
        tok = int(torch.argmax(host(tok, pos)))
        want.append(tok)
    dev = GraphDecoder(model, be, ads, gen.rope, caches[1], torch.float32, greedy=True)
    assert list(dev.tokens(first, len(prompt), len(want))) == want
    assert int(dev.pos) == 11  # moved on by the steps themselves
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        assert torch.equal(a[:, :, :11], b[:, :, :11])
    with pytest.raises(ValueError, match="greedy=True or device_draw=True"):
        next(host.tokens(first, len(prompt), 1))
    with pytest.raises(ValueError, match="needs a sampler"):
        GraphDecoder(model, be, ads, gen.rope, caches[1], torch.float32, device_draw=True)


@pytest.mark.parametrize("make_backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_adapter", [True, False])
def test_prefetch_hints_change_no_result(make_backend, dtype, with_adapter):
    """A decode.PrefetchPlan (on a GPU: extra programs in each product's launch asking L2 for the next product's
    first weight bytes) decodes the same logits, tokens and cache as none. bf16 without an
    adapter takes the tensor-core GEMV, the others the FMA GEMV. Off the GPU the hints are None (one case checks
    that plumbing)."""
    if not CUDA and (dtype != torch.float32 or not with_adapter):
        pytest.skip("the hints change nothing off the GPU: one case checks the plumbing")
    be, model, ads, gen, prompt, caches, logits = _two_prompted_caches(make_backend, dtype, with_adapter)
    first = int(torch.argmax(logits))
    runs = []
    for cache, plan in zip(caches, (PrefetchPlan(), PrefetchPlan(tail=3000, kind=1)), strict=True):
        dec = GraphDecoder(model, be, ads, gen.rope, cache, dtype, prefetch=plan)
        runs.append([dec(first, len(prompt)).clone()])
        dec = GraphDecoder(model, be, ads, gen.rope, cache, dtype, greedy=True, prefetch=plan)
        runs[-1].append(list(dec.tokens(first, len(prompt), 11 - len(prompt))))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        assert torch.equal(a[:, :, :11], b[:, :, :11])


@pytest.mark.parametrize("make_backend", _backends())
def test_sampled_steps_draw_their_token_on_the_device(make_backend):
    """GraphDecoder(sampler=..., device_draw=True): each step draws its token with the next of the uniforms handed
    to tokens() (generate.pick on the step's survivors): the tokens and cache of a host loop that draws each token
    with generate.draw from the same seeded generator."""
    from lorakit.generate import SamplingParams, draw

    be, model, ads, gen, prompt, caches, _ = _two_prompted_caches(make_backend)
    params = SamplingParams(temp=1.5, top_k=16, top_p=0.95, min_p=0.01, seed=4)
    host = GraphDecoder(model, be, ads, gen.rope, caches[0], torch.float32, sampler=params)
    rng = torch.Generator().manual_seed(7)
    want, tok = [], 3
    for pos in range(len(prompt), 11):
        host(tok, pos)
        tok = draw(host.picks, params, rng)
        want.append(tok)
    assert len(set(want)) > 1  # a flat enough distribution that the draws matter
    dev = GraphDecoder(model, be, ads, gen.rope, caches[1], torch.float32, sampler=params, device_draw=True)
    uniforms = torch.rand(len(want), generator=torch.Generator().manual_seed(7))
    assert list(dev.tokens(3, len(prompt), len(want), uniforms)) == want
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        assert torch.equal(a[:, :, :11], b[:, :, :11])
    with pytest.raises(ValueError, match="uniforms"):
        next(dev.tokens(3, len(prompt), 2))


@pytest.mark.parametrize("temp", [0.0, 0.8])
@pytest.mark.parametrize("n_predict,stop", [(-1, False), (0, False), (1, False), (4, False), (-1, True)])
def test_generate_on_the_device_same_tokens(n_predict, stop, temp):
    """Generator.generate where it replays graphs (forced here on CPU, where GraphDecoder runs its steps eagerly):
    greedy sampling forms each token in the step, sampling runs top-k / top-p / min-p and the seeded draw there
    (GraphDecoder's sampler with device_draw, the generator's uniforms handed over in advance): the same tokens,
    counts and stops as the host loop, up to the context's end."""
    from lorakit.generate import SamplingParams, greedy_only

    params = SamplingParams(temp=temp, seed=1, top_k=8, min_p=0.01)
    assert greedy_only(params) == (temp == 0) and not greedy_only(SamplingParams(temp=0.0, repeat_penalty=1.1))
    be = CpuTorchBackend()
    model = pack_fused(_model())
    prompt = [1, 17, 5, 99, 42]

    def run(device_loop: bool, stop_ids=()) -> tuple[list[int], int]:
        gen = Generator(model, be, [(_adapter(2), 0.5)], n_ctx=12, dtype=torch.float32)
        gen.use_graph = device_loop
        return list(gen.generate(prompt, n_predict, params, stop_ids)), gen.stats.generated

    host = run(False)
    assert len(host[0]) == {-1: 12 - 5 + 1, 0: 0, 1: 1, 4: 4}[n_predict]
    if stop:  # stop at the third token's first occurrence
        stop_ids = (host[0][2],)
        host = run(False, stop_ids)
        assert len(host[0]) == host[1] - 1 <= 2
        assert run(True, stop_ids) == host
    else:
        assert run(True) == host


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_sampling_from_gpu_logits_draws_the_same_tokens():
    """sample_token on logits that live on the GPU (top-k there, the k survivors drawn on the CPU) draws what it
    draws from the same logits on the CPU, penalties included."""
    from lorakit.generate import SamplingParams, sample_token

    g = torch.Generator().manual_seed(3)
    for case in range(20):
        logits = torch.randn(32000, generator=g) * 3
        params = SamplingParams(seed=case, repeat_penalty=1.0 if case % 2 else 1.3)
        history = torch.randint(0, 32000, (80,), generator=g).tolist()
        draws = [sample_token(x, params, history, torch.Generator().manual_seed(case)) for x in (logits, logits.cuda())]
        assert draws[0] == draws[1], case


def _sample_by_slices(logits, p, history, rng) -> int:
    """The sampler chain as slices of the sorted logits (llama.cpp's order: penalty, top-k, top-p, min-p,
    temperature, a seeded draw): what generate.survivors + draw compute with masks and counts."""
    from lorakit.generate import apply_repeat_penalty

    recent = list(history[-p.repeat_last_n :]) if p.repeat_last_n > 0 else []
    logits = apply_repeat_penalty(logits.float(), recent, p.repeat_penalty)
    if p.temp <= 0:
        return int(torch.argmax(logits))
    vals, idx = torch.topk(logits, min(p.top_k, logits.numel())) if p.top_k > 0 else torch.sort(logits, descending=True)
    if p.top_p < 1.0:
        keep = int((torch.cumsum(torch.softmax(vals, dim=-1), dim=-1) < p.top_p).sum()) + 1
        vals, idx = vals[:keep], idx[:keep]
    if p.min_p > 0:
        probs = torch.softmax(vals, dim=-1)
        vals, idx = vals[probs >= p.min_p * probs[0]], idx[probs >= p.min_p * probs[0]]
    # the draw: the inverse CDF of one uniform (the first survivor whose cumulative probability exceeds it)
    c = torch.cumsum(torch.softmax(vals / p.temp, dim=-1), dim=-1)
    u = torch.rand((), generator=rng)
    return int(idx[min(int((c <= u * c[-1]).sum()), vals.numel() - 1)])


def test_sampler_chain_with_masks_draws_as_slices():
    """generate.sample_token (survivors: top-k / top-p / min-p as a count over the sorted logits, no host sync;
    draw: temperature and the seeded draw) picks the token the chain of slices picks, over vocabularies, scales
    and every stage switched on and off."""
    from lorakit.generate import SamplingParams, sample_token

    g = torch.Generator().manual_seed(0)
    for case in range(120):
        V = (50, 1000, 32000)[case % 3]
        logits = torch.randn(V, generator=g) * (0.2 + 5 * float(torch.rand(1, generator=g)))
        p = SamplingParams(
            temp=(0.8, 1.5, 0.3)[case % 3],
            top_k=(40, 0, 5, 100000)[case % 4],
            top_p=(0.95, 1.0, 0.5)[case % 3],
            min_p=(0.05, 0.0, 0.2, 0.0)[case % 4],
            repeat_penalty=(1.0, 1.3)[case % 2],
        )
        history = torch.randint(0, V, (70,), generator=g).tolist()
        want = _sample_by_slices(logits, p, history, torch.Generator().manual_seed(case))
        assert sample_token(logits, p, history, torch.Generator().manual_seed(case)) == want, case


@pytest.mark.parametrize("make_backend", _backends())
def test_step_sampler_survivors_match_its_logits(make_backend):
    """GraphDecoder(sampler=...): the survivors the (captured, on a GPU) step forms are generate.survivors of the
    logits it returns, and draws from them give sample_token's tokens."""
    from lorakit.generate import SamplingParams, draw, sample_token, survivors

    be = make_backend()
    model = pack_fused(_model().to(be.device))
    gen = Generator(model, be, (), n_ctx=12, dtype=torch.float32)
    cache = gen.new_cache()
    prompt = [1, 17, 5, 99, 42]
    gen.logits(prompt, cache, 0)
    params = SamplingParams(temp=0.9, top_k=16, top_p=0.9, min_p=0.02, seed=4)
    step = GraphDecoder(model, be, (), gen.rope, cache, torch.float32, sampler=params)
    tok = 3
    for pos in range(len(prompt), 12):
        logits = step(tok, pos)
        assert torch.equal(step.picks, survivors(logits, params))
        tok = draw(step.picks, params, torch.Generator().manual_seed(pos))
        assert tok == sample_token(logits, params, [], torch.Generator().manual_seed(pos))


def test_min_p_that_no_token_passes_keeps_the_candidates():
    """min_p > 1 lets no token pass (not even the first): the stage then keeps what it got, as llama.cpp's min-p
    sampler does, instead of leaving nothing to draw from."""
    from lorakit.generate import SamplingParams, sample_token

    logits = torch.randn(500, generator=torch.Generator().manual_seed(5))
    for seed in range(10):
        draws = [
            sample_token(logits, SamplingParams(min_p=mp, seed=seed), [], torch.Generator().manual_seed(seed))
            for mp in (2.0, 0.0)
        ]
        assert draws[0] == draws[1]
