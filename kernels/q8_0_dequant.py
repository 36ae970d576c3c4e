"""q8_0 rows dequantized on the device: the whole weight (for the large-M dequantize-then-cuBLAS path,
merges and tests) or W[index] (an embedding lookup). fp32 product qs * d, rounded once to the dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_util import _INTERPRET, QK, _pdl_start, _q8_f32, _to, cdiv, launch, next_pow2, overlap_pdl


@triton.jit
def _q8_rows_kernel(
    qs_ptr,
    d_ptr,
    idx_ptr,
    out_ptr,
    K,
    stride_qn,
    stride_dn,
    stride_om,
    HAS_IDX: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EMU_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[i] = W[idx[i]] (or W[i]) dequantized: fp32 product qs * d, rounded once to out's dtype. PDL: launched
    as a programmatic dependent launch (triton_util.pdl; a decode step's embedding row lets the megakernel start)."""
    _pdl_start(PDL)
    row = tl.program_id(0)
    pid_k = tl.program_id(1)
    if HAS_IDX:
        src = tl.load(idx_ptr + row).to(tl.int64)
    else:
        src = row.to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs_k < K
    q = tl.load(qs_ptr + src * stride_qn + offs_k, mask=mask, other=0)
    dd = tl.load(d_ptr + src * stride_dn + offs_k // 32, mask=mask, other=0.0)
    w = _q8_f32(q) * dd.to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + offs_k, _to(w, out_ptr.dtype.element_ty, EMU_BF16), mask=mask)


def _check_weight(qs: torch.Tensor, d: torch.Tensor) -> tuple[int, int]:
    if qs.dtype != torch.int8 or qs.dim() != 2:
        raise TypeError(f"qs must be a 2-D int8 tensor, got {qs.dtype} {tuple(qs.shape)}")
    n, k = qs.shape
    if k % QK or k == 0:
        raise ValueError(f"q8_0 row length {k} is not a positive multiple of {QK}")
    if d.dtype != torch.float16 or tuple(d.shape) != (n, k // QK):
        raise TypeError(f"d must be float16 [{n}, {k // QK}], got {d.dtype} {tuple(d.shape)}")
    if qs.stride(1) != 1 or d.stride(1) != 1:
        raise ValueError("qs and d must be contiguous along the input axis")
    if d.device != qs.device:
        raise ValueError(f"qs is on {qs.device} but d is on {d.device}")
    return n, k


def q8_0_dequantize(
    qs: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float32, index: torch.Tensor | None = None
) -> torch.Tensor:
    """W (or W[index], any index shape) dequantized to `dtype`: fp32 product qs * d rounded once."""
    n, k = _check_weight(qs, d)
    if not _INTERPRET and qs.device.type != "cuda":
        raise ValueError("the weight must be on a CUDA device (or set TRITON_INTERPRET=1)")
    if index is None:
        rows, lead, idx = n, (n,), qs
    else:
        if index.dtype not in (torch.int32, torch.int64) or index.is_floating_point():
            raise TypeError(f"index must be int32 or int64, got {index.dtype}")
        idx = index.to(qs.device).reshape(-1).contiguous()
        rows, lead = idx.numel(), tuple(index.shape)
        capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()  # no host sync inside a graph
        if (
            rows and not capturing and (int(idx.min()) < 0 or int(idx.max()) >= n)
        ):  # one sync; a bad id must not read wild
            raise IndexError(f"row index out of range [0, {n}): min {int(idx.min())}, max {int(idx.max())}")
    out = torch.empty(rows, k, dtype=dtype, device=qs.device)
    if rows == 0:
        return out.reshape(*lead, k)
    block_k = min(1024, next_pow2(k))
    grid = (rows, cdiv(k, block_k))
    args = (qs, d, idx, out, k, qs.stride(0), d.stride(0), out.stride(0))
    const = dict(HAS_IDX=index is not None, BLOCK_K=block_k, EMU_BF16=_INTERPRET, **launch_options(qs.device, index))
    launch(_q8_rows_kernel, grid, args, const)
    return out.reshape(*lead, k)


def launch_options(device: torch.device, index: torch.Tensor | None) -> dict:
    """How q8_0_dequantize launches: rows looked up (a decode step's embedding row) as a programmatic dependent
    launch where decode launches overlap (overlap_pdl); a whole weight (dequantize + cuBLAS) as a plain launch. As a
    dependent launch the whole-weight kernel ran 45% longer inside the training step (4 x 64 with checkpointing on the
    H200: 203 launches, 9.36 ms per step against 6.45 ms; 8 x 512: 41 against 32 us a launch;
    bench/results/h200_session32/), and nothing in the step waits on its start."""
    return overlap_pdl(device) if index is not None else {}


class DequantCache:
    """The last `size` weights dequantized for the dequantize + cuBLAS path (q8_0_matmul's "dequant"), kept
    for reuse. With activation checkpointing a layer's recomputed forward and its backward run back to back:
    each base weight is dequantized once for both instead of twice (the base is frozen, so a copy stays valid;
    an entry holds its int8 tensor, so its key cannot be reused by another weight). At most `size` transient
    copies (one layer's products with size 4), never a float copy of the model.

    CUDA graphs: a graph must only read memory it owns, so the entries are dropped whenever the stream's
    capture state differs from the one they were made under (a capture starts with an empty cache)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._capturing = False

    def get(self, qs: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        capturing = qs.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing != self._capturing:
            self._entries.clear()
            self._capturing = capturing
        key = (qs.data_ptr(), d.data_ptr(), tuple(qs.shape), dtype)
        hit = self._entries.pop(key, None)
        w = hit[1] if hit is not None else q8_0_dequantize(qs, d, dtype)
        self._entries[key] = (qs, w)  # most recently used last
        while len(self._entries) > self.size:
            self._entries.pop(next(iter(self._entries)))
        return w
