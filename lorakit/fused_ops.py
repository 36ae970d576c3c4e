"""The training step's elementwise ops (RMSNorm with its gain, RoPE, SiLU * up) as one backend op forward and
one backward each, in place of the chains of small torch kernels (and their autograd nodes) of model.py's
functions. The results are model.py's (the backends' numerics: backends/cpu_torch.py is the spec).

`FusedOps` bundles the three functions that model.block / forward_hidden call:
    rms_norm(x, w, eps)  = rms_norm(x, eps) * w.to(x.dtype)       (x [..., E], w [E])
    rope(x, cos, sin)    = apply_rope(x, cos, sin)                 (x [B, T, H, D], cos/sin [T, D/2])
    silu_mul(g, u)       = F.silu(g) * u                           (g, u [..., F])
`fused_ops(backend)` builds them over the autograd Functions below; `TORCH_OPS` (= model.SPEC_OPS) is
model.py's own functions (plain torch under autograd), the path the CPU keeps using; `ops_for(backend)`
picks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .model import SPEC_OPS


class RMSNormFn(torch.autograd.Function):
    """y = rnd(rnd(n) * rnd(w)), n = xf * rstd, rstd = 1 / sqrt(mean(xf^2) + eps) per row, xf = fp32(x),
    rnd = rounding to x's dtype (model.block's `rms_norm(h, eps) * w.to(h.dtype)`).

    backward (the rounding of n as identity, as autograd treats it), with g = dy * rnd(w) in fp32:
        dx = rstd * (g - n * mean(g * n))                      rounded once to x's dtype
        dw = sum over rows of dy * rnd(n)                      fp32, returned in w's dtype
    (d rstd / dx = -rstd^3 x / E gives the mean term: dx = rstd g - rstd^3 x mean(g x).)
    w may require grad: in training the gain includes the norm's LoRA term.
    """

    @staticmethod
    def forward(ctx, x, w, eps, backend):
        y, rstd = backend.rms_norm_fwd(x, w, eps)
        ctx.save_for_backward(x, w, rstd)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        dx, dw = ctx.backend.rms_norm_bwd(dy.contiguous(), x, w, rstd)
        dx = dx if ctx.needs_input_grad[0] else None
        dw = dw.to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


class RopeFn(torch.autograd.Function):
    """model.apply_rope: x [B, T, H, D], pairs (x0, x1) = (x[2i], x[2i+1]) at position t turn by theta[t, i]:
        y = (x0*c - x1*s, x0*s + x1*c)        c, s = cos[t, i], sin[t, i]; fp32 math, rounded once to x's dtype
    backward: the rotation is orthogonal, so dx = R(-theta) dy = (dy0*c + dy1*s, -dy0*s + dy1*c) (rounded once):
    the same op with inverse=True. cos/sin get no gradient.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, backend):
        ctx.save_for_backward(cos, sin)
        ctx.backend = backend
        return backend.rope_fwd(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()  # (any strides on the other axes: attention's transpose)
        return ctx.backend.rope_fwd(dy, cos, sin, inverse=True), None, None, None


class SiluMulFn(torch.autograd.Function):
    """model.feed_forward's y = rnd(rnd(silu(g)) * u), silu(g) = g * sig(g), sig(g) = 1 / (1 + exp(-g)).

    backward, fp32 math, each result rounded once to g's dtype:
        du = dy * rnd(silu(g))
        dg = dy * u * sig * (1 + g * (1 - sig))            (d silu / dg = sig + g * sig * (1 - sig))
    """

    @staticmethod
    def forward(ctx, g, u, backend):
        ctx.save_for_backward(g, u)
        ctx.backend = backend
        return backend.silu_mul_fwd(g, u)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = ctx.backend.silu_mul_bwd(dy.contiguous(), g, u)
        return dg, du, None


@dataclass(frozen=True)
class FusedOps:
    """The elementwise ops of model.block / forward_hidden (see the module docstring)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fused_ops(backend) -> FusedOps:
    """The ops as the backend's fused forward/backward (autograd Functions)."""

    def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return RMSNormFn.apply(x, w, eps, backend)

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return RopeFn.apply(x, cos, sin, backend)

    def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return SiluMulFn.apply(g, u, backend)

    return FusedOps(rms_norm, rope, silu_mul)


# model.py's functions under plain torch autograd: the spec, and what the CPU runs
TORCH_OPS = SPEC_OPS


def ops_for(backend):
    """The elementwise ops a backend's forward uses: fused kernels on cuda-triton; the spec elsewhere (on
    CPU the torch ops are as fast, and llama.cpp's fixture runs are reproduced through them)."""
    return fused_ops(backend) if backend.name == "cuda-triton" else SPEC_OPS
