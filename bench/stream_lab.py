#!/usr/bin/env python3
"""Lab (#5): how fast can one persistent program per SM stream the decode step's weight bytes into shared memory,
and does the form of its producer matter? The decode megakernel's stream alone (one producer warp, one TMA box per
16 KB stage) tops at ~3.3 TB/s (sessions 17 and 20: 1,030-1,120 us for the step's 3.4-3.5 GB), against 4.23 TB/s
for a copy and 3.82 TB/s for session 10's launched GEMVs, whose many warps load with cp.async.

    python bench/stream_lab.py [--gb 3.5] [--stages 12] [--out FILE]

Every variant streams the same int8 buffer, each SM its contiguous share, in 16 KB stages ([128, 128] int8 with the
megakernel's 128-byte swizzle) through a ring of STAGES stages; four consumer warps wait for each stage and release
it (no arithmetic: the stream alone):
  tma1     one producer warp, one TMA box per stage (the megakernel's producer)
  tma2     two producer warps, one partition each, taking alternate stages
  cpasync  four producer warps, cp.async of 16 bytes per thread (eight per thread per stage), each thread arriving at
           the stage's barrier when its copies land (cp.async.mbarrier.arrive.noinc)
  ldg      reference: a plain Triton kernel, no ring, many programs each summing 64 KB of the buffer
  tma1-split, tma1-scales, tma1-split-scales: tma1 with the megakernel's addresses (a program's stages are the
           tasks of a contiguous range of the split-major order of gate|up-shaped products in tile-major weights:
           16 KB pieces 200 KB apart) and / or a stage's 1 KB box of scales beside it (session 22)
Each is timed as the best of five rounds of ten CUDA-graph replays; prints the rate and the ratio to tma1, saves
JSON. Session 22 on the H200: every form 4.59-4.70 TB/s (tma1 587 us for 2.76 GB; the megakernel's addresses and
scale boxes 4.67); the step's weight stream is not what holds the megakernel at ~2.9 TB/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ROWS: gl.constexpr = gl.constexpr(128)  # a stage: [ROWS, COLS] int8 = 16 KB
COLS: gl.constexpr = gl.constexpr(128)


@gluon.jit
def _share(n):
    """This program's stages [lo, hi) of n (contiguous shares)."""
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    return pid * n // P, (pid + 1) * n // P


