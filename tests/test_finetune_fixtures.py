"""lorakit finetune against the real llama.cpp finetune: same losses, files and state.

Tolerances: llama.cpp prints losses with 6 decimals (rounding error <= 5e-7). It multiplies by the
merged float32 weight W + B·Aᵀ, lorakit by W and the LoRA path separately, so float32 sums differ
in order: about 1e-7 relative per dot product over E = 64..192 terms, i.e. ~1e-6 on a loss of 6,
growing a little per step. LOSS_TOL = 1e-5 covers both with margin.

LoRA values: AdamW normalises every element's step to about lr, whatever the gradient's size, so
an element whose gradient is a cancelling sum (e.g. an output-LoRA row of a rare token: sum over
positions of p·h with p ~ 1e-5 against the (p - 1)·h of its few target positions) carries the
relative float32 error of that sum, up to ~1e-3, into its step. Measured at the worst element of
run e1: m differs by 4e-4 relative (the +1e-9 smoothing alone moves it by 3e-4). So a LoRA value
may differ by up to 1e-3 of the total movement lr * iterations: PARAM_TOL = 1e-3 * lr * iters.
Moments: relative tolerance 1e-3 (same argument) with absolute floors below their scale.
"""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.checkpoint import read_checkpoint
from lorakit.ggla import read_ggla
from tests.finetune_util import FIX, copy_fixture_run, fixture_losses, make_tree, replay

LOSS_TOL = 1e-5


def param_tol(lr: float, iters: int) -> float:
    return 1e-3 * lr * iters


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path)


def _compare_losses(ours, theirs):
    assert [r["iter"] for r in ours] == [r["iter"] for r in theirs]
    for a, b in zip(ours, theirs, strict=False):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOL, (a, b)
        assert abs(a["sched"] - b["sched"]) <= 1e-6, (a, b)
        assert a["sample"] == b["sample"]


def _compare_checkpoints(ours_path, theirs_path, lr: float):
    a, b = read_checkpoint(ours_path), read_checkpoint(theirs_path)
    tol = param_tol(lr, b.opt_iter)
    for field in (
        "train_its",
        "train_samples",
        "train_tokens",
        "train_epochs",
        "shuffle_samples_hash",
        "shuffle_rng_state",
        "shuffle_sample_count",
        "shuffle_next_sample",
        "opt_iter",
        "nx",
        "n_ctx",
        "ranks",
    ):
        assert getattr(a, field) == getattr(b, field), field
    assert a.lora.keys() == b.lora.keys()
    for n in a.lora:
        for x, y in zip(a.lora[n], b.lora[n], strict=False):
            assert x.shape == y.shape
            assert float((x - y).abs().max()) <= tol, n
    (ma, va), (mb, vb) = a.moments(), b.moments()  # each in its own file's order
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(va[k], vb[k], rtol=1e-3, atol=1e-10)
    assert abs(a.previous_loss - b.previous_loss) <= LOSS_TOL


@pytest.mark.parametrize(
    "run,files,lr",
    [
        ("a_fresh_q8_0", ["chk-a-1.gguf", "chk-a-2.gguf", "chk-a-4.gguf", "chk-a-LATEST.gguf"], 0.02),
        ("c_ranks_f32_gradacc", ["chk-c-2.gguf", "chk-c-3.gguf"], 0.03),
        ("d_sample_start", ["chk-d-3.gguf"], 0.05),
        ("e1_use_checkpointing", ["chk-e-3.gguf"], 0.02),
        ("e2_no_checkpointing", ["chk-e-3.gguf"], 0.02),
    ],
)
def test_replay_fixture_run(tree, monkeypatch, run, files, lr):
    rc, losses = replay(tree, run, monkeypatch)
    assert rc == 0
    _compare_losses(losses, fixture_losses(run))
    produced = {p.name for p in (tree / "runs" / run).iterdir()}
    expected = set(json.loads((FIX / "runs" / run / "run.json").read_text())["outputs"])
    assert expected <= produced, expected - produced  # same file names, ITERATION/LATEST included
    for f in files:
        _compare_checkpoints(tree / "runs" / run / f, FIX / "runs" / run / f, lr)
    # the ggla adapter of the last iteration holds the checkpoint's LoRA
    last = sorted(p for p in produced if p.startswith("lora-") and "LATEST" in p)[0]
    ours = read_ggla(tree / "runs" / run / last)
    theirs = read_ggla(FIX / "runs" / run / last)
    assert (ours.alpha, ours.rank) == (theirs.alpha, theirs.rank)
    tol = param_tol(lr, losses[-1]["iter"])
    for n in theirs.pairs:
        assert float((ours.pairs[n].a - theirs.pairs[n].a).abs().max()) <= tol
        assert float((ours.pairs[n].b - theirs.pairs[n].b).abs().max()) <= tol


