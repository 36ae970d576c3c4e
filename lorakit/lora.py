"""LoRA tensors for llama.cpp's 12 tensor kinds, the one autograd.Function over the backend ops,
and the functions that run a model with adapters (unmerged) on top of its quantized weights.

Storage convention (llama.cpp's finetune/ggla, numpy order): for a base weight W of shape (out, in)
    a = lora_a  (in, r)      b = lora_b  (out, r)      dW = b @ a.T
Norm vectors are treated as (1, E) weights: a (E, r), b (1, r), dg = (a @ b.T).reshape(E).
token_embd (V, E): a (E, r), b (V, r); an embedding row v gains b[v] @ a.T.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .model import LAYER_KINDS, LlamaModel, ModelArgs, Packed, fused_members

# llama.cpp's order of the 12 kinds (checkpoint rank keys, LoRA init order, ggla records)
KINDS = ("token_embd", "output_norm", "output", *LAYER_KINDS)
NORMS = ("output_norm", "attn_norm", "ffn_norm")


def kind_of(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q'; 'token_embd.weight' -> 'token_embd'."""
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    return stem.split(".")[-1]


def tensor_names(args: ModelArgs) -> list[str]:
    """Base tensor names in llama.cpp's checkpoint order (spec §6.3)."""
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(args.n_layer):
        names += [f"blk.{i}.{k}.weight" for k in LAYER_KINDS]
    return names


def base_shape(args: ModelArgs, name: str) -> tuple[int, int]:
    """(out, in) of the base weight; norms count as (1, E)."""
    shape = args.expected_shapes()[name]
    return (1, shape[0]) if len(shape) == 1 else shape


@dataclass(frozen=True)
class LoraRanks:
    ranks: dict[str, int]  # kind -> rank, all 12 kinds

    @classmethod
    def default(cls, lora_r: int = 4, **overrides: int) -> LoraRanks:
        ranks = {k: (1 if k in NORMS else lora_r) for k in KINDS}
        ranks.update({k: v for k, v in overrides.items() if v is not None})
        return cls(ranks)

    def __getitem__(self, kind: str) -> int:
        return self.ranks[kind]


def lora_shapes(args: ModelArgs, ranks: LoraRanks) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """name -> ((in, r), (out, r)) for every adapted tensor, in checkpoint order; rank 0 = no LoRA."""
    out = {}
    for name in tensor_names(args):
        r = ranks[kind_of(name)]
        if r <= 0:
            continue
        o, i = base_shape(args, name)
        out[name] = ((i, r), (o, r))
    return out


@dataclass
class LoraPair:
    a: torch.Tensor  # (in, r)
    b: torch.Tensor  # (out, r)
    scale: float = 1.0  # the file's own factor (alpha/r); the user's scale multiplies it

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def delta(self) -> torch.Tensor:
        """dW (out, in) = scale * b @ a.T."""
        return self.scale * (self.b @ self.a.T)


@dataclass
class LoraAdapter:
    """An adapter in memory, whatever file it came from."""

    pairs: dict[str, LoraPair]  # base tensor name -> pair
    alpha: float | None = None
    rank: int | None = None  # header rank (ggla)
    source: str = ""
    format: str = ""  # 'ggla' | 'gguf' | 'checkpoint'
    meta: dict = field(default_factory=dict)

    def to(self, device) -> LoraAdapter:
        pairs = {k: LoraPair(p.a.to(device), p.b.to(device), p.scale) for k, p in self.pairs.items()}
        return LoraAdapter(pairs, self.alpha, self.rank, self.source, self.format, self.meta)


def _scaled(s: float, t: torch.Tensor) -> torch.Tensor:
    return t if s == 1.0 else s * t


