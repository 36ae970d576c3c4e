"""torch's flash-attention kernels called directly (forward and backward), for fused_ops.CausalAttentionFn.

F.scaled_dot_product_attention pads a head size that is not a multiple of 8 (open_llama_3b: 100) to the next
one on CUDA, runs the same flash kernel, and narrows the output; under autograd that costs a padded copy of
q, k, v and the output gradient and a narrowing copy of each gradient per layer. Calling the kernel on heads
that are already padded (zero columns: they add exact zeros to q.k and give zero output columns) with
scale = 1/sqrt(D) of the unpadded D computes the same numbers without those copies.

CUDA: aten._scaled_dot_product_flash_attention (bf16/fp16); CPU: its _for_cpu variant (any float dtype; the
interpreter tests run through it). q [B, H, T, Dp], k, v [B, Hkv, T, Dp] views (last axis contiguous; Hkv
divides H: grouped-query attention, query head h reading key/value head h // (H / Hkv)).
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


def padded_head(head_dim: int) -> int:
    """The head size the kernels run on: the next multiple of 8 (zero columns fill the rest)."""
    return -(-head_dim // 8) * 8


def supported(dtype: torch.dtype, device: torch.device, head_dim: int, gqa: bool = False) -> bool:
    """Whether forward/backward run for these heads (padded to a multiple of 8). CUDA: bf16/fp16 on sm_80 or
    newer (torch's flash kernels), padded head size <= 256, and for GQA (fewer key/value than query heads) a
    torch whose flash kernels take them natively; CPU: any float dtype, GQA included."""
    if device.type == "cuda":
        ok = (
            dtype in (torch.bfloat16, torch.float16)
            and padded_head(head_dim) <= MAX_HEAD
            and torch.cuda.get_device_capability(device) >= (8, 0)
        )
        return ok and (not gqa or _cuda_gqa(device.index if device.index is not None else torch.cuda.current_device()))
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


_GQA_PROBED: dict[int, bool] = {}


def _cuda_gqa(device_index: int) -> bool:
    """Whether this torch's CUDA flash kernels take fewer key/value than query heads natively with
    repeat_interleave's head mapping, forward and backward (probed once per device on tiny tensors against the
    same kernels on repeated heads; a torch that refuses gets SDPA with repeated key/value heads instead). Not
    probed inside a CUDA-graph capture (the answer is then no, and asked again later)."""
    if device_index not in _GQA_PROBED:
        if torch.cuda.is_current_stream_capturing():
            return False
        _GQA_PROBED[device_index] = _probe_gqa(device_index)
    return _GQA_PROBED[device_index]


def _probe_gqa(device_index: int) -> bool:
    g = torch.Generator(device=torch.device("cuda", device_index)).manual_seed(0)
    q, k, v, dout = (torch.randn(1, h, 3, 8, generator=g, device=g.device, dtype=torch.bfloat16) for h in (4, 2, 2, 4))
    try:
        out, lse, state = forward(q, k, v, 0.5)
        dq, dk, dv = backward(dout, q, k, v, out, lse, state, 0.5)
    except Exception:  # any refusal (a shape check, an unsupported layout) means: not supported
        return False
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    out4, lse4, state4 = forward(q, k4, v4, 0.5)
    dq4, dk4, dv4 = backward(dout, q, k4, v4, out4, lse4, state4, 0.5)
    grouped = [t.float().unflatten(1, (2, 2)).sum(2) for t in (dk4, dv4)]
    return bool(
        torch.equal(out, out4)
        and torch.allclose(dq.float(), dq4.float(), atol=0.05)
        and all(torch.allclose(a.float(), b, atol=0.05) for a, b in zip((dk, dv), grouped, strict=True))
    )


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
