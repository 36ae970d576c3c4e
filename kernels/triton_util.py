"""Helpers shared by lorakit's Triton kernels: the interpreter switch, rounding, q8_0 tile dequantization."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

QK = 32  # q8_0 block length

# the same switch triton.jit read when it decorated lorakit's kernels (TRITON_INTERPRET at import)
_INTERPRET = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """Whether the kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(x: torch.Tensor, what: str, dtype: torch.dtype | None = None, device=None) -> None:
    """A kernel operand: a float activation dtype (or exactly `dtype`), on `device`, on CUDA (or the
    interpreter's CPU), contiguous along its last axis."""
    if dtype is None and x.dtype not in ACT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{what} must be {dtype}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{what} is on {x.device}, expected {device}")
    if not _INTERPRET and x.device.type != "cuda":
        raise ValueError(f"{what} must be a CUDA tensor (or set TRITON_INTERPRET=1 before importing triton)")
    if x.dim() and x.stride(-1) != 1:
        raise ValueError(f"{what} must be contiguous along its last axis")


@triton.jit
def _to(x, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    """x.to(dtype). The interpreter truncates fp32 -> bf16; with EMU_BF16 it rounds to nearest-even first
    (integer ops on the bits, finite values), as the GPU's conversion does."""
    if EMU_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(dtype)
        else:
            return x.to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _q8_magic(q):
    """1.5 * 2^23 + q as fp32, exactly: the integer q added to the bits of 1.5 * 2^23 (a float whose last
    mantissa bits then hold q)."""
    return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True)


@triton.jit
def _q8_f32(q):
    """int8 -> fp32, exactly, without a conversion instruction: _q8_magic(q) - 1.5 * 2^23. Integer and fp32
    adds issue at 4-8x the rate of the int-to-float conversion, which limits the q8_0 kernels' dequantization
    (bench/gemv_lab.py)."""
    return _q8_magic(q) - 12582912.0


@triton.jit
def _q8_times(q, d, FMA: tl.constexpr):
    """q * d in fp32 (q int8, d fp32 holding an fp16 scale, broadcastable): exact either way. FMA folds
    _q8_f32's subtraction into the multiply: fma(1.5 * 2^23 + q, d, -1.5 * 2^23 * d) rounds the exact q * d
    (18 significant bits) once, and -1.5 * 2^23 * d is exact (d's 11 bits times 3), so it equals
    _q8_f32(q) * d with one fp32 instruction per element fewer (the products are instruction-bound). Not
    under the interpreter, whose fma rounds the product before the add."""
    if FMA:
        return tl.fma(_q8_magic(q), d, d * -12582912.0)
    else:
        return _q8_f32(q) * d


@triton.jit
def _dequant_tile(q, dd, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 [BLOCK_N, BLOCK_K] x fp16 [BLOCK_N, BLOCK_K // 32] -> fp32 [BLOCK_N, BLOCK_K]."""
    KB: tl.constexpr = BLOCK_K // 32
    w = tl.reshape(_q8_f32(q), (BLOCK_N, KB, 32)) * tl.reshape(dd.to(tl.float32), (BLOCK_N, KB, 1))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))
