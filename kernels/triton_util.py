"""Helpers shared by lorakit's Triton kernels: the interpreter switch, rounding, q8_0 tile dequantization."""

from __future__ import annotations

import triton
import triton.language as tl

QK = 32  # q8_0 block length

# the same switch triton.jit read when it decorated lorakit's kernels (TRITON_INTERPRET at import)
_INTERPRET = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """Whether the kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


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
def _dequant_tile(q, dd, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 [BLOCK_N, BLOCK_K] x fp16 [BLOCK_N, BLOCK_K // 32] -> fp32 [BLOCK_N, BLOCK_K]."""
    KB: tl.constexpr = BLOCK_K // 32
    w = tl.reshape(q.to(tl.float32), (BLOCK_N, KB, 32)) * tl.reshape(dd.to(tl.float32), (BLOCK_N, KB, 1))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))
