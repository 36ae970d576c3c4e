"""llama.cpp's arithmetic for q8_0 products (quant.quantize_act_q8_0, quant.q8_0_act_matmul; `predict --act-q8`):
the activation quantizer against ggml's SIMD quantize_row_q8_0 as tests/llama_ref.py emulates it, and the product
against its definition in float64 within the float32 rounding it allows. The model-level comparison with llama.cpp
is test_llamacpp_reference.py::test_act_q8_reproduces_llamacpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit.backends.act_q8 import ActQ8Inference, requantize_act
from lorakit.backends.cpu_torch import CpuTorchBackend
from lorakit.generate import SamplingParams
from lorakit.quant import dequantize_q8_0, q8_0_act_matmul, quantize_act_q8_0, quantize_q8_0

try:  # `tests` is a package only when the repository root is on sys.path
    from tests import llama_ref
except ImportError:  # pragma: no cover
    import llama_ref


def act_terms(x: torch.Tensor, w) -> torch.Tensor:
    """[m, n, B] float64: q8_0_act_matmul's terms d_w[n, b] * d_x[m, b] * isum[m, n, b], exactly (its definition)."""
    m, n = x.shape[0], w.shape[0]
    qx, dx = quantize_act_q8_0(x)
    isum = (qx.view(m, 1, -1, 32).double() * w.qs.view(1, n, -1, 32).double()).sum(-1)
    return isum * dx.double().view(m, 1, -1) * w.d.double().view(1, n, -1)


