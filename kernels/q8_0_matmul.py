"""q8_0 matrix products that read the quantized weight directly (int8 qs + fp16 d).

Storage (lorakit.quant.Q8Weight): qs int8 [N, K] (row-major, K contiguous), d fp16 [N, K/32], one
scale per block of 32 along K; W[n, k] = qs[n, k] * d[n, k // 32].

Ops (each launcher: check -> allocate -> pick a path -> launch):
  q8_0_matmul(x, qs, d, a, b, scale)   y[M, N]  = x[M, K] @ W.T  (+ scale * (x @ a) @ b.T)
  q8_0_matmul_grad_input(dy, qs, d)     dx[M, K] = dy[M, N] @ W
  q8_0_dequantize(qs, d, dtype, index)  rows of W (all, or W[index] for an embedding lookup)

Numerics: W is dequantized in fp32 (qs * d, exact) and rounded once to the activation dtype (as
lorakit.quant.dequantize_q8_0(qs, d, x.dtype) does); products are accumulated in fp32 and the result is
rounded once to the output dtype. fp32 activations use IEEE fp32 products (no tf32). Against cpu-torch:
identical W for fp32/fp16; for bf16 cpu-torch's matmul forms rnd(qs * rnd(d)) (d converted to bf16
first), which differs from rnd(qs * d) by <= 3 * 2^-8 relative.

Paths (kernels in q8_0_gemv_tc.py, q8_0_gemv.py, q8_0_gemm.py; the choice between candidates is measured once
per shape on the device, q8_0_tuning.choose_path):
  * "gemv_tc" (M <= GEMV_TC_MAX_M, bf16/fp16 activations, decoding): W streamed once through shared memory,
    dequantized in registers into the MMA's operand (one PRMT, one FFMA, half a packed conversion per element),
    all rows of x in one MMA tile; split-K (autotuned), the partials summed in a fixed order by the last
    program of each N block (deterministic). 1.19-1.28x faster than the FMA gemv at four of the five 3B decode
    shapes, 0.96x at 3200 x 3200 (bench/results/gemv_tc_lab_h200.json).
  * "gemv" (M <= GEMV_MAX_M: fp32 activations, or bf16/fp16 with t = x @ a still to be formed): FMA reduction
    streaming W once per token, no split-K; forms t in its own launch (t-programs).
  * "skinny" (M <= 64) and "large": tutorial-03 style tiled tensor-core matmul; the K tile covers whole
    q8_0 blocks, dequantized in registers. Autotuned per (M bucket, N, K), with SWAP_AB configs that
    compute y.T = W @ x.T (the dequantized tile as the MMA's A operand). When the output tiles cannot
    fill the SMs, K is split (power of two) and the fp32 partials are summed in a fixed order
    (deterministic: no atomics).
  * "wgmma" (M > 64, bf16/fp16 activations, sm_90; q8_0_wgmma.py, Gluon): the tiled product with each W tile's
    dequantization overlapping the previous tile's wgmma (x and W's int8 tiles by TMA into a ring; where
    K % 64 == 0 the dequantized tile is the wgmma's register operand, else it goes through two shared-memory
    buffers). Its config is measured per (M bucket, N, K) among configs_for(K). The same numbers as "large"
    (W rounded once, fp32 accumulation, the LoRA term in the accumulator), up to the summation order.
    The input gradient has one too (dx.T = W.T @ dy.T, W's transposed tile as the register operand; K % 64 == 0,
    N % 8 == 0): 65-74% of cuBLAS at M >= 2048 where the triton kernel reaches 37-47%, but a candidate only
    with LORAKIT_GLUON_GRAD=1 (wgmma_grad_ok: measured slower end to end).
  * "dequant" (M >= DEQUANT_MIN_M, compute-bound): W is dequantized into a transient buffer in the
    activation dtype (freed after the product, or kept among a DequantCache's last few for the backward
    of a recomputed layer; never a float copy of the model) and multiplied by cuBLAS. At large M the
    product costs O(M) times the dequantization, and cuBLAS's Hopper kernels beat the fused kernel there;
    whether it is taken is measured per shape.
    Numerics: the same W; cuBLAS accumulates in fp32 (and, with torch's default
    allow_bf16_reduced_precision_reduction, may add split-K partials in bf16).
  * LoRA (optional): t = x @ a is a tiny [M, r] torch matmul (the FMA gemv forms it in its own launch,
    q8_0_gemv's t-programs); the kernels add scale * t @ b.T to the fp32 accumulator (so y is rounded once);
    the dequant path adds it with one addmm.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors with fixed small tiles (no autotuning). Two
triton 3.6 interpreter bugs are worked around there: its dot multiplies the raw uint16 bits of bf16
operands (so bf16 tiles are widened to fp32 after the bf16 rounding: the same arithmetic as the GPU's
bf16 MMA), and its fp32 -> bf16 cast truncates (EMU_BF16 rounds to nearest-even first, as the GPU does).
"""

