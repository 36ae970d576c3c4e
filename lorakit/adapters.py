"""LoRA adapter files: the legacy `ggla` .bin (ggla.py) and current llama.cpp GGUF adapters (spec §9).

GGUF adapter convention (numpy order, i.e. ggml ne reversed), for a base W (out, in):
    lora_a (r, in)   lora_b (out, r)      dW = lora_b @ lora_a, scale alpha/rank (rank = lora_b.ne0)
token_embd (V, E) is flipped: lora_a (V, r), lora_b (E, r); row v gains lora_b @ lora_a[v].
lorakit's internal convention (lora.py) is a (in, r), b (out, r), dW = b @ a.T; token_embd a (E, r),
b (V, r). So: matrices a = lora_a.T, b = lora_b; token_embd a = lora_b, b = lora_a.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import LorakitError
from .ggla import describe_gguf, read_ggla, write_ggla  # noqa: F401  (re-exported)
from .gguf_io import GGLA_MAGIC, GGUF_MAGIC, GGUFFile, file_magic, write_gguf_atomic
from .lora import NORMS, LoraAdapter, LoraPair, base_shape, kind_of
from .model import ModelArgs

TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
_ACCEPTED_TYPES = ("F32", "F16", "BF16", "Q8_0")
_WHICH_FILE = "pass the .bin/.gguf written by --lora-out"


def _is_norm(name: str) -> bool:
    return kind_of(name) in NORMS or name.endswith("_norm.weight")


def _check_gguf_adapter(gf: GGUFFile) -> None:
    if gf.get("training.type") is not None or gf.get("training.file_version") is not None:
        raise LorakitError(f"is a finetune checkpoint, not a LoRA adapter: {_WHICH_FILE}", gf.path)
    gtype = gf.get("general.type")
    if gtype != "adapter":
        if gtype is None or gtype == "model":
            raise LorakitError(f"is a model, not a LoRA adapter: {_WHICH_FILE}", gf.path)
        raise LorakitError(f"general.type is {gtype!r}, expected 'adapter'", gf.path)
    atype = gf.get("adapter.type")
    if atype != "lora":
        raise LorakitError(f"adapter.type is {atype!r}, expected 'lora'", gf.path)
    arch = gf.architecture
    if arch != "llama":
        raise LorakitError(f"adapter architecture is {arch!r}, only 'llama' is supported", gf.path)


def _read_gguf_adapter(gf: GGUFFile) -> LoraAdapter:
    _check_gguf_adapter(gf)
    path = gf.path
    alpha_raw = gf.get("adapter.lora.alpha", 0.0)
    try:
        alpha = float(alpha_raw)
    except (TypeError, ValueError):
        raise LorakitError(f"adapter.lora.alpha is not a number ({alpha_raw!r})", path) from None

    halves: dict[str, dict[str, str]] = {}
    ignored: list[str] = []
    for name in gf.tensor_names():
        if name.endswith(".lora_a") or name.endswith(".lora_b"):
            base, which = name[: -len(".lora_a")], name[-1]
            if which in halves.setdefault(base, {}):
                raise LorakitError(f"tensor {name!r} appears twice", path)
            halves[base][which] = name
        elif name.endswith("_norm.weight"):
            ignored.append(name)  # a full replacement norm (mergekit); llama.cpp skips it
        else:
            raise LorakitError(f"tensor {name!r} has an unexpected suffix (expected .lora_a/.lora_b)", path)

    pairs: dict[str, LoraPair] = {}
    ranks: set[int] = set()
    for base, h in halves.items():
        if "a" not in h or "b" not in h:
            missing = "lora_a" if "a" not in h else "lora_b"
            raise LorakitError(f"tensor {base}.{missing} is missing (LoRA tensors come in pairs)", path)
        if _is_norm(base):
            ignored.append(base)  # norm LoRAs load in llama.cpp but are never applied
            continue
        arrs = []
        for which in ("a", "b"):
            info = gf.info(h[which])
            if info.type_name not in _ACCEPTED_TYPES:
                raise LorakitError(
                    f"tensor {h[which]!r} has type {info.type_name} (expected one of {', '.join(_ACCEPTED_TYPES)})",
                    path,
                )
            if len(info.shape) != 2:
                raise LorakitError(f"tensor {h[which]!r} has shape {list(info.shape)}, expected 2-D", path)
            arrs.append(gf.float_array(h[which]))
        ga, gb = arrs
        if base == TOKEN_EMBD:
            # flipped: lora_a (V, r), lora_b (E, r)
            if ga.shape[1] != gb.shape[1]:
                raise LorakitError(
                    f"tensor {base!r}: lora_a {list(ga.shape)} and lora_b {list(gb.shape)} have different ranks",
                    path,
                )
            a, b = gb, ga
        else:
            if ga.shape[0] != gb.shape[1]:
                raise LorakitError(
                    f"tensor {base!r}: lora_a {list(ga.shape)} does not match lora_b {list(gb.shape)} "
                    "(lora_a is not transposed?)",
                    path,
                )
            a, b = ga.T, gb
        rank = int(b.shape[1])
        ranks.add(rank)
        scale = alpha / rank if alpha != 0 else 1.0
        a_t = torch.from_numpy(np.array(a, dtype=np.float32, order="C"))
        b_t = torch.from_numpy(np.array(b, dtype=np.float32, order="C"))
        pairs[base] = LoraPair(a_t, b_t, scale)
    if not pairs and not ignored:
        raise LorakitError("GGUF adapter has no LoRA tensors", path)
    meta = {"ignored": ignored, "name": gf.get("general.name")}
    rank = ranks.pop() if len(ranks) == 1 else None
    return LoraAdapter(pairs, alpha=alpha, rank=rank, source=str(path), format="gguf", meta=meta)


def read_gguf_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read a current llama.cpp GGUF LoRA adapter into lorakit's convention.

    Per-pair scale = alpha/rank (rank of that pair), or 1 when alpha is 0 or missing. Norm pairs are
    left out of `pairs` (llama.cpp ignores them at runtime) and listed in meta['ignored'].
    """
    return _read_gguf_adapter(GGUFFile(path))


