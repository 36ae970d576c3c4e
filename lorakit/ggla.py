"""The legacy `ggla` LoRA adapter written by llama.cpp's `finetune --lora-out` (spec §7, §8).

Layout (little-endian): u32 magic 0x67676C61 (bytes "algg"), u32 version 1, u32 r (the default rank),
u32 alpha; then records: i32 n_dims, i32 name_len, i32 type (0 F32, 1 F16), n_dims x i32 ne (ggml order),
the name, zero padding to the next absolute file offset that is a multiple of 32, the data.
Names are `<base>.loraA` / `<base>.loraB`; loraA ne = [r, n_in], loraB ne = [r, n_out] (norms: [r]).

In numpy order the bytes of loraA are an (n_in, r) array and loraB an (n_out, r) array, which is
exactly lorakit's internal convention (lora.py): a (in, r), b (out, r), dW = b @ a.T.
The old runtime applied every pair with scale alpha/r from the header (§8).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import LorakitError
from .gguf_io import GGLA_MAGIC, GGUF_MAGIC, atomic_write_bytes
from .lora import LoraAdapter, LoraPair

GGLA_VERSION = 1
ALIGN = 32
_TYPES = {0: (np.float32, 4, "F32"), 1: (np.float16, 2, "F16")}
_MAX_NAME = 4096


def describe_gguf(path: str | os.PathLike) -> str:
    """What a GGUF file is, as a phrase: 'finetune checkpoint', 'LoRA adapter' or 'model'."""
    from .gguf_io import GGUFFile

    try:
        gf = GGUFFile(path)
    except LorakitError:
        return "unreadable GGUF file"
    if gf.get("training.type") is not None or gf.get("training.file_version") is not None:
        return "finetune checkpoint"
    if gf.get("general.type") == "adapter":
        return "LoRA adapter"
    return "model"


def _gguf_hint(path: Path) -> str:
    what = describe_gguf(path)
    if what == "finetune checkpoint":
        return (
            "bad file magic: this is a finetune checkpoint, not an adapter; "
            "the adapter is the file written by --lora-out"
        )
    if what == "LoRA adapter":
        return "bad file magic: this is a GGUF LoRA adapter, not a ggla .bin (load it as a GGUF adapter)"
    if what == "model":
        return "bad file magic: this is a GGUF model, not a LoRA adapter"
    return "bad file magic: a GGUF file, not a ggla LoRA adapter"


def ggml_n_dims(ne: list[int]) -> int:
    """ggml_n_dims: the count up to the last dimension > 1 (minimum 1)."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def _split_name(name: str) -> tuple[str, str] | None:
    """'blk.0.attn_q.weight.loraA' -> ('blk.0.attn_q.weight', 'a'); None when not a LoRA name."""
    pos = name.rfind(".lora")
    if pos <= 0:
        return None
    suffix = name[pos + len(".lora") :]
    if suffix not in ("A", "B"):
        return None
    return name[:pos], suffix.lower()


