"""llama.cpp `finetune` checkpoints (spec §6): read, validate, write byte-for-byte.

A checkpoint is a GGUF file with 43 keys (§6.2), the LoRA tensors `<base>.lora_a` / `.lora_b` in
checkpoint order (§6.3; numpy shapes (in, r) / (out, r), norm lora_b 1-D (r,)), and the Adam moments
`optimizer.adam.first_moments` / `second_moments` flattened in the optimizer's parameter order (§4.1),
which depends on the graph evaluation order finetune chose (LEFT_TO_RIGHT or RIGHT_TO_LEFT). The file
does not say which; read_checkpoint infers it from the zero pattern of the second moments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import LorakitError
from .gguf_io import GGLA_MAGIC, GGUF_MAGIC, GGUFFile, file_magic, write_gguf_atomic
from .lora import KINDS, NORMS, LoraRanks, kind_of, lora_shapes
from .model import ModelArgs
from .moments import (  # noqa: F401  (re-exported)
    LEFT_TO_RIGHT,
    ORDERS,
    RIGHT_TO_LEFT,
    checkpoint_tensor_order,
    detect_moment_order,
    flatten_moments,
    param_order,
    unflatten_moments,
)

# GGUF value types
U32, I32, F32, BOOL, STR, U64 = 4, 5, 6, 7, 8, 10
_TYPE_NAMES = dict(enumerate("u8 i8 u16 i16 u32 i32 f32 bool string array u64 i64 f64".split()))
M_NAME, V_NAME, PAST_NAME = (
    "optimizer.adam.first_moments",
    "optimizer.adam.second_moments",
    "optimizer.adam.past_loss_values",
)


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Everything a finetune checkpoint holds. lora: base name -> (a (in, r), b (out, r)), float32."""

    n_ctx: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_layer: int
    rope_dim: int
    norm_eps: float
    rope_freq_base: float
    rope_scale_linear: float  # the key's raw value (finetune writes freq_scale here)
    ranks: LoraRanks
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    train_its: int = 0
    train_samples: int = 0
    train_tokens: int = 0
    train_epochs: int = 0
    shuffle_samples_hash: int = 0
    shuffle_rng_state: str = field(default="", repr=False)
    shuffle_sample_count: int = 0
    shuffle_next_sample: int = 0
    opt_past: int = 0
    nx: int = 0
    opt_iter: int = 0
    just_initialized: bool = False
    best_loss: float = 0.0
    previous_loss: float = 0.0
    no_improvement_count: int = 0
    m: torch.Tensor | None = field(default=None, repr=False)  # flat [nx], in moment_order
    v: torch.Tensor | None = field(default=None, repr=False)
    past_loss_values: torch.Tensor | None = field(default=None, repr=False)  # [opt_past] if opt_past > 0
    moment_order: str = RIGHT_TO_LEFT

    @property
    def n_vocab(self) -> int | None:
        for name in ("token_embd.weight", "output.weight"):
            if name in self.lora:
                return int(self.lora[name][1].shape[0])
        return None

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        return {n: (tuple(a.shape), tuple(b.shape)) for n, (a, b) in self.lora.items()}

    def moments(self) -> tuple[dict, dict]:
        """(m, v) per parameter: {(name, 'a'|'b'): tensor shaped like that LoRA tensor}."""
        shapes = self.shapes()
        return (
            unflatten_moments(self.m, shapes, self.moment_order),
            unflatten_moments(self.v, shapes, self.moment_order),
        )


# --------------------------------------------------------------------------- reading

_HPARAMS = (  # key suffix, field, required
    ("context_length", "n_ctx", False),
    ("embedding_length", "n_embd", True),
    ("feed_forward_length", "n_ff", True),
    ("attention.head_count", "n_head", True),
    ("attention.head_count_kv", "n_head_kv", False),
    ("block_count", "n_layer", True),
    ("rope.dimension_count", "rope_dim", False),
)


class _Keys:
    """Typed access to a GGUF's keys with one-line errors."""

    def __init__(self, gf: GGUFFile):
        self.gf = gf

    def get(self, key: str, vtype: int, required: bool = True, default=None):
        if key not in self.gf.fields:
            if required:
                raise LorakitError(f"missing key {key!r}", self.gf.path)
            return default
        got = self.gf.field_types.get(key)
        if got != vtype:
            raise LorakitError(
                f"key {key!r} has type {_TYPE_NAMES.get(got, got)}, expected {_TYPE_NAMES[vtype]}",
                self.gf.path,
            )
        return self.gf.fields[key]


