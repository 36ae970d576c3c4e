"""lora.py's autograd pieces on the cpu-torch spec: the one-buffer cast of the trainer's LoRA tensors (CastFn)
and LoraLinear's padding of the LoRA rank (zero columns: the same products, the gradients cut back to r)."""

from __future__ import annotations

import pytest
import torch
from lorakit.backends.cpu_torch import CpuTorchBackend

from lorakit.lora import LoraLinear, cast_all
from lorakit.quant import quantize_q8_0


def _leaves(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


SHAPES = [(160, 4), (97, 4), (1, 1), (33, 12), (5,)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_all_matches_per_tensor_casts(dtype):
    """Values, dtypes, shapes and fp32 gradients equal those of one .to(dtype) per tensor; an unused output
    (no gradient reaching it) gives its input a zero gradient, as the per-tensor casts' sum does."""
    got_in, ref_in = _leaves(SHAPES), _leaves(SHAPES)
    got = cast_all(got_in, dtype)
    ref = [t.to(dtype) for t in ref_in]
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == dtype and g.shape == r.shape and torch.equal(g, r)
    w = _leaves(SHAPES, seed=1)
    used = range(len(SHAPES) - 1)  # the last tensor takes no part in the loss
    sum((got[i].float() * w[i].detach()).sum() for i in used).backward()
    sum((ref[i].float() * w[i].detach()).sum() for i in used).backward()
    for i, (g, r) in enumerate(zip(got_in, ref_in, strict=True)):
        assert g.grad.dtype == torch.float32 and g.grad.shape == g.shape
        assert torch.equal(g.grad, r.grad if r.grad is not None else torch.zeros_like(g)), i


def test_cast_all_same_dtype_is_identity():
    ts = _leaves(SHAPES)
    assert all(a is b for a, b in zip(cast_all(ts, torch.float32), ts, strict=True))
    assert cast_all([], torch.bfloat16) == []


class _Padding(CpuTorchBackend):
    lora_rank_multiple = 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,s", [(4, 1.0), (5, 0.5), (8, 2.0), (12, 1.0)])
def test_lora_linear_rank_padding(dtype, r, s):
    """The padded factors' products equal the unpadded ones up to the order of fp32 sums (the extra rank terms
    are exact zeros); the gradients of a and b have rank r. Bound: |y| terms of length r8 summed in fp32 with
    a rounding to dtype at the end: 2 * r8 * 2^-24 * mag + one unit of dtype (tie-breaking of the rounding)."""
    m, n, k = 37, 97, 160
    g = torch.Generator().manual_seed(r)
    w = quantize_q8_0(torch.randn(n, k, generator=g))
    x0 = torch.randn(2, m, k, generator=g).to(dtype)
    a0, b0 = 0.3 * torch.randn(k, r, generator=g), 0.3 * torch.randn(n, r, generator=g)
    gy = torch.randn(2, m, n, generator=g)

    def run(backend):
        x = x0.clone().requires_grad_()
        a, b = a0.to(dtype).requires_grad_(), b0.to(dtype).requires_grad_()
        y = LoraLinear.apply(x, w, a, b, s, backend)
        (y.float() * gy).sum().backward()
        return y.detach(), x.grad, a.grad, b.grad

    ref, got = run(CpuTorchBackend()), run(_Padding())
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[dtype]
    for name, gt, rf in zip(("y", "dx", "da", "db"), got, ref, strict=True):
        assert gt.shape == rf.shape and gt.dtype == rf.dtype, name
        tol = 2 * 16 * 2.0**-24 * rf.double().abs().max() + u * rf.double().abs()
        assert ((gt.double() - rf.double()).abs() <= tol + 1e-30).all(), name