def read_ggla(path: str | os.PathLike) -> LoraAdapter:
    """Read a `ggla` adapter; pairs in lorakit's convention, scale = alpha/r (header) for every pair."""
    from .gguf_io import file_magic

    p = Path(path)
    magic = file_magic(p)
    if magic != GGLA_MAGIC:
        if magic == GGUF_MAGIC:
            raise LorakitError(_gguf_hint(p), p)
        if len(magic) < 4:
            raise LorakitError(f"bad file magic: file is only {len(magic)} bytes, not a ggla LoRA adapter", p)
        raise LorakitError(f"bad file magic {magic!r} (expected b'algg', a ggla LoRA adapter)", p)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise LorakitError(f"cannot read file ({e.strerror})", p) from None
    size = len(data)
    if size < 16:
        raise LorakitError(f"truncated ggla header ({size} bytes, expected 16)", p)
    version, r, alpha = struct.unpack_from("<III", data, 4)
    if version != GGLA_VERSION:
        raise LorakitError(f"unsupported ggla file version {version} (expected {GGLA_VERSION})", p)
    if r == 0:
        raise LorakitError("ggla header has rank r = 0 (the scale alpha/r is undefined)", p)
    scale = alpha / r

    arrays: dict[str, dict[str, np.ndarray]] = {}
    order: list[str] = []
    records: list[tuple[str, str, tuple[int, ...], int]] = []  # (name, type, ne, bytes) in file order
    pending: str | None = None  # base name whose partner must come next
    pos = 16
    while pos < size:
        if pos + 12 > size:
            raise LorakitError(f"truncated tensor record header at offset {pos} (file cut short?)", p)
        n_dims, name_len, ftype = struct.unpack_from("<iii", data, pos)
        if n_dims not in (1, 2):
            raise LorakitError(f"tensor record at offset {pos} has n_dims {n_dims} (expected 1 or 2)", p)
        if name_len <= 0 or name_len > _MAX_NAME or pos + 12 + 4 * n_dims + name_len > size:
            raise LorakitError(f"tensor record at offset {pos} has an impossible name length {name_len}", p)
        if ftype not in _TYPES:
            raise LorakitError(f"tensor record at offset {pos} has type {ftype} (only F32=0 and F16=1)", p)
        ne = list(struct.unpack_from(f"<{n_dims}i", data, pos + 12))
        name_at = pos + 12 + 4 * n_dims
        try:
            name = data[name_at : name_at + name_len].decode("utf-8")
        except UnicodeDecodeError:
            raise LorakitError(f"tensor record at offset {pos} has a name that is not UTF-8", p) from None
        if any(d <= 0 for d in ne):
            raise LorakitError(f"tensor {name!r} has an invalid shape {ne}", p)
        dtype, elsize, _ = _TYPES[ftype]
        count = int(np.prod(ne, dtype=np.int64))
        start = -(-(name_at + name_len) // ALIGN) * ALIGN
        end = start + count * elsize
        if end > size:
            raise LorakitError(
                f"tensor {name!r} needs {count * elsize} bytes at offset {start}, past the end of the "
                f"{size}-byte file (truncated?)",
                p,
            )
        split = _split_name(name)
        if split is None:
            raise LorakitError(f"tensor {name!r} is not a LoRA tensor (name must end in .loraA or .loraB)", p)
        base, which = split
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=start).astype(np.float32)
        records.append((name, _TYPES[ftype][2], tuple(ne), count * elsize))
        # numpy order = reversed ne: (n_in, r) for A, (n_out, r) for B; a 1-D [r] is (1, r)
        arr = arr.reshape(ne[1] if n_dims == 2 else 1, ne[0])
        if pending is None:
            if base in arrays:
                raise LorakitError(f"tensor {name!r} appears twice", p)
            arrays[base] = {which: arr}
            order.append(base)
            pending = base
        elif base != pending or which in arrays[base]:
            raise LorakitError(
                f"tensor {name!r} comes where the partner of {pending!r} should be "
                "(loraA and loraB of one tensor must be adjacent)",
                p,
            )
        else:
            arrays[base][which] = arr
            pending = None
        pos = end
    if pending is not None:
        missing = "loraB" if "a" in arrays[pending] else "loraA"
        raise LorakitError(f"tensor {pending}.{missing} is missing (file cut short?)", p)
    if not order:
        raise LorakitError("ggla file has no tensors", p)

    pairs: dict[str, LoraPair] = {}
    for base in order:
        a, b = arrays[base]["a"], arrays[base]["b"]
        if a.shape[1] != b.shape[1]:
            raise LorakitError(f"tensor {base!r}: loraA rank {a.shape[1]} != loraB rank {b.shape[1]}", p)
        pairs[base] = LoraPair(torch.from_numpy(a), torch.from_numpy(b), scale)
    meta = {"version": version, "order": order, "records": records}
    return LoraAdapter(pairs, alpha=float(alpha), rank=int(r), source=str(p), format="ggla", meta=meta)


def _as_f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _record(name: str, arr: np.ndarray, offset: int) -> bytes:
    """One record at absolute file offset `offset`; arr is 2-D in numpy order."""
    ne = [int(d) for d in reversed(arr.shape)]
    n_dims = ggml_n_dims(ne)
    ne = ne[:n_dims]
    raw = name.encode("utf-8")
    head = struct.pack(f"<iii{n_dims}i", n_dims, len(raw), 0, *ne) + raw
    pad = (-(offset + len(head))) % ALIGN
    return head + b"\0" * pad + arr.tobytes()


def ggla_bytes(adapter_pairs: dict, r: int, alpha: int) -> bytes:
    """The exact bytes finetune writes for these pairs (record order = dict order)."""
    if not (0 <= int(r) < 2**32 and 0 <= int(alpha) < 2**32):
        raise ValueError(f"ggla header r={r}, alpha={alpha} must be unsigned 32-bit integers")
    out = [GGLA_MAGIC + struct.pack("<III", GGLA_VERSION, int(r), int(alpha))]
    offset = 16
    for name, (a, b) in adapter_pairs.items():
        a32, b32 = _as_f32(a), _as_f32(b)
        if a32.ndim != 2 or b32.ndim != 2 or a32.shape[1] != b32.shape[1]:
            raise ValueError(f"{name}: expected a (in, r) and b (out, r), got {a32.shape} and {b32.shape}")
        for suffix, arr in (("loraA", a32), ("loraB", b32)):
            rec = _record(f"{name}.{suffix}", arr, offset)
            out.append(rec)
            offset += len(rec)
    return b"".join(out)


def write_ggla(path: str | os.PathLike, adapter_pairs: dict, r: int, alpha: int) -> None:
    """Write a `ggla` file byte-for-byte as finetune does; adapter_pairs: name -> (a (in, r), b (out, r)).

    Pass the pairs in checkpoint order (token_embd, output_norm, output, then per layer). Norm B
    vectors (1, r) are written 1-D, as ggml_n_dims does.
    """
    atomic_write_bytes(path, [ggla_bytes(adapter_pairs, r, alpha)])
