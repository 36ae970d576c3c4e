"""The cpu-torch backend's fused decode product (backends/cpu_gemv.py) against the specification's sliced product.

Bounds (u = 2^-24, worst case, no fitting): the sliced product is a float32 dot product of length K over the
exactly dequantized weights (error <= K u sum_k |w_k x_k|); the fused loop sums each block of 32 products (31
additions), scales it (1 rounding) and sums the K/32 blocks (K/32 - 1 additions), each product rounded once too:
<= (K/32 + 33) u sum_k |w_k x_k|. So the two differ by at most (K + K/32 + 33) u sum_k |w_k x_k|. With
llama.cpp's arithmetic (--act-q8) the integer block sums and the scales' product are formed identically and only
the order of the K/32 - 1 additions over blocks differs: <= 2 (K/32) u sum_b |term_b|.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lorakit.backends import cpu_gemv
from lorakit.backends.act_q8 import ActQ8Inference
from lorakit.backends.cpu_torch import CpuTorchBackend
from lorakit.quant import dequantize_q8_0, q8_0_act_matmul, quantize_q8_0

try:  # `tests` is a package only when the repository root is on sys.path
    from tests.test_act_q8 import act_terms
except ImportError:  # pragma: no cover
    from test_act_q8 import act_terms

U = 2.0**-24
N, K = 1024, 32 * 131  # >= MIN_VALUES values, an odd number of blocks


@pytest.fixture(scope="module")
def weight():
    g = torch.Generator().manual_seed(0)
    w = quantize_q8_0(torch.randn(N, K, generator=g))
    assert w.qs.numel() >= cpu_gemv.MIN_VALUES and (K // 32) % 2 == 1
    return w


@pytest.mark.parametrize("m", [1, 2, 3])
def test_fused_product_within_the_bound_of_the_sliced_one(weight, m):
    spec = CpuTorchBackend()
    fast = spec.eager_inference()
    assert fast.fused_gemv and not spec.fused_gemv
    x = torch.randn(1, m, K, generator=torch.Generator().manual_seed(m))
    with torch.no_grad():
        got, want = fast.matmul(x, weight), spec.matmul(x, weight)
    assert got.shape == want.shape == (1, m, N) and got.dtype == torch.float32
    if m > cpu_gemv.MAX_ROWS:  # not taken: the sliced product's bits
        assert torch.equal(got, want)
        return
    assert "float" in cpu_gemv._compiled  # the fused loop ran
    wf = dequantize_q8_0(weight.qs, weight.d)
    mag = x[0].abs() @ wf.abs().T
    bound = (K + K // 32 + 33) * U * mag
    assert ((got[0] - want[0]).abs() <= bound).all()
    with torch.enable_grad():  # autograd on: always the specification's product
        assert torch.equal(fast.matmul(x, weight), want)


def test_act_q8_fused_within_the_bound_of_its_spec(weight):
    fast = ActQ8Inference(CpuTorchBackend().eager_inference())
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = fast.matmul(x, weight)
        want = q8_0_act_matmul(x, weight)
    assert "act" in cpu_gemv._compiled
    terms = act_terms(x, weight)
    assert ((got - want).abs() <= 2 * (K // 32) * U * terms.abs().sum(-1)).all()


def test_small_weights_and_the_switch(weight, monkeypatch):
    """Weights under MIN_VALUES values keep the sliced product; LORAKIT_CPU_FUSED=0 turns the loop off."""
    small = quantize_q8_0(torch.randn(64, 256))
    x = torch.randn(1, 256)
    assert not cpu_gemv.applies(x, small) and cpu_gemv.applies(torch.randn(1, K), weight)
    monkeypatch.setenv("LORAKIT_CPU_FUSED", "0")
    assert not CpuTorchBackend().eager_inference().fused_gemv


def test_a_loop_that_cannot_be_built_falls_back_with_one_warning(monkeypatch, caplog):
    """A build failure (here a body dynamo refuses) gives None and one warning; later calls do not try again."""
    monkeypatch.setattr(cpu_gemv, "_unavailable", False)

    def broken(x):
        raise RuntimeError("no compiler")

    with caplog.at_level(logging.WARNING, logger="lorakit.cpu_gemv"):
        assert cpu_gemv._run("broken", broken, torch.zeros(2)) is None
        assert cpu_gemv._run("broken", broken, torch.zeros(2)) is None
    assert len([r for r in caplog.records if "could not be built" in r.getMessage()]) == 1
    assert cpu_gemv._unavailable
