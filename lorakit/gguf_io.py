"""Thin layer over the `gguf` package: open any GGUF file, read metadata and tensors, write files.

Shapes are reported in numpy order (the reverse of ggml's ne), so a 2-D weight with
ne = [n_in, n_out] is (n_out, n_in) here, matching a PyTorch (out, in) weight.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LorakitError

GGUF_MAGIC = b"GGUF"
GGLA_MAGIC = b"algg"  # 0x67676C61 little-endian


def file_magic(path: str | os.PathLike) -> bytes:
    """First four bytes of a file, or a clear error when it cannot be read."""
    p = Path(path)
    if not p.exists():
        raise LorakitError("file not found", p)
    if p.is_dir():
        raise LorakitError("is a directory, expected a file", p)
    try:
        with open(p, "rb") as f:
            return f.read(4)
    except OSError as e:
        raise LorakitError(f"cannot read file ({e.strerror})", p) from None


def _check_header(path: Path) -> None:
    """Reject files whose header claims more tensors/keys than the file could hold (bounded memory)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise LorakitError("not a GGUF file (bad magic)", path)
    if len(head) < 24:
        raise LorakitError("truncated GGUF header", path)
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise LorakitError(f"unsupported GGUF version {version}", path)
    # every tensor info takes at least 8+1+4+8+4+8 bytes and every key/value at least 8+1+4+1
    if n_tensors * 33 + n_kv * 14 > size:
        raise LorakitError(
            f"GGUF header claims {n_tensors} tensors and {n_kv} keys, more than the file's {size} bytes can hold",
            path,
        )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _check_kv_lengths(path, buf, n_kv)


# byte size of each scalar GGUF value type; 8 = string, 9 = array
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _check_kv_lengths(path: Path, buf, n_kv: int) -> None:
    """Walk the key/value section checking every length against the file size, without decoding.

    The `gguf` reader walks arrays element by element and clips reads at the end of the file, so an
    absurd string or array length would make it loop (and allocate) without end.
    """
    size = len(buf)

    def need(pos: int, n: int, what: str) -> int:
        if pos + n > size:
            raise LorakitError(
                f"corrupt or truncated GGUF metadata: {what} at offset {pos} needs {n} bytes, "
                f"past the end of the {size}-byte file",
                path,
            )
        return pos + n

    def value(pos: int, vtype: int, depth: int) -> int:
        if vtype in _SCALAR_SIZE:
            return need(pos, _SCALAR_SIZE[vtype], "a value")
        if vtype == 8:
            n = struct.unpack_from("<Q", buf, need(pos, 8, "a string length") - 8)[0]
            return need(pos + 8, n, "a string")
        if vtype == 9 and depth < 4:
            itype, count = struct.unpack_from("<IQ", buf, need(pos, 12, "an array header") - 12)
            pos += 12
            if itype in _SCALAR_SIZE:
                return need(pos, count * _SCALAR_SIZE[itype], f"an array of {count} values")
            need(pos, count * 8, f"an array of {count} values")  # every element takes >= 8 bytes
            for _ in range(count):
                pos = value(pos, itype, depth + 1)
            return pos
        raise LorakitError(f"corrupt GGUF metadata: unknown value type {vtype} at offset {pos}", path)

    pos = 24
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", buf, need(pos, 8, "a key length") - 8)[0]
        pos = need(pos + 8, n + 4, "a key")
        pos = value(pos, struct.unpack_from("<I", buf, pos - 4)[0], 0)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (ne reversed)
    ggml_type: int
    type_name: str
    n_bytes: int


