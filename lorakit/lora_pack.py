"""The trainer's LoRA tensors in the layout the products take, formed by one gather per step.

For a training step the LoRA tensors (float32 leaves, name -> (a, b)) are needed
  * in the compute dtype,
  * for a packed weight (model.FUSED_KINDS on CUDA) as one term: a_cat = [a_1 .. a_k] and B block-diagonal
    (member j's b in its rows and its rank columns; lora.fused_lora_term),
  * with the rank padded by zero columns to the backend's `lora_rank_multiple` (cuBLAS runs rank-4 factors,
    8-byte rows, in its slow align-2 kernels): the same products, since every extra rank term is 0 * 0.
Done tensor by tensor (cast, cat, block_diag, pad, each way) that is ~1,000 small copy launches per step at
the 3B shape. Here one concatenation + cast + gather forms every term as a view of one buffer, and the
backward is one gather back: every output element is one input element or a zero, so both directions only
move numbers (the gradients equal those of the tensor-by-tensor path exactly).

The plan (the gather indices, int32: ~80 MiB on the device at the 3B shape with all 12 kinds) depends only on
the shapes, the packing and the multiple; it is made once and cached (outside any CUDA-graph capture: the
trainer's warm-up steps make it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .lora import NORMS, kind_of
from .model import LlamaModel, fused_members

Shapes = tuple[tuple[str, tuple[int, int], tuple[int, int]], ...]  # (name, a shape, b shape) in params order
Groups = tuple[tuple[str, tuple[tuple[str, int], ...]], ...]  # (packed weight, ((member weight, its rows), ..))


@dataclass(frozen=True)
class PackPlan:
    src: torch.Tensor  # [n_out] int32: for each output element, its input element (n_in: a zero)
    inv: torch.Tensor  # [n_in] int32: for each input element, where it lands in the output
    terms: tuple[tuple[str, tuple[int, int, int], tuple[int, int, int]], ...]  # name, (offset, rows, cols) of a, b
    n_in: int


def _padded(r: int, multiple: int) -> int:
    return -(-r // multiple) * multiple


# kept for the process: a captured training step (train_graph) reads these index tensors at every replay, so
# a plan must outlive every graph made with it (one plan per model shape and rank set in practice)
@functools.cache
def plan(shapes: Shapes, groups: Groups, multiple: int, device: torch.device) -> PackPlan:
    """The gather for `shapes` (the inputs laid end to end in this order, a before b) into: one (a_cat, B) term
    per packed weight in `groups` with a LoRA on some member, and each other name's (a, b), its rank padded to
    `multiple` unless it is a norm or the embedding (their LoRA is not a product with x)."""
    start, n_in = {}, 0
    for name, sa, sb in shapes:
        start[name] = (n_in, n_in + sa[0] * sa[1])
        n_in += sa[0] * sa[1] + sb[0] * sb[1]
    shape = {name: (sa, sb) for name, sa, sb in shapes}
    src: list[torch.Tensor] = []
    n_out = 0

    def emit(rows: int, cols: int, blocks) -> tuple[int, int, int]:
        """An output matrix [rows, cols] of zeros with blocks (row, col, input start, height, width) copied in."""
        nonlocal n_out
        idx = torch.full((rows, cols), n_in, dtype=torch.int64)
        for r0, c0, off, h, w in blocks:
            idx[r0 : r0 + h, c0 : c0 + w] = torch.arange(off, off + h * w).view(h, w)
        src.append(idx.reshape(-1))
        n_out += rows * cols
        return (n_out - rows * cols, rows, cols)

    terms, grouped = [], set()
    for packed, members in groups:
        have = [m for m, _ in members if m in shape]
        if not have:
            continue
        grouped.update(have)
        width = _padded(sum(shape[m][0][1] for m in have), multiple)
        a_blocks, b_blocks, col, row = [], [], 0, 0
        for m, rows in members:
            if m in shape:
                (k, r), _ = shape[m]
                a_blocks.append((0, col, start[m][0], k, r))
                b_blocks.append((row, col, start[m][1], rows, r))
                col += r
            row += rows
        terms.append((packed, emit(shape[have[0]][0][0], width, a_blocks), emit(row, width, b_blocks)))
    for name, sa, sb in shapes:
        if name in grouped:
            continue
        r = sa[1]
        width = r if kind_of(name) in (*NORMS, "token_embd") else _padded(r, multiple)
        a = emit(sa[0], width, [(0, 0, start[name][0], sa[0], r)])
        b = emit(sb[0], width, [(0, 0, start[name][1], sb[0], r)])
        terms.append((name, a, b))
    src_t = torch.cat(src) if src else torch.zeros(0, dtype=torch.int64)
    inv = torch.empty(n_in, dtype=torch.int64)
    real = src_t < n_in
    inv[src_t[real]] = torch.arange(n_out)[real]
    return PackPlan(src_t.to(device, torch.int32), inv.to(device, torch.int32), tuple(terms), n_in)


class PackFn(torch.autograd.Function):
    """The plan's gather: inputs (one dtype) -> the terms' a and b (views of one buffer in `dtype`); backward:
    the gradients of the terms gathered back into the inputs' places and dtype (zeros where none came)."""

    @staticmethod
    def forward(ctx, p: PackPlan, dtype, *ts):
        ctx.plan, ctx.shapes, ctx.dtype = p, [t.shape for t in ts], ts[0].dtype
        flat = torch.cat([*(t.reshape(-1) for t in ts), ts[0].new_zeros(1)]).to(dtype).index_select(0, p.src)
        return tuple(flat[o : o + r * c].view(r, c) for _, *ab in p.terms for o, r, c in ab)

    @staticmethod
    def backward(ctx, *gs):
        p = ctx.plan
        outs = [ab for _, *pair in p.terms for ab in pair]
        ref = next(g for g in gs if g is not None)
        parts = [
            (g if g is not None else ref.new_zeros(r, c)).reshape(-1) for g, (_, r, c) in zip(gs, outs, strict=True)
        ]
        grad = torch.cat(parts).index_select(0, p.inv).to(ctx.dtype)
        views = grad.split([s.numel() for s in ctx.shapes])
        return (None, None, *(v.view(s) for v, s in zip(views, ctx.shapes, strict=True)))


def pack_lora(
    params: dict[str, tuple[torch.Tensor, torch.Tensor]], model: LlamaModel, multiple: int, dtype: torch.dtype
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(pairs, packed): the other names' (a, b) and the packed weights' (a_cat, B) terms (lora.model_fns's
    `packed`), differentiable with respect to `params` (name -> (a, b), one dtype, LoRA scale 1: the trainer's)."""
    if not params:
        return {}, {}
    ts = [t for ab in params.values() for t in ab]
    shapes = tuple((n, tuple(a.shape), tuple(b.shape)) for n, (a, b) in params.items())
    groups = tuple(
        (packed, tuple((m, model.tensors[m].shape[0]) for m in fused_members(packed)))
        for packed in model.fused
        if any(m in params for m in fused_members(packed))
    )
    p = plan(shapes, groups, multiple, ts[0].device)
    outs = iter(PackFn.apply(p, dtype, *ts))
    pairs, packed = {}, {}
    for name, _, _ in p.terms:
        (packed if name in model.fused else pairs)[name] = (next(outs), next(outs))
    return pairs, packed