def test_resume_llamacpp_checkpoint_continues_its_curve(tree, monkeypatch):
    """Run b: resume llama.cpp's chk-a-2 for 2 iterations -> the same losses and tensors as llama.cpp."""
    copy_fixture_run(tree, "a_fresh_q8_0")
    rc, losses = replay(tree, "b_resume_from_a_iter2", monkeypatch)
    assert rc == 0
    _compare_losses(losses, fixture_losses("b_resume_from_a_iter2"))
    for f in ("chk-b-3.gguf", "chk-b-4.gguf"):
        ours, theirs = tree / "runs/b_resume_from_a_iter2" / f, FIX / "runs/b_resume_from_a_iter2" / f
        _compare_checkpoints(ours, theirs, 0.02)


def test_only_write_lora_is_byte_identical(tree, monkeypatch):
    """f1: checkpoint -> adapter; f2: the random initial LoRA for seed 42. Both byte-for-byte llama.cpp's."""
    copy_fixture_run(tree, "a_fresh_q8_0")
    rc, _ = replay(tree, "f1_only_write_lora_from_chk", monkeypatch)
    assert rc == 0
    d = tree / "runs" / "f1_only_write_lora_from_chk"
    assert (d / "lora-f-4.bin").read_bytes() == (FIX / "runs/f1_only_write_lora_from_chk/lora-f-4.bin").read_bytes()
    assert (d / "lora-f-LATEST.bin").read_bytes() == (d / "lora-f-4.bin").read_bytes()
    rc, _ = replay(tree, "f2_only_write_lora_init", monkeypatch)
    assert rc == 0
    d = tree / "runs" / "f2_only_write_lora_init"
    ref = (FIX / "runs/f2_only_write_lora_init/lora-init-0.bin").read_bytes()
    assert (d / "lora-init-0.bin").read_bytes() == ref


def test_rank_mismatch_is_refused_and_writes_nothing(tree, monkeypatch, capsys):
    copy_fixture_run(tree, "a_fresh_q8_0")
    rc, _ = replay(tree, "x3_rejected_rank_mismatch", monkeypatch)
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert "Provided rank differs from checkpoint file" in err and "chk-a-LATEST.gguf" in err
    assert not list((tree / "runs" / "x3_rejected_rank_mismatch").glob("chk-x-*"))


def test_ffn_rank_flags_work(tree, monkeypatch):
    """llama.cpp's --rank-ffn_gate can never match (spec §1.4); lorakit's spellings all work."""
    args = ["--model-base", "../../models/tiny-f32.gguf", "--train-data", "../../data/train.txt",
            "--checkpoint-in", "", "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.bin",
            "--lora-r", "3", "--rank-ffn_gate", "5", "--rank-w2", "2", "--rank-ffn-up", "1",
            "--adam-iter", "1", "--ctx", "8", "--batch", "1", "--seed", "1"]  # fmt: skip
    rc, _ = replay(tree, "ranks", monkeypatch, args=args)
    assert rc == 0
    ck = read_checkpoint(tree / "runs" / "ranks" / "chk-LATEST.gguf")
    assert (ck.ranks["ffn_gate"], ck.ranks["ffn_down"], ck.ranks["ffn_up"], ck.ranks["attn_q"]) == (
        5,
        2,
        1,
        3,
    )
    assert ck.lora["blk.0.ffn_gate.weight"][0].shape == (64, 5)
