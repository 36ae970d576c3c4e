"""lorakit.data against the real llama.cpp finetune runs in tests/fixtures/llamacpp."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from lorakit.data import (
    BatchOptions,
    Samples,
    ShuffleState,
    build_batch,
    draw_batch,
    make_samples,
    process_escapes,
    samples_from_tokens,
    samples_hash,
    shuffle_samples,
    start_data_state,
)
from lorakit.gguf_io import GGUFFile
from lorakit.rng import MT19937

FIX = Path(__file__).parent / "fixtures" / "llamacpp"
RUNS = FIX / "runs"
TRAIN = FIX / "data" / "train.txt"
PATH_AS_TYPED = "../../data/train.txt"
N_VOCAB = 400

spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(FIX / "models" / "tokenizer.model"))


@pytest.fixture(scope="module")
def encode(sp):
    return lambda b: sp.encode(b.decode("utf-8"))


@pytest.fixture(scope="module")
def max_token_bytes(sp):
    return max(len(sp.id_to_piece(i).encode("utf-8")) for i in range(sp.get_piece_size()))


def parse_cmd(run: str) -> dict:
    """The options of a run's cmd.txt: '--name' -> value (True for flags)."""
    argv = shlex.split((RUNS / run / "cmd.txt").read_text())[1:]
    opts, i = {}, 0
    while i < len(argv):
        key = argv[i].lstrip("-").replace("_", "-")
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            opts[key] = argv[i + 1]
            i += 2
        else:
            opts[key] = True
            i += 1
    return opts


def run_setup(run: str, encode, max_token_bytes):
    o = parse_cmd(run)
    ctx = int(o.get("ctx", 128))
    samples = make_samples(
        TRAIN.read_bytes(),
        ctx,
        encode,
        sample_start=o.get("sample-start", ""),
        include_sample_start="include-sample-start" in o,
        escape="escape" in o,
        overlapping_samples="overlapping-samples" in o,
        max_token_bytes=max_token_bytes,
    )
    bopts = BatchOptions(
        n_batch=int(o.get("batch", 8)),
        ctx=ctx,
        n_vocab=N_VOCAB,
        separate_with_eos="separate-with-eos" in o,
        separate_with_bos="no-separate-with-bos" not in o,
        fill_with_next_samples="fill-with-next-samples" in o,
        sample_random_offsets="sample-random-offsets" in o,
    )
    assert o["train-data"] == PATH_AS_TYPED
    n_batches = (int(o["adam-iter"]) + 1) * max(1, int(o.get("grad-acc", 1)))
    return o, samples, bopts, n_batches


def loaded_state(chk: Path) -> ShuffleState:
    g = GGUFFile(chk)
    return ShuffleState(
        rng_state_current=g.get("training.shuffle.rng_state"),
        sample_count=int(g.get("training.shuffle.sample_count")),
        next_sample=int(g.get("training.shuffle.next_sample")),
        samples_hash=int(g.get("training.shuffle.samples_hash")),
    )


def check_batches(samples, ds, bopts, want: list[dict]):
    states = [ds]
    for j, ref in enumerate(want):
        assert ds.shuffle.next_sample == ref["example_id"], f"batch {j}"
        x, y, used, ds = draw_batch(samples, ds, bopts)
        assert x.dtype == np.int64 and x.shape == (bopts.n_batch, bopts.ctx)
        assert x.tolist() == [r["input"] for r in ref["rows"]], f"batch {j} inputs"
        assert y.tolist() == [r["target"] for r in ref["rows"]], f"batch {j} targets"
        states.append(ds)
    return states


def check_checkpoint(chk: Path, ds):
    g = GGUFFile(chk)
    assert g.get("training.shuffle.rng_state") == ds.shuffle.rng_state_current
    assert int(g.get("training.shuffle.samples_hash")) == ds.shuffle.samples_hash
    assert int(g.get("training.shuffle.sample_count")) == ds.shuffle.sample_count
    assert int(g.get("training.shuffle.next_sample")) == ds.shuffle.next_sample
    assert int(g.get("training.sample_count")) == ds.train_samples
    assert int(g.get("training.epoch_count")) == ds.train_epochs