class LoraLinear(torch.autograd.Function):
    """y = x @ W.T + s * (x @ a) @ b.T over a frozen (possibly q8_0) W.

    backward:  dx = dy @ W + s * (dy @ b) @ a.T
               da = s * x.T @ (dy @ b)          (in, r)
               db = s * dy.T @ t                (out, r), t = x @ a kept from the forward
    W gets no gradient (the base is frozen), so only the backend's matmul_grad_input touches it. (The trainer
    hands it factors padded to the backend's `lora_rank_multiple`: lora_pack.)
    """

    @staticmethod
    def forward(ctx, x, w, a, b, scale, backend):
        ctx.w, ctx.scale, ctx.backend = w, scale, backend
        ctx.has_lora = a is not None
        if a is None:
            ctx.save_for_backward(x)
            return backend.matmul(x, w)
        t = x.reshape(-1, x.shape[-1]) @ a.to(x.dtype)  # [N, r], kept: db needs it (no second pass over x)
        ctx.save_for_backward(x, a, b, t)
        return backend.lora_linear(x, w, [(a, b, scale)], t=t)

    @staticmethod
    def backward(ctx, dy):
        backend, w, s = ctx.backend, ctx.w, ctx.scale
        dx = backend.matmul_grad_input(dy, w) if ctx.needs_input_grad[0] else None
        if not ctx.has_lora:
            return dx, None, None, None, None, None
        x, a, b, t = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dyb = dy2 @ b.to(dy.dtype)  # [N, r]
        if dx is not None:
            # the low-rank term added by the same GEMM call (beta = 1, alpha = s): no [N, in]-sized
            # scaled copy and sum (two elementwise passes per product, ~5% of a step at 8 x 512)
            dx = dx.reshape(-1, dx.shape[-1]).addmm_(dyb, a.to(dy.dtype).T, alpha=s).view(dx.shape)
        da = _scaled(s, x2.T @ dyb).to(a.dtype) if ctx.needs_input_grad[2] else None
        db = _scaled(s, dy2.T @ t).to(b.dtype) if ctx.needs_input_grad[3] else None
        return dx, None, da, db, None, None


LoraTerm = tuple[torch.Tensor, torch.Tensor, float]  # (a, b, s): adds s * (x @ a) @ b.T


def lora_terms(adapters: Sequence[tuple[LoraAdapter, float]]) -> dict[str, list[LoraTerm]]:
    """Base tensor name -> its adapters' terms, each scale = the user's scale x the file's own factor."""
    by_name: dict[str, list[LoraTerm]] = {}
    for adapter, user_scale in adapters:
        for name, p in adapter.pairs.items():
            by_name.setdefault(name, []).append((p.a, p.b, float(user_scale) * p.scale))
    return by_name


def fused_lora_term(members: Sequence[Sequence[LoraTerm]], rows: Sequence[int]) -> list[LoraTerm]:
    """The terms of weights stacked along their output rows (model.FUSED_KINDS) as one term:
    sum_j s_j (x a_j) b_j.T placed in member rows = (x [a_1 .. a_k]) B.T with B block-diagonal, holding
    s_j * b_j in member j's rows and term j's rank columns. Empty if no member has a term."""
    terms = [(j, a, b, s) for j, ts in enumerate(members) for a, b, s in ts]
    if not terms:
        return []
    a0 = terms[0][1]
    r_total = sum(a.shape[1] for _, a, _, _ in terms)
    row0 = [sum(rows[:j]) for j in range(len(rows))]
    b_cat = torch.zeros(sum(rows), r_total, dtype=torch.float32, device=a0.device)
    c = 0
    for j, a, b, s in terms:
        r = a.shape[1]
        b_cat[row0[j] : row0[j] + rows[j], c : c + r] = s * b.to(torch.float32)
        c += r
    a_cat = torch.cat([a.to(torch.float32) for _, a, _, _ in terms], dim=1)
    return [(a_cat, b_cat, 1.0)]


def formed_term(members: Sequence[Sequence[LoraTerm]], rows: Sequence[int], dtype: torch.dtype) -> list[LoraTerm]:
    """fused_lora_term with its factors cast to the compute dtype: what a generation forms once per product
    (the products cast them to x's dtype anyway, so the numbers are the same)."""
    return [(a.to(dtype), b.to(dtype), s) for a, b, s in fused_lora_term(members, rows)]


