"""llama.cpp finetune's training-data semantics (spec §2), reproduced exactly.

* `make_samples` / `samples_from_tokens`: `tokenize_file` (§2.1, §2.2): the flat token array and the
  (begin, size) samples in token units.
* `samples_hash`: `compute_samples_hash` (§2.3), over the data path *as typed* and the samples.
* `shuffle_samples`: one epoch's permutation from an mt19937 text state (§2.3).
* `ShuffleState`, `DataState`, `start_data_state`: the training state and the start-of-program logic.
* `build_batch`, `after_batch`, `draw_batch`: `get_example_targets_batch` (§2.4) and the bookkeeping
  that follows every batch (sample counters, epoch wrap, reshuffle).

The tokenizer is passed in as `encode(data: bytes) -> list[int]` (no BOS, llama.cpp's leading space),
so this module does not depend on lorakit's tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .rng import MT19937, std_hash_bytes

EncodeFn = Callable[[bytes], Sequence[int]]
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Samples:
    """The training tokens and the samples in original order (token offsets and counts)."""

    tokens: np.ndarray  # int32, flat
    begins: np.ndarray  # int64
    sizes: np.ndarray  # int64

    @property
    def count(self) -> int:
        return int(len(self.begins))

    def __len__(self) -> int:
        return self.count


def _i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def samples_from_tokens(tokens: Sequence[int] | np.ndarray, ctx: int) -> Samples:
    """Mode (a), no `--sample-start`: sample 0 = (0, min(ctx, T)), then (b, ctx) for b = 1 .. T-ctx-1."""
    toks = np.asarray(tokens, dtype=np.int32)
    t = len(toks)
    end = t - ctx if t >= ctx else 0
    begins = np.concatenate([[0], np.arange(1, max(end, 1), dtype=np.int64)])
    sizes = np.full(len(begins), ctx, dtype=np.int64)
    sizes[0] = min(ctx, t)
    return Samples(toks, _i64(begins), sizes)


def _strtol_hex2(c0: int, c1: int) -> int | None:
    """glibc strtol(x, &end, 16) on a 2-char string; the value if all 2 chars were consumed."""
    hexd = b"0123456789abcdefABCDEF"
    if c1 not in hexd:
        return None
    v1 = int(chr(c1), 16)
    if c0 in hexd:
        return int(chr(c0), 16) * 16 + v1
    if c0 in b" \t\n\v\f\r+":
        return v1
    if c0 == ord("-"):
        return -v1
    return None


def process_escapes(s: bytes | str) -> bytes:
    """llama.cpp `process_escapes`: \\n \\r \\t \\' \\" \\\\ and \\xHH; anything else stays literal."""
    if isinstance(s, str):
        s = s.encode("utf-8", "surrogateescape")
    out = bytearray()
    i, n = 0, len(s)
    simple = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("'"): 39, ord('"'): 34, ord("\\"): 92}
    while i < n:
        c = s[i]
        if c == 0x5C and i + 1 < n:
            i += 1
            e = s[i]
            if e in simple:
                out.append(simple[e])
            elif e == ord("x") and i + 2 < n and (v := _strtol_hex2(s[i + 1], s[i + 2])) is not None:
                i += 2
                out.append(v & 0xFF)
            else:
                out += bytes([0x5C, e])
        else:
            out.append(c)
        i += 1
    return bytes(out)


def _utf8_end_fix(data: bytes, ends: np.ndarray) -> np.ndarray:
    """Move ends that fall inside a multi-byte character (as `mark_utf8_units` marks them: the lead
    byte's high nibble gives the length, continuation bytes are not checked) to the next char start."""
    arr = np.frombuffer(data, dtype=np.uint8)
    leads = np.flatnonzero(arr >= 0xC0)
    if len(leads) == 0:
        return ends
    starts, lens = [], []
    covered = 0
    for p in leads.tolist():
        if p < covered:
            continue  # swallowed by the previous character
        ln = 4 if arr[p] >= 0xF0 else 3 if arr[p] >= 0xE0 else 2
        starts.append(p)
        lens.append(ln)
        covered = p + ln
    st, ln = np.array(starts, dtype=np.int64), np.array(lens, dtype=np.int64)
    idx = np.searchsorted(st, ends, side="right") - 1
    ok = idx >= 0
    s = np.where(ok, st[np.maximum(idx, 0)], 0)
    e = s + np.where(ok, ln[np.maximum(idx, 0)], 0)
    inside = ok & (ends > s) & (ends < e) & (ends < len(data))
    return np.where(inside, np.minimum(e, len(data)), ends)


