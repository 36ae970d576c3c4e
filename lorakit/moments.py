"""The Adam moment layout of finetune checkpoints (spec §4.1).

The optimizer flattens every LoRA tensor into one vector in the order the parameters appear in the
forward graph, which depends on the evaluation order finetune picked (LEFT_TO_RIGHT or RIGHT_TO_LEFT,
printed as `main: evaluation order = ...`). Within a tensor, elements are in memory order (ne0 fastest),
which is the C order of lorakit's (in, r) / (out, r) arrays. Both orders are verified against
llama.cpp's own parameter-order dumps (tests/fixtures/llamacpp/runs/*/debug_param_order.json).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .lora import kind_of
from .model import LAYER_KINDS

LEFT_TO_RIGHT = "left_to_right"
RIGHT_TO_LEFT = "right_to_left"
ORDERS = (LEFT_TO_RIGHT, RIGHT_TO_LEFT)
_GLOBAL = ("token_embd.weight", "output_norm.weight", "output.weight")

_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def _order_key(order: str) -> str:
    o = order.lower()
    if o not in ORDERS:
        raise ValueError(f"unknown evaluation order {order!r} (expected {ORDERS})")
    return o


def param_order(names, order: str) -> list[tuple[str, str]]:
    """The optimizer's flattening order (§4.1) as (base tensor name, 'a'|'b'), for the names present.

    RIGHT_TO_LEFT: token_embd; per layer 0..L-1 attn_norm, q, k, v, output, ffn_norm, up, gate, down;
    output_norm; output (b before a in each). LEFT_TO_RIGHT: output, output_norm; per layer L-1..0
    ffn_down, ffn_gate, ffn_norm, attn_output, attn_norm; token_embd; per layer 0..L-1 attn_v, attn_k,
    attn_q, ffn_up (a before b). Kinds with rank 0 are simply absent from `names`.
    """
    order = _order_key(order)
    present = set(names)
    layers: set[int] = set()
    for n in present:
        mt = _LAYER_RE.match(n)
        if mt and mt.group(2) in LAYER_KINDS:
            layers.add(int(mt.group(1)))
        elif n not in _GLOBAL:
            raise ValueError(f"not a llama LoRA tensor name: {n!r}")
    lay = sorted(layers)

    def blk(i: int, kinds) -> list[str]:
        return [f"blk.{i}.{k}.weight" for k in kinds]

    if order == RIGHT_TO_LEFT:
        seq = ["token_embd.weight"]
        for i in lay:
            seq += blk(i, ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                           "ffn_up", "ffn_gate", "ffn_down"))  # fmt: skip
        seq += ["output_norm.weight", "output.weight"]
        halves = ("b", "a")
    else:
        seq = ["output.weight", "output_norm.weight"]
        for i in reversed(lay):
            seq += blk(i, ("ffn_down", "ffn_gate", "ffn_norm", "attn_output", "attn_norm"))
        seq.append("token_embd.weight")
        for i in lay:
            seq += blk(i, ("attn_v", "attn_k", "attn_q", "ffn_up"))
        halves = ("a", "b")
    return [(n, h) for n in seq if n in present for h in halves]


def checkpoint_tensor_order(names) -> list[str]:
    """Base names in checkpoint order (§6.3): token_embd, output_norm, output, then per layer."""
    present = set(names)
    head = [n for n in _GLOBAL if n in present]
    rest = sorted(
        present - set(head),
        key=lambda n: (int(n.split(".")[1]), LAYER_KINDS.index(kind_of(n))) if _LAYER_RE.match(n) else (-1, n),
    )
    return head + rest


def flatten_moments(per_param: dict, order: str) -> torch.Tensor:
    """{(name, 'a'|'b'): tensor} -> one flat float32 vector in the optimizer's order."""
    names = list(dict.fromkeys(n for n, _ in per_param))
    parts = [torch.as_tensor(per_param[k], dtype=torch.float32).reshape(-1) for k in param_order(names, order)]
    return torch.cat(parts) if parts else torch.zeros(0)


def unflatten_moments(flat, shapes: dict, order: str) -> dict:
    """Inverse of flatten_moments; shapes: name -> (a shape, b shape) as in lora.lora_shapes()."""
    flat = torch.as_tensor(flat, dtype=torch.float32).reshape(-1)
    seq = param_order(list(shapes), order)
    sizes = [int(np.prod(shapes[n][0 if h == "a" else 1])) for n, h in seq]
    if sum(sizes) != flat.numel():
        raise ValueError(f"moment vector has {flat.numel()} values, the LoRA tensors have {sum(sizes)}")
    out, pos = {}, 0
    for (n, h), size in zip(seq, sizes, strict=True):
        out[(n, h)] = flat[pos : pos + size].reshape(shapes[n][0 if h == "a" else 1])
        pos += size
    return out


def _order_score(v: torch.Tensor, shapes: dict, order: str) -> float:
    """How well `order` explains v: token_embd's B should have whole zero rows (tokens never seen as
    inputs get no gradient), output's B should have no zeros (the softmax gradient is dense)."""
    parts = unflatten_moments(v, shapes, order)
    score = 0.0
    if ("token_embd.weight", "b") in parts:
        score += float((parts[("token_embd.weight", "b")] == 0).all(dim=1).float().mean())
    if ("output.weight", "b") in parts:
        score -= float((parts[("output.weight", "b")] == 0).float().mean())
    return score


def detect_moment_order(v: torch.Tensor, shapes: dict) -> str:
    """LEFT_TO_RIGHT or RIGHT_TO_LEFT, from the second moments; ties (e.g. all zero) -> RIGHT_TO_LEFT."""
    l2r = _order_score(v, shapes, LEFT_TO_RIGHT)
    r2l = _order_score(v, shapes, RIGHT_TO_LEFT)
    return LEFT_TO_RIGHT if l2r > r2l else RIGHT_TO_LEFT