def gguf_adapter_tensors(
    pairs: dict, alpha_hdr: float, r_hdr: int, tied_output: bool = False
) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """(GGUF tensors in order, dropped base names) for the §9.4 "bake" conversion."""
    if r_hdr <= 0:
        raise ValueError(f"header rank must be positive, got {r_hdr}")
    factor = np.float32(float(alpha_hdr) / float(r_hdr))
    tensors: list[tuple[str, np.ndarray]] = []
    dropped: list[str] = []
    for name, (a, b) in pairs.items():
        if _is_norm(name) or (tied_output and name in (TOKEN_EMBD, OUTPUT)):
            dropped.append(name)
            continue
        a32 = _f32(a)
        b32 = _f32(b)
        if a32.ndim != 2 or b32.ndim != 2 or a32.shape[1] != b32.shape[1]:
            raise ValueError(f"{name}: expected a (in, r) and b (out, r), got {a32.shape} and {b32.shape}")
        if name == TOKEN_EMBD:
            ga, gb = b32, a32  # lora_a (V, r), lora_b (E, r)
        else:
            ga, gb = a32.T, b32  # lora_a (r, in), lora_b (out, r)
        if factor != 1:
            gb = gb * factor
        tensors.append((f"{name}.lora_a", np.ascontiguousarray(ga, dtype=np.float32)))
        tensors.append((f"{name}.lora_b", np.ascontiguousarray(gb, dtype=np.float32)))
    return tensors, dropped


def _f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def write_gguf_adapter(
    path: str | os.PathLike,
    pairs: dict,
    alpha_hdr: float,
    r_hdr: int,
    tied_output: bool = False,
    name: str = "lorakit LoRA adapter",
) -> list[str]:
    """Write pairs (name -> (a (in, r), b (out, r)), lorakit convention) as a GGUF LoRA adapter.

    §9.4 bake mode: every lora_b is multiplied by alpha_hdr/r_hdr and adapter.lora.alpha is 0, so
    llama.cpp applies scale = the user's scale and reproduces the old ggla runtime for any per-tensor
    ranks. Norm LoRAs are dropped (llama.cpp ignores them); with tied_output (the base has no
    output.weight) the output and token_embd pairs are dropped too. Returns the dropped names.
    """
    tensors, dropped = gguf_adapter_tensors(pairs, alpha_hdr, r_hdr, tied_output)

    import gguf

    def fill(w) -> None:
        w.add_string("general.architecture", "llama")
        w.add_string("general.type", "adapter")
        w.add_key_value("general.name", name, gguf.GGUFValueType.STRING)
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 0.0)
        for tname, arr in tensors:
            w.add_tensor(tname, arr)

    write_gguf_atomic(path, fill)
    return dropped


def load_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read a `ggla` .bin or a GGUF LoRA adapter, whichever the file is."""
    p = Path(path)
    magic = file_magic(p)
    if magic == GGLA_MAGIC:
        return read_ggla(p)
    if magic == GGUF_MAGIC:
        return _read_gguf_adapter(GGUFFile(p))
    if len(magic) < 4:
        raise LorakitError(f"file is only {len(magic)} bytes, not a LoRA adapter", p)
    raise LorakitError(f"bad file magic {magic!r}: not a ggla .bin or GGUF LoRA adapter", p)


def check_adapter_fits(adapter: LoraAdapter, args: ModelArgs, path: str | os.PathLike | None = None) -> None:
    """Every pair must be a LoRA of a base tensor with the base's shape: a (in, r), b (out, r)."""
    where = path if path is not None else (adapter.source or None)
    expected = args.expected_shapes()
    for name, pair in adapter.pairs.items():
        if name not in expected:
            raise LorakitError(f"adapter does not fit this model (unknown tensor {name!r})", where)
        out_dim, in_dim = base_shape(args, name)
        a_shape, b_shape = tuple(pair.a.shape), tuple(pair.b.shape)
        ok = (
            len(a_shape) == 2
            and len(b_shape) == 2
            and a_shape[0] == in_dim
            and b_shape[0] == out_dim
            and a_shape[1] == b_shape[1]
        )
        if not ok:
            got = f"{b_shape[0]}x{a_shape[0]}" if len(a_shape) == 2 and len(b_shape) == 2 else "?"
            raise LorakitError(
                f"adapter does not fit this model (shape mismatch at {name}: the adapter's delta is {got}, "
                f"the model tensor is {out_dim}x{in_dim})",
                where,
            )
