#!/usr/bin/env python3
"""The floor under a small decode product's time, in the harness bench/kernels_bench.py times it with
(triton.testing.do_bench_cudagraph, median of CUDA-graph replays): beside lorakit's q8_0 product at M = 1 and
M = 16 for each open_llama_3b / Llama-3-8B weight shape, one launch of an empty kernel and one launch of a
streaming read of the product's q8_0 bytes (N * K * 34 / 32; the weight's int8 values and fp16 scales, summed
into a word so nothing is skipped). Each is timed twice: with the same copy every call (hot: the weight stays in
L2, as in kernels_bench.py) and with copies cycled past L2's 50 MB (cold: every call reads HBM). H200:

    python bench/read_floor.py [--out bench/results/read_floor_h200.json]

The table gives microseconds and % of HBM bandwidth (4.23 TB/s, as kernels_bench.py) on the q8_0 bytes for each:
how far a product is from what one kernel that only reads those bytes achieves in the same harness.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorakit.kernels.q8_0_matmul import q8_0_matmul  # noqa: E402
from lorakit.quant import quantize_q8_0  # noqa: E402

SHAPES = [(3200, 3200), (8640, 3200), (3200, 8640), (32000, 3200), (4096, 4096), (1024, 4096), (14336, 4096),
          (4096, 14336)]  # fmt: skip
HBM_BYTES_PER_S = 4.23e12


@triton.jit
def _empty_kernel(out_ptr):
    pass


@triton.jit
def _read_kernel(src_ptr, out_ptr, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Program p sums words [p * ITERS * BLOCK, + ITERS * BLOCK) of src (int32) into out[p]."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * (ITERS * BLOCK) + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(ITERS):
        o = offs + i * BLOCK
        acc += tl.load(src_ptr + o, mask=o < n_words, other=0, cache_modifier=".cg")
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def _read(src, out, block: int = 1024, iters: int = 4) -> None:
    n = src.numel()
    _read_kernel[(triton.cdiv(n, block * iters),)](src, out, n, BLOCK=block, ITERS=iters, num_warps=4)


def hot_cold_ms(fns) -> tuple[float, float]:
    """(hot, cold) ms per call, median of CUDA-graph replays (triton.testing.do_bench_cudagraph): fns[0] each call
    (its data stays in L2 when it fits), then fns in turn (copies totalling more than L2's 50 MB: every call reads
    HBM)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fns[0], rep=50, return_mode="median"), cold_ms(fns)


def cold_ms(fns) -> float:
    """hot_cold_ms's cold time alone: ms per call with fns called in turn (every call reads HBM)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(_cycling(fns), rep=50, return_mode="median")


def lab_parser(doc: str, default_json: str) -> argparse.ArgumentParser:
    """A GPU lab's command line: its docstring's first paragraph and --out (default bench/results/<default_json>)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / default_json))
    return p


def lab_args(script: str, doc: str, default_json: str, argv=None):
    """lab_parser's arguments; None, after a one-line message, without a CUDA GPU."""
    args = lab_parser(doc, default_json).parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU", file=sys.stderr)
        return None
    return args


def save_rows(out: str, rows: list, **extra) -> None:
    """The lab's JSON: the device's name, `extra`, then the rows."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), **extra, rows=rows), indent=1))


def _cycling(fns):
    """A callable that calls fns[0], fns[1], ... in turn: captured repeatedly into a CUDA graph it reads a new copy
    each call."""
    i = [0]

    def call():
        fns[i[0] % len(fns)]()
        i[0] += 1

    return call


def main(argv=None) -> int:
    args = lab_args("read_floor.py", __doc__, "read_floor_h200.json", argv)
    if args is None:
        return 1
    from triton.testing import do_bench_cudagraph

    out = torch.zeros(1 << 20, dtype=torch.int32, device="cuda")
    t_empty = do_bench_cudagraph(lambda: _empty_kernel[(1,)](out), rep=50, return_mode="median")
    print(f"empty kernel, one program: {1e3 * t_empty:.2f} us per launch", flush=True)
    rows = []
    print("us per call (% of HBM) with the same copy each call (hot: L2) and with copies cycled past L2 (cold)")
    print(f"{'N':>6} {'K':>6} {'MB':>6} {'read hot':>14} {'read cold':>14} {'M':>3} {'q8 hot':>14} {'q8 cold':>14}")
    for n, k in SHAPES:
        nbytes = n * k * 34 // 32
        copies = min(48, -(-200_000_000 // nbytes))
        srcs = [torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
                for _ in range(copies)]  # fmt: skip
        reads = [lambda s=s: _read(s, out) for s in srcs]
        t_read = hot_cold_ms(reads)
        del srcs, reads
        w = quantize_q8_0(torch.randn(n, k, device="cuda"))
        ws = [(w.qs.clone(), w.d.clone()) for _ in range(copies)]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").bfloat16()
            q8_0_matmul(x, w.qs, w.d)  # path choice and tuning outside the timing
            prods = [lambda qs=qs, d=d, x=x: q8_0_matmul(x, qs, d) for qs, d in ws]
            t_q8 = hot_cold_ms(prods)
            cells = [f"{1e3 * t:6.2f} ({100 * nbytes / (t * 1e-3) / HBM_BYTES_PER_S:3.0f}%)" for t in t_read + t_q8]
            print(f"{n:6d} {k:6d} {nbytes / 1e6:6.1f} {cells[0]:>14} {cells[1]:>14} {m:3d} {cells[2]:>14} "
                  f"{cells[3]:>14}", flush=True)  # fmt: skip
            rows.append(dict(n=n, k=k, m=m, q8_bytes=nbytes, copies=copies, read_hot_ms=t_read[0],
                             read_cold_ms=t_read[1], q8_hot_ms=t_q8[0], q8_cold_ms=t_q8[1]))  # fmt: skip
        del ws
    save_rows(args.out, rows, empty_ms=t_empty)
    return 0


if __name__ == "__main__":
    sys.exit(main())
