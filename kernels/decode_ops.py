"""Fused kernels for the single-token decode step (lorakit/decode.py), one launch per op.

The compute dtype is fp32, bf16 or fp16; all math is fp32 and each result is rounded once to the dtype
where the spec (backends/cpu_torch.py, i.e. lorakit/model.py's math) rounds it. Every launcher: check ->
allocate -> launch. `pos` is a 1-element integer device tensor read by the kernels (no host sync, no
shape that depends on it: the launches can be captured in a CUDA graph).

  add_rms_norm(h, delta, w, eps) -> (s, y)   one program per row, the whole row in registers (E <= MAX_ROW):
      s = rnd(h + delta) (s is h itself when delta is None), y = rnd(rnd(s * rsqrt(mean(s^2) + eps)) * rnd(w)).
  rope_kv_write(qkv, cos, sin, pos, cache_k, cache_v, H, Hkv) -> q [1, H, 1, D]   one program per head
      (H + Hkv): qkv = [q | k | v] of one token; q and k pairs (x[2i], x[2i+1]) turn by (cos, sin)[pos, i]
      (x0*c - x1*s, x0*s + x1*c); q goes to the output, k to cache_k[0, :, pos], v (as is) to cache_v[0, :, pos].
  attention_decode(q, cache_k, cache_v, pos) -> [1, 1, H*D]   flash-decoding in one launch, grid (H, S):
      program (h, s) (GQA: kv head h // (H / Hkv)) runs the online softmax (scores/max/sum/acc in fp32) over
      the BLOCK_T-key blocks s, s + S, s + 2S, ... of keys 0..pos. S = min(cdiv(n_ctx, BLOCK_T), MAX_SPLITS)
      is fixed by n_ctx, never by pos (pos lives on the device); the blocks are dealt round-robin so that
      the splits stay balanced at any pos (every split is busy once pos >= (S-1)*BLOCK_T; a split whose
      first block lies past pos is empty). S == 1 writes the output directly. Otherwise each program
      stores its partial (acc[D], m, l) in an fp32 workspace [H, S, D+2] (an empty split: 0, -inf, 0),
      then (bar.sync, so that its threads' stores precede) takes a ticket from the head's counter with one
      acq_rel gpu-scope atomic; the program that draws S-1 reads the S partials with .cg loads (L2, not a
      stale L1), combines them as one [S, D] tile (m = max m_s, w_s = exp2(m_s - m), o = sum w_s acc_s /
      sum w_s l_s: a fixed reduction order, whichever program comes last), writes the output rounded once
      and resets the counter to 0. The launcher allocates the workspace (torch.empty) per call, and zeroed
      counters (torch.zeros) unless the caller passes its own (every launch leaves them zero again). D and
      the row strides are compile-time constants and the head strides carry their power-of-two factor
      (KV_ALIGN), so the rows load as vectors.
  greedy_next(x, tok, pos, zero, hist)   a greedy decode step's last launch: program 0 writes tok[0] = the first
      index of the largest x[i] (NaN counts as +inf; chunks of at most ARGMAX_BLOCK values: torch.argmax's answer
      without its generic reduction, which took ~10 us for 32,000 logits on the H200, session 21), the token into
      hist[pos] too (GraphDecoder.tokens copies it from there on a side stream) and pos[0] + 1; every program (up
      to GREEDY_PROGRAMS) zeroes its share of `zero` (the decode megakernel's sums for the next step: one launch
      instead of three).
(SwiGLU over the packed [gate | up] is train_ops.silu_mul_fwd on its two column views.)

Numerics against cpu-torch:
  * add_rms_norm: s is bit-identical (one fp32 add, one rounding, as torch). The sum of squares is a tree
    reduction (torch sums in another order) and rsqrt is the hardware approximation, so 1/rms differs by a
    few fp32 ulps (<= ~E/2 ulps in the worst case); y agrees to that in fp32, and to one rounding step per
    rounding (the normalized value, then the product) in bf16/fp16.
  * rope_kv_write: op for op the spec's fp32 sequence, launched with enable_fp_fusion=False so the GPU
    compiler cannot contract x0*c - x1*s into an FMA: bit-identical q and cache rows.
  * attention_decode: exp2 with scale*log2(e) folded into the scores; P stays fp32 (torch's CPU flash kernel
    rounds P to bf16/fp16 for reduced dtypes): differences of a few fp32 ulps of the scores plus, for
    bf16/fp16, the spec's P rounding and one output rounding step. The key splits only re-associate the
    fp32 sums and add one rescaling exp2(m_s - m) per split (exactly 1 for the split holding the max).
    The result is deterministic (bit-identical from call to call) for a given S; another S may differ
    in the last fp32 bits.

A pos outside [0, n_ctx) writes no cache row (rotating with zeros) and attention reads only rows < n_ctx.
Under TRITON_INTERPRET=1 (CPU tensors) the tiles are small so the tests' odd shapes hit every mask, and
EMU_BF16 makes the interpreter's fp32 -> bf16 cast round to nearest-even like the GPU (see q8_0_matmul).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_util import _pdl_start, _to, cdiv, check_tensor, interpreting, next_pow2, overlap_pdl, pdl

_INTERPRET = interpreting()
MAX_ROW = 16384  # add_rms_norm keeps a whole row in registers
_LOG2E = 1.0 / math.log(2.0)
# attention_decode: keys per block (one step of a split's loop), most splits (programs) per head, warps
BLOCK_T = 8 if _INTERPRET else 32
MAX_SPLITS = 16
ATTN_WARPS = 4
ARGMAX_BLOCK = 64 if _INTERPRET else 32768  # greedy_next: values per chunk (and zeroed per chunk)
GREEDY_PROGRAMS = 64  # greedy_next: the most programs zeroing


@triton.jit
def _add_rms_norm_kernel(
    h_ptr, d_ptr, w_ptr, s_ptr, y_ptr, E, E_f, eps, stride_h, stride_d, stride_s, stride_y,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, EMU_BF16: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    _pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    dtype = y_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < E
    h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0)
        s = _to(h.to(tl.float32) + d.to(tl.float32), dtype, EMU_BF16)
        tl.store(s_ptr + row * stride_s + offs, s, mask=mask)
    else:
        s = h
    x = s.to(tl.float32)
    r = tl.math.rsqrt(tl.math.div_rn(tl.sum(x * x, axis=0), E_f) + eps)  # E_f = float(E)
    n = _to(x * r, dtype, EMU_BF16).to(tl.float32)
    w = _to(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32), dtype, EMU_BF16).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, _to(n * w, dtype, EMU_BF16), mask=mask)


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, H, Hkv, D, n_pos,
    stride_c0, stride_c1, stride_s0, stride_s1, stride_kh, stride_kt, stride_vh, stride_vt,
    BLOCK_P: tl.constexpr, EMU_BF16: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    _pdl_start(PDL)
    pid = tl.program_id(0)
    dtype = q_ptr.dtype.element_ty
    pos = tl.load(pos_ptr).to(tl.int64)
    ok = (pos >= 0) & (pos < n_pos)
    i = tl.arange(0, BLOCK_P)
    m = i < D // 2
    src = qkv_ptr + pid * D + 2 * i  # q heads, then k heads: head pid starts at pid * D
    x0 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x1 = tl.load(src + 1, mask=m, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + pos * stride_c0 + i * stride_c1, mask=m & ok, other=0.0)
    s = tl.load(sin_ptr + pos * stride_s0 + i * stride_s1, mask=m & ok, other=0.0)
    o0 = _to(x0 * c - x1 * s, dtype, EMU_BF16)
    o1 = _to(x0 * s + x1 * c, dtype, EMU_BF16)
    if pid < H:
        dst = q_ptr + pid * D + 2 * i
        tl.store(dst, o0, mask=m)
        tl.store(dst + 1, o1, mask=m)
    else:
        j = pid - H
        kd = k_ptr + j * stride_kh + pos * stride_kt + 2 * i
        tl.store(kd, o0, mask=m & ok)
        tl.store(kd + 1, o1, mask=m & ok)
        vs = qkv_ptr + (H + Hkv + j) * D + 2 * i
        vd = v_ptr + j * stride_vh + pos * stride_vt + 2 * i
        tl.store(vd, tl.load(vs, mask=m, other=0.0), mask=m & ok)
        tl.store(vd + 1, tl.load(vs + 1, mask=m, other=0.0), mask=m & ok)


@triton.jit
def _rope_pairs(src, i, mi, c, sn, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    """One head of D values at src, its pairs (x[2i], x[2i+1]) turned by (c, sn)[i] as _rope_kv_kernel turns them,
    rounded to dtype: [2 * len(i)] (the pairs interleaved again)."""
    x0 = tl.load(src + 2 * i, mask=mi, other=0.0).to(tl.float32)
    x1 = tl.load(src + 2 * i + 1, mask=mi, other=0.0).to(tl.float32)
    o0 = _to(x0 * c - x1 * sn, dtype, EMU_BF16)
    o1 = _to(x0 * sn + x1 * c, dtype, EMU_BF16)
    return tl.reshape(tl.join(o0, o1), (2 * i.shape[0],))


@triton.jit
def _attn_decode_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, ws_ptr, cnt_ptr, n_ctx, group, qk_scale, stride_qh, stride_qd,
    kh_units, vh_units, cos_ptr, sin_ptr, n_pos, stride_c0, stride_c1, stride_s0, stride_s1, H, Hkv,
    D: tl.constexpr, stride_kt: tl.constexpr, stride_vt: tl.constexpr, KV_ALIGN: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    EMU_BF16: tl.constexpr, ROPE: tl.constexpr = False, PDL: tl.constexpr = False,
):  # fmt: skip
    _pdl_start(PDL)
    h = tl.program_id(0)
    s = tl.program_id(1)  # this program's key split: key blocks s, s + SPLITS, s + 2*SPLITS, ...
    kvh = (h // group).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    pos = tl.load(pos_ptr)
    n = tl.minimum(pos + 1, n_ctx).to(tl.int32)  # keys 0..pos
    # head strides = units * KV_ALIGN: the compiler sees their power-of-two factor (vector loads of the rows)
    k_base = k_ptr + kvh * (kh_units * KV_ALIGN)
    v_base = v_ptr + kvh * (vh_units * KV_ALIGN)
    if ROPE:  # q_ptr is the token's [q | k | v]: rotate q and k here (as _rope_kv_kernel), v as is
        row = pos.to(tl.int64)
        ok = (row >= 0) & (row < n_pos)
        i = tl.arange(0, BLOCK_D // 2)
        mi = i < D // 2
        c = tl.load(cos_ptr + row * stride_c0 + i * stride_c1, mask=mi & ok, other=0.0)
        sn = tl.load(sin_ptr + row * stride_s0 + i * stride_s1, mask=mi & ok, other=0.0)
        dtype = o_ptr.dtype.element_ty
        q = _rope_pairs(q_ptr + h * D, i, mi, c, sn, dtype, EMU_BF16).to(tl.float32)
        k_new = _rope_pairs(q_ptr + (H + kvh) * D, i, mi, c, sn, dtype, EMU_BF16)
        v_new = tl.load(q_ptr + (H + Hkv + kvh) * D + offs_d, mask=md, other=0.0)
        if (h % group == 0) & (s == 0):  # one program per kv head writes its cache row; the others (this launch
            # reads row pos from none of them: the loop below takes k_new / v_new for it) need not wait
            tl.store(k_base + row * stride_kt + offs_d, k_new, mask=md & ok)
            tl.store(v_base + row * stride_vt + offs_d, v_new, mask=md & ok)
        k_new = k_new.to(tl.float32)
        v_new = v_new.to(tl.float32)
    else:
        q = tl.load(q_ptr + h * stride_qh + offs_d * stride_qd, mask=md, other=0.0).to(tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    m_i = tl.full((), float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.full((), 0.0, tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(s * BLOCK_T, n, SPLITS * BLOCK_T):  # empty when the split's first block lies past pos
        t = t0 + offs_t
        mt = t < n
        tile = mt[:, None] & md[None, :]
        kt = tl.load(k_base + t[:, None] * stride_kt + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
        vt = tl.load(v_base + t[:, None] * stride_vt + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
        if ROPE:  # key pos: this token's, from registers
            kt = tl.where((t == pos)[:, None], k_new[None, :], kt)
            vt = tl.where((t == pos)[:, None], v_new[None, :], vt)
        sc = tl.where(mt, tl.sum(kt * q[None, :], axis=1) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        m_i = m_new
    o_row = o_ptr + h * D + offs_d
    if SPLITS == 1:
        tl.store(o_row, _to(tl.math.div_rn(acc, l_i), o_ptr.dtype.element_ty, EMU_BF16), mask=md)
    else:
        # partial (acc[0:D], m, l) -> ws[h, s]; an empty split writes (0, -inf, 0)
        W = D + 2
        ws_h = ws_ptr + h.to(tl.int64) * (SPLITS * W)
        ws_row = ws_h + s * W
        tl.store(ws_row + offs_d, acc, mask=md)
        tl.store(ws_row + D, m_i)
        tl.store(ws_row + D + 1, l_i)
        # every thread's partial stores precede the one thread's gpu-scope release (the atomic)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + h, 1, sem="acq_rel")
        if done == SPLITS - 1:  # the last of the head's SPLITS programs combines, s = 0..SPLITS-1 as one tile
            offs_s = tl.arange(0, BLOCK_S)
            ms = offs_s < SPLITS
            rows = ws_h + offs_s * W
            m_s = tl.load(rows + D, mask=ms, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(rows + D + 1, mask=ms, other=0.0, cache_modifier=".cg")
            a_s = tl.load(
                rows[:, None] + offs_d[None, :], mask=ms[:, None] & md[None, :], other=0.0, cache_modifier=".cg"
            )
            m = tl.max(m_s, axis=0)  # finite: split 0 holds key 0 (pos >= 0)
            w = tl.exp2(m_s - m)  # 0 for the empty splits (m_s = -inf)
            l_sum = tl.sum(l_s * w, axis=0)
            o = tl.sum(a_s * w[:, None], axis=0)
            tl.store(o_row, _to(tl.math.div_rn(o, l_sum), o_ptr.dtype.element_ty, EMU_BF16), mask=md)
            tl.atomic_xchg(cnt_ptr + h, 0, sem="relaxed")  # ready for the next launch


# --------------------------------------------------------------------------------------------------
# checks and launchers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _greedy_next_kernel(x_ptr, tok_ptr, pos_ptr, z_ptr, hist_ptr, n, nz, nh, per, BLOCK: tl.constexpr,
                        ZBLOCK: tl.constexpr, HAS_POS: tl.constexpr, HAS_HIST: tl.constexpr,
                        PDL: tl.constexpr = False):  # fmt: skip
    _pdl_start(PDL)
    pid = tl.program_id(0)
    if pid == 0:
        offs = tl.arange(0, BLOCK)
        best = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        best_i = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0)
        for start in range(0, n, BLOCK):
            x = tl.load(x_ptr + start + offs, mask=start + offs < n, other=float("-inf")).to(tl.float32)
            x = tl.where(x != x, float("inf"), x)  # NaN: the largest, as torch.argmax
            v, i = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
            best_i = tl.where(v > best, start + i.to(tl.int64), best_i)  # an equal later chunk: the first stays
            best = tl.maximum(best, v)
        tl.store(tok_ptr, best_i)
        if HAS_POS:
            p = tl.load(pos_ptr)
            if HAS_HIST:
                tl.store(hist_ptr + p, best_i, mask=(p >= 0) & (p < nh))
            tl.store(pos_ptr, p + 1)
    zo = tl.arange(0, ZBLOCK)
    for start in range(pid * per, tl.minimum(pid * per + per, nz), ZBLOCK):
        tl.store(z_ptr + start + zo, tl.zeros([ZBLOCK], tl.float32), mask=start + zo < tl.minimum(pid * per + per, nz))


def greedy_next(x: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor | None = None,
                zero: torch.Tensor | None = None, hist: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """tok (one int64 element) = the first index of the largest value of the 1-D x (see the module docstring); pos
    (one int64 element, optional) += 1; zero (an fp32 buffer, optional, not x) = 0; hist (int64 [n], with pos):
    hist[pos] = tok at the position before the increment (a position outside [0, n) writes nothing): a greedy decode
    step's last launch. Returns tok."""
    if x.dim() != 1 or not x.is_contiguous() or x.numel() == 0:
        raise ValueError("greedy_next: x must be a non-empty contiguous 1-D tensor")
    for name, t in (("tok", tok), ("pos", pos)):
        bad = t is not None and (t.dtype != torch.int64 or t.numel() != 1 or not t.is_contiguous())
        if bad or (t is not None and t.device != x.device):
            raise ValueError(f"greedy_next: {name} must be one contiguous int64 element on {x.device}")
    if zero is not None and (zero.dtype != torch.float32 or not zero.is_contiguous() or zero.device != x.device):
        raise ValueError(f"greedy_next: zero must be a contiguous float32 tensor on {x.device}")
    if hist is not None and (pos is None or hist.dtype != torch.int64 or hist.dim() != 1 or not hist.is_contiguous()
                             or hist.device != x.device):  # fmt: skip
        raise ValueError(f"greedy_next: hist must be a contiguous 1-D int64 tensor on {x.device}, with pos")
    nz = 0 if zero is None else zero.numel()
    grid = 1 if nz == 0 else max(1, min(GREEDY_PROGRAMS, cdiv(nz, 8192)))
    per = cdiv(nz, grid)
    _greedy_next_kernel[(grid,)](
        x, tok, tok if pos is None else pos, x if zero is None else zero, tok if hist is None else hist, x.numel(),
        nz, 0 if hist is None else hist.numel(), per, BLOCK=min(next_pow2(x.numel()), ARGMAX_BLOCK),
        ZBLOCK=ARGMAX_BLOCK, HAS_POS=pos is not None, HAS_HIST=hist is not None, num_warps=1 if _INTERPRET else 16,
        **overlap_pdl(x.device),
    )  # fmt: skip
    return tok


