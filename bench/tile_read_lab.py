#!/usr/bin/env python3
"""Is the decode GEMVs' ceiling (66-77% of HBM at M = 1 on the largest products, whatever the kernel's
instruction count: bench/results/h200_session28) the order W's bytes are read in? One launch that only reads
a q8_0 weight's int8 bytes, three ways, cold (copies cycled past L2, as bench/read_floor.py):

  * flat: programs read 16 KB contiguous runs (read_floor's kernel);
  * rows: as the GEMVs read them: a program owns BLOCK_N rows (row stride K bytes) and walks K in
    [BLOCK_N, BLOCK_K] tiles (split-K: its share of K), U tiles in flight per step;
  * tiled: the same program grid and tile order over a copy stored tile-contiguous (each [BLOCK_N, BLOCK_K] tile
    BLOCK_N * BLOCK_K consecutive bytes).

    python bench/tile_read_lab.py [--out bench/results/tile_read_lab_h200.json]
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_floor import _read, cold_ms, lab_args, save_rows  # noqa: E402

SHAPES = [(32000, 3200), (14336, 4096), (4096, 14336), (8640, 3200), (3200, 8640), (4096, 4096), (3200, 3200)]
# BLOCK_N, BLOCK_K (bytes), SPLIT_K, U (tiles in flight per step), warps
CFGS = [(16, 256, 1, 4, 1), (16, 256, 4, 4, 1), (32, 256, 1, 4, 2), (32, 256, 4, 4, 2), (64, 256, 1, 2, 4),
        (16, 512, 1, 2, 1), (16, 1024, 1, 2, 2), (32, 1024, 1, 2, 4), (16, 256, 1, 8, 1),
        (64, 512, 4, 2, 4)]  # fmt: skip
HBM = 4.8e12


@triton.jit
def _tile_read_kernel(src_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      U: tl.constexpr, TILED: tl.constexpr):  # fmt: skip
    """Program (n-block, split) XOR-sums its [BLOCK_N, k-range] of an int8 [N, K] (read as int32 words) into out."""
    pid = tl.program_id(0)
    pid_n = pid // SPLIT_K
    pid_k = pid % SPLIT_K
    KW: tl.constexpr = BLOCK_K // 4
    tiles_k = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(tiles_k, SPLIT_K)
    t_lo = pid_k * per
    t_hi = tl.minimum(tiles_k, t_lo + per)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, KW)
    acc = tl.zeros([BLOCK_N, KW], dtype=tl.int32)
    for t0 in range(t_lo, t_hi, U):
        for u in tl.static_range(U):
            t = t0 + u
            if TILED:  # tile (pid_n, t) at ((pid_n * tiles_k + t) * BLOCK_N * BLOCK_K) bytes
                base = (pid_n.to(tl.int64) * tiles_k + t) * (BLOCK_N * KW)
                ptrs = src_ptr + base + rows[:, None] * KW + cols[None, :]
            else:
                ptrs = src_ptr + (pid_n * BLOCK_N + rows[:, None]).to(tl.int64) * (K // 4) + t * KW + cols[None, :]
            ok = (t < t_hi) & ((pid_n * BLOCK_N + rows[:, None]) < N) & ((t * KW + cols[None, :]) < K // 4)
            acc ^= tl.load(ptrs, mask=ok, other=0, cache_modifier=".cg")
    tl.store(out_ptr + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


def _pct(nbytes, us):
    return 100 * nbytes / (us * 1e-6) / HBM


def _tile_read(src, out, n, k, cfg, tiled):
    bn, bk, sk, u, nw = cfg
    grid = (triton.cdiv(n, bn) * sk,)
    _tile_read_kernel[grid](src, out, n, k, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, U=u, TILED=tiled, num_warps=nw)


def main(argv=None) -> int:
    args = lab_args("tile_read_lab.py", __doc__, "tile_read_lab_h200.json", argv)
    if args is None:
        return 1
    rows = []
    print("cold us (% of HBM at 4.8 TB/s) reading a weight's int8 bytes; config BLOCK_N/BLOCK_K/SPLIT_K/U/warps")
    for n, k in SHAPES:
        kp = -(-k // 1024) * 1024  # tiled copies padded to whole tiles of every config
        copies = min(32, -(-200_000_000 // (n * k)))
        srcs = [torch.randint(-128, 128, (n * kp // 4,), dtype=torch.int32, device="cuda") for _ in range(copies)]
        out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
        pct = partial(_pct, n * k)
        flat = 1e3 * cold_ms([partial(_read, s[: n * k // 4], out) for s in srcs])
        line = [f"{n:6d} x {k:6d}: flat {flat:6.2f} ({pct(flat):3.0f}%)"]
        row = dict(n=n, k=k, flat_us=flat, rows_us={}, tiled_us={})
        for cfg in CFGS:
            name = "/".join(map(str, cfg))
            t_rows = 1e3 * cold_ms([partial(_tile_read, s, out, n, k, cfg, False) for s in srcs])
            t_tiled = 1e3 * cold_ms([partial(_tile_read, s, out, n, k, cfg, True) for s in srcs])
            row["rows_us"][name], row["tiled_us"][name] = t_rows, t_tiled
            line.append(f"{name}: rows {t_rows:.2f} ({pct(t_rows):.0f}%) tiled {t_tiled:.2f} ({pct(t_tiled):.0f}%)")
        print("\n    ".join(line), flush=True)
        rows.append(row)
        del srcs
    save_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
