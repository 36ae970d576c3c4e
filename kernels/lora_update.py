"""Fused AdamW over all LoRA tensors with llama.cpp's semantics (ggml_opt_adam, spec §4.2).

Three launches per step over one flat fp32 vector of all parameters (params, grads, m, v alike):
  1. _sumsq_kernel:    per-block partial sums of g*g (fp32 products summed in fp32 within a block of
                       BLOCK elements);
  2. _finalize_kernel: one program: the partials summed in fp64, norm = sqrt (fp64), clip factor
                       float(gclip / norm) when gclip > 0 and norm > gclip, else 1;
  3. _adamw_kernel:    one pass that reads g, m, v, x once and writes m, v, x once, op for op as the spec:
                       g' = g*factor; m = m*b1 + g'*(1-b1); v = v*b2 + g'*g'*(1-b2);
                       x = x*(1-dec) - (m*h1) / (sqrt(v*h2) + eps), dec = decay*alpha*sched on decayed
                       elements (a per-element flag built from the per-tensor `decayed` list), 0 elsewhere.

Difference from ggml's norm: ggml adds each float product g*g to a double in sequence; here the
products are summed in fp32 within blocks of BLOCK (a tree reduction, relative error about
log2(BLOCK) * 2^-24 per partial) and the partials in fp64. The norm therefore differs from ggml's in
the last few fp32 ulps at most, and the clip factor float(gclip/norm) by at most an ulp or two; the
element-wise update is otherwise the spec's arithmetic. On the GPU every multiply/add/sqrt/divide of
the update is an explicitly rounded PTX instruction (mul.rn, add.rn, sqrt.rn, div.rn), so the compiler
cannot contract them into FMAs and the update is bit-for-bit the fp32 sequence of the spec (given the
same factor); the CPU interpreter computes the same sequence with numpy's IEEE fp32 operations.

If the tensors passed are contiguous, adjacent views of one buffer (in order), the kernels run on
that buffer in place; otherwise they are concatenated, updated, and scattered back.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .triton_util import cdiv

# the same switch triton.jit read when it decorated the kernels below (TRITON_INTERPRET at import)
_INTERPRET = bool(triton.knobs.runtime.interpret)

BLOCK = 4096  # elements per program (all three kernels)
# hyper-parameter slots in the small fp64 buffer the kernels read
_HP_KEYS = ("gclip", "beta1", "omb1", "beta2", "omb2", "h1", "h2", "eps", "keep_dec")
_N_HP = 16


@triton.jit
def _mul(a, b, EXACT: tl.constexpr):
    if EXACT:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a * b


@triton.jit
def _add(a, b, EXACT: tl.constexpr):
    if EXACT:
        return tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a + b


@triton.jit
def _sub(a, b, EXACT: tl.constexpr):
    if EXACT:
        return tl.inline_asm_elementwise(
            "sub.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a - b


@triton.jit
def _sumsq_kernel(g_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr + offs, mask=offs < n, other=0.0)
    tl.store(part_ptr + pid, tl.sum(g * g, axis=0))


@triton.jit
def _finalize_kernel(part_ptr, n_parts, hp_ptr, factor_ptr, norm_ptr, BLOCK_P: tl.constexpr):
    acc = tl.zeros((BLOCK_P,), dtype=tl.float64)
    for p0 in range(0, n_parts, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + offs, mask=offs < n_parts, other=0.0).to(tl.float64)
    norm = tl.sqrt(tl.sum(acc, axis=0))
    gclip = tl.load(hp_ptr + 0)  # fp64, as the spec's Python float
    clip = (gclip > 0.0) & (norm > gclip)
    factor = tl.where(clip, (gclip / tl.where(clip, norm, 1.0)).to(tl.float32), 1.0)
    tl.store(factor_ptr, factor)
    tl.store(norm_ptr, norm)


@triton.jit
def _adamw_kernel(
    x_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    flag_ptr,
    hp_ptr,
    factor_ptr,
    n,
    DECAY: tl.constexpr,  # 0: no element decayed, 1: all, 2: per-element flags
    EXACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # fp64 slots holding fp32-representable values: the conversions are exact
    beta1 = tl.load(hp_ptr + 1).to(tl.float32)
    omb1 = tl.load(hp_ptr + 2).to(tl.float32)
    beta2 = tl.load(hp_ptr + 3).to(tl.float32)
    omb2 = tl.load(hp_ptr + 4).to(tl.float32)
    h1 = tl.load(hp_ptr + 5).to(tl.float32)
    h2 = tl.load(hp_ptr + 6).to(tl.float32)
    eps = tl.load(hp_ptr + 7).to(tl.float32)
    keep_dec = tl.load(hp_ptr + 8).to(tl.float32)
    factor = tl.load(factor_ptr)

    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)

    g = _mul(g, factor, EXACT)  # exact when factor == 1
    m = _add(_mul(m, beta1, EXACT), _mul(g, omb1, EXACT), EXACT)
    v = _add(_mul(v, beta2, EXACT), _mul(_mul(g, g, EXACT), omb2, EXACT), EXACT)
    num = _mul(m, h1, EXACT)
    den = _add(tl.sqrt_rn(_mul(v, h2, EXACT)), eps, EXACT)
    step = tl.math.div_rn(num, den)
    if DECAY == 1:
        x = _mul(x, keep_dec, EXACT)
    elif DECAY == 2:
        flag = tl.load(flag_ptr + offs, mask=mask, other=0)
        x = _mul(x, tl.where(flag != 0, keep_dec, 1.0), EXACT)  # x * 1 is exact
    x = _sub(x, step, EXACT)

    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(x_ptr + offs, x, mask=mask)


# --------------------------------------------------------------------------------------------------


def adam_constants(hp) -> dict[str, float]:
    """The per-iteration fp32 constants, formed exactly as the spec forms them (CpuTorchBackend)."""
    f32 = torch.float32
    beta1 = torch.tensor(hp.beta1, dtype=f32)
    beta2 = torch.tensor(hp.beta2, dtype=f32)
    one = torch.tensor(1.0, dtype=f32)
    tt = torch.tensor(float(hp.t), dtype=f32)
    h1 = torch.tensor(hp.alpha, dtype=f32) * torch.tensor(hp.sched, dtype=f32)
    h1 = h1 / (1.0 - torch.pow(beta1, tt))
    h2 = 1.0 / (1.0 - torch.pow(beta2, tt))
    dec = torch.tensor(hp.decay, dtype=f32) * torch.tensor(hp.alpha, dtype=f32)  # (decay * alpha) first
    dec = dec * torch.tensor(hp.sched, dtype=f32)
    return {
        "gclip": float(hp.gclip) if hp.gclip > 0 else 0.0,  # compared and divided in double
        "beta1": float(beta1),
        "omb1": float(one - beta1),
        "beta2": float(beta2),
        "omb2": float(one - beta2),
        "h1": float(h1),
        "h2": float(h2),
        "eps": float(torch.tensor(hp.eps, dtype=f32)),
        "keep_dec": float(one - dec),
    }


def _flat_view(ts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D view covering all of ts if they are contiguous fp32 views laid end to end in one storage."""
    ts = [t for t in ts if t.numel() > 0]
    if not ts:
        return None
    first = ts[0]
    ptr = first.untyped_storage().data_ptr()
    off = first.storage_offset()
    for t in ts:
        if (
            t.dtype != torch.float32
            or not t.is_contiguous()
            or t.device != first.device
            or t.untyped_storage().data_ptr() != ptr
            or t.storage_offset() != off
        ):
            return None
        off += t.numel()
    return torch.as_strided(first.detach(), (off - first.storage_offset(),), (1,), first.storage_offset())