def _check_pos(pos: torch.Tensor, device) -> None:
    if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64) or pos.device != device:
        raise ValueError(f"pos must be a 1-element int32/int64 tensor on {device}, got {pos.dtype} {tuple(pos.shape)}")


def _check_cache(cache_k: torch.Tensor, cache_v: torch.Tensor, dtype, device) -> tuple[int, int, int]:
    check_tensor(cache_k, "cache_k", dtype, device)
    check_tensor(cache_v, "cache_v", dtype, device)
    if cache_k.dim() != 4 or cache_k.shape[0] != 1 or cache_v.shape != cache_k.shape:
        raise ValueError(f"caches must be [1, Hkv, n_ctx, D], got {tuple(cache_k.shape)} and {tuple(cache_v.shape)}")
    return cache_k.shape[1], cache_k.shape[2], cache_k.shape[3]


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): s = h + delta (h itself when delta is None), y = rms_norm(s, eps) * w, both in h's dtype."""
    check_tensor(h, "h")
    E = h.shape[-1]
    if delta is not None:
        check_tensor(delta, "delta", h.dtype, h.device)
        if delta.shape != h.shape:
            raise ValueError(f"delta has shape {tuple(delta.shape)}, h {tuple(h.shape)}")
    check_tensor(w, "w", None, h.device)
    if w.shape != (E,):
        raise ValueError(f"w must be [{E}], got {tuple(w.shape)}")
    if not 0 < E <= MAX_ROW:
        raise ValueError(f"row length {E} is outside 1..{MAX_ROW} (the kernel keeps a row in registers)")
    h2 = h.reshape(-1, E)  # a copy only when the leading axes cannot be flattened
    d2 = h2 if delta is None else delta.reshape(-1, E)  # (dummy when there is no delta: never read)
    s = h if delta is None else torch.empty(h.shape, dtype=h.dtype, device=h.device)
    y = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    s2, y2 = s.reshape(-1, E), y.view(-1, E)  # (s2 is only written when there is a delta)
    if h2.shape[0] == 0:
        return s, y
    block = next_pow2(E)
    _add_rms_norm_kernel[(h2.shape[0],)](
        h2, d2, w, s2, y2, E, float(E), float(eps), h2.stride(0), d2.stride(0), s2.stride(0), y2.stride(0),
        HAS_DELTA=delta is not None, BLOCK=block, EMU_BF16=_INTERPRET, num_warps=min(16, max(1, block // 512)),
        **pdl(h.device),
    )  # fmt: skip
    return s, y


def _check_rope(qkv, cos, sin, pos, cache_k, cache_v, n_head: int, n_head_kv: int) -> tuple[int, int, int, int]:
    """(H, Hkv, n_ctx, D) of one token's [q | k | v], its RoPE tables and the caches, or a ValueError."""
    check_tensor(qkv, "qkv")
    Hkv, n_ctx, D = _check_cache(cache_k, cache_v, qkv.dtype, qkv.device)
    H = n_head
    if n_head_kv != Hkv or D % 2 or qkv.numel() != (H + 2 * Hkv) * D or qkv.shape[-1] != qkv.numel():
        raise ValueError(
            f"qkv {tuple(qkv.shape)} must be [1, 1, (H + 2*Hkv) * D] with H={H}, Hkv={n_head_kv}, D={D} (even) "
            f"and caches [1, {Hkv}, n_ctx, D]"
        )
    if H % Hkv:
        raise ValueError(f"n_head {H} must be a multiple of n_head_kv {Hkv}")
    for t, name in ((cos, "cos"), (sin, "sin")):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != D // 2 or t.device != qkv.device:
            raise ValueError(f"{name} must be a float32 [n_pos, {D // 2}] table on {qkv.device}")
    _check_pos(pos, qkv.device)
    return H, Hkv, n_ctx, D


def rope_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    n_head: int,
    n_head_kv: int,
) -> torch.Tensor:
    """Rotate q and k of one token at position pos; k and v into the caches' row pos; returns q [1, H, 1, D]."""
    H, Hkv, n_ctx, D = _check_rope(qkv, cos, sin, pos, cache_k, cache_v, n_head, n_head_kv)
    q = torch.empty(1, H, 1, D, dtype=qkv.dtype, device=qkv.device)
    _rope_kv_kernel[(H + Hkv,)](
        qkv, cos, sin, pos, q, cache_k, cache_v, H, Hkv, D, min(n_ctx, cos.shape[0], sin.shape[0]),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        cache_k.stride(1), cache_k.stride(2), cache_v.stride(1), cache_v.stride(2),
        BLOCK_P=max(1, next_pow2(D // 2)), EMU_BF16=_INTERPRET, enable_fp_fusion=False, num_warps=1,
        **pdl(qkv.device),
    )  # fmt: skip
    return q


def attention_decode(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    pos: torch.Tensor,
    counters: torch.Tensor | None = None,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """softmax(q k.T / sqrt(D)) v over key positions 0..pos of the caches -> [1, 1, H*D] in q's dtype.

    counters: int32 zeros (>= H of them) on q's device that the launch may use and leaves zero again: a caller
    that replays the step (the CUDA-graph decode) keeps one buffer for all its layers instead of a memset per
    launch; None: zeroed counters per call. splits (a test hook) overrides the number of key splits S
    (default: attention_splits(n_ctx))."""
    check_tensor(q, "q")
    Hkv, n_ctx, D = _check_cache(cache_k, cache_v, q.dtype, q.device)
    if q.dim() != 4 or q.shape[0] != 1 or q.shape[2] != 1 or q.shape[3] != D or q.shape[1] % Hkv:
        raise ValueError(f"q must be [1, H, 1, {D}] with H a multiple of {Hkv}, got {tuple(q.shape)}")
    _check_pos(pos, q.device)
    return _attend(q, q.shape[1], (q.stride(1), q.stride(3)), cache_k, cache_v, pos, counters, splits, None)


def rope_attention_decode(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    n_head: int,
    n_head_kv: int,
    counters: torch.Tensor | None = None,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """attention_decode(rope_kv_write(qkv, ...), ...) in one launch: every program rotates its q head, the first
    program of each kv head writes the rotated k and v to cache row pos, and the programs whose keys include pos
    take that row from registers. The same q and cache rows as rope_kv_write (the launch keeps the rotation
    from being contracted into FMAs)."""
    H, _, _, D = _check_rope(qkv, cos, sin, pos, cache_k, cache_v, n_head, n_head_kv)
    return _attend(qkv, H, (D, 1), cache_k, cache_v, pos, counters, splits, (cos, sin))


def _attend(q, H, q_strides, cache_k, cache_v, pos, counters, splits, rope) -> torch.Tensor:
    """The attention launch of attention_decode (q [1, H, 1, D]) or, with rope = (cos, sin), of
    rope_attention_decode (q the token's [q | k | v])."""
    Hkv, n_ctx, D = cache_k.shape[1], cache_k.shape[2], cache_k.shape[3]
    S = attention_splits(n_ctx) if splits is None else int(splits)
    if S < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    out = torch.empty(1, 1, H * D, dtype=q.dtype, device=q.device)
    if S == 1:
        ws = cnt = out  # never touched
    else:
        ws = torch.empty(H, S, D + 2, dtype=torch.float32, device=q.device)
        if counters is None:
            cnt = torch.zeros(H, dtype=torch.int32, device=q.device)  # the combining program resets it too
        else:
            check_counters(counters, H, q.device)
            cnt = counters
    if rope is None:
        cos = sin = out  # never read
        rope_args = (cos, sin, 0, 0, 0, 0, 0, H, Hkv)
    else:
        cos, sin = rope
        n_pos = min(n_ctx, cos.shape[0], sin.shape[0])
        rope_args = (cos, sin, n_pos, cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), H, Hkv)
    a = math.gcd(cache_k.stride(1), cache_v.stride(1), 16)  # KV_ALIGN: a power of two dividing both
    _attn_decode_kernel[(H, S)](
        q, cache_k, cache_v, pos, out, ws, cnt, n_ctx, H // Hkv, _LOG2E / math.sqrt(D), *q_strides,
        cache_k.stride(1) // a, cache_v.stride(1) // a, *rope_args, D=D, stride_kt=cache_k.stride(2),
        stride_vt=cache_v.stride(2), KV_ALIGN=a, SPLITS=S, BLOCK_S=next_pow2(S), BLOCK_T=BLOCK_T,
        BLOCK_D=next_pow2(D), EMU_BF16=_INTERPRET, ROPE=rope is not None, enable_fp_fusion=rope is None,
        num_warps=ATTN_WARPS, **pdl(q.device),
    )  # fmt: skip
    return out


def check_counters(counters: torch.Tensor, H: int, device: torch.device) -> None:
    if counters.dtype != torch.int32 or counters.dim() != 1 or counters.numel() < H or counters.device != device:
        raise ValueError(f"counters must be a 1-D int32 tensor of >= {H} zeros on {device}")
    if not counters.is_contiguous():
        raise ValueError("counters must be contiguous")


def attention_splits(n_ctx: int) -> int:
    """S for a cache of n_ctx rows: one split per BLOCK_T-key block of the cache, at most MAX_SPLITS."""
    return max(1, min(cdiv(n_ctx, BLOCK_T), MAX_SPLITS))
