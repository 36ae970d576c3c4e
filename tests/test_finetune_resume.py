"""Resume, interruption, GQA and checkpointing behaviour of lorakit finetune (beyond llama.cpp's fixtures)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lorakit.adapters import read_gguf_adapter
from lorakit.checkpoint import read_checkpoint
from lorakit.ggla import read_ggla
from tests.finetune_util import make_tree, replay

BASE = ["--model-base", "../../models/tiny-q8_0.gguf", "--train-data", "../../data/train.txt",
        "--seed", "42", "--ctx", "16", "--batch", "2", "--warmup", "0", "--adam-alpha", "0.02"]  # fmt: skip


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path)


def _ck(path):
    return read_checkpoint(path)


def test_resume_is_bit_exact(tree, monkeypatch):
    """4 iterations straight == 2 iterations, then 2 more from LATEST: identical tensors and losses.

    As in llama.cpp, a periodic save (--save-every) records the state before the next batch is drawn,
    so resuming from it replays exactly; the final save of a run records the state after the extra
    loss-only batch (spec §4.6), which a resumed run then skips."""
    straight = BASE + ["--checkpoint-in", "", "--checkpoint-out", "chk-ITERATION.gguf",
                       "--lora-out", "lora-ITERATION.bin", "--adam-iter", "4", "--save-every", "2"]  # fmt: skip
    rc, l_straight = replay(tree, "straight", monkeypatch, args=straight)
    assert rc == 0
    first = BASE + ["--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
                    "--lora-out", "lora-ITERATION.bin", "--adam-iter", "2", "--save-every", "2"]  # fmt: skip
    rc, l1 = replay(tree, "split", monkeypatch, args=first)
    assert rc == 0
    rc, l2 = replay(tree, "split", monkeypatch, args=first)  # resumes from the LATEST the first call wrote
    assert rc == 0
    a, b = _ck(tree / "runs/straight/chk-4.gguf"), _ck(tree / "runs/split/chk-4.gguf")
    for n in a.lora:
        assert torch.equal(a.lora[n][0], b.lora[n][0]) and torch.equal(a.lora[n][1], b.lora[n][1]), n
    assert torch.equal(a.m, b.m) and torch.equal(a.v, b.v)
    for f in ("train_its", "train_samples", "train_tokens", "shuffle_next_sample", "shuffle_rng_state"):
        assert getattr(a, f) == getattr(b, f)
    # log.jsonl accumulates both split calls: iterations 0,1,2 then 2,3,4
    by_iter = {r["iter"]: r["loss"] for r in l2 if r["loss"] != 0.0}  # a run's first line prints 0
    for r in l_straight:
        if r["iter"] > 0:
            assert by_iter[r["iter"]] == r["loss"]
    assert (tree / "runs/straight/lora-4.bin").read_bytes() == (tree / "runs/split/lora-4.bin").read_bytes()


def test_checkpointing_does_not_change_losses(tree, monkeypatch):
    args = BASE + ["--checkpoint-in", "", "--checkpoint-out", "", "--lora-out", "", "--adam-iter", "3"]
    _, with_ckpt = replay(tree, "ck", monkeypatch, args=args + ["--use-checkpointing"])
    _, without = replay(tree, "nock", monkeypatch, args=args + ["--no-checkpointing"])
    assert [r["loss"] for r in with_ckpt] == [r["loss"] for r in without]


def test_gqa_model_trains(tree, monkeypatch):
    """stories260K has 8 query / 4 KV heads: llama.cpp's finetune aborts on it (fixture run g); lorakit trains."""
    args = ["--model-base", "../../models/stories260K-f32.gguf", "--train-data", "../../data/train.txt",
            "--checkpoint-in", "", "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf",
            "--seed", "11", "--ctx", "32", "--batch", "4", "--adam-iter", "30", "--save-every", "0",
            "--warmup", "0", "--adam-alpha", "0.01"]  # fmt: skip
    rc, losses = replay(tree, "g", monkeypatch, args=args)
    assert rc == 0
    vals = [r["loss"] for r in losses if r["iter"] > 0]
    assert sum(vals[-5:]) / 5 < sum(vals[:5]) / 5 - 0.3  # clearly learning
    ad = read_gguf_adapter(tree / "runs/g/lora-LATEST.gguf")
    assert "blk.0.attn_k.weight" in ad.pairs and ad.pairs["blk.0.attn_k.weight"].b.shape == (32, 4)


def test_gguf_and_ggla_outputs_hold_the_same_lora(tree, monkeypatch):
    args = BASE + ["--checkpoint-in", "", "--checkpoint-out", "", "--adam-iter", "2", "--lora-alpha", "8"]
    replay(tree, "bin", monkeypatch, args=args + ["--lora-out", "lora-ITERATION.bin"])
    replay(tree, "gguf", monkeypatch, args=args + ["--lora-out", "lora-ITERATION.gguf"])
    g = read_ggla(tree / "runs/bin/lora-LATEST.bin")
    a = read_gguf_adapter(tree / "runs/gguf/lora-LATEST.gguf")
    assert set(a.pairs) == {n for n in g.pairs if "_norm" not in n}
    for n, p in a.pairs.items():  # same runtime delta: file scale alpha/r baked into B
        torch.testing.assert_close(p.delta(), g.pairs[n].delta(), rtol=1e-6, atol=1e-9)


def test_ctrl_c_saves_last_finished_iteration_and_exits_130(tree):
    run = tree / "runs" / "int"
    run.mkdir()
    cmd = [sys.executable, "-m", "lorakit.cli", "finetune", *BASE, "--checkpoint-in", "",
           "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.bin",
           "--adam-iter", "100000", "--save-every", "0", "--backend", "cpu-torch"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    seen = 0
    while time.time() < deadline:  # wait until a few iterations are done
        line = proc.stdout.readline()
        if "iter=" in line:
            seen = int(line.split("iter=")[1].split()[0])
            if seen >= 3:
                break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    ck = read_checkpoint(run / "chk-LATEST.gguf")
    assert ck.opt_iter >= seen and (run / f"chk-{ck.opt_iter}.gguf").exists()
    assert read_ggla(run / "lora-LATEST.bin").pairs
    assert not [p for p in os.listdir(run) if ".tmp" in p]  # no temporary files left behind
    assert "Traceback" not in err


def test_failed_save_keeps_previous_latest(tree, monkeypatch):
    """Saves go to a temporary name and are renamed: a crash while writing leaves LATEST intact."""
    import lorakit.checkpoint as ckmod

    args = BASE + ["--checkpoint-in", "", "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "",
                   "--adam-iter", "1"]  # fmt: skip
    replay(tree, "atomic", monkeypatch, args=args)
    latest = tree / "runs/atomic/chk-LATEST.gguf"
    before = latest.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckmod, "_np32", boom)  # fails inside the write, after the temp file is opened
    rc, _ = replay(tree, "atomic", monkeypatch, args=BASE + ["--checkpoint-in", "chk-LATEST.gguf",
                   "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "", "--adam-iter", "1"])  # fmt: skip
    assert rc == 1
    assert latest.read_bytes() == before
    assert not [p for p in os.listdir(latest.parent) if ".tmp" in p]
