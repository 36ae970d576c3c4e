"""finetune checkpoints (spec §6) against the files real llama.cpp wrote (tests/fixtures/llamacpp)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lorakit.checkpoint import (
    LEFT_TO_RIGHT,
    RIGHT_TO_LEFT,
    checkpoint_tensor_order,
    detect_moment_order,
    flatten_moments,
    param_order,
    read_checkpoint,
    unflatten_moments,
    write_checkpoint,
)
from lorakit.errors import LorakitError
from lorakit.gguf_io import GGUFFile
from lorakit.lora import KINDS, LoraRanks, lora_shapes, tensor_names
from lorakit.model import ModelArgs

FIX = Path(__file__).parent / "fixtures" / "llamacpp"
RUNS = FIX / "runs"
MODELS = FIX / "models"
CHKS = sorted(glob.glob(str(RUNS / "*" / "chk-*.gguf")))
CHK_A4 = RUNS / "a_fresh_q8_0" / "chk-a-4.gguf"
CHK_E1 = RUNS / "e1_use_checkpointing" / "chk-e-3.gguf"
CHK_E2 = RUNS / "e2_no_checkpointing" / "chk-e-3.gguf"

# evaluation order of each training run (log.txt "main: evaluation order = ...")
RUN_ORDER = {
    "a_fresh_q8_0": LEFT_TO_RIGHT,
    "b_resume_from_a_iter2": LEFT_TO_RIGHT,
    "c_ranks_f32_gradacc": LEFT_TO_RIGHT,
    "d_sample_start": LEFT_TO_RIGHT,
    "e1_use_checkpointing": LEFT_TO_RIGHT,
    "e2_no_checkpointing": RIGHT_TO_LEFT,
}


def _args(name: str = "tiny-q8_0.gguf") -> ModelArgs:
    return ModelArgs.from_gguf(GGUFFile(MODELS / name))


def _ids(paths):
    return [os.path.relpath(p, RUNS) for p in paths]


def _run(path) -> str:
    return Path(path).parent.name


def _dump(path):
    """Keys (name, types, value) in order and tensors (name, shape, type, bytes) in order."""
    r = gguf.GGUFReader(path)
    kv = [(k, [int(t) for t in f.types], f.contents()) for k, f in r.fields.items()]
    ts = [(t.name, [int(x) for x in t.shape], int(t.tensor_type), bytes(t.data.tobytes())) for t in r.tensors]
    return kv, ts


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("path", CHKS, ids=_ids(CHKS))
def test_read_write_roundtrip(path, tmp_path):
    ck = read_checkpoint(path, _args("tiny-f32.gguf"))
    assert ck.nx == sum(a.numel() + b.numel() for a, b in ck.lora.values())
    assert ck.m.shape == ck.v.shape == (ck.nx,)
    assert ck.n_vocab == 400 and ck.n_embd == 64 and ck.n_layer == 2
    assert list(ck.lora) == tensor_names(_args())
    out = tmp_path / "rt.gguf"
    write_checkpoint(out, ck)
    kv, ts = _dump(out)
    kv0, ts0 = _dump(path)
    assert len(kv0) == 3 + 43 and len(ts0) == 44  # 3 GGUF.* header fields from the reader
    assert [k for k, _, _ in kv] == [k for k, _, _ in kv0]
    assert kv == kv0
    assert ts == ts0
    assert out.read_bytes() == Path(path).read_bytes()  # byte-identical


def test_checkpoint_fields():
    ck = read_checkpoint(RUNS / "c_ranks_f32_gradacc" / "chk-c-3.gguf")
    assert ck.ranks == LoraRanks.default(3, token_embd=2, output=6, attn_q=2, attn_v=5, attn_norm=2)
    assert (ck.train_its, ck.opt_iter, ck.train_samples, ck.train_tokens) == (3, 3, 16, 288)
    assert ck.nx == 12103 and ck.n_ctx == 24 and ck.rope_dim == 16
    assert ck.shuffle_sample_count == 2542 and ck.shuffle_next_sample == 16
    assert ck.shuffle_rng_state.startswith("3 ") and ck.shuffle_rng_state.endswith(" 624")
    assert len(ck.shuffle_rng_state.split()) == 625
    assert ck.just_initialized is False and ck.opt_past == 0 and ck.past_loss_values is None
    assert ck.shapes() == lora_shapes(_args(), ck.ranks)
    a = read_checkpoint(RUNS / "a_fresh_q8_0" / "chk-a-4.gguf")
    assert a.lora["output_norm.weight"][1].shape == (1, 1)
    assert a.lora["blk.0.attn_norm.weight"][0].shape == (64, 1)


# --------------------------------------------------------------------------- moment order


@pytest.mark.parametrize("path", CHKS, ids=_ids(CHKS))
def test_moment_order_detected(path):
    ck = read_checkpoint(path)
    assert ck.moment_order == RUN_ORDER[_run(path)]


@pytest.mark.parametrize("run", sorted(RUN_ORDER))
def test_param_order_matches_llamacpp(run):
    order = json.loads((RUNS / run / "debug_param_order.json").read_text())
    chk = sorted(glob.glob(str(RUNS / run / "chk-*.gguf")))[0]
    ck = read_checkpoint(chk)
    shapes = ck.shapes()
    seq = param_order(list(ck.lora), RUN_ORDER[run])
    got = [(f"{n}.lora_{h}", int(np.prod(shapes[n][0 if h == "a" else 1]))) for n, h in seq]
    assert got == [(n, c) for n, c in order]
    other = LEFT_TO_RIGHT if RUN_ORDER[run] == RIGHT_TO_LEFT else RIGHT_TO_LEFT
    assert param_order(list(ck.lora), other) != seq
    # the order does not depend on how the names are listed
    assert param_order(list(reversed(list(ck.lora))), RUN_ORDER[run]) == seq


def test_e1_e2_moments_agree_after_reordering():
    e1, e2 = read_checkpoint(CHK_E1), read_checkpoint(CHK_E2)
    assert (e1.moment_order, e2.moment_order) == (LEFT_TO_RIGHT, RIGHT_TO_LEFT)
    assert float((e1.m - e2.m).abs().max()) > 1e-3  # raw layouts differ
    m1, v1 = e1.moments()
    m2, v2 = e2.moments()
    assert m1.keys() == m2.keys()
    for k in m1:
        assert float((m1[k] - m2[k]).abs().max()) < 1e-8, k
        assert float((v1[k] - v2[k]).abs().max()) < 1e-11, k
    # re-flatten e1's moments in e2's order
    flat = flatten_moments(m1, RIGHT_TO_LEFT)
    assert float((flat - e2.m).abs().max()) < 1e-8


def test_flatten_unflatten_roundtrip():
    ck = read_checkpoint(CHK_A4)
    for order in (LEFT_TO_RIGHT, RIGHT_TO_LEFT):
        per = unflatten_moments(ck.v, ck.shapes(), order)
        assert torch.equal(flatten_moments(per, order), ck.v)
    with pytest.raises(ValueError):
        unflatten_moments(ck.v[:-1], ck.shapes(), LEFT_TO_RIGHT)
    with pytest.raises(ValueError):
        param_order(["blk.0.attn_q.weight"], "top_down")


def test_param_order_rank_zero():
    args = _args()
    ranks = LoraRanks.default(4, attn_norm=0, ffn_norm=0, output_norm=0, token_embd=0)
    names = list(lora_shapes(args, ranks))
    for order in (LEFT_TO_RIGHT, RIGHT_TO_LEFT):
        seq = param_order(names, order)
        assert len(seq) == 2 * len(names)
        assert not any("norm" in n or n == "token_embd.weight" for n, _ in seq)
    assert checkpoint_tensor_order(reversed(names)) == names


def test_written_order_is_detected(tmp_path):
    """A checkpoint written with the other moment layout reads back with that layout."""
    e1 = read_checkpoint(CHK_E1)
    m, v = e1.moments()
    ck = dataclasses.replace(
        e1,
        m=flatten_moments(m, RIGHT_TO_LEFT),
        v=flatten_moments(v, RIGHT_TO_LEFT),
        moment_order=RIGHT_TO_LEFT,
    )
    write_checkpoint(tmp_path / "r2l.gguf", ck)
    back = read_checkpoint(tmp_path / "r2l.gguf")
    assert back.moment_order == RIGHT_TO_LEFT
    assert torch.equal(back.m, ck.m)


def test_fresh_moments_default_right_to_left(tmp_path):
    ck = read_checkpoint(CHK_A4)
    assert detect_moment_order(torch.zeros(ck.nx), ck.shapes()) == RIGHT_TO_LEFT
    fresh = dataclasses.replace(ck, m=torch.zeros(ck.nx), v=torch.zeros(ck.nx), just_initialized=True)
    write_checkpoint(tmp_path / "fresh.gguf", fresh)
    back = read_checkpoint(tmp_path / "fresh.gguf")
    assert back.moment_order == RIGHT_TO_LEFT and back.just_initialized is True


def test_past_loss_values(tmp_path):
    ck = read_checkpoint(CHK_A4)
    past = torch.tensor([6.1, 6.0, 5.9], dtype=torch.float32)
    ck2 = dataclasses.replace(ck, opt_past=3, past_loss_values=past)
    write_checkpoint(tmp_path / "p.gguf", ck2)
    gf = GGUFFile(tmp_path / "p.gguf")
    assert gf.tensor_names()[-1] == "optimizer.adam.past_loss_values"
    back = read_checkpoint(tmp_path / "p.gguf")
    assert back.opt_past == 3 and torch.equal(back.past_loss_values, past)
    with pytest.raises(ValueError):
        write_checkpoint(tmp_path / "q.gguf", dataclasses.replace(ck, opt_past=2))


# --------------------------------------------------------------------------- validation


def _rewrite(src, dst, edit_kv=None, drop_keys=(), edit_tensors=None):
    """Copy a GGUF, changing keys ({key: (value, GGUFValueType)}) or tensors ({name: array | None})."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch="")
    w.kv_data[0].pop("general.architecture", None)
    edit_kv = edit_kv or {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in drop_keys:
            continue
        if k in edit_kv:
            val, vt = edit_kv[k]
            w.add_key_value(k, val, vt)
        else:
            w.add_key_value(k, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in r.tensors:
        arr = np.asarray(t.data).reshape([int(x) for x in reversed(t.shape.tolist())])
        if edit_tensors and t.name in edit_tensors:
            arr = edit_tensors[t.name]
            if arr is None:
                continue
        w.add_tensor(t.name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _raises(fn, path, *words):
    with pytest.raises(LorakitError) as e:
        fn()
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_identity_rewrite_is_identical(tmp_path):
    _rewrite(CHK_A4, tmp_path / "same.gguf")
    assert (tmp_path / "same.gguf").read_bytes() == CHK_A4.read_bytes()


def test_checkpoint_for_another_model():
    other = _args("stories260K-f32.gguf")
    _raises(lambda: read_checkpoint(CHK_A4, other), CHK_A4, "checkpoint is for another model", "n_ff 192 != 172")
    wide = ModelArgs(n_vocab=400, n_embd=128, n_ff=192, n_head=4, n_head_kv=4, n_layer=2)
    _raises(lambda: read_checkpoint(CHK_A4, wide), CHK_A4, "n_embd 64 != 128")
    vocab = ModelArgs(n_vocab=512, n_embd=64, n_ff=192, n_head=4, n_head_kv=4, n_layer=2)
    _raises(lambda: read_checkpoint(CHK_A4, vocab), CHK_A4, "n_vocab 400 != 512")


def test_wrong_files_as_checkpoint(tmp_path):
    bin_ = RUNS / "a_fresh_q8_0" / "lora-a-4.bin"
    _raises(lambda: read_checkpoint(bin_), bin_, "ggla LoRA adapter")
    model = MODELS / "tiny-q8_0.gguf"
    _raises(lambda: read_checkpoint(model), model, "not a finetune checkpoint")
    ad = FIX / "adapter" / "adapter.gguf"
    _raises(lambda: read_checkpoint(ad), ad, "LoRA adapter, not a finetune checkpoint")
    missing = tmp_path / "none.gguf"
    _raises(lambda: read_checkpoint(missing), missing, "not found")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(CHK_A4.read_bytes()[:50000])
    _raises(lambda: read_checkpoint(cut), cut)
    rnd = tmp_path / "rnd.gguf"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises(lambda: read_checkpoint(rnd), rnd, "magic")


VT = gguf.GGUFValueType


@pytest.mark.parametrize(
    "edit,drop,words",
    [
        ({"training.type": ("train_llama", VT.STRING)}, (), ["training.type"]),
        ({"general.architecture": ("falcon", VT.STRING)}, (), ["architecture"]),
        ({"general.file_type": (1, VT.UINT32)}, (), ["file_type is 1"]),
        ({"optimizer.file_version": (1, VT.UINT32)}, (), ["optimizer.file_version 1"]),
        ({"training.file_version": (2, VT.UINT32)}, (), ["training.file_version 2"]),
        ({"training.iteration_count": (4, VT.UINT32)}, (), ["has type u32, expected u64"]),
        ({"llama.embedding_length": (64, VT.UINT64)}, (), ["has type u64, expected u32"]),
        ({"optimizer.parameter_count": (14000, VT.UINT64)}, (), ["parameter_count is 14000"]),
        ({"training.lora.rank.attn_q": (5, VT.UINT32)}, (), ["attn_q.weight.lora_a", "rank 5"]),
        ({"optimizer.type": ("lbfgs", VT.STRING)}, (), ["lbfgs"]),
        ({}, ("training.lora.rank.ffn_up",), ["missing key 'training.lora.rank.ffn_up'"]),
        ({}, ("llama.block_count",), ["missing key 'llama.block_count'"]),
    ],
)
def test_invalid_checkpoints(tmp_path, edit, drop, words):
    p = tmp_path / "bad.gguf"
    _rewrite(CHK_A4, p, edit, drop)
    _raises(lambda: read_checkpoint(p), p, *words)


def test_invalid_tensors(tmp_path):
    p = tmp_path / "bad.gguf"
    _rewrite(CHK_A4, p, edit_tensors={"optimizer.adam.second_moments": None})
    _raises(lambda: read_checkpoint(p), p, "missing tensor 'optimizer.adam.second_moments'")
    _rewrite(CHK_A4, p, edit_tensors={"optimizer.adam.first_moments": np.zeros(10, np.float32)})
    _raises(lambda: read_checkpoint(p), p, "first_moments", "expected [14277]")
    _rewrite(CHK_A4, p, edit_tensors={"blk.1.ffn_up.weight.lora_b": np.zeros((192, 4), np.float16)})
    _raises(lambda: read_checkpoint(p), p, "type F16, expected F32")
    _rewrite(CHK_A4, p, edit_tensors={"blk.1.ffn_down.weight.lora_a": np.zeros((64, 4), np.float32)})
    _raises(lambda: read_checkpoint(p), p, "blk.1.ffn_down.weight.lora_a", "expected [192, 4]")


def test_training_file_version_0(tmp_path):
    """Version 0: u32 counts and no epoch/shuffle keys."""
    p = tmp_path / "v0.gguf"
    drop = [k for k in GGUFFile(CHK_A4).fields if k.startswith("training.shuffle.")] + ["training.epoch_count"]
    edit = {
        "training.file_version": (0, VT.UINT32),
        "training.iteration_count": (4, VT.UINT32),
        "training.sample_count": (8, VT.UINT32),
        "training.token_count": (128, VT.UINT32),
    }
    _rewrite(CHK_A4, p, edit, drop)
    ck = read_checkpoint(p, _args())
    assert (ck.train_its, ck.train_samples, ck.train_tokens, ck.train_epochs) == (4, 8, 128, 0)
    assert ck.shuffle_rng_state == "" and ck.shuffle_sample_count == 0
    write_checkpoint(tmp_path / "v1.gguf", ck)  # always written as version 1 with all 43 keys
    gf = GGUFFile(tmp_path / "v1.gguf")
    assert len(gf.fields) == 43 and gf.get("training.file_version") == 1


def test_written_key_types():
    gf = GGUFFile(CHK_A4)
    assert list(gf.fields)[:2] == ["training.type", "general.architecture"]
    assert [gf.field_types[f"training.lora.rank.{k}"] for k in KINDS] == [VT.UINT32] * 12
    assert gf.field_types["optimizer.just_initialized"] == VT.BOOL
    assert gf.field_types["optimizer.parameter_count"] == VT.UINT64
