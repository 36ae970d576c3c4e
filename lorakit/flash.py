"""torch's flash-attention kernels called directly (forward and backward), for fused_ops.CausalAttentionFn.

F.scaled_dot_product_attention pads a head size that is not a multiple of 8 (open_llama_3b: 100) to the next
one on CUDA, runs the same flash kernel, and narrows the output; under autograd that costs a padded copy of
q, k, v and the output gradient and a narrowing copy of each gradient per layer. Calling the kernel on heads
that are already padded (zero columns: they add exact zeros to q.k and give zero output columns) with
scale = 1/sqrt(D) of the unpadded D computes the same numbers without those copies.

CUDA: aten._scaled_dot_product_flash_attention (bf16/fp16); CPU: its _for_cpu variant (any float dtype; the
interpreter tests run through it). q, k, v: [B, H, T, Dp] views, last axis contiguous, same head count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

aten = torch.ops.aten


@dataclass
class FlashState:
    """What the backward needs besides q, k, v, out and logsumexp (tensors to save, ints to keep)."""

    tensors: tuple[torch.Tensor, ...]
    max_q: int = 0
    max_k: int = 0


MAX_HEAD = 256  # the CUDA flash kernels' largest head size


def supported(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether forward/backward run for these heads (padded to a multiple of 8). CUDA: bf16/fp16 on sm_80 or
    newer (torch's flash kernels), padded head size <= 256; CPU: any float dtype."""
    if device.type == "cuda":
        padded = -(-head_dim // 8) * 8
        return (
            dtype in (torch.bfloat16, torch.float16)
            and padded <= MAX_HEAD
            and torch.cuda.get_device_capability(device) >= (8, 0)
        )
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, FlashState]:
    """Causal attention -> (out [B, H, T, Dp], logsumexp, state)."""
    if q.device.type == "cuda":
        out, lse, cum_q, cum_k, max_q, max_k, rng, unused, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale
        )
        return out, lse, FlashState((cum_q, cum_k, rng, unused), int(max_q), int(max_k))
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, FlashState(())


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    state: FlashState,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) [B, H, T, Dp] for the output gradient dout [B, H, T, Dp]."""
    if q.device.type == "cuda":
        cum_q, cum_k, rng, unused = state.tensors
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, state.max_q, state.max_k, 0.0, True, rng, unused, scale=scale
        )
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, True, scale=scale)