# --------------------------------------------------------------------------- samples


def test_default_tokens_match_llamacpp(encode):
    s = make_samples(TRAIN.read_bytes(), 16, encode)
    want = json.loads((FIX / "data" / "train.tokens.json").read_text())
    assert s.tokens.tolist() == want
    assert s.count == len(want) - 16 == 2550
    assert s.begins.tolist() == list(range(2550)) and set(s.sizes.tolist()) == {16}


def test_samples_from_tokens_edges():
    assert samples_from_tokens(range(5), 16).begins.tolist() == [0]
    assert samples_from_tokens(range(5), 16).sizes.tolist() == [5]
    assert samples_from_tokens(range(16), 16).count == 1
    assert samples_from_tokens(range(17), 16).count == 1
    s = samples_from_tokens(range(19), 16)
    assert s.begins.tolist() == [0, 1, 2] and s.sizes.tolist() == [16, 16, 16]


def test_sample_start_run_d(encode, max_token_bytes):
    _, s, _, _ = run_setup("d_sample_start", encode, max_token_bytes)
    # README: 104 samples, 2643 tokens; 4 longer than ctx 32, 98 shorter
    assert s.count == 104 and len(s.tokens) == 2643
    assert int((s.sizes > 32).sum()) == 4 and int((s.sizes < 32).sum()) == 98
    # every sample is the separate tokenization of its line, newline included at its start
    text = TRAIN.read_bytes()
    lines = [b"\n" + t for t in text.split(b"\n")[1:]]
    assert [s.tokens[b : b + n].tolist() for b, n in zip(s.begins, s.sizes, strict=True)] == [encode(t) for t in lines]


def test_sample_start_modes(encode, max_token_bytes):
    data = "ab\u00e9cd|xy|\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9zz".encode()
    s = make_samples(data, 4, encode, sample_start="|")
    assert [s.tokens[b : b + n].tolist() for b, n in zip(s.begins, s.sizes, strict=True)] == [
        encode(b"xy"),
        encode(("\u00e9" * 6 + "zz").encode()),
    ]
    # overlapping: end = start + max_token_bytes*ctx, moved forward out of a multi-byte character
    s = make_samples(data, 1, encode, sample_start="|", overlapping_samples=True, max_token_bytes=3)
    second = data.index(b"|", 9) + 1
    assert s.tokens[s.begins[1] : s.begins[1] + s.sizes[1]].tolist() == encode(data[second : second + 4])
    first = data.index(b"|") + 1
    assert s.tokens[: s.sizes[0]].tolist() == encode(data[first : first + 3])
    # pattern not found: one sample at offset 0
    s = make_samples(b"hello world", 4, encode, sample_start="#", include_sample_start=True)
    assert s.count == 1 and s.tokens.tolist() == encode(b"hello world")
    # ... and without --include-sample-start the pattern length is still skipped at offset 0
    s = make_samples(b"hello world", 4, encode, sample_start="#")
    assert s.count == 1 and s.tokens.tolist() == encode(b"ello world")
    # empty file -> zero samples
    assert make_samples(b"", 4, encode).count == 0
    # adjacent patterns give empty samples
    s = make_samples(b"||ab", 4, encode, sample_start="|")
    assert s.sizes.tolist() == [0, len(encode(b"ab"))] and s.begins.tolist() == [0, 0]


def test_process_escapes():
    assert process_escapes(r"\n") == b"\n"
    assert process_escapes(r"a\tb\\c\'\"\r") == b"a\tb\\c'\"\r"
    assert process_escapes(r"\x41\x4a") == b"AJ"
    assert process_escapes(r"\x4") == b"\\x4"  # needs two chars after the x
    assert process_escapes(r"\x41") == b"A"
    assert process_escapes(r"\xzz") == b"\\xzz"
    assert process_escapes(r"\q") == b"\\q"
    assert process_escapes("end\\") == b"end\\"


