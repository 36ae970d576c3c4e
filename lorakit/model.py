"""The llama architecture over GGUF weights: args from metadata, weights that stay quantized,
and a functional forward pass (training and KV-cached decoding) that runs every matmul through
a backend. Tensor names are GGUF's (`blk.N.attn_q.weight`, ...).

Shapes (numpy order, E = n_embd, Ekv = n_embd_kv, F = n_ff, V = n_vocab):
    token_embd.weight   [V, E]      output.weight [V, E] (absent: tied to token_embd)
    output_norm.weight  [E]
    blk.N.attn_norm     [E]         blk.N.ffn_norm  [E]
    blk.N.attn_q        [E, E]      blk.N.attn_output [E, E]
    blk.N.attn_k/v      [Ekv, E]
    blk.N.ffn_gate/up   [F, E]      blk.N.ffn_down  [E, F]
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import LorakitError
from .gguf_io import GGUFFile
from .quant import GGML_BF16, GGML_F16, Q8Weight, Weight, weight_from_gguf

LAYER_KINDS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_down",
    "ffn_up",
)
NORM_KINDS = ("attn_norm", "ffn_norm", "output_norm")
# per-layer weights that read the same input, stored as row slices of one tensor on the GPU so that a
# decode step runs them as one product: blk.N.attn_qkv = [q; k; v], blk.N.ffn_gate_up = [gate; up]
FUSED_KINDS = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_gate_up": ("ffn_gate", "ffn_up")}


def fused_members(name: str) -> list[str]:
    """The member weights of the packed weight `name` = blk.N.<FUSED_KINDS kind>, in packing order."""
    _, i, kind = name.split(".")
    return [f"blk.{i}.{m}.weight" for m in FUSED_KINDS[kind]]


@dataclass(frozen=True)
class ModelArgs:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_layer: int
    norm_eps: float = 1e-5
    rope_freq_base: float = 10000.0
    rope_freq_scale: float = 1.0
    n_ctx_train: int = 2048

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> ModelArgs:
        arch = gf.architecture
        if arch is None:
            raise LorakitError("missing general.architecture", gf.path)
        if arch != "llama":
            raise LorakitError(f"architecture {arch!r} is not supported (only 'llama')", gf.path)
        problems = [f"missing metadata key 'llama.{k}'" for k in _REQUIRED if f"llama.{k}" not in gf.fields]
        if problems:
            raise LorakitError("; ".join(problems), gf.path)
        n_head = _meta(gf, "llama.attention.head_count", int)
        freq_scale = 1.0
        scale_linear = _meta(gf, "llama.rope.scale_linear", float, positive=True)
        if scale_linear is not None and scale_linear != 1.0:
            freq_scale = 1.0 / scale_linear
        if gf.get("llama.rope.scaling.type") == "linear" and gf.get("llama.rope.scaling.factor"):
            freq_scale = 1.0 / _meta(gf, "llama.rope.scaling.factor", float, positive=True)
        n_vocab = _meta(gf, "llama.vocab_size", int)
        if n_vocab is None:
            tokens = gf.get("tokenizer.ggml.tokens")
            if tokens is not None:
                n_vocab = len(tokens)
            elif gf.has("token_embd.weight"):
                n_vocab = gf.info("token_embd.weight").shape[0]
            else:
                raise LorakitError("cannot tell the vocabulary size (no tokenizer, no token_embd)", gf.path)
        args = cls(
            n_vocab=int(n_vocab),
            n_embd=_meta(gf, "llama.embedding_length", int),
            n_ff=_meta(gf, "llama.feed_forward_length", int),
            n_head=n_head,
            n_head_kv=_meta(gf, "llama.attention.head_count_kv", int, n_head),
            n_layer=_meta(gf, "llama.block_count", int),
            norm_eps=_meta(gf, "llama.attention.layer_norm_rms_epsilon", float, 1e-5),
            rope_freq_base=_meta(gf, "llama.rope.freq_base", float, 10000.0, positive=True),
            rope_freq_scale=freq_scale,
            n_ctx_train=_meta(gf, "llama.context_length", int, 2048, positive=True),
        )
        bad = []
        if args.n_head <= 0 or args.n_embd % args.n_head:
            bad.append(f"embedding_length {args.n_embd} is not a multiple of head_count {args.n_head}")
        elif args.n_head_kv <= 0 or args.n_head % args.n_head_kv:
            bad.append(f"head_count {args.n_head} is not a multiple of head_count_kv {args.n_head_kv}")
        if min(args.n_vocab, args.n_embd, args.n_ff, args.n_layer) <= 0:
            bad.append("a hyperparameter is zero or negative")
        if bad:
            raise LorakitError("; ".join(bad), gf.path)
        return args

    def context_note(self, n_ctx: int) -> str | None:
        """What to tell a user who asks for more context than the model was trained on (llama.cpp takes it and
        warns); None within it."""
        if n_ctx <= self.n_ctx_train:
            return None
        return f"the model was trained on only {self.n_ctx_train} tokens of context ({n_ctx} asked)"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        E, Ekv, Fd, V = self.n_embd, self.n_embd_kv, self.n_ff, self.n_vocab
        shapes = {"token_embd.weight": (V, E), "output_norm.weight": (E,), "output.weight": (V, E)}
        per = {
            "attn_norm": (E,),
            "attn_q": (E, E),
            "attn_k": (Ekv, E),
            "attn_v": (Ekv, E),
            "attn_output": (E, E),
            "ffn_norm": (E,),
            "ffn_gate": (Fd, E),
            "ffn_down": (E, Fd),
            "ffn_up": (Fd, E),
        }
        for i in range(self.n_layer):
            for k, s in per.items():
                shapes[f"blk.{i}.{k}.weight"] = s
        return shapes


_REQUIRED = ("embedding_length", "feed_forward_length", "attention.head_count", "block_count")


def _meta(gf: GGUFFile, key: str, kind: type, default=None, positive: bool = False):
    """A numeric metadata value as `kind` (int or float), `default` where the key is missing; a value of another
    type, not finite, or (positive) not above zero is an error naming the file and the key."""
    value = gf.get(key, default)
    if value is None:
        return None
    what = "an integer" if kind is int else "a number"
    try:
        if isinstance(value, (bool, str, bytes)) or (kind is int and float(value) != int(value)):
            raise ValueError
        num = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise LorakitError(f"metadata key {key!r} is {value!r}, not {what}", gf.path) from None
    if not math.isfinite(num) or (positive and num <= 0):
        need = f"{what} above zero" if positive else f"a finite {what.split()[-1]}"
        raise LorakitError(f"metadata key {key!r} is {value!r}, not {need}", gf.path)
    return num


@dataclass
class LlamaModel:
    """Weights as loaded: q8_0 matrices stay quantized, norms in float32.

    `fused` holds, once the model is on a CUDA device, the per-layer FUSED_KINDS tensors; the member
    names in `tensors` are then row views of them (no extra memory)."""

    args: ModelArgs
    tensors: dict[str, Weight]
    path: str
    tied_output: bool
    source_types: dict[str, str] = field(default_factory=dict)
    fused: dict[str, Weight] = field(default_factory=dict)

    def weight(self, name: str) -> Weight:
        if name == "output.weight" and self.tied_output:
            return self.tensors["token_embd.weight"]
        return self.tensors[name]

    def to(self, device: torch.device) -> LlamaModel:
        device = torch.device(device)
        moved = {k: v.to(device) for k, v in self.tensors.items()}
        model = LlamaModel(self.args, moved, self.path, self.tied_output, self.source_types)
        return pack_fused(model) if device.type == "cuda" else model


def pack_fused(model: LlamaModel) -> LlamaModel:
    """The model with each layer's FUSED_KINDS weights packed into one tensor (members become views)."""
    tensors, fused = dict(model.tensors), dict(model.fused)
    for i in range(model.args.n_layer):
        for kind in FUSED_KINDS:
            name = f"blk.{i}.{kind}"
            names = fused_members(name)
            if name in fused:
                continue
            packed = _pack_rows([tensors[n] for n in names])
            if packed is not None:
                fused[name] = packed
                tensors.update(zip(names, _row_views(packed, [tensors[n].shape[0] for n in names]), strict=True))
    return LlamaModel(model.args, tensors, model.path, model.tied_output, model.source_types, fused)