def make_samples(
    data: bytes,
    ctx: int,
    encode: EncodeFn,
    *,
    sample_start: bytes | str = b"",
    include_sample_start: bool = False,
    escape: bool = False,
    overlapping_samples: bool = False,
    max_token_bytes: int = 0,
) -> Samples:
    """`tokenize_file` (spec §2.2). `data` is the training file's bytes; `sample_start` the pattern as typed
    (`escape` applies `process_escapes`); `max_token_bytes` is the longest token text in bytes over the
    vocabulary (only used with `overlapping_samples`). An empty file gives zero samples."""
    if isinstance(sample_start, str):
        sample_start = sample_start.encode("utf-8", "surrogateescape")
    pattern = process_escapes(sample_start) if escape else bytes(sample_start)
    empty = Samples(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(data) == 0:
        return empty
    if not pattern:
        return samples_from_tokens(list(encode(bytes(data))), ctx)

    offsets = []
    pos = data.find(pattern, 0)
    while pos != -1:
        offsets.append(pos)
        pos = data.find(pattern, pos + len(pattern))
    if not offsets:
        offsets = [0]
    offs = _i64(offsets)
    starts = offs + (0 if include_sample_start else len(pattern))
    if overlapping_samples:
        if max_token_bytes <= 0:
            raise ValueError("overlapping_samples needs max_token_bytes")
        ends = np.minimum(len(data), starts + max_token_bytes * ctx)
    else:
        ends = np.append(offs[1:], len(data))
    ends = _utf8_end_fix(data, ends)

    tokens: list[int] = []
    begins = np.zeros(len(offs), dtype=np.int64)
    sizes = np.zeros(len(offs), dtype=np.int64)
    for i, (b, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        begins[i] = len(tokens)
        if e > b:
            toks = list(encode(data[b:e]))
            sizes[i] = len(toks)
            tokens += toks
    return Samples(np.asarray(tokens, dtype=np.int32), begins, sizes)


def samples_hash(path_as_typed: str | bytes, samples: Samples) -> int:
    """`compute_samples_hash`: h = hash(path); h ^= N<<1; per sample h ^= begin<<1; h ^= size<<1."""
    h = std_hash_bytes(path_as_typed)
    h ^= (samples.count << 1) & _MASK64
    if samples.count:
        b = samples.begins.astype(np.uint64) << np.uint64(1)
        s = samples.sizes.astype(np.uint64) << np.uint64(1)
        h ^= int(np.bitwise_xor.reduce(b ^ s))
    return h


# --------------------------------------------------------------------------- shuffling


@dataclass(frozen=True)
class Permutation:
    """One epoch's shuffled samples: begins, sizes and random offsets, by shuffled position."""

    begins: np.ndarray
    sizes: np.ndarray
    offs: np.ndarray


def shuffle_samples(
    state_text: str, begins: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """`shuffle_samples` (§2.3): N draws sorted by (value, index), then N draws for the offsets
    floor((size-1) * (u / 4294967294.0)). Returns (begins, sizes, offs, state text after the 2N draws)."""
    begins, sizes = _i64(begins), _i64(sizes)
    n = len(begins)
    if n == 0:
        return begins, sizes, np.zeros(0, np.uint64), state_text
    rng = MT19937.from_text(state_text)
    rnd = rng.draw(n)
    idx = np.argsort(rnd, kind="stable")  # ties keep index order
    ratio = rng.draw(n).astype(np.float64) / 4294967294.0
    sm1 = (sizes[idx].astype(np.uint64) - np.uint64(1)).astype(np.float64)  # size 0 wraps to 2^64-1
    v = sm1 * ratio
    big = v >= 2.0**64  # only for size-0 samples, whose offset is never used; x86-64 gives 0
    offs = np.where(big, 0.0, v).astype(np.uint64)
    return begins[idx], sizes[idx], offs, rng.to_text()


@dataclass(frozen=True)
class ShuffleState:
    """train_state's shuffle fields (checkpoint keys training.shuffle.*)."""

    rng_state_current: str = ""
    rng_state_next: str = ""
    sample_count: int = 0
    next_sample: int = 0
    samples_hash: int = 0


@dataclass(frozen=True)
class DataState:
    """Everything the data side carries between batches."""

    shuffle: ShuffleState
    perm: Permutation  # the current epoch's permutation (shuffle of rng_state_current)
    train_samples: int = 0  # training.sample_count
    train_epochs: int = 0  # training.epoch_count


def start_data_state(
    samples: Samples,
    path_as_typed: str | bytes,
    seed: int,
    loaded: ShuffleState | None = None,
    *,
    force_reshuffle: bool = False,
    train_samples: int = 0,
    train_epochs: int = 0,
) -> DataState:
    """Program start: keep the loaded shuffle state unless there is none (empty current state), the
    hash or sample count changed, or `force_reshuffle`; then a fresh state from mt19937(seed). In every
    case next = shuffle(current), which rebuilds the current epoch's permutation.
    `seed` must already be resolved (-1 means time(NULL) in llama.cpp; do that in the caller)."""
    h = samples_hash(path_as_typed, samples)
    st = loaded if loaded is not None else ShuffleState()
    changed = h != st.samples_hash or st.sample_count != samples.count
    if st.rng_state_current == "" or changed or force_reshuffle:
        st = ShuffleState(MT19937.seed_text(int(seed) & 0xFFFFFFFF), "", samples.count, 0, h)
    b, s, o, nxt = shuffle_samples(st.rng_state_current, samples.begins, samples.sizes)
    return DataState(replace(st, rng_state_next=nxt), Permutation(b, s, o), train_samples, train_epochs)


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class BatchOptions:
    n_batch: int
    ctx: int
    n_vocab: int
    bos: int = 1
    eos: int = 2
    separate_with_eos: bool = False
    separate_with_bos: bool = True
    fill_with_next_samples: bool = False
    sample_random_offsets: bool = False


def build_batch(
    samples: Samples, perm: Permutation, example_id: int, opts: BatchOptions
) -> tuple[np.ndarray, np.ndarray, int]:
    """`get_example_targets_batch` (§2.4). Returns (inputs int64 [n_batch, ctx], targets int64
    [n_batch, ctx], used): inputs = [BOS, t0 .. t_{ctx-2}], targets = [t0 .. t_{ctx-1}], EOS after the
    end of a sample (or the next samples with `fill_with_next_samples`), tokens clamped to the vocab."""
    n, ctx = len(perm.begins), opts.ctx
    if n == 0:
        raise ValueError("no samples")
    data = samples.tokens
    targets = np.full((opts.n_batch, ctx), opts.eos, dtype=np.int64)
    used = 0
    for k in range(opts.n_batch):
        idx = (example_id + used) % n
        offs = int(perm.offs[idx]) if opts.sample_random_offsets else 0
        begin, size = int(perm.begins[idx]), int(perm.sizes[idx])
        used += 1
        sep_eos, sep_bos = not opts.separate_with_eos, not opts.separate_with_bos
        row = targets[k]
        pos = 0
        while pos < ctx:
            if offs < size:
                m = min(size - offs, ctx - pos)
                row[pos : pos + m] = np.clip(data[begin + offs : begin + offs + m], 0, opts.n_vocab - 1)
                offs += m
                pos += m
                continue
            if not opts.fill_with_next_samples:
                break  # the rest stays EOS
            if not sep_eos:
                sep_eos = True  # this position is EOS
            elif not sep_bos:
                sep_bos = True
                row[pos] = opts.bos
            else:
                sep_eos, sep_bos = not opts.separate_with_eos, not opts.separate_with_bos
                idx = (example_id + used) % n
                offs, begin, size = 0, int(perm.begins[idx]), int(perm.sizes[idx])
                used += 1
                if size > 0:
                    continue  # its first token goes at this same position
            pos += 1
    inputs = np.empty_like(targets)
    inputs[:, 0] = opts.bos
    inputs[:, 1:] = targets[:, :-1]
    return inputs, targets, used


def after_batch(samples: Samples, ds: DataState, used: int) -> DataState:
    """The bookkeeping after each batch: train_samples += used, next_sample += used; at or past the end
    of the permutation: epochs += 1, current = next, next = shuffle(current), next_sample = 0."""
    st = ds.shuffle
    nxt = st.next_sample + used
    if nxt < st.sample_count:
        return replace(ds, shuffle=replace(st, next_sample=nxt), train_samples=ds.train_samples + used)
    b, s, o, new_next = shuffle_samples(st.rng_state_next, samples.begins, samples.sizes)
    st = replace(st, rng_state_current=st.rng_state_next, rng_state_next=new_next, next_sample=0)
    return DataState(st, Permutation(b, s, o), ds.train_samples + used, ds.train_epochs + 1)


def draw_batch(samples: Samples, ds: DataState, opts: BatchOptions) -> tuple[np.ndarray, np.ndarray, int, DataState]:
    """Build the batch at ds.shuffle.next_sample and advance: (inputs, targets, used, new state)."""
    x, y, used = build_batch(samples, ds.perm, ds.shuffle.next_sample, opts)
    return x, y, used, after_batch(samples, ds, used)