class GGUFFile:
    """A memory-mapped GGUF file: metadata as plain Python values, tensors as numpy views."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        magic = file_magic(self.path)
        if magic == GGLA_MAGIC:
            raise LorakitError("is a ggla LoRA adapter (.bin), not a GGUF file", self.path)
        if magic != GGUF_MAGIC:
            raise LorakitError(f"not a GGUF file (bad magic {magic!r})", self.path)
        _check_header(self.path)
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors
            raise LorakitError(f"corrupt or truncated GGUF file ({type(e).__name__}: {e})", self.path) from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.fields: dict[str, object] = {}
        for name, field in self._reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                self.fields[name] = field.contents()
            except Exception as e:
                raise LorakitError(f"cannot decode metadata key {name!r} ({e})", self.path) from None
        self.field_types: dict[str, int] = {
            name: int(field.types[0]) for name, field in self._reader.fields.items() if field.types
        }

    # metadata -------------------------------------------------------------
    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def require(self, key: str):
        if key not in self.fields:
            raise LorakitError(f"missing metadata key {key!r}", self.path)
        return self.fields[key]

    @property
    def architecture(self) -> str | None:
        return self.fields.get("general.architecture")

    # tensors --------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        return TensorInfo(name, shape, int(t.tensor_type), t.tensor_type.name, int(t.n_bytes))

    def infos(self) -> Iterator[TensorInfo]:
        for name in self._tensors:
            yield self.info(name)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's data as stored (a memmap view; quantized types come as uint8 rows)."""
        if name not in self._tensors:
            raise LorakitError(f"missing tensor {name!r}", self.path)
        return self._tensors[name].data

    def read_copy(self, name: str) -> np.ndarray:
        """Like raw(), but read into a private buffer with plain file I/O: the memory map's pages are
        never touched, so loading a model costs its size in memory once, not twice."""
        if name not in self._tensors:
            raise LorakitError(f"missing tensor {name!r}", self.path)
        t = self._tensors[name]
        view = t.data  # a lazy memmap view: gives dtype and shape without reading
        try:
            buf = np.fromfile(self.path, dtype=np.uint8, count=int(t.n_bytes), offset=int(t.data_offset))
        except OSError as e:
            raise LorakitError(f"cannot read tensor {name!r} ({e})", self.path) from None
        if buf.size != int(t.n_bytes):
            raise LorakitError(f"tensor {name!r} is truncated", self.path)
        return buf.view(view.dtype).reshape(view.shape)

    def float_array(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy order, dequantizing through `gguf` where needed."""
        import gguf

        info = self.info(name)
        data = self.raw(name)
        if info.ggml_type == gguf.GGMLQuantizationType.F32:
            return np.asarray(data, dtype=np.float32).reshape(info.shape)
        try:
            out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(info.ggml_type))
        except NotImplementedError:
            raise LorakitError(
                f"tensor {name!r} has type {info.type_name}, which cannot be dequantized", self.path
            ) from None
        return np.asarray(out, dtype=np.float32).reshape(info.shape)


@contextlib.contextmanager
def _atomic_target(path: Path):
    """Yield a temporary name beside `path`; on success the caller has written it and it is renamed
    into place; on any failure it is removed and `path` is untouched. OSErrors become one-line errors."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise LorakitError(f"cannot write file ({e.strerror or e})", path) from None
        raise


def write_gguf_atomic(path: str | os.PathLike, fill) -> None:
    """Write a GGUF file through `gguf.GGUFWriter` to a temporary name, then rename it into place.

    `fill(writer)` adds keys and tensors. An interrupted write never leaves a partial file at `path`.
    """
    import gguf

    with _atomic_target(Path(path)) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="")  # an empty arch adds no key
        # GGUFWriter always puts general.architecture first; llama.cpp's checkpoints put
        # training.type first, so fill() adds every key itself, in file order.
        writer.kv_data[0].pop("general.architecture", None)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def atomic_write_bytes(path: str | os.PathLike, chunks) -> None:
    """Write an iterable of bytes-like chunks to a temporary file, fsync, then rename into place."""
    with _atomic_target(Path(path)) as tmp, open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a finished file to another name through a temporary file and a rename."""
    with _atomic_target(Path(dst)) as tmp:
        shutil.copyfile(src, tmp)