def model_fns(
    model: LlamaModel,
    backend,
    adapters: Sequence[tuple[LoraAdapter, float]] = (),
    dtype: torch.dtype = torch.float32,
    packed: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    frozen: bool = False,
):
    """The linear/norm/embed functions for model.forward_hidden with adapters applied unmerged.

    Every adapter contributes s_user * s_file * b @ (a @ x). When autograd is on (training), the
    matrices go through LoraLinear so the frozen base gets the backend's grad-input op. packed: packed weight
    name -> its members' LoRA as one formed term (a_cat, B) at scale 1 (the trainer's, lora_pack.pack_lora).
    frozen: the adapters do not change while these functions run without autograd (a generation), so each
    packed weight's block-diagonal term, and each other weight's terms as the backend combines them
    (Backend.fuse_loras), are formed once, on first use, instead of at every product (a prompt's prefill
    formed ~20 small tensors per packed product with two adapters).
    """
    packed = packed or {}
    by_name = lora_terms(adapters)
    layout: dict[str, tuple[list[str], list[int]]] = {}  # packed weight name -> (members, their rows)
    formed: dict[str, list[LoraTerm]] = {}  # frozen: weight name -> its formed terms in dtype

    def _members_rows(name: str) -> tuple[list[str], list[int]]:
        members = fused_members(name)
        return members, [model.tensors[m].shape[0] for m in members]

    def _terms(name: str, make: Callable[[], list[LoraTerm]]) -> list[LoraTerm]:
        """make()'s terms for weight `name`: formed at every call, or once when frozen."""
        term = formed.get(name)
        if term is None:
            term = make()
            if frozen:
                formed[name] = term
        return term

    def packed_linear(x: torch.Tensor, name: str) -> Packed:
        """The members' outputs x @ W_j.T for blk.N.<fused kind>: views of one product over the packed
        weight (Packed.whole) with the members' LoRA terms as one block-diagonal term (differentiable:
        cat / block_diag of the factors), or one product per member where the model is not packed."""
        members, rows = layout.get(name) or layout.setdefault(name, _members_rows(name))
        w = model.fused.get(name)
        terms = [by_name.get(m, []) for m in members]
        if w is not None and name in packed:
            y = LoraLinear.apply(x, w, *packed[name], 1.0, backend)
            return Packed(y.split(rows, dim=-1), y)
        if w is None or (torch.is_grad_enabled() and any(len(t) > 1 for t in terms)):
            return Packed(linear(x, m) for m in members)  # not packed, or several adapters in training
        if not torch.is_grad_enabled():
            y = backend.lora_linear(x, w, _terms(name, lambda: formed_term(terms, rows, dtype)))
        elif not any(terms):
            y = LoraLinear.apply(x, w, None, None, 1.0, backend)
        else:
            a_cat = torch.cat([t[0][0] for t in terms if t], dim=1)
            # s_j * b_j in member j's rows; a (rows, 0) block for a member without a LoRA
            blocks = [
                _scaled(t[0][2], t[0][1]) if t else a_cat.new_zeros(r, 0) for t, r in zip(terms, rows, strict=True)
            ]
            y = LoraLinear.apply(x, w, a_cat, torch.block_diag(*blocks), 1.0, backend)
        return Packed(y.split(rows, dim=-1), y)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        if not name.endswith(".weight"):
            return packed_linear(x, name)
        w = model.weight(name)
        loras = by_name.get(name, [])
        if torch.is_grad_enabled():
            if not loras:
                return LoraLinear.apply(x, w, None, None, 1.0, backend)
            y = None
            for a, b, s in loras:
                part = LoraLinear.apply(x, w, a, b, s, backend) if y is None else s * ((x @ a) @ b.T)
                y = part if y is None else y + part
            return y
        if frozen and loras:  # the adapters' terms as the backend combines them, formed once
            return backend.lora_linear(x, w, _terms(name, lambda: backend.fuse_loras(loras, dtype)))
        return backend.lora_linear(x, w, loras)

    base_norms: dict[str, torch.Tensor] = {}  # the frozen norm gains in dtype, cast once (not per forward)

    def norm(name: str) -> torch.Tensor:
        g = base_norms.get(name)
        if g is None:
            g = base_norms[name] = model.tensors[name].to(dtype)
        for a, b, s in by_name.get(name, []):
            g = g + s * (a @ b.T).reshape(-1).to(dtype)
        return g

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        h = backend.embedding(model.tensors["token_embd.weight"], tokens, dtype)
        for a, b, s in by_name.get("token_embd.weight", []):
            h = h + s * (b[tokens] @ a.T).to(dtype)
        return h

    return linear, norm, embed
