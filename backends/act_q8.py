"""A backend's inference products with llama.cpp's arithmetic for q8_0 weights (`lorakit predict --act-q8`).

llama.cpp's CPU build quantizes every activation row that meets a q8_0 weight to q8_0 and sums integer products per
block (quant.q8_0_act_matmul); lorakit's own path multiplies float activations by the exactly dequantized weights.
This wrapper gives model.forward_hidden (through lora.model_fns) the former for q8_0 weights; products with float
weights and the LoRA terms stay the wrapped backend's (llama.cpp converts activations only for quantized weights,
and adapters are float). Inference only: there is no gradient of the rounding.
"""

from __future__ import annotations

import torch

from lorakit.quant import Q8Weight, Weight, q8_0_act_matmul

from . import TermByTermLora


class ActQ8Inference(TermByTermLora):
    lora_rank_multiple = 1

    def __init__(self, base):
        self.base = base
        self.name = base.name
        self.device = base.device

    def eager_inference(self) -> ActQ8Inference:
        return self

    def matmul(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        """q8_0 weights: quant.q8_0_act_matmul, or on the CPU its compiled decode loop (cpu_gemv; the same arithmetic
        up to the order of the sum over blocks) where the wrapped backend takes that loop for its own products."""
        if not isinstance(w, Q8Weight):
            return self.base.matmul(x, w)
        if getattr(self.base, "fused_gemv", False):
            from . import cpu_gemv

            y = cpu_gemv.product(x, w, act_q8=True)
            if y is not None:
                return y
        return q8_0_act_matmul(x, w)

    def prefetch_hint(self, w: Weight, start: int, nbytes: int, kind: int = 2) -> None:
        return None

    def embedding(self, w: Weight, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.base.embedding(w, tokens, dtype)
