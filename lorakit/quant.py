"""Weights as the model holds them: q8_0 kept quantized, everything else as float tensors.

q8_0 (ggml type 8): blocks of 32 values, each block = fp16 scale d + 32 int8 qs; value = qs * d.
It is repacked once at load into two tensors:
    qs: int8   [out, in]        the quantized values, row-major like a PyTorch weight
    d:  fp16   [out, in // 32]  one scale per block of 32 along the input axis
Every other ggml type the `gguf` package can dequantize is dequantized at load (reported by
`inspect`); F16/BF16/F32 stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QK8_0 = 32
GGML_Q8_0 = 8
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30


@dataclass
class Q8Weight:
    """A q8_0 matrix of logical shape (out, in)."""

    qs: torch.Tensor  # int8 [out, in]
    d: torch.Tensor  # float16 [out, in // 32]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qs.shape)

    @property
    def device(self) -> torch.device:
        return self.qs.device

    def to(self, device) -> Q8Weight:
        return Q8Weight(self.qs.to(device), self.d.to(device))

    def rows(self, index: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Dequantize only the selected rows (an embedding lookup)."""
        return dequantize_q8_0(self.qs[index], self.d[index], dtype)


Weight = torch.Tensor | Q8Weight


def q8_0_from_bytes(raw: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """Split GGUF q8_0 rows (uint8 [out, in/32*34]) into int8 values and fp16 scales (copies once)."""
    out, n_in = shape
    if n_in % QK8_0:
        raise ValueError(f"q8_0 row length {n_in} is not a multiple of 32")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(out, n_in // QK8_0, 2 + QK8_0)
    d = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).reshape(out, n_in // QK8_0)  # copies
    qs = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(out, n_in)  # copies
    return Q8Weight(torch.from_numpy(qs), torch.from_numpy(d))


def q8_0_to_bytes(w: Q8Weight) -> np.ndarray:
    """The inverse of q8_0_from_bytes: uint8 [out, in/32*34] in GGUF block layout."""
    out, n_in = w.shape
    nb = n_in // QK8_0
    blocks = np.empty((out, nb, 2 + QK8_0), dtype=np.uint8)
    blocks[:, :, :2] = w.d.cpu().numpy().reshape(out, nb, 1).view(np.uint8).reshape(out, nb, 2)
    blocks[:, :, 2:] = w.qs.cpu().numpy().reshape(out, nb, QK8_0).view(np.uint8)
    return blocks.reshape(out, nb * (2 + QK8_0))


def dequantize_q8_0(qs: torch.Tensor, d: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """qs int8 [..., in], d fp16 [..., in/32] -> [..., in] in `dtype` (products formed in float32)."""
    shape = qs.shape
    vals = qs.reshape(*shape[:-1], shape[-1] // QK8_0, QK8_0).to(torch.float32)
    return (vals * d.to(torch.float32).unsqueeze(-1)).reshape(shape).to(dtype)


def quantize_q8_0(x: torch.Tensor) -> Q8Weight:
    """ggml's reference quantizer (quantize_row_q8_0_ref): d = amax/127, qs = round-half-away(x/d).

    The scale used for rounding is the float32 d (before it is stored as fp16), as in ggml.
    """
    x = x.to(torch.float32)
    out, n_in = x.shape
    blocks = x.reshape(out, n_in // QK8_0, QK8_0)
    amax = blocks.abs().amax(dim=-1)
    d = amax / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    scaled = blocks * inv.unsqueeze(-1)
    qs = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # roundf: ties away from zero
    return Q8Weight(qs.to(torch.int8).reshape(out, n_in), d.to(torch.float16))


def quantize_act_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An activation row as llama.cpp's CPU build quantizes it before a q8_0 product (quantize_row_q8_0, the
    AVX / NEON paths): per block of 32, amax = max |x|, stored scale d = fp16(amax / 127), q = round half to even
    (x * (127 / amax)) in float32 (0 where amax = 0). ggml's scalar reference rounds half away from zero with
    x * (1 / d) instead; the SIMD paths are what llama.cpp runs. Returns (qs int8 [..., K], d fp16 [..., K / 32])."""
    shape = x.shape
    blocks = x.to(torch.float32).reshape(*shape[:-1], shape[-1] // QK8_0, QK8_0)
    amax = blocks.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    qs = torch.round(blocks * inv.unsqueeze(-1))  # torch.round: half to even, as _mm256_round_ps(NEAREST)
    return qs.to(torch.int8).reshape(shape), (amax / 127.0).to(torch.float16)


def _act_rows(n_rows: int, n_blocks: int) -> int:
    """Rows of W per q8_0_act_matmul step: the [blocks, rows of x, rows of W] fp32 block sums ~64 MB at most."""
    return max(1, (16 << 20) // max(1, n_blocks * n_rows))


def q8_0_act_matmul(x: torch.Tensor, w: Q8Weight) -> torch.Tensor:
    """x @ W.T with llama.cpp's arithmetic for a q8_0 weight (ggml_vec_dot_q8_0_q8_0 on activations quantized by
    quantize_act_q8_0): per row m, output n and block b the integer dot isum = sum_k qs_w[n, b, k] * qs_x[m, b, k]
    (exact: |isum| <= 32 * 127^2 < 2^24, so the float32 batched product forms it exactly in any order), then
    y[m, n] = sum_b (d_w[n, b] * d_x[m, b]) * isum in float32 (the scales' product rounded once, the sum over
    blocks in torch's order, not ggml's SIMD lanes). Returned in x's dtype."""
    out_f, n_in = w.shape
    nb = n_in // QK8_0
    lead = x.shape[:-1]
    qx, dx = quantize_act_q8_0(x.reshape(-1, n_in))
    m = qx.shape[0]
    xb = qx.reshape(m, nb, QK8_0).permute(1, 0, 2).to(torch.float32)  # [B, M, 32]
    dxt = dx.to(torch.float32).T.unsqueeze(-1)  # [B, M, 1]
    y = torch.empty(m, out_f, dtype=torch.float32, device=x.device)
    step = _act_rows(m, nb)
    for r0 in range(0, out_f, step):
        r1 = min(out_f, r0 + step)
        wb = w.qs[r0:r1].reshape(r1 - r0, nb, QK8_0).permute(1, 2, 0).to(torch.float32)  # [B, 32, rows]
        isum = torch.bmm(xb, wb)  # [B, M, rows], exact integers
        scale = dxt * w.d[r0:r1].to(torch.float32).T.unsqueeze(1)  # [B, M, rows]: d_x * d_w, rounded once
        y[:, r0:r1] = (isum * scale).sum(dim=0)
    return y.to(x.dtype).reshape(*lead, out_f)


def weight_from_gguf(gf, name: str) -> Weight:
    """Load one model tensor: q8_0 stays quantized, F32/F16/BF16 as torch tensors, others dequantized."""
    info = gf.info(name)
    if info.ggml_type == GGML_Q8_0 and len(info.shape) == 2:
        return q8_0_from_bytes(gf.read_copy(name), info.shape)
    if info.ggml_type == GGML_F32:
        return torch.from_numpy(gf.read_copy(name).astype(np.float32, copy=False).reshape(info.shape))
    if info.ggml_type == GGML_F16:
        return torch.from_numpy(gf.read_copy(name).astype(np.float16, copy=False).reshape(info.shape))
    if info.ggml_type == GGML_BF16:
        as_u16 = gf.read_copy(name).view(np.uint8).view(np.int16).reshape(info.shape)
        return torch.from_numpy(as_u16.copy()).view(torch.bfloat16)
    return torch.from_numpy(gf.float_array(name).copy())


def dequantize(w: Weight, dtype=torch.float32) -> torch.Tensor:
    if isinstance(w, Q8Weight):
        return dequantize_q8_0(w.qs, w.d, dtype)
    return w.to(dtype)
