"""The fused AdamW's large case, shared by tests/test_kernels.py::test_gpu_adamw_large and bench/adamw_repeat.py:
60 LoRA-shaped tensors (1.9 M values), clipping on (the norm is ~1,377 against gclip 1), small second moments."""

from __future__ import annotations

import torch
from lorakit.backends import AdamHyper


def large_case() -> tuple[AdamHyper, list[list[torch.Tensor]], list[bool]]:
    """(hyper-parameters, [params, grads, m, v] on the CPU, decayed flags)."""
    hp = AdamHyper(alpha=1e-3, decay=0.1, beta1=0.9, beta2=0.999, eps=1e-8, gclip=1.0, sched=0.7, t=3)
    sizes = [(3200, 8), (8, 8640), (8,)] * 20
    g = torch.Generator().manual_seed(3)
    state = [[torch.randn(*s, generator=g) for s in sizes] for _ in range(4)]
    state[3] = [t.abs() * 0.01 for t in state[3]]
    return hp, state, [len(s) == 2 for s in sizes]