from __future__ import annotations

import functools
import os

import torch

from .q8_0_dequant import DequantCache, _check_weight, q8_0_dequantize
from .q8_0_gemm import _q8_gemm_kernel, _q8_gemm_t_kernel
from .q8_0_gemv import _q8_gemv_kernel
from .q8_0_gemv_tc import _q8_gemv_tc_kernel
from .q8_0_tuning import (
    _BEST,
    _INTERP_GEMM,
    _INTERP_GEMM_T,
    _INTERP_GEMV,
    _INTERP_GEMV_TC,
    TC_TILES,
    _launch_tuned,
    _skinny_block_m,
    _tiles,
    choose_path,
    pick_wgmma_config,
)
from .triton_util import (
    _INTERPRET,
    ACT_DTYPES,
    QK,
    Prefetch,
    cdiv,
    gluon_enabled,
    interpreting,
    launch,
    next_pow2,
    pdl,
    prefetch_launch,
)

__all__ = [
    "QK",
    "MAX_FUSED_RANK",
    "interpreting",
    "q8_0_matmul",
    "q8_0_matmul_grad_input",
    "q8_0_dequantize",
    "DequantCache",
    "_BEST",
]

MAX_FUSED_RANK = 64  # LoRA ranks above this are added by a separate torch matmul
GEMV_MAX_M = 2  # rows of x up to which the gemv kernel is a candidate
GEMV_TC_MAX_M = 16  # ... and the tensor-core gemv (bf16/fp16 activations)
DEQUANT_MIN_M = 256  # rows of x from which dequantize + cuBLAS is a candidate
DEQUANT_DEFAULT_M = 1024  # ... and the choice without a measurement (LORAKIT_AUTOTUNE=0)
# shared_dequant (a checkpointed training step's products): the chooser times each product alone, the
# dequantization D inside the dequantize + cuBLAS path's time (D + C), against a fused kernel's F. In the step a
# weight's forward runs twice (the checkpointed pass and its recompute) and its input gradient once, right after the
# recompute, on the DequantCache's copy: 2D + 2C + G on dequantize + cuBLAS against 2F + D + G with a fused forward,
# so dequantize + cuBLAS is faster wherever F > C + D/2, while the chooser takes it only where F > C + D. At 256 rows
# the two are near and the measured choice flipped between runs (4 x 64 seed step: 8,118 / 9,871 tok/s for the same
# code, 8,352-9,300 for main). Every product there on dequantize + cuBLAS: 9,047 / 9,072 tok/s against the chooser's
# 8,503 / 8,487, alternating in one call, the same peak memory (bench/results/h200_session32/).

# --------------------------------------------------------------------------------------------------
# launch planning
# --------------------------------------------------------------------------------------------------


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if _INTERPRET or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _m_bucket(m: int) -> int:
    """Autotune bucket of M: the next power of two, capped at 8192."""
    return min(8192, next_pow2(max(1, m)))


def _split(tiles: int, k_tiles: int, target: int, max_split: int = 16) -> int:
    """Power-of-two split of the reduction so that tiles * split reaches `target` programs, keeping at
    least 4 reduction tiles per split (1 when the tiles alone fill the GPU)."""
    s = 1
    while s < max_split and tiles * s * 2 <= target and k_tiles // (s * 2) >= 4:
        s *= 2
    return s


