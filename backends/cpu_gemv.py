"""The decode product on CPU: y = x @ W.T for one or two rows of x and a q8_0 W, as one fused loop.

The specification (cpu_torch.CpuTorchBackend.matmul) dequantizes W slice by slice into a float buffer and
multiplies; for a row of x that buffer traffic is most of the time. Here torch.compile (inductor's C++ backend)
builds one loop from the obvious expression: int8 -> float32, times x, summed per block of 32, times the block's
scale, summed over the blocks (llama.cpp's order of operations); no dequantized value is ever stored. Same
arithmetic as the specification up to the order of the float32 sums (tests/test_cpu_gemv.py derives the bound).

Built once per process for every shape (dynamic shapes; inductor keeps the build in its on-disk cache, so only a
machine's first run pays the ~10 s); where it cannot be built (no C++ compiler), the sliced product is used and
one warning says so. Used by the cpu-torch backend's inference ops (CpuTorchBackend.eager_inference) for weights
of >= MIN_VALUES values; LORAKIT_CPU_FUSED=0 turns it off.
"""

from __future__ import annotations

import logging
import os

import torch

from lorakit.quant import QK8_0, Q8Weight, quantize_act_q8_0

log = logging.getLogger("lorakit.cpu_gemv")

MAX_ROWS = 2  # rows of x up to which the loop beats the sliced GEMM (3B shapes, 2 threads: 1-2 rows 1.5-3.4x, 4 even)
MIN_VALUES = 1 << 22  # smaller weights: the sliced product is as fast, and small models need no compiler

_compiled: dict[str, object] = {}
_unavailable = False


def enabled_by_env() -> bool:
    return os.environ.get("LORAKIT_CPU_FUSED", "1") != "0"


def _block_sums(x: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """[m, n, K / 32]: sum_k qs[n, b, k] * x[m, b, k] in float32 per block b (exact for integer x)."""
    m, k = x.shape
    n = qs.shape[0]
    xb = x.to(torch.float32).view(m, 1, k // QK8_0, QK8_0)
    return (qs.view(1, n, k // QK8_0, QK8_0).to(torch.float32) * xb).sum(-1)


def _fused(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The float product: sum_b d[n, b] * sum_k qs[n, b, k] * x[m, b, k]."""
    return (_block_sums(x, qs) * d.to(torch.float32)).sum(-1)


def _fused_act(xq: torch.Tensor, dx: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """quant.q8_0_act_matmul's arithmetic: sum_b (d[n, b] * dx[m, b]) * isum (the integer sums exact in float32)."""
    scale = d.to(torch.float32).unsqueeze(0) * dx.to(torch.float32).unsqueeze(1)
    return (_block_sums(xq, qs) * scale).sum(-1)


def applies(x2: torch.Tensor, w) -> bool:
    """Whether q8_gemv takes this product: a q8_0 W of >= MIN_VALUES values on the CPU, <= MAX_ROWS rows of x."""
    return (
        not _unavailable
        and isinstance(w, Q8Weight)
        and x2.device.type == "cpu"
        and x2.shape[0] <= MAX_ROWS
        and w.qs.numel() >= MIN_VALUES
    )


def _run(kind: str, fn, *args) -> torch.Tensor | None:
    """fn compiled once (dynamic shapes) and run; None, and a warning once, where it cannot be built."""
    global _unavailable
    if _unavailable:
        return None
    compiled = _compiled.get(kind) or torch.compile(fn, dynamic=True, fullgraph=True)
    try:
        y = compiled(*args)
    except Exception as e:  # a build failure (no C++ compiler, ...): the sliced product from now on
        _unavailable = True
        log.warning("the fused CPU decode product could not be built (%s); using the sliced product",
                    str(e).splitlines()[0][:200] if str(e) else type(e).__name__)  # fmt: skip
        return None
    _compiled[kind] = compiled
    return y


def product(x: torch.Tensor, w, act_q8: bool = False) -> torch.Tensor | None:
    """x [..., in] @ W.T in x's dtype through the compiled loop (act_q8: quant.q8_0_act_matmul's arithmetic) where it
    applies (applies()) and can be built, under no autograd; None where the caller's own product is to be used."""
    if torch.is_grad_enabled():
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if not applies(x2, w):
        return None
    y = q8_gemv_act(x2, w) if act_q8 else q8_gemv(x2, w)
    return None if y is None else y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def q8_gemv(x2: torch.Tensor, w: Q8Weight) -> torch.Tensor | None:
    """x2 [m, in] @ W.T -> [m, out] float32 through the compiled loop; None where it cannot be built."""
    return _run("float", _fused, x2, w.qs, w.d)


def q8_gemv_act(x2: torch.Tensor, w: Q8Weight) -> torch.Tensor | None:
    """quant.q8_0_act_matmul(x2, w) in float32 through the compiled loop (x2's rows quantized as it does); None
    where it cannot be built."""
    xq, dx = quantize_act_q8_0(x2)
    return _run("act", _fused_act, xq, dx, w.qs, w.d)