def _describe_not_checkpoint(gf: GGUFFile) -> str:
    if gf.get("general.type") == "adapter":
        return "is a LoRA adapter, not a finetune checkpoint"
    return "is not a finetune checkpoint (no training.* keys; is it a model?)"


def read_checkpoint(path: str | os.PathLike, args: ModelArgs | None = None) -> Checkpoint:
    """Read and validate a finetune checkpoint (§6.4); with `args`, it must be for that base model."""
    p = Path(path)
    magic = file_magic(p)
    if magic == GGLA_MAGIC:
        raise LorakitError("is a ggla LoRA adapter (--lora-out), not a finetune checkpoint", p)
    if magic != GGUF_MAGIC:
        raise LorakitError(f"bad file magic {magic!r}: not a GGUF finetune checkpoint", p)
    gf = GGUFFile(p)
    k = _Keys(gf)
    ttype = k.get("training.type", STR, required=False)
    if ttype is None and "training.file_version" not in gf.fields:
        raise LorakitError(_describe_not_checkpoint(gf), p)
    if ttype is not None and ttype != "finetune_lora":
        raise LorakitError(f"training.type is {ttype!r}, expected 'finetune_lora'", p)
    arch = k.get("general.architecture", STR)
    if arch != "llama":
        raise LorakitError(f"checkpoint architecture is {arch!r}, only 'llama' is supported", p)
    ftype = k.get("general.file_type", U32)
    if ftype != 0:
        raise LorakitError(f"general.file_type is {ftype}, expected 0 (all F32)", p)

    hp: dict = {}
    for suffix, name, required in _HPARAMS:
        hp[name] = k.get(f"llama.{suffix}", U32, required)
    hp["n_ctx"] = hp["n_ctx"] or 0
    if hp["n_head_kv"] is None:
        hp["n_head_kv"] = hp["n_head"]
    if hp["n_head"] <= 0 or hp["n_embd"] % hp["n_head"]:
        raise LorakitError(f"n_embd {hp['n_embd']} is not a multiple of n_head {hp['n_head']}", p)
    if hp["n_head_kv"] <= 0 or hp["n_head"] % hp["n_head_kv"]:
        raise LorakitError(f"n_head {hp['n_head']} is not a multiple of n_head_kv {hp['n_head_kv']}", p)
    if hp["n_layer"] > len(gf.tensor_names()):
        raise LorakitError(f"block_count {hp['n_layer']} is more than the file's tensors can hold", p)
    if hp["rope_dim"] is None:
        hp["rope_dim"] = hp["n_embd"] // hp["n_head"]
    hp["norm_eps"] = float(k.get("llama.attention.layer_norm_rms_epsilon", F32, False, 1e-5))
    hp["rope_freq_base"] = float(k.get("llama.rope.freq_base", F32, False, 10000.0))
    hp["rope_scale_linear"] = float(k.get("llama.rope.scale_linear", F32, False, 1.0))
    if args is not None:
        for name in ("n_embd", "n_ff", "n_head", "n_head_kv", "n_layer"):
            if hp[name] != getattr(args, name):
                raise LorakitError(
                    f"checkpoint is for another model: {name} {hp[name]} != {getattr(args, name)} "
                    "(checkpoint vs base model)",
                    p,
                )
    ranks = LoraRanks({kind: int(k.get(f"training.lora.rank.{kind}", U32)) for kind in KINDS})

    # training state
    tver = k.get("training.file_version", U32)
    st: dict = {}
    if tver == 0:
        st["train_its"] = k.get("training.iteration_count", U32)
        st["train_samples"] = k.get("training.sample_count", U32)
        st["train_tokens"] = k.get("training.token_count", U32)
    elif tver == 1:
        st["train_its"] = k.get("training.iteration_count", U64)
        st["train_samples"] = k.get("training.sample_count", U64)
        st["train_tokens"] = k.get("training.token_count", U64)
        st["train_epochs"] = k.get("training.epoch_count", U64)
        st["shuffle_samples_hash"] = k.get("training.shuffle.samples_hash", U64, False, 0)
        st["shuffle_rng_state"] = k.get("training.shuffle.rng_state", STR, False, "")
        st["shuffle_sample_count"] = k.get("training.shuffle.sample_count", U64, False, 0)
        st["shuffle_next_sample"] = k.get("training.shuffle.next_sample", U64, False, 0)
    else:
        raise LorakitError(f"unsupported training.file_version {tver} (expected 0 or 1)", p)

    # optimizer
    over = k.get("optimizer.file_version", U32)
    if over != 0:
        raise LorakitError(f"unsupported optimizer.file_version {over} (expected 0)", p)
    st["opt_past"] = k.get("optimizer.convergence_past_count", U32)
    st["opt_iter"] = k.get("optimizer.iteration_count", U32)
    st["just_initialized"] = bool(k.get("optimizer.just_initialized", BOOL))
    st["nx"] = nx = k.get("optimizer.parameter_count", U64)
    otype = k.get("optimizer.type", STR)
    if otype != "adam":
        raise LorakitError(f"optimizer.type is {otype!r}; only 'adam' checkpoints are supported", p)
    st["best_loss"] = float(k.get("optimizer.adam.best_loss", F32))
    st["previous_loss"] = float(k.get("optimizer.adam.previous_loss", F32))
    st["no_improvement_count"] = k.get("optimizer.adam.no_improvement_count", U32)

    lora = _read_lora(gf, hp, ranks, args)
    shapes = {n: (tuple(a.shape), tuple(b.shape)) for n, (a, b) in lora.items()}
    total = sum(int(a.numel() + b.numel()) for a, b in lora.values())
    if total != nx:
        raise LorakitError(f"optimizer.parameter_count is {nx}, but the LoRA tensors hold {total} values", p)
    m = _flat_tensor(gf, M_NAME, nx)
    v = _flat_tensor(gf, V_NAME, nx)
    past = _flat_tensor(gf, PAST_NAME, st["opt_past"]) if st["opt_past"] > 0 else None
    order = detect_moment_order(v, shapes)
    return Checkpoint(**hp, ranks=ranks, lora=lora, m=m, v=v, past_loss_values=past, moment_order=order, **st)