@functools.lru_cache(maxsize=4096)
def _split_for(path: str, m: int, n_out: int, n_red: int, device: torch.device) -> int:
    """Split of the reduction for the tiled paths; depends on (bucket, N, K) only (the autotune key)."""
    if path not in ("skinny", "large"):
        return 1
    sms = _num_sms(device.index if device.type == "cuda" else None)
    mb = _m_bucket(m)
    if path == "skinny":
        tiles = cdiv(mb, _skinny_block_m(mb)) * cdiv(n_out, 64)
        return _split(tiles, cdiv(n_red, 64), 2 * sms)
    tiles = cdiv(mb, 128) * cdiv(n_out, 128)
    return _split(tiles, cdiv(n_red, 64), sms)


def _candidates(
    m: int,
    same_dtype: bool,
    gemv: bool,
    half: bool = False,
    t_in_launch: bool = False,
    wgmma: bool = False,
    shared_dequant: bool = False,
) -> tuple[list[str], str]:
    """(paths that can compute an [m, *] product, the default without a measurement: below DEQUANT_DEFAULT_M rows
    the tiled kernel, one launch with little host work).
    shared_dequant: q8_0_matmul's (a checkpointed training step): dequantize + cuBLAS alone where it is a candidate.
    half: the activations are bf16/fp16 (the tensor-core gemv's products are exact only for those).
    wgmma: the Gluon kernel can compute this product (wgmma_ok): a candidate above 64 rows, taken only where measured
    faster, never the default (as the default the fixed-tile prefill fell to 10.5k tok/s from 12.2k-16.4k: its
    launch builds TMA descriptors on the host; bench/results/h200_session12/call3_prefill_fixed.log).
    t_in_launch: a LoRA term whose t = x @ a is still to be formed: up to GEMV_MAX_M rows the FMA gemv forms it
    in its launch at less cost (a decode step with two adapters: 2.42 ms with it, 2.84 ms when the tensor-core
    gemv formed t in its launch, a variant since removed; bench/results/h200_session8)."""
    if gemv and half and m <= GEMV_TC_MAX_M and not (t_in_launch and m <= GEMV_MAX_M):
        return ["gemv_tc"], "gemv_tc"
    if gemv and m <= GEMV_MAX_M:
        # one row: the GEMV is 1.3-2x faster than the tiled kernel at every measured shape (bench/gemv_lab.py's
        # tiled column), and timing them against each other measured the Python launch (longer than either
        # kernel), not the GPU: one run took the tiled kernel's time (2x) for a 9600 x 3200 product
        return (["gemv"] if m == 1 else ["gemv", "skinny"]), "gemv"
    if _m_bucket(m) <= 64:
        return ["skinny"], "skinny"
    tiled = ["large", "wgmma"] if wgmma else ["large"]  # "wgmma" only where measured faster: never the default
    if m >= DEQUANT_MIN_M and same_dtype:
        if shared_dequant:
            return ["dequant"], "dequant"
        return [*tiled, "dequant"], "dequant" if m >= DEQUANT_DEFAULT_M else "large"
    return tiled, "large"


def _forced_path(cfg: dict, m: int) -> str:
    """config={"path": ...} from the tests: "gemm" is the tiled kernel at m's size class."""
    p = cfg["path"]
    return ("skinny" if _m_bucket(m) <= 64 else "large") if p == "gemm" else p


# --------------------------------------------------------------------------------------------------
# checks and helpers
# --------------------------------------------------------------------------------------------------


def _check_act(x: torch.Tensor, k: int, qs: torch.Tensor, what: str) -> None:
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{what} has shape {tuple(x.shape)}; its last axis must be {k} (W {tuple(qs.shape)})")
    if x.device != qs.device:
        raise ValueError(f"{what} is on {x.device} but the weight is on {qs.device}")
    if not _INTERPRET and x.device.type != "cuda":
        raise ValueError(f"{what} must be a CUDA tensor (or set TRITON_INTERPRET=1 before importing triton)")


def _reduce_splits(parts: torch.Tensor, out: torch.Tensor) -> None:
    """out = sum of the fp32 split-K partials (in a fixed order: deterministic), rounded once."""
    if out.dtype == torch.float32:
        torch.sum(parts, dim=0, out=out)
    else:
        out.copy_(parts.sum(dim=0))


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# y = x @ W.T
# --------------------------------------------------------------------------------------------------


def _dequantized(qs, d, dtype, cache: DequantCache | None) -> torch.Tensor:
    return q8_0_dequantize(qs, d, dtype) if cache is None else cache.get(qs, d, dtype)


