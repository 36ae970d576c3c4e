"""The training micro-step (forward + backward of one batch) captured once as a CUDA graph.

At llama.cpp's setting (4 x 64 tokens) a step is thousands of small kernels, and launching them from
Python costs more than running them. The shapes never change during a run, so after a few eager warm-up
steps (Triton autotuning and path choice happen there) the step is captured with
torch.cuda.graph and every later micro-batch is one replay: copy the batch into the static input
tensors, replay, read the static loss and gradients. The graph's kernels are the eager step's kernels,
so the numbers are the same. The gradients come back as views of one flat fp32 buffer (gathered inside the
graph), so the fused AdamW reads them in place. Nothing in the step may synchronize with the host (checkpointing runs
without RNG-state bookkeeping: the forward has no randomness).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, targets) -> loss; runs backward


class GraphedStep:
    """`step(inputs, targets)` -> (loss, grads of `params`) through one captured CUDA graph."""

    def __init__(self, fn: StepFn, params: Sequence[torch.Tensor], warmup: int = 2):
        self.fn, self.params, self.warmup = fn, list(params), warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.x = self.y = self.loss = None
        self.grads: list[torch.Tensor] = []

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.clone(), y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                for p in self.params:
                    p.grad = None
                self.fn(self.x, self.y)
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        # the parameters' gradient-accumulation nodes were made by the warm-up's stream; inside the capture
        # that is a recorded cross-stream dependency, not a host synchronization, so torch's warning
        # about the mismatch does not apply here
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
            flat = torch.empty(sum(p.numel() for p in self.params), dtype=torch.float32, device=x.device)
            with torch.cuda.graph(self.graph):
                self.loss = self.fn(self.x, self.y)
                parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params]
                torch.cat([t.float() for t in parts], out=flat)
        for p in self.params:
            p.grad = None
        self.grads = [g.view(p.shape) for g, p in zip(torch.split(flat, [p.numel() for p in self.params]), self.params,
                                                      strict=True)]  # fmt: skip

    def __call__(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dev = self.params[0].device
        x = torch.from_numpy(inputs).to(dev)
        y = torch.from_numpy(targets).to(dev)
        if self.graph is None:
            self._capture(x, y)
        else:
            self.x.copy_(x)
            self.y.copy_(y)
        self.graph.replay()
        return self.loss, self.grads