@gluon.jit
def _tma_producer(desc, d_desc, q_s, d_s, full, empty, n, W: gl.constexpr, NP: gl.constexpr,
                  SPLIT: gl.constexpr = False, SCALES: gl.constexpr = False):  # fmt: skip
    """Producer W of NP: the program's stages lo + W, lo + W + NP, ... by TMA (one [ROWS, COLS] box each). SPLIT:
    stage g is read where the megakernel's task g of a gate|up-shaped product lies (split-major tasks, tile-major
    weights: 16 KB pieces 200 KB apart, _stage_at); SCALES: with a 1 KB box of scales per stage, as it loads them."""
    STAGES: gl.constexpr = full.shape[0]
    NBYTES: gl.constexpr = desc.block_type.nbytes + (d_desc.block_type.nbytes if SCALES else 0)
    lo, hi = _share(n)
    for g in range(lo + W, hi, NP):
        it = g - lo
        st = it % STAGES
        a = _stage_at(g) if SPLIT else g
        mbarrier.wait(empty.index(st), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(full.index(st), NBYTES)
        tma.async_copy_global_to_shared(desc, [a * ROWS, 0], full.index(st), q_s.index(st))
        if SCALES:
            tma.async_copy_global_to_shared(d_desc, [a * 2, 0], full.index(st), d_s.index(st))


NB_GU: gl.constexpr = gl.constexpr(270)  # the 3B step's gate|up product: 270 row blocks x 13 stages of 16 KB
ST_GU: gl.constexpr = gl.constexpr(13)


@gluon.jit
def _stage_at(g):
    """Where task g of the split-major order (task = split NB + row block) of gate|up-shaped products lies in their
    tile-major weights (row block rb's 13 stages contiguous): product g // (NB ST), row block, stage."""
    per: gl.constexpr = NB_GU * ST_GU
    t = g % per
    return (g // per) * per + (t % NB_GU) * ST_GU + t // NB_GU


@gluon.jit
def _cp_producer(x_ptr, q_s, full, empty, n, num_warps: gl.constexpr):
    """The program's stages by cp.async, 16 bytes per thread per copy; each thread arrives at the stage's full
    barrier once its copies have landed."""
    STAGES: gl.constexpr = full.shape[0]
    LC: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [num_warps, 1], [1, 0])
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, LC))
    cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, LC))
    offs = gl.expand_dims(rows * COLS, 1) + gl.expand_dims(cols, 0)
    lo, hi = _share(n)
    for g in range(lo, hi):
        it = g - lo
        st = it % STAGES
        mbarrier.wait(empty.index(st), ((it // STAGES) & 1) ^ 1)
        async_copy.async_copy_global_to_shared(q_s.index(st), x_ptr + g.to(gl.int64) * (ROWS * COLS) + offs)
        async_copy.mbarrier_arrive(full.index(st), increment_count=False)


@gluon.jit
def _consumer(q_s, full, empty, n, num_warps: gl.constexpr):
    """Wait for each stage, release it (every consumer thread arrives)."""
    STAGES: gl.constexpr = full.shape[0]
    lo, hi = _share(n)
    for it in range(0, hi - lo):
        st = it % STAGES
        mbarrier.wait(full.index(st), (it // STAGES) & 1)
        async_copy.mbarrier_arrive(empty.index(st), increment_count=False)


@gluon.jit
def _stream_kernel(desc, d_desc, x_ptr, n, STAGES: gl.constexpr, FORM: gl.constexpr, num_warps: gl.constexpr):
    """FORM 0: tma1, 1: tma2, 2: cpasync, 3: tma1-split, 4: tma1-scales, 5: tma1-split-scales (see the module
    docstring)."""
    lay: gl.constexpr = desc.layout
    q_s = gl.allocate_shared_memory(gl.int8, [STAGES, ROWS, COLS], lay)
    d_s = gl.allocate_shared_memory(gl.float16, [STAGES] + d_desc.block_type.shape, d_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=32 * 4 if FORM == 2 else 1)
        mbarrier.init(empty.index(i), count=32 * num_warps)
    # fmt: off
    if FORM == 0:
        gl.warp_specialize([(_consumer, (q_s, full, empty, n, num_warps)),
                            (_tma_producer, (desc, d_desc, q_s, d_s, full, empty, n, 0, 1))], [1], [48])
    elif FORM == 1:
        gl.warp_specialize([(_consumer, (q_s, full, empty, n, num_warps)),
                            (_tma_producer, (desc, d_desc, q_s, d_s, full, empty, n, 0, 2)),
                            (_tma_producer, (desc, d_desc, q_s, d_s, full, empty, n, 1, 2))], [1, 1], [48, 48])
    elif FORM >= 3:
        gl.warp_specialize([(_consumer, (q_s, full, empty, n, num_warps)),
                            (_tma_producer, (desc, d_desc, q_s, d_s, full, empty, n, 0, 1, FORM != 4, FORM != 3))],
                           [1], [48])
    else:
        gl.warp_specialize([(_consumer, (q_s, full, empty, n, num_warps)),
                            (_cp_producer, (x_ptr, q_s, full, empty, n, 4))], [4], [64])
    # fmt: on


@triton.jit
def _ldg_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """One program: BLOCK bytes as int32 words, summed (so that the loads are used)."""
    pid = tl.program_id(0).to(tl.int64)
    w = tl.load(x_ptr + pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4))
    tl.store(out_ptr + pid, tl.sum(w, axis=0))


FORMS = {"tma1": 0, "tma2": 1, "cpasync": 2, "tma1-split": 3, "tma1-scales": 4, "tma1-split-scales": 5}


def stream(x: torch.Tensor, form: str, stages: int, programs: int, desc=None) -> None:
    """One launch of a variant over x (int8 [n * ROWS, COLS]); desc: its TMA descriptors (tma forms: x's, the
    scales')."""
    n = x.shape[0] // ROWS.value
    if form == "ldg":
        words = x.view(torch.int32).view(-1)
        block = 65536
        out = torch.empty(words.numel() * 4 // block, dtype=torch.int32, device=x.device)
        _ldg_kernel[(out.numel(),)](words, out, BLOCK=block, num_warps=8)
        return
    _stream_kernel[(programs,)](desc[0], desc[1], x, n, STAGES=stages, FORM=FORMS[form], num_warps=4)


def descriptor(x: torch.Tensor, d: torch.Tensor):
    """TMA descriptors of x (boxes [ROWS, COLS]: a stage) and of the scales d (fp16 [2 n, 256], boxes [2, 256]: a
    stage's 1 KB, as the megakernel's pack_d layout)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    lay = gl.NVMMASharedLayout.get_default_for([ROWS.value, COLS.value], gl.int8)
    flat16 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    return TensorDescriptor.from_tensor(x, [ROWS.value, COLS.value], lay), TensorDescriptor.from_tensor(
        d, [2, 256], flat16
    )


def main(argv=None) -> int:
    from persistent_lab import graph_us

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=3.5, help="bytes streamed per launch (the 3B step's weights: ~3.5)")
    p.add_argument("--stages", type=int, default=12)
    p.add_argument("--out", default=str(ROOT / "bench/results/stream_lab.json"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("stream_lab.py: needs a CUDA GPU", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    programs = torch.cuda.get_device_properties(dev).multi_processor_count
    n = int(a.gb * 1e9) // (ROWS.value * COLS.value)
    n -= n % (16 * 270 * 13)  # whole 64 KB blocks for ldg, whole gate|up-shaped products for the split forms
    x = torch.randint(-127, 128, (n * ROWS.value, COLS.value), dtype=torch.int8, device=dev)
    d = torch.randn(2 * n, 256, device=dev).half()
    desc = descriptor(x, d)
    rows = []
    for form in ("tma1", "tma2", "cpasync", "ldg", *[f for f in FORMS if f.startswith("tma1-")]):
        try:
            us = graph_us(lambda form=form: stream(x, form, a.stages, programs, desc))
            nbytes = x.numel() + (d.numel() * 2 if "scales" in form else 0)
            rows.append({"form": form, "us": us, "tb_s": nbytes / us / 1e6})
        except Exception as e:  # a form that fails to build or run: reported, the others still measured
            rows.append({"form": form, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        r = rows[-1]
        print(f"{form:<8s} " + (f"{r['us']:9.1f} us  {r['tb_s']:5.2f} TB/s" if "us" in r else r["error"]), flush=True)
    base = next((r["us"] for r in rows if r["form"] == "tma1" and "us" in r), None)
    for r in rows:
        if base and "us" in r:
            r["vs_tma1"] = base / r["us"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"bytes": x.numel(), "stages": a.stages, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