def _tensor(gf: GGUFFile, name: str) -> np.ndarray:
    if not gf.has(name):
        raise LorakitError(f"missing tensor {name!r}", gf.path)
    info = gf.info(name)
    if info.type_name != "F32":
        raise LorakitError(f"tensor {name!r} has type {info.type_name}, expected F32", gf.path)
    return gf.float_array(name)


def _flat_tensor(gf: GGUFFile, name: str, n: int) -> torch.Tensor:
    arr = _tensor(gf, name)
    if arr.shape != (n,):
        raise LorakitError(f"tensor {name!r} has shape {list(arr.shape)}, expected [{n}]", gf.path)
    return torch.from_numpy(arr.copy())


def _read_lora(gf: GGUFFile, hp: dict, ranks: LoraRanks, args: ModelArgs | None) -> dict:
    n_vocab = 1  # placeholder when neither token_embd nor output has a LoRA
    for name in ("token_embd.weight.lora_b", "output.weight.lora_b"):
        if gf.has(name) and len(gf.info(name).shape) == 2:
            n_vocab = gf.info(name).shape[0]
            break
    if args is not None and ranks["token_embd"] + ranks["output"] > 0 and n_vocab != args.n_vocab:
        raise LorakitError(
            f"checkpoint is for another model: n_vocab {n_vocab} != {args.n_vocab} (checkpoint vs base model)",
            gf.path,
        )
    shape_args = ModelArgs(n_vocab, hp["n_embd"], hp["n_ff"], hp["n_head"], hp["n_head_kv"], hp["n_layer"])
    lora = {}
    for name, (want_a, want_b) in lora_shapes(shape_args, ranks).items():
        a = _tensor(gf, f"{name}.lora_a")
        b = _tensor(gf, f"{name}.lora_b")
        r = want_a[1]
        if kind_of(name) in NORMS and b.shape == (r,):
            b = b.reshape(1, r)  # 1-D since 2023-12-14 ([r, 1] before)
        for tname, arr, want in ((f"{name}.lora_a", a, want_a), (f"{name}.lora_b", b, want_b)):
            if arr.shape != want:
                raise LorakitError(
                    f"tensor {tname!r} has shape {list(arr.shape)}, expected {list(want)} "
                    f"(rank {r} from training.lora.rank.{kind_of(name)})",
                    gf.path,
                )
        lora[name] = (torch.from_numpy(a.copy()), torch.from_numpy(b.copy()))
    return lora


# --------------------------------------------------------------------------- writing


