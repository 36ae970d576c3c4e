"""Autotuning of the q8_0 kernels (GPU only; the interpreter runs fixed small tiles), and the choice
between ways of computing the same product, measured once per shape on the device in use."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch
import triton

from .q8_0_gemm import _q8_gemm_kernel, _q8_gemm_t_kernel
from .q8_0_gemv import _q8_gemv_kernel
from .q8_0_gemv_tc import _q8_gemv_tc_kernel
from .triton_util import _INTERPRET, launch


def autotuning() -> bool:
    """LORAKIT_AUTOTUNE=0 skips every search (fixed configs, heuristic paths) for short runs."""
    return os.environ.get("LORAKIT_AUTOTUNE", "1") != "0"


def _skinny_block_m(m_bucket: int) -> int:
    return min(64, max(16, m_bucket))


# --------------------------------------------------------------------------------------------------
# autotuning (GPU only; the interpreter uses fixed configs)
# --------------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, warps, stages, group_m=8, swap=None):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}
    if swap is not None:
        kw["SWAP_AB"] = swap
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# M > 64: Hopper-sized tiles (the tensor cores are the limit); BLOCK_K covers 2 or 4 q8 blocks
_LARGE_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 256, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 128, 128, 8, 3),
    # y.T = W @ x.T: W rows are the MMA's M (BLOCK_N), tokens its N (BLOCK_M <= 256)
    _cfg(128, 128, 64, 8, 3, swap=True),
    _cfg(256, 128, 64, 8, 3, swap=True),
    _cfg(128, 256, 64, 8, 3, swap=True),
    _cfg(128, 128, 128, 8, 3, swap=True),
]
# 4 < M <= 64: memory-bound; BLOCK_M follows the bucket, wide K tiles keep many bytes in flight
_SKINNY_CONFIGS = [
    _cfg(bm, bn, bk, w, s, group_m=1)
    for bm in (16, 32, 64)
    for (bn, bk, w, s) in (
        (64, 128, 4, 4),
        (128, 64, 4, 4),
        (64, 256, 4, 3),
        (128, 128, 8, 3),
    )
] + [
    _cfg(bm, bn, bk, w, s, group_m=1, swap=True)
    for bm in (16, 32, 64)
    for (bn, bk, w, s) in ((64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3))
]
# grad-input: BLOCK_N is the reduction tile, BLOCK_K the output tile
_T_LARGE_CONFIGS = [
    _cfg(128, 64, 128, 8, 3),
    _cfg(128, 64, 128, 4, 4),
    _cfg(128, 64, 256, 8, 3),
    _cfg(256, 64, 128, 8, 3),
    _cfg(128, 128, 128, 8, 3),
]
_T_SKINNY_CONFIGS = [
    _cfg(bm, bn, bk, w, s, group_m=1)
    for bm in (16, 32, 64)
    for (bn, bk, w, s) in ((128, 64, 4, 4), (64, 128, 4, 4), (256, 64, 4, 3), (128, 128, 8, 3))
]
# M <= 2 (decode): rows per program, q8_0 blocks per K step, steps loaded together, warps, stages
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "KB": kb, "UNROLL": u}, num_warps=w, num_stages=st)
    for (bn, kb, u, w, st) in (
        (4, 16, 2, 4, 1),
        (8, 8, 2, 4, 1),
        (8, 16, 1, 4, 1),
        (16, 8, 1, 4, 1),
        (16, 8, 2, 8, 1),
        (4, 32, 1, 8, 1),
        (2, 32, 1, 4, 1),
        (2, 16, 2, 2, 1),
        (8, 8, 1, 4, 3),
        (4, 16, 1, 4, 3),
        (32, 4, 2, 8, 1),
        (1, 32, 2, 2, 1),
        (4, 32, 2, 4, 1),  # more bytes in flight per program: 8 KB per unrolled step
        (8, 16, 2, 8, 1),
        (2, 64, 1, 8, 1),
        (16, 16, 1, 8, 1),
    )
]

# M <= 16, bf16/fp16 (decode): the tensor-core gemv. Rows of W per program (16 per warp), K tile, programs per
# N block (split-K), stages. First: the best all-round config at the 3B decode shapes (bench/results/h200_session8)
_GEMV_TC_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=bn // 16, num_stages=st)
    for (bn, bk, sk, st) in (
        (32, 128, 8, 4),
        (32, 256, 1, 4),
        (16, 256, 1, 4),
        (32, 512, 1, 3),
        (32, 256, 2, 4),
        (32, 256, 4, 4),
        (64, 256, 4, 3),
        (16, 256, 4, 4),
        (64, 128, 4, 4),
        (16, 128, 8, 4),
        # split counts outside the powers of two (K = 3200 / 8640 is 12.5 / 33.75 tiles of 256: 5 or 6 splits
        # leave fewer tiles per program), more, smaller splits for narrow N (1024), and 3 stages (less shared
        # memory per program). Each was the fastest at one of the 3B / 8B decode shapes at M = 1 or 16, 4-27%
        # below the list above (bench/results/h200_session27, calls 1, 2 and 4)
        (16, 256, 5, 4),
        (32, 128, 5, 4),
        (32, 128, 10, 4),
        (32, 256, 8, 3),
        (32, 256, 16, 3),
        (32, 256, 5, 4),
        (16, 128, 5, 3),
        (16, 128, 6, 3),
        (32, 128, 5, 3),
        (32, 128, 6, 3),
    )
]
TC_TILES = sorted({(c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"]) for c in _GEMV_TC_CONFIGS})  # the scratch covers any


def _bench_graph(kernel_call, quantiles):
    """The autotuner's timing for decode-sized kernels: GPU time of CUDA-graph replays. triton's default
    (do_bench: eager launches) measured the ~20 us Python launch more than these 5-40 us kernels and picked
    configs up to 2.5x slower than the best (bench/results/h200_session8/call1_gemv_tc_lab.log).
    do_bench_cudagraph launches on a new stream that does not wait for the caller's: the device is synchronized
    first, or the timed launches would read inputs still being written and write into memory (the output, the
    split-K scratch) that the caller's stream had freed but may still be using (it corrupted a product's
    reference in bench/results/h200_session8/call4_kernels_decode.log)."""
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(kernel_call, rep=10, quantiles=quantiles)


# weights below this many elements are not worth a search (compiling the candidates costs seconds; the
# product costs microseconds): they take the first config of their list
SMALL_WEIGHT = 1 << 21


def _prune_small(configs, named_args, **kwargs):
    return configs[:1] if named_args["N"] * named_args["K"] < SMALL_WEIGHT else configs


def _prune_skinny(configs, named_args, **kwargs):
    bm = _skinny_block_m(named_args["M_BUCKET"])
    return _prune_small([c for c in configs if c.kwargs["BLOCK_M"] == bm], named_args)


def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


def _even_n(args):
    return args["N"] % args["BLOCK_N"] == 0


def _quick(configs, **want):
    """One config per BLOCK_M: the ones that won most often on the H200 (bench/results)."""
    out, seen = [], set()
    for c in configs:
        kw = c.kwargs
        if all(kw.get(k) == v for k, v in want.items()) and kw["BLOCK_M"] not in seen:
            seen.add(kw["BLOCK_M"])
            out.append(c)
    return out or configs[:1]


@functools.cache
def _tuned():
    """The autotuned kernels (built on first GPU use). LORAKIT_AUTOTUNE=0 skips the search and uses
    the configs that won most often on the H200 (for short runs where tuning time would dominate)."""
    large, skinny_cfgs, t_large, t_skinny = _LARGE_CONFIGS, _SKINNY_CONFIGS, _T_LARGE_CONFIGS, _T_SKINNY_CONFIGS
    gemv, gemv_tc = _GEMV_CONFIGS, _GEMV_TC_CONFIGS
    if not autotuning():
        large, t_large, gemv, gemv_tc = large[:1], t_large[:1], gemv[1:2], gemv_tc[:1]
        skinny_cfgs = _quick(skinny_cfgs, BLOCK_N=64, BLOCK_K=256, SWAP_AB=True)
        t_skinny = _quick(t_skinny, BLOCK_N=128, BLOCK_K=64)
    gemm = triton.heuristics({"EVEN_K": _even_k})(_q8_gemm_kernel)
    gemm_t = triton.heuristics({"EVEN_N": _even_n})(_q8_gemm_t_kernel)
    key = ["M_BUCKET", "N", "K"]
    skinny = {"early_config_prune": _prune_skinny}
    small = {"early_config_prune": _prune_small}
    # results are cached on disk with the compiled kernels (triton's cache dir): a later process skips
    # the search for a key it has seen
    tune = functools.partial(triton.autotune, cache_results=True)
    return {
        "gemm_large": tune(large, key=key, prune_configs_by=small)(gemm),
        "gemm_skinny": tune(skinny_cfgs, key=key, prune_configs_by=skinny)(gemm),
        "gemm_t_large": tune(t_large, key=key, prune_configs_by=small)(gemm_t),
        "gemm_t_skinny": tune(t_skinny, key=key, prune_configs_by=skinny)(gemm_t),
        "gemv": tune(gemv, key=["N", "K"], prune_configs_by=small)(_q8_gemv_kernel),
        "gemv_tc": tune(gemv_tc, key=["M", "N", "K"], prune_configs_by=small, do_bench=_bench_graph)(
            _q8_gemv_tc_kernel
        ),
    }


# fixed tiles for the CPU interpreter: small, so the tests' odd shapes hit every mask
_INTERP_GEMM_T = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}
_INTERP_GEMM = {**_INTERP_GEMM_T, "SWAP_AB": False}
_INTERP_GEMV = {"BLOCK_N": 16, "KB": 2, "UNROLL": 1}
_INTERP_GEMV_TC = {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 1, "num_stages": 2}


# best autotuned config per launch key: later calls skip the Autotuner/Heuristics wrappers (their
# Python overhead is tens of microseconds, comparable to a decode-sized kernel)
_BEST: dict[tuple, triton.Config] = {}
_META: dict[tuple, dict] = {}  # ... as the raw kernel's constexprs and options


def _launch_tuned(name: str, raw, grid_fn, args: tuple, const: dict, key: tuple, even: tuple[str, str, int] | None):
    """Launch the autotuned kernel `name` (first time per key), then the raw kernel with its best config
    (`even`: the heuristic flag the raw kernel needs, as (flag, BLOCK_* it depends on, length))."""
    best = _BEST.get(key)
    if best is None:
        tuned = _tuned()[name]
        tuned[grid_fn](*args, **const)
        _BEST[key] = tuned.best_config
        return
    meta = _META.get(key)
    if meta is None:
        meta = best.all_kwargs()
        if even is not None:
            flag, block, length = even
            meta[flag] = length % meta[block] == 0
        _META[key] = meta
    launch(raw, grid_fn(meta), args, {**const, **meta})


def _tiles(defaults: dict, cfg: dict) -> dict:
    """The fixed (interpreter / forced) tiles: defaults overridden by cfg's BLOCK_*/GROUP_M entries."""
    return {key: cfg.get(key, val) for key, val in defaults.items()}


