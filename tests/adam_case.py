"""The fused AdamW's test hyper-parameters and tolerance, shared by tests/test_kernels.py and bench/adamw_repeat.py,
and its large case (test_gpu_adamw_large): 60 LoRA-shaped tensors (1.9 M values), clipping on (the norm is ~1,377
against gclip 1), small second moments."""

from __future__ import annotations

import torch

from lorakit.backends import AdamHyper

# m, v and x match the spec to this relative to their magnitude (tests/test_kernels.py's docstring derives it)
ADAM_RTOL = 16 * 2.0**-24


def hyper(gclip: float, t: int = 3, sched: float = 0.7) -> AdamHyper:
    """The AdamW hyper-parameters of the kernel tests: clipping at gclip, step t, schedule factor sched."""
    return AdamHyper(alpha=1e-3, decay=0.1, beta1=0.9, beta2=0.999, eps=1e-8, gclip=gclip, sched=sched, t=t)


def large_case() -> tuple[AdamHyper, list[list[torch.Tensor]], list[bool]]:
    """(hyper-parameters, [params, grads, m, v] on the CPU, decayed flags)."""
    hp = hyper(1.0)
    sizes = [(3200, 8), (8, 8640), (8,)] * 20
    g = torch.Generator().manual_seed(3)
    state = [[torch.randn(*s, generator=g) for s in sizes] for _ in range(4)]
    state[3] = [t.abs() * 0.01 for t in state[3]]
    return hp, state, [len(s) == 2 for s in sizes]
