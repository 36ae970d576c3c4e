"""llama.cpp finetune's random LoRA initialisation (`randomize_lora`, spec §5), bit for bit.

One `std::mt19937(seed)` and one `std::normal_distribution<float>(0, 1)` are shared by all tensors, in
llama.cpp's order (token_embd, output_norm, output, then per layer attn_norm, attn_q, attn_k, attn_v,
attn_output, ffn_norm, ffn_gate, ffn_down, ffn_up). Every lora_a element, in memory order (ggml ne0
fastest = row-major of the numpy shape (in, r)), is clamp(N, -1, 1) * (1 / sqrtf(ne0 + ne1)) in float32;
every lora_b is zero. A seed of -1 (time-based) is resolved by the caller.
"""

from __future__ import annotations

import numpy as np
import torch

from .rng import MT19937, StdNormalFloat


def _scale(shape: tuple[int, int]) -> np.float32:
    """randomize_tensor_normal's scale for a ggml tensor of ne = [shape[1], shape[0]] (ggml_n_dims rules)."""
    ne0, ne1 = int(shape[1]), int(shape[0])
    if ne1 == 1:  # a 1-D tensor: 1/sqrtf(ne0)
        return np.float32(1.0) / np.sqrt(np.float32(ne0))
    return np.float32(1.0) / np.sqrt(np.float32(ne0 + ne1))


def init_lora_arrays(
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]], seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Like `init_lora`, as float32 numpy arrays."""
    rng = MT19937(int(seed) & 0xFFFFFFFF)
    normal = StdNormalFloat(rng, 0.0, 1.0)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (a_shape, b_shape) in shapes.items():
        a_shape = (int(a_shape[0]), int(a_shape[1]))
        n = a_shape[0] * a_shape[1]
        z = np.clip(normal.sample(n), np.float32(-1.0), np.float32(1.0))
        a = (_scale(a_shape) * z).astype(np.float32).reshape(a_shape)
        b = np.zeros((int(b_shape[0]), int(b_shape[1])), dtype=np.float32)
        out[name] = (a, b)
    return out


def init_lora(
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]], seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (lora_a (in, r), lora_b (out, r)) as float32 tensors; `shapes` in llama.cpp order
    (as `lorakit.lora.lora_shapes` gives it)."""
    return {k: (torch.from_numpy(a), torch.from_numpy(b)) for k, (a, b) in init_lora_arrays(shapes, seed).items()}