def test_quantizer_is_ggml_simd():
    """Bit for bit what ggml's AVX / NEON quantize_row_q8_0 gives (llama_ref.q8_0_roundtrip): scale fp16(amax/127),
    q = round half to even (x * 127 / amax); an all-zero block has q = 0 and d = 0; ties go to even (2.5 -> 2,
    3.5 -> 4, where ggml's scalar reference would give 3 and 4)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 320, generator=g) * torch.logspace(-3, 3, 5).unsqueeze(1)
    x[2, 64:96] = 0
    x[3, :32] = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5] + [0.0] * 27)  # amax 127: x * 127 / amax = x exactly
    qs, d = quantize_act_q8_0(x)
    assert qs.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (5, 10)
    got = (qs.view(5, 10, 32).double() * d.double().unsqueeze(-1)).view(5, 320).numpy()
    assert np.array_equal(got, llama_ref.q8_0_roundtrip(x.numpy()))
    assert qs[3, :5].tolist() == [127, 2, 4, -2, 0] and float(d[3, 0]) == 1.0
    assert not qs[2, 64:96].any() and float(d[2, 2]) == 0.0


@pytest.mark.parametrize("m", [1, 3, 37])
def test_product_is_its_definition(m):
    """y[m, n] = sum_b (d_w d_x) isum in float32 against the same sum in float64: the scales' product and the
    product with isum each round once (<= 2u relative), the sum over B blocks adds (B - 1) u of the terms' absolute
    sum (u = 2^-24), so |y - y64| <= (B + 1) u sum_b |term_b|. The integer block sums themselves are exact."""
    g = torch.Generator().manual_seed(m)
    k, n = 32 * 19, 45  # an odd number of blocks
    x = torch.randn(m, k, generator=g)
    w = quantize_q8_0(torch.randn(n, k, generator=g))
    y = q8_0_act_matmul(x, w)
    assert y.shape == (m, n) and y.dtype == torch.float32
    terms = act_terms(x, w)  # [m, n, B]
    bound = (k // 32 + 1) * 2.0**-24 * terms.abs().sum(-1)
    assert ((y.double() - terms.sum(-1)).abs() <= bound).all()
    # leading dimensions and dtype pass through
    y3 = q8_0_act_matmul(x.view(1, m, k).to(torch.bfloat16), w)
    assert y3.shape == (1, m, n) and y3.dtype == torch.bfloat16


def test_wrapper_products():
    """ActQ8Inference over cpu-torch: q8_0 weights through q8_0_act_matmul (decode rows) or the sliced product of the
    requantized rows (a prompt's), float weights and LoRA terms through the wrapped backend's arithmetic (llama.cpp
    converts activations only for quantized weights)."""
    g = torch.Generator().manual_seed(1)
    base = CpuTorchBackend()
    ops = ActQ8Inference(base)
    x = torch.randn(4, 64, generator=g)
    wq = quantize_q8_0(torch.randn(8, 64, generator=g))
    wf = dequantize_q8_0(wq.qs, wq.d)
    a, b = torch.randn(64, 2, generator=g), torch.randn(8, 2, generator=g)
    assert torch.equal(ops.matmul(x[:2], wq), q8_0_act_matmul(x[:2], wq))
    assert torch.equal(ops.matmul(x, wq), base.matmul(requantize_act(x), wq))
    assert torch.equal(ops.matmul(x, wf), base.matmul(x, wf))
    want = q8_0_act_matmul(x[:2], wq) + 0.5 * ((x[:2] @ a) @ b.T)
    assert torch.equal(ops.lora_linear(x[:2], wq, ops.fuse_loras([(a, b, 0.5)], x.dtype)), want)
    assert not torch.equal(ops.matmul(x, wq), base.matmul(x, wq))  # the activations' rounding is there
    qx, dx = quantize_act_q8_0(x)  # requantize_act: q * d exactly
    assert torch.equal(requantize_act(x).double(), (qx.view(4, 2, 32).double() * dx.double().unsqueeze(-1)).view(4, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_act_q8_on_the_gpu_backend():
    """The same arithmetic on cuda-triton's tensors (eager; the integer block sums are exact there too): the product
    within test_product_is_its_definition's bound of the CPU's, and stories260K's greedy ids with --act-q8 the
    CPU's."""
    from pathlib import Path

    from lorakit.predict import PredictRequest, run_predict

    g = torch.Generator().manual_seed(2)
    k, n = 32 * 19, 45
    x = torch.randn(7, k, generator=g)
    w = quantize_q8_0(torch.randn(n, k, generator=g))
    terms = act_terms(x, w)
    y = q8_0_act_matmul(x.cuda(), w.to(torch.device("cuda"))).cpu()
    assert ((y.double() - terms.sum(-1)).abs() <= (k // 32 + 1) * 2.0**-24 * terms.abs().sum(-1)).all()

    root = Path(__file__).resolve().parent.parent
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("conv", root / "examples" / "convert_llama2c.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "stories260K-q8_0.gguf"
        conv.convert(root / "assets/stories260K.bin", root / "assets/tok512.model", model, "q8_0")
        texts = {}
        for backend in ("cpu-torch", "cuda-triton"):
            req = PredictRequest(model=str(model), prompt="Once upon a time", n_predict=32,
                                 sampling=SamplingParams(temp=0), backend=backend, act_q8=True)  # fmt: skip
            texts[backend] = "".join(p for p in run_predict(req) if isinstance(p, str))
        assert texts["cpu-torch"] == texts["cuda-triton"]


def test_prompt_rows_through_the_sliced_product():
    """More rows than the decode loop takes (a prompt): the cpu-torch backend's sliced float product of the
    requantized activations, the same sum with each product rounded before summing: within (K + 2) u sum |terms| of
    the definition (each product x' w' rounded once, K - 1 additions, the exact block sums and scales otherwise)."""
    g = torch.Generator().manual_seed(9)
    k, n, m = 32 * 19, 45, 9
    x = torch.randn(m, k, generator=g)
    w = quantize_q8_0(torch.randn(n, k, generator=g))
    ops = ActQ8Inference(CpuTorchBackend().eager_inference())
    with torch.no_grad():
        y = ops.matmul(x, w)
    qx, dx = quantize_act_q8_0(x)
    prods = (qx.view(m, 1, -1, 32).double() * w.qs.view(1, n, -1, 32).double()) * (
        dx.double().view(m, 1, -1, 1) * w.d.double().view(1, n, -1, 1)
    )
    want = prods.sum((-1, -2))
    assert ((y.double() - want).abs() <= (k + 2) * 2.0**-24 * prods.abs().sum((-1, -2))).all()


def test_prompt_rows_through_the_batched_matmul_of_other_backends():
    """On cuda-triton (the Triton interpreter in CI) a prompt's rows go through its batched q8_0 matmul of the
    requantized rows (float32 activations, IEEE products): within test_prompt_rows_through_the_sliced_product's bound
    of the definition, and in x's dtype; decode rows stay quant.q8_0_act_matmul."""
    from lorakit.kernels import q8_0_matmul as qmm

    if not (torch.cuda.is_available() or qmm.interpreting()):
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    from lorakit.backends.cuda_triton import CudaTritonBackend

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(11)
    k, n, m = 32 * 5, 24, 5
    x = torch.randn(m, k, generator=g)
    w = quantize_q8_0(torch.randn(n, k, generator=g))
    ops = ActQ8Inference(CudaTritonBackend(dev).eager_inference())
    wd = w.to(dev)
    with torch.no_grad():
        y = ops.matmul(x.to(dev), wd).cpu()
        y16 = ops.matmul(x.to(dev).bfloat16(), wd)
        y2 = ops.matmul(x[:2].to(dev), wd).cpu()
    qx, dx = quantize_act_q8_0(x)
    prods = (qx.view(m, 1, -1, 32).double() * w.qs.view(1, n, -1, 32).double()) * (
        dx.double().view(m, 1, -1, 1) * w.d.double().view(1, n, -1, 1)
    )
    want = prods.sum((-1, -2))
    assert ((y.double() - want).abs() <= (k + 2) * 2.0**-24 * prods.abs().sum((-1, -2))).all()
    assert y16.dtype == torch.bfloat16 and y16.shape == (m, n)
    assert torch.equal(y2, q8_0_act_matmul(x[:2].to(dev), wd).cpu())
