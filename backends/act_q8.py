"""A backend's inference products with llama.cpp's arithmetic for q8_0 weights (`lorakit predict --act-q8`).

llama.cpp's CPU build quantizes every activation row that meets a q8_0 weight to q8_0 and sums integer products per
block (quant.q8_0_act_matmul); lorakit's own path multiplies float activations by the exactly dequantized weights.
This wrapper gives model.forward_hidden (through lora.model_fns) the former for q8_0 weights; products with float
weights and the LoRA terms stay the wrapped backend's (llama.cpp converts activations only for quantized weights,
and adapters are float). Inference only: there is no gradient of the rounding.
"""

from __future__ import annotations

import torch

from lorakit.quant import Q8Weight, Weight, dequantize_q8_0, q8_0_act_matmul, quantize_act_q8_0

from . import TermByTermLora, cpu_gemv
from .cpu_torch import CpuTorchBackend


def requantize_act(x: torch.Tensor) -> torch.Tensor:
    """x's rows as quantize_act_q8_0 rounds them, back in float32: q * d exactly (8 + 11 significant bits)."""
    return dequantize_q8_0(*quantize_act_q8_0(x))


class ActQ8Inference(TermByTermLora):
    lora_rank_multiple = 1

    def __init__(self, base):
        self.base = base
        self.name = base.name
        self.device = base.device

    def eager_inference(self) -> ActQ8Inference:
        return self

    def matmul(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        """q8_0 weights: quant.q8_0_act_matmul's arithmetic. On the CPU (float32 x): one or two rows through its
        compiled decode loop (cpu_gemv; the same up to the order of the sum over blocks), more rows (a prompt) as the
        specification's sliced float product of the activations quantized and dequantized again (q * d is exact in
        float32, so this is the same sum with each product rounded before the sum instead of each block's sum: within
        float32 rounding, tests/test_act_q8.py). Other backends (cuda-triton) take a prompt's rows the same way, as
        their batched q8_0 matmul of the requantized float32 rows (IEEE float32 products there), returned in x's
        dtype; their decode rows, and the CPU's other cases, quant.q8_0_act_matmul itself."""
        if not isinstance(w, Q8Weight):
            return self.base.matmul(x, w)
        prompt = x.numel() // x.shape[-1] > cpu_gemv.MAX_ROWS
        if isinstance(self.base, CpuTorchBackend) and x.dtype == torch.float32:
            y = cpu_gemv.product(x, w, act_q8=True) if self.base.fused_gemv else None
            if y is not None:
                return y
            if prompt:
                return self.base.matmul(requantize_act(x), w)
        elif not isinstance(self.base, CpuTorchBackend) and prompt:
            return self.base.matmul(requantize_act(x), w).to(x.dtype)
        return q8_0_act_matmul(x, w)

    def prefetch_hint(self, w: Weight, start: int, nbytes: int, kind: int = 2) -> None:
        return None

    def embedding(self, w: Weight, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.base.embedding(w, tokens, dtype)