def _pack_rows(ws: list[Weight]) -> Weight | None:
    """The weights stacked along their output rows, or None if their types differ."""
    if all(isinstance(w, Q8Weight) for w in ws):
        return Q8Weight(torch.cat([w.qs for w in ws]), torch.cat([w.d for w in ws]))
    if all(isinstance(w, torch.Tensor) and w.dtype == ws[0].dtype for w in ws):
        return torch.cat(ws)
    return None


def _row_views(w: Weight, rows: list[int]) -> list[Weight]:
    out, r0 = [], 0
    for r in rows:
        out.append(Q8Weight(w.qs[r0 : r0 + r], w.d[r0 : r0 + r]) if isinstance(w, Q8Weight) else w[r0 : r0 + r])
        r0 += r
    return out


def load_model(path: str | os.PathLike, gf: GGUFFile | None = None) -> LlamaModel:
    """Read and validate a llama GGUF; every problem found is reported at once."""
    gf = gf or GGUFFile(path)
    if gf.get("general.type") == "adapter":
        raise LorakitError("is a LoRA adapter, not a model (pass it with --lora)", gf.path)
    if gf.get("training.type") is not None:
        raise LorakitError("is a finetune checkpoint, not a model", gf.path)
    args = ModelArgs.from_gguf(gf)  # the architecture first: a gpt2/falcon file fails on that
    if gf.get("tokenizer.ggml.model") == "gpt2":
        raise LorakitError("BPE ('gpt2') vocabularies are not supported yet; only SPM ('llama') vocabularies", gf.path)
    if not gf.tensor_names():
        raise LorakitError("has no tensors (a vocabulary-only GGUF), not a model", gf.path)
    expected = args.expected_shapes()
    tied = not gf.has("output.weight")
    problems = []
    for name, shape in expected.items():
        if name == "output.weight" and tied:
            continue
        if not gf.has(name):
            problems.append(f"missing tensor {name!r}")
            continue
        got = gf.info(name).shape
        if tuple(got) != shape:
            problems.append(f"tensor {name!r} has shape {list(got)}, expected {list(shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise LorakitError("; ".join(problems[:5]) + more, gf.path)
    tensors: dict[str, Weight] = {}
    types: dict[str, str] = {}
    for name in expected:
        if name == "output.weight" and tied:
            continue
        info = gf.info(name)
        types[name] = info.type_name
        w = weight_from_gguf(gf, name)
        if isinstance(w, torch.Tensor) and (w.dim() == 1 or info.ggml_type not in (GGML_F16, GGML_BF16)):
            w = w.to(torch.float32)  # norms and dequantized types in float32
        tensors[name] = w
    return LlamaModel(args, tensors, str(gf.path), tied, types)


# --------------------------------------------------------------------------- math


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps), computed in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(args: ModelArgs, n_pos: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n_pos, D/2] for ggml RoPE mode 0: pair (2i, 2i+1) turns by p*scale*base^(-2i/D)."""
    D = args.head_dim
    inv = args.rope_freq_base ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2.0 / D)
    pos = torch.arange(n_pos, dtype=torch.float64) * args.rope_freq_scale
    theta = pos[:, None] * inv[None, :]
    return theta.cos().float().to(device), theta.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [T, D/2]. Rotates adjacent pairs (x[2i], x[2i+1])."""
    xp = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)


