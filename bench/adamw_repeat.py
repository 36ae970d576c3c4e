"""Repeat the fused AdamW step of tests/test_kernels.py::test_gpu_adamw_large many times on the GPU and report any
run that differs from the first (the kernels have no atomics: every run should be bit-identical) or from the
cpu-torch spec beyond the test's tolerance, with the clip factor and norm that run used.

    python bench/adamw_repeat.py [--runs 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lorakit.backends.cpu_torch import CpuTorchBackend
from lorakit.kernels import lora_update

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.adam_case import ADAM_RTOL, large_case  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=300)
    args = p.parse_args()
    hp, state, decayed = large_case()
    ref = [[t.clone() for t in ts] for ts in state]
    norm_ref = CpuTorchBackend().adamw_step(*ref, decayed, hp)
    ref_flat = [torch.cat([t.reshape(-1) for t in ts]) for ts in ref]
    factor_ref = float(torch.tensor(hp.gclip / norm_ref, dtype=torch.float32))
    print(f"spec: norm {norm_ref!r} factor {factor_ref!r}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: under TRITON_INTERPRET=1
    first = None
    bad = 0
    for run in range(args.runs):
        lists = [[t.to(dev, copy=True) for t in ts] for ts in state]
        norm = lora_update.adamw_step(*lists, decayed, hp)
        got = [torch.cat([t.reshape(-1) for t in ts]).cpu() for ts in lists]
        if first is None:
            first = got
        same = all(torch.equal(a, b) for a, b in zip(got, first, strict=True))
        worst = 0.0
        where = None
        for name, a, b in zip(("x", "g", "m", "v"), got, ref_flat, strict=True):
            tol = ADAM_RTOL * b.abs() + ADAM_RTOL * float(b.abs().max())
            r = ((a - b).abs() / tol).max().item()
            if r > worst:
                worst, where = r, (name, int(((a - b).abs() / tol).argmax()))
        if not same or worst > 1 or run % 50 == 0:
            print(f"run {run}: norm {norm!r} identical_to_first={same} worst_err/tol={worst:.3f} at {where}")
        if not same or worst > 1:
            bad += 1
            for name, a, b in zip(("x", "g", "m", "v"), got, first, strict=True):
                diff = (a != b).nonzero().reshape(-1)
                if diff.numel():
                    blocks = sorted({int(i) // lora_update.BLOCK for i in diff})
                    print(f"  {name}: {diff.numel()} elements differ from run 0, programs {blocks[:20]}")
    print(f"{args.runs} runs, {bad} differing or out of tolerance")


if __name__ == "__main__":
    main()
