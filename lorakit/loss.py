"""ggml's cross-entropy loss (spec §3.4), with its own backward.

    loss = -(1/N) * sum_rows log(softmax(logits)[target] * (1 - 1e-9) + 1e-9)

The mean runs over all N = ctx * n_batch positions, EOS padding included (llama.cpp masks
nothing). ggml's backward is (softmax * (1 - eps) + eps - onehot) / N, which is what the
Function below returns, rather than the exact derivative of the smoothed log.
Rows are processed in chunks so the float32 softmax of a [tokens, n_vocab] block is bounded.
"""

from __future__ import annotations

import torch

EPS = 1e-9
_ROWS = 1024


class GGMLCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for r0 in range(0, n, _ROWS):
            lg = logits[r0 : r0 + _ROWS].float()
            lse = torch.logsumexp(lg, dim=-1)
            pt = torch.exp(lg.gather(1, targets[r0 : r0 + _ROWS, None])[:, 0] - lse)
            total += torch.log(pt * (1.0 - EPS) + EPS).double().sum()
        ctx.save_for_backward(logits, targets)
        return (-total / n).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets = ctx.saved_tensors
        n = logits.shape[0]
        grad = torch.empty_like(logits)
        scale = grad_out.float() / n
        for r0 in range(0, n, _ROWS):
            p = torch.softmax(logits[r0 : r0 + _ROWS].float(), dim=-1) * (1.0 - EPS) + EPS
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, targets[r0 : r0 + _ROWS]] -= 1.0
            grad[r0 : r0 + _ROWS] = (p * scale).to(grad.dtype)
        return grad, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [..., V], targets [...] (int64) -> scalar mean loss (float32)."""
    return GGMLCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
