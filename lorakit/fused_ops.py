"""The block's non-product ops (RMSNorm with its gain, the residual sum with the norm that reads it, RoPE,
SiLU * up, causal attention on the packed q|k|v product) as one backend op (or torch's flash kernel) forward
and one backward each, in place of the chains of small torch kernels (and their autograd nodes) of model.py's
functions. The results are model.py's (the backends' numerics: backends/cpu_torch.py is the spec).

`FusedOps` bundles the functions that model.block / forward_hidden call:
    rms_norm(x, w, eps)  = rms_norm(x, eps) * w.to(x.dtype)       (x [..., E], w [E])
    add_rms_norm(h, d, w, eps) = (s, rms_norm(s, w, eps)), s = h + d     (a residual sum and its norm)
    rope(x, cos, sin)    = apply_rope(x, cos, sin)                 (x [B, T, H, D], cos/sin [T, D/2])
    silu_mul(g, u)       = F.silu(g) * u                           (g, u [..., F])
    swiglu(gate_up)      = silu_mul(*gate_up)       (on the packed product where there is one: SwigluPackedFn)
    causal_attention(qkv, cos, sin, H, Hkv[, kv_out]) = model.causal_attention   (packed: CausalAttentionFn,
                           flash; a prompt's k, v written into the KV cache: flash_prompt)
`fused_ops(backend)` builds them over the autograd Functions below; `TORCH_OPS` (= model.SPEC_OPS) is
model.py's own functions (plain torch under autograd), the path the CPU keeps using; `ops_for(backend)`
picks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import flash, model
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


class AddRMSNormFn(torch.autograd.Function):
    """(s, y) = (h + d, RMSNormFn(s)): model.block's residual sum and the norm that reads it, one pass each way.

    backward: s feeds the norm and (as the residual stream) later ops, so its gradient is ds + dx_norm, which
    autograd would add in s's dtype after rounding dx_norm: the norm's backward adds ds in the same pass
    (rms_norm_bwd's dres). h and d both get that gradient.
    """

    @staticmethod
    def forward(ctx, h, d, w, eps, backend):
        s, y, rstd = backend.add_rms_norm_fwd(h, d, w, eps)
        ctx.save_for_backward(s, w, rstd)
        ctx.backend = backend
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, w, rstd = ctx.saved_tensors
        dres = None if ds is None else ds.contiguous()
        dx, dw = ctx.backend.rms_norm_bwd(dy.contiguous(), s, w, rstd, dres)
        dw = dw.to(w.dtype) if ctx.needs_input_grad[2] else None
        return dx, dx, dw, None, None


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


class SwigluPackedFn(torch.autograd.Function):
    """SiluMulFn on the packed product gu = [gate | up] (model.Packed.whole): the backward writes dg and du
    into the two column halves of one gradient for gu (no concatenation of the members' gradients)."""

    @staticmethod
    def forward(ctx, gu, backend):
        ctx.save_for_backward(gu)
        ctx.backend = backend
        return backend.silu_mul_fwd(*gu.chunk(2, dim=-1))

    @staticmethod
    def backward(ctx, dy):
        (gu,) = ctx.saved_tensors
        dgu = torch.empty_like(gu, memory_format=torch.contiguous_format)
        ctx.backend.silu_mul_bwd(dy.contiguous(), *gu.chunk(2, dim=-1), out=dgu.chunk(2, dim=-1))
        return dgu, None


def qkv_heads(padded: torch.Tensor, H: int, Hkv: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, heads, T, Dp] as views of the padded [B, T, H + 2 Hkv, Dp] buffer."""
    return tuple(t.transpose(1, 2) for t in padded.split([H, Hkv, Hkv], dim=2))


def _flash_causal(qkv: torch.Tensor, cos, sin, n_head: int, n_head_kv: int, backend, kv_last=None):
    """model.causal_attention's forward on the packed product [q | k | v] [B, T, (H + 2 Hkv) D]: (out
    [B, T, H*D], padded [B, T, H + 2 Hkv, Dp], out_p, lse, state, scale). One rope_heads launch writes RoPE(q),
    RoPE(k) and v into one zero-tailed buffer (and into kv_last [B, T, 2 Hkv, D], a KV cache's rows, where
    given); flash forward (GQA natively: query head h reads key/value head h // (H / Hkv), as repeat_interleave
    does); one launch copies the output's D columns to [B, T, H*D]."""
    B, T, W = qkv.shape
    H, Hkv = n_head, n_head_kv
    D = W // (H + 2 * Hkv)
    padded = qkv.new_empty(B, T, H + 2 * Hkv, flash.padded_head(D))
    backend.rope_heads(qkv.view(B, T, H + 2 * Hkv, D), cos, sin, H + Hkv, padded, last=kv_last)
    scale = 1.0 / math.sqrt(D)
    out_p, lse, state = flash.forward(*qkv_heads(padded, H, Hkv), scale)
    out = qkv.new_empty(B, T, H * D)
    backend.rope_heads(out_p.transpose(1, 2)[..., :D], cos, sin, 0, out.view(B, T, H, D))
    return out, padded, out_p, lse, state, scale


def joint_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """k and v [B, Hkv, n, D] as one [B, 2 Hkv, n, D] view where v's heads follow k's in memory with the same
    strides (model.KVCache's layout), else None."""
    if k.dtype != v.dtype or k.device != v.device or k.shape != v.shape or k.stride() != v.stride():
        return None
    if v.data_ptr() != k.data_ptr() + k.shape[1] * k.stride(1) * k.element_size():
        return None
    B, Hkv, n, D = k.shape
    return k.as_strided((B, 2 * Hkv, n, D), k.stride())


def flash_prompt(qkv: torch.Tensor, cos, sin, n_head: int, n_head_kv: int, backend, kv_out) -> torch.Tensor:
    """_flash_causal for a prompt at position 0 (no autograd): also writes RoPE(k) and v into the cache's rows
    0..T-1 (kv_out = (k, v) [B, Hkv, n_ctx, D]): by the launch that forms them where the cache keeps each layer's
    v heads right after its k heads (model.KVCache), else by one copy launch each from the padded buffer."""
    T = qkv.shape[1]
    joint = joint_kv(*kv_out)
    if joint is not None:
        return _flash_causal(qkv, cos, sin, n_head, n_head_kv, backend, joint[:, :, :T].transpose(1, 2))[0]
    out, padded, *_ = _flash_causal(qkv, cos, sin, n_head, n_head_kv, backend)
    D = kv_out[0].shape[-1]
    for j0, cache in ((n_head, kv_out[0]), (n_head + n_head_kv, kv_out[1])):
        backend.rope_heads(padded[:, :, j0 : j0 + n_head_kv, :D], cos, sin, 0, cache[:, :, :T].transpose(1, 2))
    return out


class CausalAttentionFn(torch.autograd.Function):
    """model.causal_attention on the packed product qkv = [q | k | v] [B, T, (H + 2 Hkv) D]: out [B, T, H*D].
    The heads go to torch's flash kernel padded with zero columns to Dp = 8 * ceil(D/8) (lorakit/flash.py: the
    kernel SDPA itself runs on padded heads, so the numbers are SDPA's).

    forward:  _flash_causal (rope_heads into one zero-tailed [B, T, H + 2 Hkv, Dp] buffer, flash, unpad).
    backward: one launch pads dout; flash backward (dk, dv summed over each key/value head's query heads);
              three launches write the inverse RoPE of dq, dk and dv (as is) into the one gradient of qkv.
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head, n_head_kv, backend):
        out, padded, out_p, lse, state, scale = _flash_causal(qkv, cos, sin, n_head, n_head_kv, backend)
        ctx.save_for_backward(padded, out_p, lse, cos, sin, *state.tensors)
        ctx.max_qk, ctx.scale, ctx.heads, ctx.backend = (state.max_q, state.max_k), scale, (n_head, n_head_kv), backend
        return out

    @staticmethod
    def backward(ctx, dout):
        padded, out_p, lse, cos, sin, *state_tensors = ctx.saved_tensors
        state = flash.FlashState(tuple(state_tensors), *ctx.max_qk)
        be, (H, Hkv) = ctx.backend, ctx.heads
        B, T, N, Dp = padded.shape
        D = dout.shape[-1] // H
        dout_p = dout.new_empty(B, T, H, Dp)
        be.rope_heads(dout.contiguous().view(B, T, H, D), cos, sin, 0, dout_p)
        grads = flash.backward(dout_p.transpose(1, 2), *qkv_heads(padded, H, Hkv), out_p, lse, state, ctx.scale)
        dqkv = dout.new_empty(B, T, N, D)
        for g, j0, n_rot in zip(grads, (0, H, H + Hkv), (H, Hkv, 0), strict=True):  # dq, dk by -theta; dv as is
            dst = dqkv[:, :, j0 : j0 + g.shape[1]]
            be.rope_heads(g.transpose(1, 2)[..., :D], cos, sin, n_rot, dst, inverse=True)
        return dqkv.view(B, T, N * D), None, None, None, None, None


@dataclass(frozen=True)
class FusedOps:
    """The elementwise ops of model.block / forward_hidden (see the module docstring)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    swiglu: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    causal_attention: Callable[..., torch.Tensor]


def fused_ops(backend) -> FusedOps:
    """The ops as the backend's fused forward/backward (autograd Functions)."""

    # without autograd (a prefill) the backend's forward directly: a Function's apply costs host time even
    # then, and an eager prefill is host-bound (bench/host_lab.py)
    def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return backend.rms_norm_fwd(x, w, eps)[0]
        return RMSNormFn.apply(x, w, eps, backend)

    def add_rms_norm(
        h: torch.Tensor, d: torch.Tensor, w: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_grad_enabled():
            return backend.add_rms_norm_fwd(h, d, w, eps)[:2]
        return AddRMSNormFn.apply(h, d, w, eps, backend)

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return backend.rope_fwd(x, cos, sin)
        return RopeFn.apply(x, cos, sin, backend)

    def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return backend.silu_mul_fwd(g, u)
        return SiluMulFn.apply(g, u, backend)

    def swiglu(gate_up: Sequence[torch.Tensor]) -> torch.Tensor:
        whole = getattr(gate_up, "whole", None)
        if whole is None:
            return silu_mul(*gate_up)
        if not torch.is_grad_enabled():
            return backend.silu_mul_fwd(*whole.chunk(2, dim=-1))
        return SwigluPackedFn.apply(whole, backend)

    def causal_attention(
        qkv: Sequence[torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        n_head: int,
        n_head_kv: int,
        kv_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        whole = getattr(qkv, "whole", None)
        fused = whole is not None and flash.supported(
            whole.dtype, whole.device, whole.shape[-1] // (n_head + 2 * n_head_kv), gqa=n_head != n_head_kv
        )
        if kv_out is not None and fused and not (torch.is_grad_enabled() and whole.requires_grad):
            return flash_prompt(whole, cos, sin, n_head, n_head_kv, backend, kv_out)
        if kv_out is not None or not fused:
            return model.causal_attention(qkv, cos, sin, n_head, n_head_kv, ops, kv_out)
        return CausalAttentionFn.apply(whole, cos, sin, n_head, n_head_kv, backend)

    ops = FusedOps(rms_norm, add_rms_norm, rope, silu_mul, swiglu, causal_attention)
    return ops


# model.py's functions under plain torch autograd: the spec, and what the CPU runs
TORCH_OPS = SPEC_OPS


def ops_for(backend):
    """The elementwise ops a backend's forward uses: fused kernels on cuda-triton; the spec elsewhere (on
    CPU the torch ops are as fast, and llama.cpp's fixture runs are reproduced through them)."""
    return fused_ops(backend) if backend.name == "cuda-triton" else SPEC_OPS