# the Gluon kernel's config per (M bucket, N, K, dtypes, LoRA), measured once (pick_wgmma_config)
_WGMMA_BEST: dict[tuple, dict] = {}


def pick_wgmma_config(key: tuple, run: Callable[[dict], object], configs: list[dict]) -> dict:
    """The fastest of configs (q8_0_wgmma.configs_for the product) for this key (run(cfg) computes the product with
    it), timed once (eager launches, as the products are launched) and kept: later calls with the key return it;
    the first config without a search (LORAKIT_AUTOTUNE=0, inside CUDA-graph capture)."""
    best = _WGMMA_BEST.get(key)
    if best is not None:
        return best
    if not autotuning() or torch.cuda.is_current_stream_capturing():
        return configs[0]
    best = _WGMMA_BEST[key] = _fastest(configs, run)
    return best


WALL_CALLS = 8  # calls per timed round of _fastest(wall=True)


def _fastest(options: list, run: Callable[[object], object], wall: bool = False, sync: Callable | None = None):
    """The option whose run(option) takes least GPU time (eager launches, as the products are launched), each run
    once first outside the timing (its kernels compile and autotune; that synchronizes). wall: least wall time per
    call of back-to-back eager calls instead (host and GPU together: what a caller whose host is the limit pays;
    best of three rounds of WALL_CALLS; sync: waits for the device, torch.cuda.synchronize by default)."""
    if not wall:
        times = []
        for opt in options:
            run(opt)
            times.append(triton.testing.do_bench(lambda opt=opt: run(opt), warmup=3, rep=15))
        return options[times.index(min(times))]
    sync = sync or torch.cuda.synchronize
    for opt in options:
        run(opt)
    best = {}
    for _ in range(3):
        for opt in options:
            sync()
            t0 = time.perf_counter()
            for _ in range(WALL_CALLS):
                run(opt)
            sync()
            best[opt] = min(best.get(opt, float("inf")), time.perf_counter() - t0)
    return min(options, key=best.__getitem__)


# the fastest path per product key, measured once (see choose_path)
_PATH: dict[tuple, str] = {}


def choose_path(key: tuple, paths: list[str], run: Callable[[str], object], default: str, wall: bool = False) -> str:
    """The fastest of `paths` for this product (run(path) computes it along one), timed once per key on
    the GPU (wall: by the wall time of back-to-back eager calls, _fastest). Each path's first run autotunes its own
    kernel. Without a search (interpreter, LORAKIT_AUTOTUNE=0, a single candidate, or inside CUDA-graph capture, where
    nothing may synchronize) `default` is used."""
    best = _PATH.get(key)
    if best is not None:
        return best
    small = key[2] * key[3] < SMALL_WEIGHT  # key = (op, m, n, k, ...)
    if len(paths) == 1 or small or _INTERPRET or not autotuning() or torch.cuda.is_current_stream_capturing():
        return default if default in paths else paths[0]
    best = _PATH[key] = _fastest(paths, run, wall)
    return best