# --------------------------------------------------------------------------- hash and checkpoint state


def test_samples_hash_and_rng_state_chk_a1(encode, max_token_bytes):
    _, s, _, _ = run_setup("a_fresh_q8_0", encode, max_token_bytes)
    g = GGUFFile(RUNS / "a_fresh_q8_0" / "chk-a-1.gguf")
    assert samples_hash(PATH_AS_TYPED, s) == int(g.get("training.shuffle.samples_hash"))
    assert samples_hash("train.txt", s) != int(g.get("training.shuffle.samples_hash"))
    assert g.get("training.shuffle.rng_state") == MT19937.seed_text(42)


def test_shuffle_spec_properties():
    begins = np.arange(10, dtype=np.int64) * 3
    sizes = np.array([16, 16, 0, 5, 16, 1, 16, 16, 16, 16], dtype=np.int64)
    b, s, o, st = shuffle_samples(MT19937.seed_text(1), begins, sizes)
    m = MT19937(1)
    rnd = m.draw(10)
    idx = sorted(range(10), key=lambda i: (int(rnd[i]), i))
    u = m.draw(10)
    assert b.tolist() == [int(begins[i]) for i in idx]
    assert s.tolist() == [int(sizes[i]) for i in idx]
    for j, i in enumerate(idx):
        if sizes[i] > 0:
            assert int(o[j]) == int((int(sizes[i]) - 1) * (float(u[j]) / 4294967294.0))
    assert st == m.to_text()


# --------------------------------------------------------------------------- batches of the real runs


@pytest.mark.parametrize("run", ["a_fresh_q8_0", "c_ranks_f32_gradacc", "d_sample_start", "e1_use_checkpointing"])
def test_fresh_run_batches(run, encode, max_token_bytes):
    o, samples, bopts, n_batches = run_setup(run, encode, max_token_bytes)
    want = json.loads((RUNS / run / "debug_batches.json").read_text())
    assert len(want) == n_batches
    ds = start_data_state(samples, PATH_AS_TYPED, int(o["seed"]), None)
    assert ds.shuffle.rng_state_current == MT19937.seed_text(int(o["seed"]))
    states = check_batches(samples, ds, bopts, want)

    # the checkpoints' training state: a save at iteration k happens before the batch for update k
    # is drawn (after k*G batches); the final save after the optimizer returns (after all batches)
    g_acc = max(1, int(o.get("grad-acc", 1)))
    save_every = int(o.get("save-every", 10))
    adam_iter = int(o["adam-iter"])
    last = 0
    for k in range(1, adam_iter + 1):
        if save_every > 0 and k - last >= save_every:
            check_checkpoint(next((RUNS / run).glob(f"chk-*-{k}.gguf")), states[k * g_acc])
            last = k
    if adam_iter - last > 0:
        check_checkpoint(next((RUNS / run).glob(f"chk-*-{adam_iter}.gguf")), states[-1])


def test_resume_run_b(encode, max_token_bytes):
    o, samples, bopts, n_batches = run_setup("b_resume_from_a_iter2", encode, max_token_bytes)
    loaded = loaded_state(RUNS / "a_fresh_q8_0" / "chk-a-2.gguf")
    g = GGUFFile(RUNS / "a_fresh_q8_0" / "chk-a-2.gguf")
    ds = start_data_state(
        samples,
        PATH_AS_TYPED,
        int(o["seed"]),
        loaded,
        train_samples=int(g.get("training.sample_count")),
        train_epochs=int(g.get("training.epoch_count")),
    )
    assert ds.shuffle.next_sample == loaded.next_sample == 4
    want = json.loads((RUNS / "b_resume_from_a_iter2" / "debug_batches.json").read_text())
    assert len(want) == n_batches == 3
    states = check_batches(samples, ds, bopts, want)
    check_checkpoint(RUNS / "b_resume_from_a_iter2" / "chk-b-3.gguf", states[1])
    check_checkpoint(RUNS / "b_resume_from_a_iter2" / "chk-b-4.gguf", states[2])

    # another path string changes the hash: the loaded state is dropped and a fresh one made from the seed
    ds2 = start_data_state(samples, "train.txt", 42, loaded)
    assert ds2.shuffle.next_sample == 0 and ds2.shuffle.rng_state_current == MT19937.seed_text(42)
    ds3 = start_data_state(samples, PATH_AS_TYPED, 42, loaded, force_reshuffle=True)
    assert ds3.shuffle.next_sample == 0


