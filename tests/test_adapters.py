"""ggla and GGUF LoRA adapters against the files real llama.cpp wrote (tests/fixtures/llamacpp)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lorakit.adapters import (
    check_adapter_fits,
    load_adapter,
    read_ggla,
    read_gguf_adapter,
    write_ggla,
    write_gguf_adapter,
)
from lorakit.checkpoint import read_checkpoint
from lorakit.errors import LorakitError
from lorakit.gguf_io import GGUFFile
from lorakit.lora import KINDS, NORMS, LoraRanks, kind_of, lora_shapes, tensor_names
from lorakit.model import ModelArgs

FIX = Path(__file__).parent / "fixtures" / "llamacpp"
RUNS = FIX / "runs"
MODELS = FIX / "models"
ADAPTER_GGUF = FIX / "adapter" / "adapter.gguf"
LORA_A4 = RUNS / "a_fresh_q8_0" / "lora-a-4.bin"
LORA_C3 = RUNS / "c_ranks_f32_gradacc" / "lora-c-3.bin"
CHK_A4 = RUNS / "a_fresh_q8_0" / "chk-a-4.gguf"
BINS = sorted(glob.glob(str(RUNS / "*" / "lora-*.bin")))


def _args(name: str = "tiny-q8_0.gguf") -> ModelArgs:
    return ModelArgs.from_gguf(GGUFFile(MODELS / name))


def _deltas(adapter) -> dict[str, torch.Tensor]:
    return {n: p.delta() for n, p in adapter.pairs.items()}


def _ids(paths):
    return [os.path.relpath(p, RUNS) for p in paths]


# --------------------------------------------------------------------------- ggla


@pytest.mark.parametrize("path", BINS, ids=_ids(BINS))
def test_read_ggla_fixture(path):
    ad = read_ggla(path)
    args = _args()
    assert ad.format == "ggla"
    assert list(ad.pairs) == tensor_names(args)  # checkpoint order, all 21 tensors
    check_adapter_fits(ad, args)
    for name, p in ad.pairs.items():
        assert p.a.dtype == torch.float32 and p.b.dtype == torch.float32
        assert p.scale == ad.alpha / ad.rank
        if kind_of(name) in NORMS:
            assert p.b.shape[0] == 1
    if "c_ranks" in path:
        assert (ad.rank, ad.alpha) == (3, 7.0)
        ranks = LoraRanks.default(3, token_embd=2, output=6, attn_q=2, attn_v=5, attn_norm=2)
        shapes = lora_shapes(args, ranks)
        assert {n: (tuple(p.a.shape), tuple(p.b.shape)) for n, p in ad.pairs.items()} == shapes
    else:
        assert (ad.rank, ad.alpha) == (4, 4.0)


@pytest.mark.parametrize("path", BINS, ids=_ids(BINS))
def test_write_ggla_byte_identical(path, tmp_path):
    ad = read_ggla(path)
    out = tmp_path / "out.bin"
    write_ggla(out, {n: (p.a, p.b) for n, p in ad.pairs.items()}, ad.rank, int(ad.alpha))
    assert out.read_bytes() == Path(path).read_bytes()


def test_init_lora_b_is_zero():
    ad = read_ggla(RUNS / "f2_only_write_lora_init" / "lora-init-0.bin")
    assert all(float(p.b.abs().max()) == 0.0 for p in ad.pairs.values())
    assert all(float(p.a.abs().max()) > 0.0 for p in ad.pairs.values())


@pytest.mark.parametrize(
    "chk,bin_",
    [
        ("a_fresh_q8_0/chk-a-4.gguf", "a_fresh_q8_0/lora-a-4.bin"),
        ("a_fresh_q8_0/chk-a-1.gguf", "a_fresh_q8_0/lora-a-1.bin"),
        ("c_ranks_f32_gradacc/chk-c-3.gguf", "c_ranks_f32_gradacc/lora-c-3.bin"),
        ("d_sample_start/chk-d-3.gguf", "d_sample_start/lora-d-3.bin"),
        ("e2_no_checkpointing/chk-e-3.gguf", "e2_no_checkpointing/lora-e-3.bin"),
    ],
)
def test_checkpoint_lora_equals_ggla(chk, bin_):
    ck = read_checkpoint(RUNS / chk, _args())
    ad = read_ggla(RUNS / bin_)
    assert list(ck.lora) == list(ad.pairs)
    for name, (a, b) in ck.lora.items():
        assert torch.equal(a, ad.pairs[name].a), name
        assert torch.equal(b, ad.pairs[name].b), name


# --------------------------------------------------------------------------- GGUF adapters


def test_read_gguf_adapter_matches_ggla():
    g = read_gguf_adapter(ADAPTER_GGUF)
    old = read_ggla(LORA_A4)
    assert g.format == "gguf" and g.alpha == 4.0
    assert g.meta["ignored"] == []  # the fixture already dropped the norm pairs
    expected = [n for n in old.pairs if kind_of(n) not in NORMS]
    assert list(g.pairs) == expected
    check_adapter_fits(g, _args())
    dg, do = _deltas(g), _deltas(old)
    for name in expected:
        assert g.pairs[name].scale == 1.0
        torch.testing.assert_close(dg[name], do[name], rtol=0, atol=0)


def _gguf_layout(path):
    r = gguf.GGUFReader(path)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    tensors = [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type)) for t in r.tensors]
    return keys, tensors


def test_write_gguf_adapter_like_fixture(tmp_path):
    old = read_ggla(LORA_A4)
    out = tmp_path / "a.gguf"
    dropped = write_gguf_adapter(out, {n: (p.a, p.b) for n, p in old.pairs.items()}, old.alpha, old.rank)
    assert dropped == [n for n in old.pairs if kind_of(n) in NORMS]
    keys, tensors = _gguf_layout(out)
    fkeys, ftensors = _gguf_layout(ADAPTER_GGUF)
    assert keys == fkeys
    assert tensors == ftensors
    # alpha 4 / r 4 bakes nothing, so the tensor data equals the fixture's byte for byte
    for t, f in zip(gguf.GGUFReader(out).tensors, gguf.GGUFReader(ADAPTER_GGUF).tensors, strict=True):
        assert t.data.tobytes() == f.data.tobytes(), t.name
    gf = GGUFFile(out)
    assert gf.field_types["adapter.lora.alpha"] == gguf.GGUFValueType.FLOAT32
    assert gf.get("adapter.lora.alpha") == 0.0
    back = read_gguf_adapter(out)
    ref = read_gguf_adapter(ADAPTER_GGUF)
    for name, p in back.pairs.items():
        assert p.scale == 1.0
        torch.testing.assert_close(p.delta(), ref.pairs[name].delta(), rtol=0, atol=0)


def test_write_gguf_adapter_bakes_scale(tmp_path):
    """Run c: alpha 7, header r 3, per-tensor ranks 2..6; the baked adapter reproduces alpha/r_hdr."""
    old = read_ggla(LORA_C3)
    out = tmp_path / "c.gguf"
    write_gguf_adapter(out, {n: (p.a, p.b) for n, p in old.pairs.items()}, old.alpha, old.rank)
    back = read_gguf_adapter(out)
    assert back.alpha == 0.0
    ranks = {back.pairs[n].rank for n in back.pairs}
    assert ranks == {2, 3, 5, 6}
    for name, p in back.pairs.items():
        assert p.scale == 1.0
        want = old.pairs[name].delta()
        torch.testing.assert_close(p.delta(), want, rtol=0, atol=1e-6 * float(want.abs().max()))
    # token_embd is flipped on disk
    gf = GGUFFile(out)
    assert gf.info("token_embd.weight.lora_a").shape == (400, 2)
    assert gf.info("token_embd.weight.lora_b").shape == (64, 2)
    assert gf.info("output.weight.lora_a").shape == (6, 64)
    assert gf.info("output.weight.lora_b").shape == (400, 6)


def test_write_gguf_adapter_tied_output(tmp_path):
    old = read_ggla(LORA_A4)
    dropped = write_gguf_adapter(
        tmp_path / "t.gguf", {n: (p.a, p.b) for n, p in old.pairs.items()}, 4, 4, tied_output=True
    )
    assert "output.weight" in dropped and "token_embd.weight" in dropped
    back = read_gguf_adapter(tmp_path / "t.gguf")
    assert "output.weight" not in back.pairs and "token_embd.weight" not in back.pairs
    assert len(back.pairs) == 14


def _write_custom_adapter(path, tensors, alpha=None, gtype="adapter", atype="lora", arch="llama"):
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_string("general.type", gtype)
    w.add_string("adapter.type", atype)
    if alpha is not None:
        w.add_float32("adapter.lora.alpha", alpha)
    for name, arr in tensors:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_read_gguf_adapter_f16_norms_and_alpha(tmp_path):
    rng = np.random.default_rng(0)
    a_q = rng.standard_normal((8, 64)).astype(np.float16)  # lora_a (r, in), rank 8
    b_q = rng.standard_normal((64, 8)).astype(np.float16)
    tensors = [
        ("blk.0.attn_q.weight.lora_a", a_q),
        ("blk.0.attn_q.weight.lora_b", b_q),
        ("blk.0.attn_norm.weight.lora_a", rng.standard_normal((1, 64)).astype(np.float32)),
        ("blk.0.attn_norm.weight.lora_b", rng.standard_normal((1, 1)).astype(np.float32)),
        ("blk.1.ffn_norm.weight", np.ones(64, np.float32)),
    ]
    path = tmp_path / "f16.gguf"
    _write_custom_adapter(path, tensors, alpha=16.0)
    ad = load_adapter(path)
    assert list(ad.pairs) == ["blk.0.attn_q.weight"]
    assert sorted(ad.meta["ignored"]) == ["blk.0.attn_norm.weight", "blk.1.ffn_norm.weight"]
    p = ad.pairs["blk.0.attn_q.weight"]
    assert p.a.dtype == torch.float32 and p.a.shape == (64, 8) and p.b.shape == (64, 8)
    assert p.scale == 2.0
    want = 2.0 * (b_q.astype(np.float32) @ a_q.astype(np.float32))
    np.testing.assert_allclose(p.delta().numpy(), want, rtol=1e-5, atol=1e-5)
    check_adapter_fits(ad, _args())
    # alpha missing -> scale 1
    _write_custom_adapter(tmp_path / "noalpha.gguf", tensors[:2])
    assert read_gguf_adapter(tmp_path / "noalpha.gguf").pairs["blk.0.attn_q.weight"].scale == 1.0


def test_load_adapter_dispatch():
    assert load_adapter(LORA_A4).format == "ggla"
    assert load_adapter(ADAPTER_GGUF).format == "gguf"


# --------------------------------------------------------------------------- errors


def _raises(fn, path, *words):
    with pytest.raises(LorakitError) as e:
        fn()
    msg = str(e.value)
    assert str(path) in msg, msg
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_file(tmp_path):
    p = tmp_path / "nope.bin"
    _raises(lambda: load_adapter(p), p, "not found")
    _raises(lambda: read_ggla(p), p, "not found")
    _raises(lambda: read_gguf_adapter(p), p)


def test_truncated_ggla(tmp_path):
    data = LORA_A4.read_bytes()
    p = tmp_path / "half.bin"
    p.write_bytes(data[: len(data) // 2])
    _raises(lambda: load_adapter(p), p, "truncated")
    p.write_bytes(data[:10])
    _raises(lambda: read_ggla(p), p, "truncated")
    p.write_bytes(data[:16])
    _raises(lambda: read_ggla(p), p, "no tensors")


def test_random_bytes(tmp_path):
    p = tmp_path / "rand.bin"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _raises(lambda: load_adapter(p), p, "magic")
    _raises(lambda: read_ggla(p), p, "bad file magic")
    e = tmp_path / "empty.bin"
    e.write_bytes(b"")
    _raises(lambda: load_adapter(e), e)
    _raises(lambda: read_ggla(e), e, "bad file magic")


def test_corrupt_ggla_headers(tmp_path):
    data = bytearray(LORA_A4.read_bytes())
    p = tmp_path / "x.bin"
    bad = bytearray(data)
    bad[4] = 2
    p.write_bytes(bad)
    _raises(lambda: read_ggla(p), p, "version 2")
    bad = bytearray(data)
    bad[16] = 3  # n_dims
    p.write_bytes(bad)
    _raises(lambda: read_ggla(p), p, "n_dims 3")
    bad = bytearray(data)
    bad[20:24] = (10**9).to_bytes(4, "little")  # name length
    p.write_bytes(bad)
    _raises(lambda: read_ggla(p), p, "name length")
    bad = bytearray(data)
    bad[24] = 8  # type q8_0
    p.write_bytes(bad)
    _raises(lambda: read_ggla(p), p, "type 8")
    bad = bytearray(data)
    bad[32:36] = (10**8).to_bytes(4, "little")  # ne1 of token_embd loraA: absurd size
    p.write_bytes(bad)
    _raises(lambda: read_ggla(p), p, "past the end")


def test_ggla_pairs_must_be_adjacent(tmp_path):
    ad = read_ggla(LORA_A4)
    pairs = {n: (p.a, p.b) for n, p in ad.pairs.items()}
    p = tmp_path / "swap.bin"
    write_ggla(p, pairs, 4, 4)
    data = p.read_bytes()
    # rename the first loraB so that A of token_embd is followed by another tensor's B
    i = data.index(b"token_embd.weight.loraB")
    p.write_bytes(data[:i] + b"token_embx.weight.loraB" + data[i + 23 :])
    _raises(lambda: read_ggla(p), p, "adjacent")
    i = data.index(b"token_embd.weight.loraB")
    p.write_bytes(data[:i] + b"token_embd.weight.loraC" + data[i + 23 :])
    _raises(lambda: read_ggla(p), p, "not a LoRA tensor")


def test_checkpoint_passed_as_adapter():
    _raises(lambda: load_adapter(CHK_A4), CHK_A4, "finetune checkpoint", "--lora-out")
    _raises(lambda: read_ggla(CHK_A4), CHK_A4, "bad file magic", "finetune checkpoint", "--lora-out")
    _raises(lambda: read_gguf_adapter(CHK_A4), CHK_A4, "finetune checkpoint")


def test_model_passed_as_adapter():
    m = MODELS / "tiny-q8_0.gguf"
    _raises(lambda: load_adapter(m), m, "is a model, not a LoRA adapter")
    _raises(lambda: read_ggla(m), m, "bad file magic", "model")


def test_gguf_adapter_bad_metadata(tmp_path):
    t = [("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), np.float32))]
    p = tmp_path / "x.gguf"
    _write_custom_adapter(p, t, atype="control_vector")
    _raises(lambda: load_adapter(p), p, "adapter.type")
    _write_custom_adapter(p, t, arch="gpt2")
    _raises(lambda: load_adapter(p), p, "architecture")
    _write_custom_adapter(p, t)  # lora_b missing
    _raises(lambda: load_adapter(p), p, "lora_b is missing")
    t2 = t + [("blk.0.attn_q.weight.lora_b", np.zeros((4, 64), np.float32))]  # ggla-style shapes
    _write_custom_adapter(p, t2)
    _raises(lambda: load_adapter(p), p, "not transposed")
    _write_custom_adapter(p, [("blk.0.attn_q.weight.delta", np.zeros(4, np.float32))])
    _raises(lambda: load_adapter(p), p, "unexpected suffix")


def test_adapter_does_not_fit():
    ad = read_ggla(LORA_A4)
    other = _args("stories260K-f32.gguf")
    msg = _raises(lambda: check_adapter_fits(ad, other), LORA_A4, "adapter does not fit this model")
    assert "token_embd.weight" in msg and "shape mismatch" in msg
    small = ModelArgs(n_vocab=400, n_embd=64, n_ff=192, n_head=4, n_head_kv=4, n_layer=1)
    msg = _raises(lambda: check_adapter_fits(ad, small), LORA_A4, "adapter does not fit this model")
    assert "blk.1." in msg
    g = read_gguf_adapter(ADAPTER_GGUF)
    wide = ModelArgs(n_vocab=400, n_embd=64, n_ff=256, n_head=4, n_head_kv=4, n_layer=2)
    msg = _raises(lambda: check_adapter_fits(g, wide), ADAPTER_GGUF, "shape mismatch")
    assert "blk.0.ffn_gate.weight" in msg


def test_kinds_constant_matches_files():
    # the rank keys of a checkpoint follow lora.KINDS
    gf = GGUFFile(CHK_A4)
    keys = [k for k in gf.fields if k.startswith("training.lora.rank.")]
    assert keys == [f"training.lora.rank.{k}" for k in KINDS]