@functools.lru_cache(maxsize=16)
def _decay_flags(numels: tuple[int, ...], decayed: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    flags = torch.tensor([1 if dk else 0 for dk in decayed], dtype=torch.uint8)
    return torch.repeat_interleave(flags, torch.tensor(numels, dtype=torch.int64)).to(device)


def adamw_flat(
    x: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    hp,
    decay: bool | torch.Tensor = True,
) -> torch.Tensor:
    """In-place AdamW on flat fp32 vectors; decay: one flag for all, or a uint8/bool per-element mask.

    Returns the gradient norm as a 0-d fp64 device tensor (no host sync)."""
    n = x.numel()
    for name, t in (("g", g), ("m", m), ("v", v)):
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, params {tuple(x.shape)}")
    for name, t in (("params", x), ("g", g), ("m", m), ("v", v)):
        if t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{name} must be a contiguous 1-D float32 tensor on {x.device}")
    if not _INTERPRET and x.device.type != "cuda":
        raise ValueError("adamw_flat needs CUDA tensors (or TRITON_INTERPRET=1)")
    c = adam_constants(hp)
    hpv = torch.zeros(_N_HP, dtype=torch.float64)
    for i, key in enumerate(_HP_KEYS):
        hpv[i] = c[key]
    hpv = hpv.to(x.device)

    if isinstance(decay, torch.Tensor):
        if decay.shape != x.shape:
            raise ValueError(f"decay mask has shape {tuple(decay.shape)}, params {tuple(x.shape)}")
        flags, mode = decay.to(device=x.device, dtype=torch.uint8).contiguous(), 2
    else:
        flags, mode = x, (1 if decay else 0)  # flags unused

    n_blocks = max(1, cdiv(n, BLOCK))
    parts = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    factor = torch.empty(1, dtype=torch.float32, device=x.device)
    norm = torch.empty((), dtype=torch.float64, device=x.device)
    _sumsq_kernel[(n_blocks,)](g, parts, n, BLOCK=BLOCK)
    _finalize_kernel[(1,)](parts, n_blocks, hpv, factor, norm, BLOCK_P=1024)
    if n:
        _adamw_kernel[(n_blocks,)](
            x, g, m, v, flags, hpv, factor, n, DECAY=mode, EXACT=not _INTERPRET, BLOCK=BLOCK, num_warps=8
        )
    return norm


def adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    m: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    decayed: Sequence[bool],
    hp,
) -> float:
    """The Backend.adamw_step contract: in-place over the lists, returns the global grad norm."""
    if not (len(params) == len(grads) == len(m) == len(v) == len(decayed)):
        raise ValueError("params, grads, m, v and decayed must have the same length")
    if not params:
        return 0.0
    for i, (p, g, mi, vi) in enumerate(zip(params, grads, m, v, strict=True)):
        if not (p.shape == g.shape == mi.shape == vi.shape):
            raise ValueError(f"tensor {i}: shapes differ: {p.shape}, {g.shape}, {mi.shape}, {vi.shape}")
    numels = tuple(int(p.numel()) for p in params)
    device = params[0].device
    views = [_flat_view(ts) for ts in (params, grads, m, v)]
    flat = [
        fv if fv is not None else torch.cat([t.detach().reshape(-1).to(torch.float32) for t in ts])
        for fv, ts in zip(views, (params, grads, m, v), strict=True)
    ]
    if all(decayed):
        decay: bool | torch.Tensor = True
    elif not any(decayed):
        decay = False
    else:
        decay = _decay_flags(numels, tuple(bool(dk) for dk in decayed), device)
    norm = adamw_flat(*flat, hp, decay=decay)
    # scatter back where the lists were not one buffer (grads are only read)
    for fv, ts, buf in ((views[0], params, flat[0]), (views[2], m, flat[2]), (views[3], v, flat[3])):
        if fv is None:
            for t, part in zip(ts, torch.split(buf, numels), strict=True):
                t.detach().copy_(part.view(t.shape))
    return float(norm)