def _np32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def write_checkpoint(path: str | os.PathLike, ck: Checkpoint) -> None:
    """Write `ck` as finetune does: the 43 keys of §6.2 in order and type, then the tensors of §6.3."""
    if ck.m is None or ck.v is None:
        raise ValueError("checkpoint has no moment vectors (m, v)")
    m, v = _np32(ck.m).reshape(-1), _np32(ck.v).reshape(-1)
    total = sum(int(np.prod(a.shape)) + int(np.prod(b.shape)) for a, b in ck.lora.values())
    if not (ck.nx == total == m.size == v.size):
        raise ValueError(f"nx {ck.nx}, LoRA values {total}, m {m.size}, v {v.size} must all be equal")
    past = None
    if ck.opt_past > 0:
        if ck.past_loss_values is None:
            raise ValueError("opt_past > 0 needs past_loss_values")
        past = _np32(ck.past_loss_values).reshape(-1)
        if past.size != ck.opt_past:
            raise ValueError(f"past_loss_values has {past.size} values, opt_past is {ck.opt_past}")

    def fill(w) -> None:
        import gguf

        # GGUFWriter.add_string silently skips empty strings; llama.cpp writes them
        def add_str(key: str, val: str) -> None:
            w.add_key_value(key, val, gguf.GGUFValueType.STRING)

        w.add_string("training.type", "finetune_lora")
        w.add_string("general.architecture", "llama")
        w.add_uint32("general.file_type", 0)
        w.add_uint32("llama.context_length", int(ck.n_ctx))
        w.add_uint32("llama.embedding_length", int(ck.n_embd))
        w.add_uint32("llama.feed_forward_length", int(ck.n_ff))
        w.add_uint32("llama.attention.head_count", int(ck.n_head))
        w.add_uint32("llama.attention.head_count_kv", int(ck.n_head_kv))
        w.add_uint32("llama.block_count", int(ck.n_layer))
        w.add_uint32("llama.rope.dimension_count", int(ck.rope_dim))
        w.add_float32("llama.attention.layer_norm_rms_epsilon", float(ck.norm_eps))
        w.add_float32("llama.rope.freq_base", float(ck.rope_freq_base))
        w.add_float32("llama.rope.scale_linear", float(ck.rope_scale_linear))
        for kind in KINDS:
            w.add_uint32(f"training.lora.rank.{kind}", int(ck.ranks[kind]))
        w.add_uint32("training.file_version", 1)
        w.add_uint64("training.iteration_count", int(ck.train_its))
        w.add_uint64("training.sample_count", int(ck.train_samples))
        w.add_uint64("training.token_count", int(ck.train_tokens))
        w.add_uint64("training.epoch_count", int(ck.train_epochs))
        w.add_uint64("training.shuffle.samples_hash", int(ck.shuffle_samples_hash))
        add_str("training.shuffle.rng_state", ck.shuffle_rng_state)
        w.add_uint64("training.shuffle.sample_count", int(ck.shuffle_sample_count))
        w.add_uint64("training.shuffle.next_sample", int(ck.shuffle_next_sample))
        w.add_uint32("optimizer.file_version", 0)
        w.add_uint32("optimizer.convergence_past_count", int(ck.opt_past))
        w.add_uint64("optimizer.parameter_count", int(ck.nx))
        w.add_uint32("optimizer.iteration_count", int(ck.opt_iter))
        w.add_bool("optimizer.just_initialized", bool(ck.just_initialized))
        w.add_string("optimizer.type", "adam")
        w.add_float32("optimizer.adam.best_loss", float(ck.best_loss))
        w.add_float32("optimizer.adam.previous_loss", float(ck.previous_loss))
        w.add_uint32("optimizer.adam.no_improvement_count", int(ck.no_improvement_count))
        for name in checkpoint_tensor_order(ck.lora):
            a, b = ck.lora[name]
            a32, b32 = _np32(a), _np32(b)
            if b32.ndim == 2 and b32.shape[0] == 1:
                b32 = b32.reshape(-1)  # ggml_n_dims: norm lora_b [r, 1] is written 1-D
            w.add_tensor(f"{name}.lora_a", a32)
            w.add_tensor(f"{name}.lora_b", b32)
        w.add_tensor(M_NAME, m)
        w.add_tensor(V_NAME, v)
        if past is not None:
            w.add_tensor(PAST_NAME, past)

    write_gguf_atomic(path, fill)