# --------------------------------------------------------------------------- epoch wrap and batch options


def _toy_samples() -> Samples:
    toks = np.arange(3, 3 + 40, dtype=np.int32)
    return Samples(toks, np.array([0, 5, 9, 20, 30], np.int64), np.array([5, 4, 0, 10, 3], np.int64))


def test_epoch_wrap():
    s = _toy_samples()
    opts = BatchOptions(n_batch=2, ctx=4, n_vocab=1000)
    ds = start_data_state(s, "p", 9)
    first_next = ds.shuffle.rng_state_next
    seen = []
    for _ in range(3):
        x, y, used, ds = draw_batch(s, ds, opts)
        seen.append((used, ds.shuffle.next_sample, ds.train_epochs))
    # 5 samples, 2 per batch: the third batch wraps (index 5 % 5 = 0 of the old permutation)
    assert seen == [(2, 2, 0), (2, 4, 0), (2, 0, 1)]
    assert ds.train_samples == 6
    assert ds.shuffle.rng_state_current == first_next
    b, sz, o, nxt = shuffle_samples(first_next, s.begins, s.sizes)
    assert ds.shuffle.rng_state_next == nxt
    assert ds.perm.begins.tolist() == b.tolist() and ds.perm.sizes.tolist() == sz.tolist()


def test_batch_fill_separators_and_clamp():
    toks = np.array([10, 11, 12, 500, 20, 21], dtype=np.int32)
    s = Samples(toks, np.array([0, 3, 5], np.int64), np.array([3, 0, 1], np.int64))
    from lorakit.data import Permutation

    perm = Permutation(s.begins, s.sizes, np.array([1, 0, 0], np.uint64))
    base = dict(n_batch=1, ctx=10, n_vocab=400)
    # no fill: EOS padding, clamping to n_vocab-1
    _, y, used = build_batch(s, perm, 0, BatchOptions(**base))
    assert y.tolist() == [[10, 11, 12, 2, 2, 2, 2, 2, 2, 2]] and used == 1
    # fill, BOS separation only (default); sample 1 is empty, so its position stays EOS
    x, y, used = build_batch(s, perm, 0, BatchOptions(**base, fill_with_next_samples=True))
    assert y.tolist() == [[10, 11, 12, 1, 2, 1, 21, 1, 10, 11]]
    assert x.tolist() == [[1, 10, 11, 12, 1, 2, 1, 21, 1, 10]]
    assert used == 4
    # fill with EOS and BOS separation
    _, y, used = build_batch(s, perm, 0, BatchOptions(**base, fill_with_next_samples=True, separate_with_eos=True))
    assert y.tolist() == [[10, 11, 12, 2, 1, 2, 2, 1, 21, 2]] and used == 3
    # no separators at all
    _, y, used = build_batch(s, perm, 0, BatchOptions(**base, fill_with_next_samples=True, separate_with_bos=False))
    assert y.tolist() == [[10, 11, 12, 2, 21, 10, 11, 12, 2, 21]] and used == 6
    # random offsets apply to the first sample of a row only; token 500 is clamped to 399
    s2 = Samples(toks, np.array([1, 3], np.int64), np.array([4, 3], np.int64))
    perm2 = Permutation(s2.begins, s2.sizes, np.array([2, 1], np.uint64))
    _, y, _ = build_batch(s2, perm2, 0, BatchOptions(n_batch=2, ctx=4, n_vocab=400, sample_random_offsets=True))
    assert y.tolist() == [[399, 20, 2, 2], [20, 21, 2, 2]]
