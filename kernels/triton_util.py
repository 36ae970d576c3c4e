"""Helpers shared by lorakit's Triton kernels: the interpreter switch, rounding, q8_0 tile dequantization."""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda

from . import triton_release

QK = 32  # q8_0 block length

# the same switch triton.jit read when it decorated lorakit's kernels (TRITON_INTERPRET at import)
_INTERPRET = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """Whether the kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


GLUON_TESTED = (3, 6)  # the triton release the Gluon kernels are written for


def gluon_enabled(version: str = triton.__version__, env: str | None = None) -> bool:
    """Whether the Gluon kernels (q8_0_wgmma's matmuls, the decode megakernel) may be used: LORAKIT_GLUON=0 switches
    them off, LORAKIT_GLUON=1 on; unset, they are used with the triton release they are written for
    (GLUON_TESTED). Gluon is triton's experimental layer, and its API changes between releases; elsewhere the
    triton kernels and dequantize + cuBLAS, which give the same results within the tested bounds, run instead."""
    env = os.environ.get("LORAKIT_GLUON") if env is None else env
    if env in ("0", "1"):
        return env == "1"
    return triton_release(version) == GLUON_TESTED


ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Host-side grid and block arithmetic for the launchers. triton.cdiv and triton.next_power_of_2 are
# constexpr_functions in triton 3.6: each host call unwraps its arguments through triton's constexpr
# machinery (~5 us; a 512-token prefill made ~1,500 such calls, about an eighth of its host time).
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers (triton.cdiv)."""
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    """The smallest power of two >= n for n >= 1, 0 for n = 0 (triton.next_power_of_2)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def check_tensor(x: torch.Tensor, what: str, dtype: torch.dtype | None = None, device=None) -> None:
    """A kernel operand: a float activation dtype (or exactly `dtype`), on `device`, on CUDA (or the
    interpreter's CPU), contiguous along its last axis."""
    if dtype is None and x.dtype not in ACT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{what} must be {dtype}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{what} is on {x.device}, expected {device}")
    if not _INTERPRET and x.device.type != "cuda":
        raise ValueError(f"{what} must be a CUDA tensor (or set TRITON_INTERPRET=1 before importing triton)")
    if x.dim() and x.stride(-1) != 1:
        raise ValueError(f"{what} must be contiguous along its last axis")


@functools.cache
def _pdl_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def launch_overlap() -> bool:
    """Whether a decode step's launches overlap (the megakernel, the embedding row and greedy_next as programmatic
    dependent launches; greedy tokens copied to the host on a side stream): LORAKIT_LAUNCH_OVERLAP=0 turns it off,
    for benchmarks that compare both in one run."""
    return os.environ.get("LORAKIT_LAUNCH_OVERLAP", "1") != "0"


def overlap_pdl(device: torch.device) -> dict:
    """pdl(device) for a decode step's overlapping launches (the embedding row, greedy_next, the megakernel); empty
    (a plain launch) where launch_overlap() is off."""
    return pdl(device) if launch_overlap() else {}


def pdl(device: torch.device) -> dict:
    """The launch options and constexpr of a programmatic dependent launch where the device has them (sm_90+):
    the kernel may be launched while the previous one in the stream is still running, and waits for it
    (_pdl_start) before touching memory. In a decode step of ~240 short kernels this overlaps each launch with
    the previous kernel's tail. Empty (a plain launch) elsewhere and under the interpreter."""
    if _INTERPRET or device.type != "cuda" or not _pdl_device(device.index or 0):
        return {}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """The first statement of a kernel launched with pdl(): let the next kernel launch once every program of
    this one has started, then wait until the previous kernel has finished and its writes are visible."""
    if PDL:
        tl_cuda.gdc_launch_dependents()
        tl_cuda.gdc_wait()


# L2 prefetch hints (PREFETCH constexpr of the decode kernels): 0 none, 1 a plain prefetch, 2 with the
# evict_last priority (the lines outlive the streaming reads of the kernels in between)
_PF_PLAIN: tl.constexpr = tl.constexpr("prefetch.global.L2 [$1];\n    mov.u32 $0, 0;")
_PF_LAST: tl.constexpr = tl.constexpr("prefetch.global.L2::evict_last [$1];\n    mov.u32 $0, 0;")
PF_LINE: tl.constexpr = tl.constexpr(128)  # bytes per prefetched line (an L2 line)
PF_LINES: tl.constexpr = tl.constexpr(256)  # lines per loop step of a prefetch program


@triton.jit
def _prefetch_lines(ptr, lines, part, parts, KIND: tl.constexpr):
    """Ask L2 for share `part` of `parts` of the first `lines` 128-byte lines at ptr (an int8 pointer); nothing
    waits for them. The lines' order is the order in which a q8_0 product's programs read their weights
    (row-major), so a prefix is what the next product's first programs need."""
    per = tl.cdiv(lines, parts)
    lo = part * per
    hi = tl.minimum(lo + per, lines)
    for start in range(lo, hi, PF_LINES):
        offs = tl.minimum(start + tl.arange(0, PF_LINES), hi - 1).to(tl.int64) * PF_LINE
        if KIND == 2:
            tl.inline_asm_elementwise(_PF_LAST, "=r,l", [ptr + offs], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(_PF_PLAIN, "=r,l", [ptr + offs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch(pf_q, pf_d, q_lines, d_lines, part, parts, KIND: tl.constexpr):
    """One prefetch program's share of a q8_0 weight's hinted range: its qs lines and the lines of those blocks'
    scales d."""
    _prefetch_lines(pf_q, q_lines, part, parts, KIND)
    _prefetch_lines(pf_d, d_lines, part, parts, KIND)


class Prefetch(NamedTuple):
    """An L2 prefetch hint a decode launch carries for the product after it: bytes [start, start + nbytes) of a
    q8_0 weight's qs (row-major: the rows its first programs read) and those blocks' scales d, requested by
    extra programs of the launch that read nothing else and wait for nothing (prefetch_launch). kind: 1 a plain
    prefetch, 2 with the evict_last priority."""

    qs: torch.Tensor
    d: torch.Tensor
    start: int
    nbytes: int
    kind: int = 2


def prefetch_ranges(pf: Prefetch) -> tuple[int, int, int, int]:
    """(q0, q_lines, d0, d_lines): the hinted bytes of qs from q0 and of d (as bytes) from d0, in 128-byte lines,
    d's covering the scales of the hinted q8_0 blocks (qs and d are both row-major); q_lines = 0 for an empty
    range. Every line starts inside its tensor."""
    q0, q1 = max(0, pf.start), min(pf.qs.numel(), pf.start + pf.nbytes)
    if q1 <= q0:
        return 0, 0, 0, 0
    es = pf.d.element_size()  # qs byte q is in block q // QK, whose scale is d's bytes [es * block, es * (block + 1))
    d0, d1 = es * (q0 // QK), es * ((q1 - 1) // QK + 1)
    return q0, cdiv(q1 - q0, PF_LINE.value), d0, cdiv(d1 - d0, PF_LINE.value)


def prefetch_launch(pf: Prefetch | None, dummy: torch.Tensor) -> tuple[tuple, int, int]:
    """((pf_q, pf_d, q_lines, d_lines), extra programs, PREFETCH) for a kernel's prefetch programs: the int8 views
    of the hinted ranges (prefetch_ranges), PF_LINES qs lines per program. No programs (PREFETCH 0, the dummy
    pointers) without a hint, for an empty range and under the interpreter (no PTX)."""
    if pf is None or _INTERPRET:
        return (dummy, dummy, 0, 0), 0, 0
    q0, q_lines, d0, d_lines = prefetch_ranges(pf)
    if q_lines == 0:
        return (dummy, dummy, 0, 0), 0, 0
    q, d = pf.qs.reshape(-1), pf.d.reshape(-1).view(torch.int8)
    return (q[q0:], d[d0:], q_lines, d_lines), cdiv(q_lines, PF_LINES.value), pf.kind


# (kernel, device, constexprs + options, specialization of the runtime arguments) -> (compiled kernel, the
# constexpr tail of its argument list); see launch(). Keys hold exact int values (a prompt length, say), so a
# long-lived process could gather many: past COMPILED_MAX entries the map starts over (triton keeps the
# compiled kernels; a first launch per key just goes through its dispatch again).
_COMPILED: dict[tuple, tuple] = {}
COMPILED_MAX = 8192


def launch(kernel, grid: tuple, args: tuple, const: dict) -> None:
    """kernel[grid](*args, **const): `args` the kernel's leading runtime arguments in order, `const` its
    constexprs (by name) and compile options (num_warps, ...).

    triton's JIT dispatch (binding, specialization, cache key, lookup) costs about as much host time per
    launch as the launch itself (bench/host_lab.py: 28 vs 14 us for 16 arguments on the H200's host), and an
    eager prefill is host-bound. So the first launch per specialization goes through triton and keeps the
    compiled kernel; later ones call its launcher directly. The key holds everything triton specializes on
    and more: every int argument's value, every tensor's dtype and 16-byte alignment, the type of floats,
    the constexprs and options, the current device. Launch hooks (knobs.runtime) are honoured."""
    if _INTERPRET:
        kernel[grid](*args, **const)
        return
    device = triton.runtime.driver.active.get_current_device()
    # inline, exact types first (a call or an isinstance per argument costs host time): ints, plain tensors, the rest
    spec = tuple([a if type(a) is int else (a.dtype, a.data_ptr() & 15 == 0) if type(a) is _TENSOR else _spec(a)
                  for a in args])  # fmt: skip
    key = (kernel, device, tuple(const.items()), spec)
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **const)
        if len(_COMPILED) >= COMPILED_MAX:
            _COMPILED.clear()
        _COMPILED[key] = (compiled, _constexpr_tail(kernel, len(args), const))
        return
    compiled, tail = hit
    if tail is None:  # runtime arguments after a constexpr: triton's own dispatch
        kernel[grid](*args, **const)
        return
    full = (*args, *tail)
    stream = triton.runtime.driver.active.get_current_stream(device)
    g = (*grid, 1, 1)
    rt = triton.knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    if getattr(enter, "calls", True) or getattr(leave, "calls", True):  # a hook is set: its metadata
        meta = compiled.launch_metadata(grid, stream, *full)
    else:  # triton's empty chains: the launcher calls no hook for None (and the metadata is not formed)
        meta = enter = leave = None
    compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, meta, enter, leave,
                 *full)  # fmt: skip


_TENSOR = torch.Tensor


def _spec(a):
    """launch()'s key for an argument other than an int or a plain tensor: a tensor subclass like a tensor, the type
    of a float, a TMA descriptor by _desc_spec, any other value (None, a bool, a string) as it is."""
    if type(a) is float:
        return float
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15 == 0
    if hasattr(a, "block_shape"):
        return _desc_spec(a)
    return a


def _desc_spec(a) -> tuple:
    """What launch() keys a TMA descriptor (Gluon's TensorDescriptor, unhashable) on: everything but its base
    address."""
    return a.base.dtype, a.base.data_ptr() % 16 == 0, *a.shape, *a.strides, *a.block_shape, a.layout, a.padding


def _constexpr_tail(kernel, n_args: int, const: dict) -> tuple | None:
    """The values of the kernel's parameters after its first n_args (all constexprs: from const or their
    defaults), or None where one of them is not a constexpr."""
    tail = []
    for p in kernel.params[n_args:]:
        if not p.is_constexpr:
            return None
        if p.name in const:
            tail.append(const[p.name])
        elif p.has_default:
            tail.append(p.default)
        else:
            return None
    return tuple(tail)


@triton.jit
def _to(x, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    """x.to(dtype). The interpreter truncates fp32 -> bf16; with EMU_BF16 it rounds to nearest-even first
    (integer ops on the bits, finite values), as the GPU's conversion does."""
    if EMU_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(dtype)
        else:
            return x.to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _q8_magic(q):
    """1.5 * 2^23 + q as fp32, exactly: the integer q added to the bits of 1.5 * 2^23 (a float whose last
    mantissa bits then hold q)."""
    return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True)


@triton.jit
def _q8_f32(q):
    """int8 -> fp32, exactly, without a conversion instruction: _q8_magic(q) - 1.5 * 2^23. Integer and fp32
    adds issue at 4-8x the rate of the int-to-float conversion, which limits the q8_0 kernels' dequantization
    (bench/gemv_lab.py)."""
    return _q8_magic(q) - 12582912.0


@triton.jit
def _q8_times(q, d, FMA: tl.constexpr):
    """q * d in fp32 (q int8, d fp32 holding an fp16 scale, broadcastable): exact either way. FMA folds
    _q8_f32's subtraction into the multiply: fma(1.5 * 2^23 + q, d, -1.5 * 2^23 * d) rounds the exact q * d
    (18 significant bits) once, and -1.5 * 2^23 * d is exact (d's 11 bits times 3), so it equals
    _q8_f32(q) * d with one fp32 instruction per element fewer (the products are instruction-bound). Not
    under the interpreter, whose fma rounds the product before the add."""
    if FMA:
        return tl.fma(_q8_magic(q), d, d * -12582912.0)
    else:
        return _q8_f32(q) * d


@triton.jit
def _dequant_tile(q, dd, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 [BLOCK_N, BLOCK_K] x fp16 [BLOCK_N, BLOCK_K // 32] -> fp32 [BLOCK_N, BLOCK_K]."""
    KB: tl.constexpr = BLOCK_K // 32
    w = tl.reshape(_q8_f32(q), (BLOCK_N, KB, 32)) * tl.reshape(dd.to(tl.float32), (BLOCK_N, KB, 1))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


_DEQ_ASM = """{{
    .reg .b32 u, f0, f1, f2, f3;
    xor.b32 u, $2, 0x80808080;
    prmt.b32 f0, u, 0x47000000, 0x7404;
    prmt.b32 f1, u, 0x47000000, 0x7414;
    prmt.b32 f2, u, 0x47000000, 0x7424;
    prmt.b32 f3, u, 0x47000000, 0x7434;
    fma.rn.f32 f0, f0, $3, $7;
    fma.rn.f32 f1, f1, $4, $8;
    fma.rn.f32 f2, f2, $5, $9;
    fma.rn.f32 f3, f3, $6, $10;
    cvt.rn.{t}x2.f32 $0, f1, f0;
    cvt.rn.{t}x2.f32 $1, f3, f2;
}}"""
_DEQ_BF16: tl.constexpr = tl.constexpr(_DEQ_ASM.format(t="bf16"))
_DEQ_F16: tl.constexpr = tl.constexpr(_DEQ_ASM.format(t="f16"))


def _grouped_tile_src(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid over the [M, N] output tiles in grouped order: GROUP_M tile rows at a time,
    column by column, so programs running together share their operands' tiles in L2 (triton's tutorial 03).
    Builtins only: the Gluon kernel compiles this same source (gluon.jit(_grouped_tile_src))."""
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


_grouped_tile = triton.jit(_grouped_tile_src)


def _prmt_dequant_src(q3, ds, dc, dtype: tl.constexpr):
    """W = rnd_dtype(q * d) for bf16/fp16 from int8 q3 and the per-element scale d (ds) and -(2^15 + 2^7) d (dc),
    four elements per inline-PTX call (see q8_0_gemv_tc's module docstring). Also compiled by the Gluon kernel
    (gluon.jit(_prmt_dequant_src))."""
    if dtype == tl.bfloat16:
        w = tl.inline_asm_elementwise(_DEQ_BF16, "=r,=r,r,r,r,r,r,r,r,r,r", [q3, ds, dc], dtype=tl.bfloat16,
                                      is_pure=True, pack=4)  # fmt: skip
    else:
        w = tl.inline_asm_elementwise(_DEQ_F16, "=r,=r,r,r,r,r,r,r,r,r,r", [q3, ds, dc], dtype=tl.float16,
                                      is_pure=True, pack=4)  # fmt: skip
    return w


_prmt_dequant = triton.jit(_prmt_dequant_src)


@triton.jit
def _dequant_words(q, d, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 [BLOCK_N, BLOCK_K] x fp16 [BLOCK_N, BLOCK_K // 32] -> W [BLOCK_N, BLOCK_K] in dtype (bf16/fp16)
    = rnd(q * d), four elements per inline-PTX call (see q8_0_gemv_tc's module docstring)."""
    KB: tl.constexpr = BLOCK_K // 32
    df = d.to(tl.float32)
    ds = tl.broadcast_to(tl.reshape(df, (BLOCK_N, KB, 1)), (BLOCK_N, KB, 32))
    dc = tl.broadcast_to(tl.reshape(df * -32896.0, (BLOCK_N, KB, 1)), (BLOCK_N, KB, 32))  # -(2^15 + 2^7) d
    w = _prmt_dequant(tl.reshape(q, (BLOCK_N, KB, 32)), ds, dc, dtype)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _dequant_to(q, d, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMU_BF16: tl.constexpr):
    """W [BLOCK_N, BLOCK_K] = rnd_dtype(q * d) as the q8_0 kernels form it: _dequant_words for bf16/fp16 on the GPU,
    _dequant_tile and _to for fp32 and under the interpreter (no inline PTX); the same numbers either way."""
    if EMU_BF16 or dtype == tl.float32:
        return _to(_dequant_tile(q, d, BLOCK_N, BLOCK_K), dtype, EMU_BF16)
    else:
        return _dequant_words(q, d, dtype, BLOCK_N, BLOCK_K)