# the GEMV kernels' sync words (the FMA gemv's t-program flags and counts, three int32 per row of x; the
# tensor-core gemv's split-K counters, one per N block), zero between launches, per (device, stream): launches on
# one stream run one after another, so they can share them. A buffer outgrown is kept, not freed: a CUDA graph
# captured with it keeps using it, and freed memory could be handed to a later tensor of the same capture.
_SYNC: dict[tuple, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def _sync_words(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    buf = _SYNC.get((device, stream))
    if buf is None or buf.numel() < n:
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = _SYNC[(device, stream)] = torch.zeros(max(2 * n, 64), dtype=torch.int32, device=device)
    return buf


def _gemv(x2, qs, d, y, lora, cfg: dict, prefetch: Prefetch | None = None) -> None:
    """The gemv path; without a formed t, t = x @ a is formed by the launch's own t-programs."""
    m, k = x2.shape
    n = qs.shape[0]
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    t, a, bb, r, s = lora if lora is not None else (y, y, y, 0, 0.0)  # dummies, never read without HAS_LORA
    block_r = max(1, next_pow2(r))
    t_prog = lora is not None and t is None
    splits, block_kt, ws, sync = 0, 1, y, y
    if t_prog:
        block_kt = int(cfg.get("BLOCK_KT", max(16, 4096 // block_r)))
        splits = cdiv(k, block_kt)
        t = torch.empty(m, r, dtype=x2.dtype, device=x2.device)
        ws = torch.empty(m, splits, block_r, dtype=torch.float32, device=x2.device)
        sync = _sync_words(x2.device, 3 * m)
    forced = _INTERPRET or "BLOCK_N" in cfg
    key = ("gemv", m, n, k, x2.dtype, y.dtype, lora is not None, t_prog)
    pf_args, extra, kind = prefetch_launch(prefetch if forced or key in _BEST else None, qs)  # not while tuning
    args = (x2, qs, d, y, t, bb, n, k, x2.stride(0), qs.stride(0), d.stride(0), y.stride(0), y.stride(1),
            t.stride(0), t.stride(1), bb.stride(0), bb.stride(1), r, float(s),
            a, a.stride(0), a.stride(1), ws, sync, splits, *pf_args)  # fmt: skip
    const = dict(HAS_LORA=lora is not None, BLOCK_R=block_r, EMU_BF16=_INTERPRET, T_PROG=t_prog,
                 BLOCK_KT=block_kt, BLOCK_S=next_pow2(max(1, splits)), PREFETCH=kind, **pdl(x2.device))  # fmt: skip
    if forced:
        tiles = _tiles(_INTERP_GEMV, cfg)
        launch(_q8_gemv_kernel, (splits + cdiv(n, tiles["BLOCK_N"]) + extra, m), args, {**const, **tiles})
    else:
        grid = lambda meta: (splits + cdiv(n, meta["BLOCK_N"]) + extra, m)  # noqa: E731
        _launch_tuned("gemv", _q8_gemv_kernel, grid, args, const, key, None)


def _d_align(d: torch.Tensor) -> int:
    """The bytes (2, 4, 8 or 16) that d's start and every row of it are aligned to."""
    a = 16
    while a > 2 and (d.data_ptr() % a or (d.stride(0) * 2) % a):
        a //= 2
    return a


def _gemv_tc(x2, qs, d, y, lora, cfg: dict, prefetch: Prefetch | None = None) -> None:
    """The tensor-core gemv path (q8_0_gemv_tc): all rows of x in each program; t = x @ a formed (by _fwd);
    split-K partials combined by the last program of each N block."""
    m, k = x2.shape
    n = qs.shape[0]
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    t, _, bb, r, s = lora if lora is not None else (y, y, y, 0, 0.0)  # dummies, never read without HAS_LORA
    forced = _INTERPRET or any(key in cfg for key in _INTERP_GEMV_TC)
    key = ("gemv_tc", m, n, k, x2.dtype, y.dtype, lora is not None)
    tiles = _tiles(_INTERP_GEMV_TC, cfg) if forced else (_BEST[key].kwargs if key in _BEST else None)
    # split-K scratch (for every config before the autotuning): partial tiles [N blocks, SPLIT_K, BLOCK_N, BLOCK_M],
    # a counter per N block
    block_m = max(8, next_pow2(m))
    shapes = [(tiles["BLOCK_N"], tiles["SPLIT_K"])] if tiles else TC_TILES
    counts = _sync_words(x2.device, max(cdiv(n, bn) for bn, _ in shapes))
    numel = max(cdiv(n, bn) * bn * sk * block_m if sk > 1 else 1 for bn, sk in shapes)
    parts = torch.empty(numel, dtype=torch.float32, device=x2.device)
    pf_args, extra, kind = prefetch_launch(prefetch if tiles else None, qs)  # not while tuning
    args = (x2, qs, d, y, t, bb, parts, counts, m, n, k, x2.stride(0), qs.stride(0), d.stride(0), y.stride(0),
            y.stride(1), t.stride(0), t.stride(1), bb.stride(0), bb.stride(1), r, float(s), *pf_args)  # fmt: skip
    const = dict(BLOCK_M=block_m, HAS_LORA=lora is not None, BLOCK_R=max(16, next_pow2(r)), EMU_BF16=_INTERPRET,
                 D_ALIGN=_d_align(d), PREFETCH=kind, **pdl(x2.device))  # fmt: skip
    if forced:
        launch(_q8_gemv_tc_kernel, (cdiv(n, tiles["BLOCK_N"]) * tiles["SPLIT_K"] + extra,), args, {**const, **tiles})
    else:
        grid = lambda meta: (cdiv(n, meta["BLOCK_N"]) * meta["SPLIT_K"] + extra,)  # noqa: E731
        _launch_tuned("gemv_tc", _q8_gemv_tc_kernel, grid, args, const, key, None)


@functools.cache
def _sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def wgmma_ok(x2: torch.Tensor, qs: torch.Tensor, r: int) -> bool:
    """Whether the Gluon kernel (q8_0_wgmma) can compute y = x2 @ W.T here: an sm_90 GPU (not the interpreter),
    bf16/fp16 activations, W's int8 rows where TMA can read them (16-byte aligned), a LoRA rank <= 32 (its
    tiles share the shared memory with the pipeline's), and the Gluon kernels enabled (triton_util.gluon_enabled:
    LORAKIT_GLUON=0 switches the path off, for benchmarks that compare with and without)."""
    if _INTERPRET or x2.device.type != "cuda" or x2.dtype not in (torch.bfloat16, torch.float16) or r > 32:
        return False
    if not gluon_enabled():
        return False
    return _sm90(x2.device.index or 0) and qs.stride(1) == 1 and qs.stride(0) % 16 == 0 and qs.data_ptr() % 16 == 0


def _wgmma(x2, qs, d, y, lora, cfg: dict) -> None:
    """The Gluon path; lora = (t, a, b, r, scale) with t formed."""
    from .q8_0_wgmma import configs_for, wgmma_matmul

    m, k = x2.shape
    lo = None if lora is None else (lora[0], lora[2], lora[4])
    if "BLOCK_N" in cfg:
        wgmma_matmul(x2, qs, d, y, lo, cfg)
        return
    configs = configs_for(k, d)
    key = (_m_bucket(m), qs.shape[0], k, x2.dtype, y.dtype, lora is not None, len(configs))
    best = pick_wgmma_config(key, lambda c: wgmma_matmul(x2, qs, d, y, lo, c), configs)
    wgmma_matmul(x2, qs, d, y, lo, best)


def _fwd(
    path: str, x2, qs, d, y, lora, cfg: dict, cache: DequantCache | None = None, prefetch: Prefetch | None = None
) -> None:
    """y[M, N] = x2 @ W.T (+ LoRA) along `path`; lora = (t [M, r] or None, a [K, r], b [N, r], r, scale) or
    None, a and b in x2's dtype; t = x2 @ a is formed here when not given."""
    m, k = x2.shape
    n = qs.shape[0]
    if path == "gemv":
        _gemv(x2, qs, d, y, lora, cfg, prefetch)
        return
    if lora is not None and lora[0] is None:
        lora = (x2 @ lora[1], *lora[1:])
    if path == "gemv_tc":
        _gemv_tc(x2, qs, d, y, lora, cfg, prefetch)
        return
    if path == "wgmma":
        _wgmma(x2, qs, d, y, lora, cfg)
        return
    if path == "dequant":
        torch.matmul(x2, _dequantized(qs, d, x2.dtype, cache).T, out=y)
        if lora is not None:
            t, _, bb, _, s = lora
            y.addmm_(t, bb.T, alpha=s)
        return
    if lora is None:  # dummies, never read without HAS_LORA
        t, bb, r, lora_args = y, y, 0, (0, 0, 0, 0, 0, 0.0)
    else:
        t, _, bb, r, s = lora
        lora_args = (*t.stride(), *bb.stride(), r, float(s))
    split = int(cfg["SPLIT_K"]) if "SPLIT_K" in cfg else _split_for(path, m, n, k, x2.device)
    out = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    ys, ym, yn = out.stride() if split > 1 else (0, *out.stride())
    args = (x2, qs, d, out, t, bb, m, n, k, _m_bucket(m), *x2.stride(), qs.stride(0), d.stride(0), ys, ym, yn,
            *lora_args)  # fmt: skip
    const = dict(
        SPLIT_K=split,
        HAS_LORA=lora is not None,
        BLOCK_R=max(16, next_pow2(r)),
        DOT_F32=_dot_f32(x2.dtype),
        EMU_BF16=_INTERPRET,
    )
    if _INTERPRET or "BLOCK_N" in cfg:
        tiles = _tiles(_INTERP_GEMM, cfg)
        grid = (cdiv(m, tiles["BLOCK_M"]) * cdiv(n, tiles["BLOCK_N"]), split)
        launch(_q8_gemm_kernel, grid, args, {**const, **tiles, "EVEN_K": k % tiles["BLOCK_K"] == 0})
    else:
        name = "gemm_skinny" if path == "skinny" else "gemm_large"
        key = (name, _m_bucket(m), n, k, x2.dtype, out.dtype, lora is not None, split)
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
        _launch_tuned(name, _q8_gemm_kernel, grid, args, const, key, ("EVEN_K", "BLOCK_K", k))
    if split > 1:
        _reduce_splits(out, y)


def fwd_path(x2: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, y: torch.Tensor, lora, host_bound: bool,
             cfg: dict | None = None, shared_dequant: bool = False) -> str:  # fmt: skip
    """The path of y[M, N] = x2 @ W.T (+ LoRA) that q8_0_matmul takes (choose_path: measured once per key, which
    may run the candidates into y). lora = (t or None, a, b, r, scale) as _fwd takes it, or None; cfg: _fwd's;
    shared_dequant: q8_0_matmul's."""
    m, k = x2.shape
    n = qs.shape[0]
    has_lora = lora is not None
    half = x2.dtype in (torch.bfloat16, torch.float16)
    t_in = has_lora and lora[0] is None
    gl_ok = m > 64 and wgmma_ok(x2, qs, lora[3] if has_lora else 0)
    paths, default = _candidates(m, y.dtype == x2.dtype, True, half, t_in, gl_ok, shared_dequant)
    # gl_ok in the key: a product the Gluon kernel cannot compute (a LoRA rank above 32, say) never reuses the
    # "wgmma" measured for another of the same shape
    key = ("fwd", m if m <= GEMV_TC_MAX_M else _m_bucket(m), n, k, x2.dtype, y.dtype, has_lora, t_in, host_bound,
           gl_ok)  # fmt: skip
    return choose_path(key, paths, lambda p: _fwd(p, x2, qs, d, y, lora, cfg or {}), default, wall=host_bound)


def q8_0_matmul_into(
    path: str, x2: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, y: torch.Tensor, dequant_cache=None
) -> None:
    """y[M, N] = x2[M, K] @ W.T along `path` (fwd_path's), unchecked, no LoRA: x2 with unit column stride, y
    contiguous [M, N] in x2's dtype. For callers that checked the operands once (a prompt's lean forward)."""
    _fwd(path, x2, qs, d, y, None, {}, dequant_cache)


def q8_0_matmul(
    x: torch.Tensor,
    qs: torch.Tensor,
    d: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    scale: float = 0.0,
    out_dtype: torch.dtype | None = None,
    *,
    config: dict | None = None,
    host_bound: bool = False,
    dequant_cache: DequantCache | None = None,
    lora_t: torch.Tensor | None = None,
    prefetch: Prefetch | None = None,
    shared_dequant: bool = False,
) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W.T (+ scale * (x @ a) @ b.T), W = q8_0(qs, d) of shape [N, K].

    a: (K, r), b: (N, r) (llama.cpp's lora_a / lora_b layout). fp32 accumulation; y in out_dtype
    (default x.dtype). `config` forces a path/tiles (tests): {"path": "gemv"|"gemm"|"dequant",
    "SPLIT_K": s, plus BLOCK_* entries}. host_bound: eager launches where the host is the limit (a prefill): the
    path is chosen by the wall time of back-to-back eager calls, host and GPU together (choose_path(wall=True)),
    not by GPU time; every path computes the same numbers. dequant_cache: where the dequantize + cuBLAS path
    keeps its dequantized weights for reuse (DequantCache; None: a transient copy per product). lora_t: x @ a
    in x's dtype ([rows, r]) where the caller already formed it (LoraLinear keeps it for its backward).
    prefetch: an L2 hint for the next product's weight (triton_util.Prefetch), carried by the GEMV paths' launch
    (a decode step's); no effect on the result. shared_dequant: the product is one of a checkpointed training step,
    whose recomputed forward and input gradient share dequant_cache's copy of W: dequantize + cuBLAS wherever it
    is a candidate, unmeasured (see DEQUANT_DEFAULT_M).
    """
    n, k = _check_weight(qs, d)
    _check_act(x, k, qs, "x")
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]

    has_lora = a is not None and float(scale) != 0.0
    extra = None
    if has_lora:
        ok = b is not None and a.dim() == 2 and b.dim() == 2
        if not ok or a.shape[0] != k or b.shape[0] != n or a.shape[1] != b.shape[1]:
            raise ValueError(
                f"LoRA factors must be a ({k}, r) and b ({n}, r), got {tuple(a.shape)} and "
                f"{None if b is None else tuple(b.shape)}"
            )
        if a.shape[1] > MAX_FUSED_RANK:  # rare: keep the kernel's register tile small, add it outside
            extra = float(scale) * ((x2 @ a.to(x.dtype)) @ b.to(x.dtype).T)
            has_lora = False
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    lora = None
    if has_lora:
        # t = x @ a [M, r] in x's dtype, as the spec forms it (by the path, when not given)
        t = None if lora_t is None else lora_t.reshape(m, a.shape[1])
        lora = (t, a.to(x.dtype), b.to(x.dtype), a.shape[1], float(scale))

    cfg = dict(config or {})
    path = _forced_path(cfg, m) if "path" in cfg else fwd_path(x2, qs, d, y, lora, host_bound, cfg, shared_dequant)
    _fwd(path, x2, qs, d, y, lora, cfg, dequant_cache, prefetch)
    if extra is not None:
        y += extra.to(out_dtype)
    return y.reshape(*lead, n)


# --------------------------------------------------------------------------------------------------
# dx = dy @ W
# --------------------------------------------------------------------------------------------------


def wgmma_grad_ok(dy2: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether the Gluon kernel can compute dx = dy2 @ W here: as wgmma_ok (no LoRA term), dy's rows a multiple of
    16 bytes (TMA reads its tiles; N % 8 == 0), and K % 64 == 0 with W's scale rows readable as int32 words (its
    tiles span 64 columns of W: two scales per row). A candidate only with LORAKIT_GLUON_GRAD=1: timed alone it beats
    dequantize + cuBLAS at M = 256 for some products (the down projection's), but the finetune step at 4 x 64 measured
    5% slower with it (8,659-8,860 against 9,307-9,316 tok/s, bench/results/h200_session25/call4-5; its profile:
    53 us per product where cuBLAS took 28 us, and no fewer dequantizations in the step, call6)."""
    if os.environ.get("LORAKIT_GLUON_GRAD", "0") != "1" or not wgmma_ok(dy2, qs, 0):
        return False
    from .q8_0_wgmma import grad_readable

    return grad_readable(dy2, qs, d)


def _wgmma_grad(dy2, qs, d, dx, cfg: dict) -> None:
    """The Gluon path of the input gradient, its config measured once per key (or forced by cfg)."""
    from .q8_0_wgmma import WS_GRAD_CONFIGS, wgmma_grad_input

    m, n = dy2.shape
    if "BLOCK_N" in cfg:
        wgmma_grad_input(dy2, qs, d, dx, cfg)
        return
    key = ("grad", _m_bucket(m), n, qs.shape[1], dy2.dtype, dx.dtype, len(WS_GRAD_CONFIGS))
    run = lambda c: wgmma_grad_input(dy2, qs, d, dx, c)  # noqa: E731
    wgmma_grad_input(dy2, qs, d, dx, pick_wgmma_config(key, run, WS_GRAD_CONFIGS))


def _grad(path: str, dy2, qs, d, dx, cfg: dict, cache: DequantCache | None = None) -> None:
    """dx[M, K] = dy2 @ W along `path` ("skinny", "large", "wgmma" or "dequant")."""
    m, n = dy2.shape
    k = qs.shape[1]
    if path == "dequant":
        torch.matmul(dy2, _dequantized(qs, d, dy2.dtype, cache), out=dx)
        return
    if path == "wgmma":
        _wgmma_grad(dy2, qs, d, dx, cfg)
        return
    split = int(cfg.get("SPLIT_K", _split_for(path, m, k, n, dy2.device)))
    out = dx if split == 1 else torch.empty(split, m, k, dtype=torch.float32, device=dy2.device)
    xs = out.stride(0) if split > 1 else 0
    xm, xk = (out.stride(1), out.stride(2)) if split > 1 else (out.stride(0), out.stride(1))
    args = (dy2, qs, d, out, m, n, k, _m_bucket(m),
            dy2.stride(0), dy2.stride(1), qs.stride(0), d.stride(0), xs, xm, xk)  # fmt: skip
    const = dict(SPLIT_N=split, DOT_F32=_dot_f32(dy2.dtype), EMU_BF16=_INTERPRET)
    if _INTERPRET or "BLOCK_N" in cfg:
        tiles = _tiles(_INTERP_GEMM_T, cfg)
        grid = (cdiv(m, tiles["BLOCK_M"]) * cdiv(k, tiles["BLOCK_K"]), split)
        launch(_q8_gemm_t_kernel, grid, args, {**const, **tiles, "EVEN_N": n % tiles["BLOCK_N"] == 0})
    else:
        name = "gemm_t_skinny" if path == "skinny" else "gemm_t_large"
        key = (name, _m_bucket(m), n, k, dy2.dtype, out.dtype, split)
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(k, meta["BLOCK_K"]), split)  # noqa: E731
        _launch_tuned(name, _q8_gemm_t_kernel, grid, args, const, key, ("EVEN_N", "BLOCK_N", n))
    if split > 1:
        _reduce_splits(out, dx)


def q8_0_matmul_grad_input(
    dy: torch.Tensor,
    qs: torch.Tensor,
    d: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    config: dict | None = None,
    dequant_cache: DequantCache | None = None,
    shared_dequant: bool = False,
) -> torch.Tensor:
    """dx[..., K] = dy[..., N] @ W, W = q8_0(qs, d) of shape [N, K]; fp32 accumulation, dx in dy's dtype.
    dequant_cache, shared_dequant: as for q8_0_matmul."""
    n, k = _check_weight(qs, d)
    _check_act(dy, n, qs, "dy")
    out_dtype = out_dtype or dy.dtype
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, n)
    m = dy2.shape[0]
    dx = torch.empty(m, k, dtype=out_dtype, device=dy.device)
    if m == 0:
        return dx.reshape(*lead, k)
    cfg = dict(config or {})
    if "path" in cfg:
        path = _forced_path(cfg, m)
    else:
        gl_ok = m > 64 and wgmma_grad_ok(dy2, qs, d)
        paths, default = _candidates(m, out_dtype == dy.dtype, gemv=False, wgmma=gl_ok, shared_dequant=shared_dequant)
        key = ("grad", _m_bucket(m), n, k, dy.dtype, out_dtype, gl_ok)
        path = choose_path(key, paths, lambda p: _grad(p, dy2, qs, d, dx, cfg), default)
    _grad(path, dy2, qs, d, dx, cfg, dequant_cache)
    return dx.reshape(*lead, k)


def tuned_choices() -> dict[str, str]:
    """The measured path per product key and the autotuned config per kernel key (for benchmarks)."""
    from .q8_0_tuning import _PATH

    out = {str(k): v for k, v in _PATH.items()}
    out.update({str(k): str(v) for k, v in _BEST.items()})
    return out
