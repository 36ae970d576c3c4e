"""The cuda-triton backend's lean prompt forward (backends/cuda_prompt.py: CudaPrompt) against the generic forward
(model.forward_hidden over lora.model_fns and fused_ops) that Generator.logits runs otherwise: the same kernels in the
same order on the same operands, so the logits and the KV cache's rows must be equal bit for bit (no tolerance).
Without a GPU through Triton's CPU interpreter (small shapes); with one also at a prompt long enough for the batched
products' other paths (dequantize + cuBLAS, the Gluon kernel). And where it does not apply: the generic forward.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from lorakit.backends.cpu_torch import CpuTorchBackend  # noqa: E402
from lorakit.generate import Generator, SamplingParams  # noqa: E402
from lorakit.model import ModelArgs, pack_fused  # noqa: E402
from tests.test_decode import _adapter, _model  # noqa: E402

cuda_triton = pytest.importorskip("lorakit.backends.cuda_triton")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = torch.device("cuda" if CUDA else "cpu")
GQA = ModelArgs(n_vocab=120, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, n_layer=2, norm_eps=1e-5)
# head size 12: padded to 16 for the flash kernel (the output's D columns copied out of the padded heads)
MHA = ModelArgs(n_vocab=120, n_embd=96, n_ff=96, n_head=8, n_head_kv=8, n_layer=2, norm_eps=1e-5)
# a prompt of 300 rows: the batched products' measured paths (GPU only)
WIDE = ModelArgs(n_vocab=256, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4, n_layer=3, norm_eps=1e-5)


def _dtypes():
    # the CUDA flash kernels take bf16 / fp16 only (CudaPrompt.build declines float32 there)
    return [torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.bfloat16]


def _pair(args: ModelArgs, dtype, n_ctx: int, adapters: bool = False, act_q8: bool = False):
    """Two generations of one model (lean and generic prompt); adapters: two scaled ones on every tensor kind but
    attn_v (tests/test_decode.py's: the norms and the token embedding too; q|k|v packed with a member without);
    act_q8: llama.cpp's arithmetic for the products (every product through the generation's functions)."""
    be = cuda_triton.CudaTritonBackend(DEVICE)
    model = pack_fused(_model(args).to(DEVICE))
    ads = [(_adapter(1, args).to(DEVICE), 0.7), (_adapter(2, args).to(DEVICE), 0.4)] if adapters else ()
    lean = Generator(model, be, ads, n_ctx=n_ctx, dtype=dtype, act_q8=act_q8)
    generic = Generator(model, be, ads, n_ctx=n_ctx, dtype=dtype, act_q8=act_q8, lean_prompt=False)
    return lean, generic


def _same_prompt(lean: Generator, generic: Generator, prompt: list[int]) -> None:
    c_lean, c_gen = lean.new_cache(), generic.new_cache()
    got, ref = lean.logits(prompt, c_lean, 0), generic.logits(prompt, c_gen, 0)
    assert torch.equal(got, ref), f"max |diff| {(got - ref).abs().max().item():.3g}"
    for i in range(len(c_gen.k)):
        assert torch.equal(c_lean.k[i], c_gen.k[i]) and torch.equal(c_lean.v[i], c_gen.v[i]), f"layer {i}'s cache"


@pytest.mark.parametrize("adapters", [False, True], ids=["base", "2-adapters"])
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("args", [GQA, MHA], ids=["gqa", "mha"])
def test_lean_prompt_equals_generic_forward(args, dtype, adapters):
    lean, generic = _pair(args, dtype, n_ctx=12, adapters=adapters)
    assert lean.prompt is not None and generic.prompt is None
    for prompt in ([7], [1, 17, 5, 99, 42], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]):
        _same_prompt(lean, generic, prompt)


@pytest.mark.parametrize("adapters", [False, True], ids=["base", "2-adapters"])
def test_lean_prompt_with_act_q8_equals_generic_forward(adapters):
    lean, generic = _pair(GQA, _dtypes()[0], n_ctx=12, adapters=adapters, act_q8=True)
    assert lean.prompt is not None
    _same_prompt(lean, generic, [1, 17, 5, 99, 42, 7])


def test_output_product_takes_one_layout_from_both_forwards():
    """The last row reaches the output product as [1, 1, E] with the same strides from either forward: torch's CPU
    matmul (--act-q8's LoRA terms, x @ a) summed a row of leading stride T*E in another order than one of stride E
    (2.4e-7 apart on an AVX-512/AMX host), so the bit-for-bit test above held only on some CPUs."""
    lean, generic = _pair(GQA, _dtypes()[0], n_ctx=12)
    seen = {}
    for tag, gen in (("lean", lean), ("generic", generic)):
        linear, norm, embed = gen.fns

        def spy(x, name, linear=linear, tag=tag):
            if name == "output.weight":
                seen[tag] = (tuple(x.shape), x.stride())
            return linear(x, name)

        gen.fns = (spy, norm, embed)
        gen.logits([1, 17, 5, 99, 42, 7], gen.new_cache(), 0)
    E = GQA.n_embd
    assert seen["lean"] == seen["generic"] == ((1, 1, E), (E, E, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a GPU (300-row products: the dequantize + cuBLAS and Gluon paths)")
@pytest.mark.parametrize("adapters", [False, True], ids=["base", "2-adapters"])
def test_lean_prompt_equals_generic_forward_long_prompt(adapters):
    lean, generic = _pair(WIDE, torch.bfloat16, n_ctx=320, adapters=adapters)
    assert lean.prompt is not None
    g = torch.Generator().manual_seed(1)
    for n in (65, 300):
        _same_prompt(lean, generic, torch.randint(3, WIDE.n_vocab, (n,), generator=g).tolist())


@pytest.mark.parametrize("adapters", [False, True], ids=["base", "2-adapters"])
def test_generation_after_a_lean_prompt_is_the_generic_one(adapters):
    """Greedy tokens after the prompt (its cache rows read by every decode step) are the generic forward's."""
    dtype = _dtypes()[0]
    lean, generic = _pair(GQA, dtype, n_ctx=16, adapters=adapters)
    assert lean.prompt is not None
    params = SamplingParams(temp=0.0)
    prompt = [1, 17, 5, 99, 42]
    assert list(lean.generate(prompt, 6, params)) == list(generic.generate(prompt, 6, params))


def test_where_the_lean_prompt_does_not_apply():
    be = cuda_triton.CudaTritonBackend(DEVICE)
    dtype = _dtypes()[0]
    packed = pack_fused(_model(GQA).to(DEVICE))
    # products not packed (LlamaModel.to packs them on a GPU: here without): no runner
    plain = dataclasses.replace(packed, fused={})
    assert be.prompt_runner(plain, dtype) is None
    # a later position (a host decode step) or a cache of another layout: the generic forward
    gen = Generator(packed, be, (), n_ctx=12, dtype=dtype)
    cache = gen.new_cache()
    t = torch.tensor([[1, 2]], device=DEVICE)
    assert gen.prompt.cache_rows(t, cache, 0) is not None and gen.prompt.cache_rows(t, cache, 3) is None
    assert gen.prompt.cache_rows(torch.tensor([[1] * 13], device=DEVICE), cache, 0) is None  # longer than the cache
    split = type(cache)([k.clone() for k in cache.k], [v.clone() for v in cache.v])
    assert gen.prompt.cache_rows(t, split, 0) is None
    last_split = type(cache)(cache.k[:-1] + split.k[-1:], cache.v[:-1] + split.v[-1:])  # one layer's only
    assert gen.prompt.cache_rows(t, last_split, 0) is None
    # the CPU backend has none
    assert CpuTorchBackend().prompt_runner(packed.to("cpu"), torch.float32) is None