class SpecOps:
    """The block's elementwise ops in plain torch (autograd through torch): the specification. A backend
    may supply fused versions with the same signatures and numerics (lorakit.fused_ops)."""

    @staticmethod
    def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, eps) * w.to(x.dtype)

    @staticmethod
    def add_rms_norm(
        h: torch.Tensor, d: torch.Tensor, w: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual sum s = h + d and rms_norm(s, eps) * w (model.block's second half's input)."""
        s = h + d
        return s, SpecOps.rms_norm(s, w, eps)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)

    @staticmethod
    def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return F.silu(g) * u

    @staticmethod
    def swiglu(gate_up: Sequence[torch.Tensor]) -> torch.Tensor:
        """silu(gate) * up on the pair a LinearFn returns for blk.N.ffn_gate_up."""
        return SpecOps.silu_mul(*gate_up)

    @staticmethod
    def causal_attention(
        qkv: Sequence[torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        n_head: int,
        n_head_kv: int,
        kv_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Causal self-attention over T tokens from position 0 (training, a prompt): see causal_attention."""
        return causal_attention(qkv, cos, sin, n_head, n_head_kv, SPEC_OPS, kv_out)


SPEC_OPS = SpecOps()


class Packed(tuple):
    """A fused kind's member outputs (model.FUSED_KINDS): views of one product over the packed weight, which
    `whole` holds (None when the members were computed one by one). An op that takes the whole product hands
    back one gradient for it, where autograd would otherwise concatenate the members' gradients."""

    whole: torch.Tensor | None

    def __new__(cls, parts, whole: torch.Tensor | None = None):
        obj = super().__new__(cls, parts)
        obj.whole = whole
        return obj


# A LinearFn computes y = x @ W'.T for the named (possibly LoRA-adapted) weight; for a FUSED_KINDS name
# (`blk.N.attn_qkv`, `blk.N.ffn_gate_up`) it returns the members' outputs as a tuple (views of one
# product over the packed weight when the model has one, else one product per member).
LinearFn = Callable[[torch.Tensor, str], torch.Tensor]
# A NormFn returns the (possibly adapted) norm gain vector for a norm tensor name.
NormFn = Callable[[str], torch.Tensor]
# An EmbedFn returns the (possibly adapted) embedding rows for a token tensor.
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class KVCache:
    """Static per-layer key/value cache [B, Hkv, n_ctx, D] (views of one buffer [n_layer, B, 2 Hkv, n_ctx, D])."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def empty(cls, args: ModelArgs, batch: int, n_ctx: int, dtype, device) -> KVCache:
        # one zero fill for all layers (a prompt's eager prefill pays a launch per allocation); each layer's v
        # heads follow its k heads, so a prompt's k and v go into the cache by one copy (fused_ops.flash_prompt)
        Hkv = args.n_head_kv
        kv = torch.zeros(args.n_layer, batch, 2 * Hkv, n_ctx, args.head_dim, dtype=dtype, device=device)
        return cls([layer[:, :Hkv] for layer in kv], [layer[:, Hkv:] for layer in kv])


def attention(
    args: ModelArgs,
    i: int,
    x: torch.Tensor,
    linear: LinearFn,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache | None,
    n_past: int,
    ops=SPEC_OPS,
) -> torch.Tensor:
    B, T, _ = x.shape
    qkv = linear(x, f"blk.{i}.attn_qkv")  # one product over the packed [q; k; v] where there is one
    if cache is None or n_past == 0:  # training, or a prompt from position 0 (its k, v go into the cache)
        kv_out = None if cache is None else (cache.k[i], cache.v[i])
        out = ops.causal_attention(qkv, cos, sin, args.n_head, args.n_head_kv, kv_out)
        return linear(out, f"blk.{i}.attn_output.weight")
    q, k, v = _rope_heads(qkv, cos, sin, args.n_head, args.n_head_kv, ops)
    cache.k[i][:, :, n_past : n_past + T] = k
    cache.v[i][:, :, n_past : n_past + T] = v
    k = cache.k[i][:, :, : n_past + T]
    v = cache.v[i][:, :, : n_past + T]
    mask = None
    if T > 1:
        qpos = torch.arange(n_past, n_past + T, device=x.device)[:, None]
        kpos = torch.arange(n_past + T, device=x.device)[None, :]
        mask = kpos <= qpos
    return linear(_attend(q, k, v, mask, causal=False), f"blk.{i}.attn_output.weight")


def _rope_heads(qkv, cos, sin, H: int, Hkv: int, ops) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed product's q, k, v as [B, heads, T, D], q and k turned by RoPE."""
    q, k, v = qkv
    B, T, _ = q.shape
    D = q.shape[-1] // H
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    return ops.rope(q, cos, sin).transpose(1, 2), ops.rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) [+ causal or boolean mask]) v over [B, H, T, D] (k, v: GQA heads) -> [B, T, H*D]."""
    B, H, T, D = q.shape
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T > 1, scale=1.0 / math.sqrt(D))
    return out.transpose(1, 2).reshape(B, T, H * D)


def causal_attention(qkv, cos, sin, n_head: int, n_head_kv: int, ops=SPEC_OPS, kv_out=None) -> torch.Tensor:
    """Causal self-attention over T tokens from position 0: qkv = (q [B, T, H*D], k, v [B, T, Hkv*D]) ->
    [B, T, H*D] (RoPE on q and k with cos/sin [T, D/2], scale 1/sqrt(D)); the spec of the fused versions.
    kv_out: a KV cache's (k, v) [B, Hkv, n_ctx, D]: k (after RoPE) and v are written into rows 0..T-1."""
    q, k, v = _rope_heads(qkv, cos, sin, n_head, n_head_kv, ops)
    if kv_out is not None:
        T = q.shape[2]
        kv_out[0][:, :, :T] = k
        kv_out[1][:, :, :T] = v
    return _attend(q, k, v, None, causal=True)


