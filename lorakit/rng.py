"""Bit-exact reimplementations of the C++ standard-library randomness that llama.cpp's finetune uses.

* `MT19937`: `std::mt19937`, with libstdc++'s text state (`operator<<` / `operator>>`).
* `StdNormalFloat`: libstdc++'s `std::normal_distribution<float>` (Marsaglia polar method).
* `std_hash_bytes`: libstdc++'s `_Hash_bytes` (what `std::hash<std::string>` returns on 64-bit).

Bulk draws go through numpy's own MT19937 bit generator, whose state (624 words + position) is set
directly, so they are fast and still the exact std::mt19937 stream (spec §2.3, §5).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

N_WORDS = 624
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _init_genrand(seed: int) -> np.ndarray:
    """The 624 state words after `std::mt19937(seed)` (Matsumoto-Nishimura init_genrand)."""
    key = [0] * N_WORDS
    x = seed & _MASK32
    key[0] = x
    for i in range(1, N_WORDS):
        x = (1812433253 * (x ^ (x >> 30)) + i) & _MASK32
        key[i] = x
    return np.array(key, dtype=np.uint32)


class MT19937:
    """`std::mt19937`. The state is the 624-word key and the position index (624 = twist next)."""

    def __init__(self, seed: int = 5489):
        self._bg = np.random.MT19937(0)
        self.seed(seed)

    # state ----------------------------------------------------------------
    def seed(self, seed: int) -> None:
        self.set_state(_init_genrand(seed), N_WORDS)

    def set_state(self, key, pos: int) -> None:
        key = np.asarray(key, dtype=np.uint32)
        if key.shape != (N_WORDS,) or not 0 <= int(pos) <= N_WORDS:
            raise ValueError("an mt19937 state is 624 words and a position in 0..624")
        self._bg.state = {"bit_generator": "MT19937", "state": {"key": key.copy(), "pos": int(pos)}}

    def get_state(self) -> tuple[np.ndarray, int]:
        st = self._bg.state["state"]
        return np.asarray(st["key"], dtype=np.uint32).copy(), int(st["pos"])

    def copy(self) -> MT19937:
        out = MT19937.__new__(MT19937)
        out._bg = np.random.MT19937(0)
        out.set_state(*self.get_state())
        return out

    # libstdc++ text form --------------------------------------------------
    def to_text(self) -> str:
        """libstdc++ `operator<<`: each of the 624 words followed by a space, then the position."""
        key, pos = self.get_state()
        return "".join(f"{int(w)} " for w in key) + str(pos)

    @classmethod
    def from_text(cls, text: str) -> MT19937:
        """libstdc++ `operator>>` (whitespace-separated decimal words, then the position)."""
        parts = text.split()
        if len(parts) != N_WORDS + 1:
            raise ValueError(f"an mt19937 text state has {N_WORDS + 1} numbers, got {len(parts)}")
        vals = [int(p) for p in parts]
        if any(v < 0 or v > _MASK32 for v in vals[:N_WORDS]):
            raise ValueError("mt19937 state word out of range")
        out = cls.__new__(cls)
        out._bg = np.random.MT19937(0)
        out.set_state(np.array(vals[:N_WORDS], dtype=np.uint32), vals[N_WORDS])
        return out

    @staticmethod
    def seed_text(seed: int) -> str:
        """`mt19937_seed_to_state(seed)`: the text state right after seeding."""
        return MT19937(seed).to_text()

    def __str__(self) -> str:
        return self.to_text()

    # drawing --------------------------------------------------------------
    def next_u32(self) -> int:
        return int(self._bg.random_raw())

    def __call__(self) -> int:
        return self.next_u32()

    def draw(self, n: int) -> np.ndarray:
        """The next n outputs as uint32."""
        if n <= 0:
            return np.zeros(0, dtype=np.uint32)
        return self._bg.random_raw(int(n)).astype(np.uint32)

    def discard(self, n: int) -> None:
        chunk = 1 << 20
        while n > 0:
            k = min(n, chunk)
            self._bg.random_raw(k)
            n -= k


# --------------------------------------------------------------------------
# std::normal_distribution<float>

_libm = None


def _glibc_logf():
    global _libm
    if _libm is None:
        name = ctypes.util.find_library("m") or "libm.so.6"
        _libm = ctypes.CDLL(name)
        _libm.logf.restype = ctypes.c_float
        _libm.logf.argtypes = [ctypes.c_float]
    return _libm.logf


_ONE_BELOW = np.nextafter(np.float32(1.0), np.float32(0.0))
_TWO32 = np.float32(2.0**32)


def canonical_float(raw: np.ndarray) -> np.ndarray:
    """libstdc++ `generate_canonical<float, 24>` of mt19937 outputs: float(x) / 2^32, kept below 1."""
    u = raw.astype(np.float32) / _TWO32
    return np.where(u >= np.float32(1.0), _ONE_BELOW, u).astype(np.float32)


class StdNormalFloat:
    """libstdc++ `std::normal_distribution<float>(mean, stddev)` drawing from an `MT19937`.

    Polar method in float: x = float(double(2u1) - 1), y likewise, r2 = x*x + y*y, reject r2 > 1 or
    r2 == 0; mult = sqrtf(-2 * logf(r2) / r2); return y*mult and keep x*mult for the next call.
    `logf` is glibc's (through ctypes); a double log rounded to float differs in rare cases.
    """

    def __init__(self, rng: MT19937, mean: float = 0.0, stddev: float = 1.0):
        self.rng = rng
        self.mean = np.float32(mean)
        self.stddev = np.float32(stddev)
        self.saved: np.float32 | None = None

    def reset(self) -> None:
        self.saved = None

    def __call__(self) -> np.float32:
        return self.sample(1)[0]

    def _pairs(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """m accepted (x, y) pairs, consuming exactly the MT outputs libstdc++ would consume."""
        xs, ys = [], []
        need = m
        while need > 0:
            key, pos = self.rng.get_state()
            k = int(need * 1.3) + 64  # acceptance rate is pi/4 = 0.785
            raw = self.rng.draw(2 * k)
            u = canonical_float(raw).reshape(k, 2)
            xy = ((np.float32(2.0) * u).astype(np.float64) - 1.0).astype(np.float32)
            x, y = xy[:, 0], xy[:, 1]
            r2 = x * x + y * y
            ok = np.flatnonzero(~((r2 > np.float32(1.0)) | (r2 == np.float32(0.0))))
            take = ok[:need]
            if len(take) == need:
                used = 2 * (int(take[-1]) + 1)
            else:
                used = 2 * k
            self.rng.set_state(key, pos)
            self.rng.discard(used)
            xs.append(x[take])
            ys.append(y[take])
            need -= len(take)
        return np.concatenate(xs), np.concatenate(ys)

    def sample_std(self, n: int) -> np.ndarray:
        """n raw N(0, 1) floats (before mean/stddev), in call order."""
        out = np.empty(n, dtype=np.float32)
        if n == 0:
            return out
        start = 0
        if self.saved is not None:
            out[0] = self.saved
            self.saved = None
            start = 1
        rest = n - start
        if rest == 0:
            return out
        m = (rest + 1) // 2
        x, y = self._pairs(m)
        r2 = x * x + y * y
        logf = _glibc_logf()
        logs = np.fromiter(map(logf, r2.tolist()), dtype=np.float32, count=m)
        mult = np.sqrt((np.float32(-2.0) * logs) / r2).astype(np.float32)
        first = y * mult
        second = x * mult
        seq = np.empty(2 * m, dtype=np.float32)
        seq[0::2] = first
        seq[1::2] = second
        out[start:] = seq[:rest]
        if rest % 2 == 1:
            self.saved = np.float32(second[-1])
        return out

    def sample(self, n: int) -> np.ndarray:
        """The next n values of the distribution (float32), exactly as n calls would give."""
        z = self.sample_std(n)
        if self.stddev == np.float32(1.0) and self.mean == np.float32(0.0):
            return z + np.float32(0.0)  # ret*1 + 0: -0.0 becomes +0.0, as in C++
        return (z * self.stddev).astype(np.float32) + self.mean


# --------------------------------------------------------------------------
# libstdc++ _Hash_bytes (64-bit MurmurHash64A variant)

_M = 0xC6A4A7935BD1E995


def _shift_mix(v: int) -> int:
    return v ^ (v >> 47)


def std_hash_bytes(data: bytes | str, seed: int = 0xC70F6907) -> int:
    """`std::_Hash_bytes(data, len, seed)`; with the default seed this is `std::hash<std::string>`."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    n = len(data)
    h = (seed ^ ((n * _M) & _MASK64)) & _MASK64
    n8 = n & ~7
    for off in range(0, n8, 8):
        w = int.from_bytes(data[off : off + 8], "little")
        d = (_shift_mix((w * _M) & _MASK64) * _M) & _MASK64
        h = ((h ^ d) * _M) & _MASK64
    if n & 7:
        t = int.from_bytes(data[n8:], "little")
        h = ((h ^ t) * _M) & _MASK64
    h = (_shift_mix(h) * _M) & _MASK64
    return _shift_mix(h)