def feed_forward(i: int, x: torch.Tensor, linear: LinearFn, ops=SPEC_OPS) -> torch.Tensor:
    gate_up = linear(x, f"blk.{i}.ffn_gate_up")  # one product over the packed [gate; up] where there is one
    return linear(ops.swiglu(gate_up), f"blk.{i}.ffn_down.weight")


def block(
    args: ModelArgs,
    i: int,
    h: torch.Tensor,
    linear: LinearFn,
    norm: NormFn,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache | None = None,
    n_past: int = 0,
    ops=SPEC_OPS,
) -> torch.Tensor:
    a = ops.rms_norm(h, norm(f"blk.{i}.attn_norm.weight"), args.norm_eps)
    attn = attention(args, i, a, linear, cos, sin, cache, n_past, ops)
    h, f = ops.add_rms_norm(h, attn, norm(f"blk.{i}.ffn_norm.weight"), args.norm_eps)  # h + attn, its norm
    return h + feed_forward(i, f, linear, ops)


def forward_hidden(
    args: ModelArgs,
    tokens: torch.Tensor,
    linear: LinearFn,
    norm: NormFn,
    embed: EmbedFn,
    rope: tuple[torch.Tensor, torch.Tensor],
    cache: KVCache | None = None,
    n_past: int = 0,
    checkpoint_layers: bool = False,
    ops=SPEC_OPS,
) -> torch.Tensor:
    """tokens [B, T] -> final normed hidden state [B, T, E] (before the output projection). `ops`: the
    elementwise ops (SPEC_OPS, or a backend's fused ones with the same numerics)."""
    T = tokens.shape[1]
    cos, sin = rope[0][n_past : n_past + T], rope[1][n_past : n_past + T]
    h = embed(tokens)
    for i in range(args.n_layer):
        # the last block is not checkpointed: its backward runs right after its forward, so keeping
        # its activations costs one layer's worth of memory and saves recomputing it
        if checkpoint_layers and torch.is_grad_enabled() and i < args.n_layer - 1:
            # no RNG-state bookkeeping (the forward has no randomness; it would synchronize a CUDA graph)
            h = torch.utils.checkpoint.checkpoint(
                block, args, i, h, linear, norm, cos, sin, None, 0, ops, use_reentrant=False, preserve_rng_state=False
            )
        else:
            h = block(args, i, h, linear, norm, cos, sin, cache, n_past, ops)
    return ops.rms_norm(h, norm("output_norm.weight"), args.norm_eps)
