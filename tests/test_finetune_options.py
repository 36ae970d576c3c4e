"""finetune option values and output names that used to waste a run, hang, train to NaN or replace the user's files.

Each bad command must be refused before training: exit 2 (usage) or 1 (file problem), one line on stderr that
names the option or file, and every file the user had left byte-identical (expect_failure checks all of it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.ggla import read_ggla
from tests.test_bad_input import CHK_A4, TINY_Q8, TRAIN, _finetune, _snapshot, expect_failure


def _base(*extra: str) -> list[str]:
    """The audit's base command, outputs switched off: for runs refused before anything is written."""
    return ["finetune", "--model-base", str(TINY_Q8), "--train-data", str(TRAIN), "-t", "1", "--checkpoint-in", "",
            "--ctx", "8", "--batch", "1", "--seed", "1", "--adam-iter", "1", "--backend", "cpu-torch",
            "--checkpoint-out", "", "--lora-out", "", *extra]  # fmt: skip


def _ok(capsys, argv: list[str]) -> tuple[str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


# --------------------------------------------------------------------------- 1: an output name is a directory


@pytest.mark.parametrize("target", ["chk-LATEST.gguf", "lora-1.bin"])
def test_output_that_is_a_directory_is_refused_before_training(capsys, tmp_path, target):
    argv = _finetune(tmp_path, TINY_Q8)
    path = tmp_path / "out" / target
    path.unlink()
    path.mkdir()
    line = expect_failure(capsys, tmp_path, argv, path, code=1)
    assert "directory" in line


# --------------------------------------------------------------------------- 2: negative integers


@pytest.mark.parametrize(
    "args, option",
    [
        (["--opt-past", "-1"], "--opt-past"),
        (["--lora-alpha", "-1"], "--lora-alpha"),
    ],
)
def test_negative_integer_option_is_a_usage_error(capsys, tmp_path, args, option):
    argv = _finetune(tmp_path, TINY_Q8, *args)
    assert option in expect_failure(capsys, tmp_path, argv, None, code=2)


def test_llamacpp_sentinel_values_still_run(capsys, tmp_path):
    """llama.cpp's own meanings for 0 and negative values are kept (spec §1.2)."""
    argv = _base("--save-every", "-1", "--epochs", "0", "--opt-max-no-improvement", "-1", "--grad-acc", "0",
                 "--warmup", "-5", "--adam-decay-min-ndim", "-1", "--enable-restart", "--cos-decay-restart", "1",
                 "--opt-past", "0", "--lora-out", str(tmp_path / "lora-ITERATION.bin"))  # fmt: skip
    _ok(capsys, argv)
    assert (tmp_path / "lora-1.bin").is_file()


# --------------------------------------------------------------------------- 3: schedule values, nan and inf

FLOAT_OPTIONS = ("--norm-rms-eps", "--rope-freq-base", "--rope-freq-scale", "--cos-decay-restart", "--cos-decay-min",
                 "--opt-delta", "--adam-alpha", "--adam-min-alpha", "--adam-decay", "--adam-beta1", "--adam-beta2",
                 "--adam-gclip", "--adam-epsf")  # fmt: skip


@pytest.mark.parametrize(
    "args, option",
    [
        (["--enable-restart", "--cos-decay-steps", "2", "--cos-decay-restart", "0.5"], "--cos-decay-restart"),
        (["--enable-restart", "--cos-decay-steps", "0"], "--cos-decay-steps"),
        (["--cos-decay-steps", "0"], "--cos-decay-steps"),
        (["--cos-decay-steps", "-3"], "--cos-decay-steps"),
        (["--adam-beta1", "1"], "--adam-beta1"),
        (["--adam-beta2", "1.5"], "--adam-beta2"),
        *[([name, value], name) for name in FLOAT_OPTIONS for value in ("nan", "inf", "-inf")],
    ],
)
def test_schedule_and_float_values_that_hang_or_give_nan(capsys, tmp_path, args, option):
    argv = _finetune(tmp_path, TINY_Q8, *args)
    assert option in expect_failure(capsys, tmp_path, argv, None, code=2)


def test_cos_decay_restart_only_matters_with_restarts():
    from lorakit.finetune_cli import _check_schedule

    _check_schedule(1000, 0.5, enable_restart=False)  # unused without --enable-restart
    _check_schedule(1000, 1.0, enable_restart=True)  # a factor of 1 keeps the period: the loop ends
    with pytest.raises(Exception, match="--cos-decay-restart"):
        _check_schedule(1000, 0.999, enable_restart=True)  # shrinks to 0 after ~500000 steps, then hangs


# --------------------------------------------------------------------------- 4: --log-jsonl


def test_log_jsonl_in_missing_directory(capsys, tmp_path):
    log = tmp_path / "nodir" / "log.jsonl"
    line = expect_failure(capsys, tmp_path, _finetune(tmp_path, TINY_Q8, "--log-jsonl", str(log)), log, code=1)
    assert "--log-jsonl" in line


def test_log_jsonl_that_is_a_directory(capsys, tmp_path):
    (tmp_path / "logdir").mkdir()
    log = tmp_path / "logdir"
    expect_failure(capsys, tmp_path, _finetune(tmp_path, TINY_Q8, "--log-jsonl", str(log)), log, code=1)


def test_log_jsonl_not_created_when_the_run_is_refused(capsys, tmp_path):
    argv = _finetune(tmp_path, TINY_Q8, "--log-jsonl", str(tmp_path / "log.jsonl"))
    argv[argv.index("--train-data") + 1] = str(tmp_path / "no-such.txt")
    expect_failure(capsys, tmp_path, argv, tmp_path / "no-such.txt", code=1)
    assert not (tmp_path / "log.jsonl").exists()


# --------------------------------------------------------------------------- 5: seeds


def _init_lora(capsys, tmp_path: Path, seed: str) -> bytes:
    out = tmp_path / f"lora-{seed}-ITERATION.bin"
    _ok(capsys, _base("--seed", seed, "--only-write-lora", "--lora-out", str(out)))
    return (tmp_path / f"lora-{seed}-0.bin").read_bytes()


def test_negative_seed_wraps_like_uint32(capsys, tmp_path):
    """llama.cpp stores -s as a uint32: -2 is seed 4294967294, not a time seed (only -1 is)."""
    assert _init_lora(capsys, tmp_path, "-2") == _init_lora(capsys, tmp_path, "4294967294")
    assert _init_lora(capsys, tmp_path, "-2") != _init_lora(capsys, tmp_path, "1")


@pytest.mark.parametrize("seed", ["99999999999999999999", "4294967296", "-2147483649"])
def test_seed_out_of_32_bits_is_a_usage_error(capsys, tmp_path, seed):
    line = expect_failure(capsys, tmp_path, _finetune(tmp_path, TINY_Q8, "--seed", seed), None, code=2)
    assert "--seed" in line and seed in line


# --------------------------------------------------------------------------- 6: --ctx beyond the model's context


def test_ctx_beyond_model_context_warns(capsys, tmp_path):
    lora = str(tmp_path / "lora-ITERATION.bin")
    _, err = _ok(capsys, _base("--ctx", "1000", "--only-write-lora", "--lora-out", lora))
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(TINY_Q8) in lines[0] and "256" in lines[0] and "1000" in lines[0], err
    _, err = _ok(capsys, _base("--ctx", "256", "--only-write-lora", "--lora-out", lora))
    assert err == ""


# --------------------------------------------------------------------------- 7: outputs over inputs


@pytest.fixture
def inputs(tmp_path):
    shutil.copyfile(TINY_Q8, tmp_path / "base.gguf")
    shutil.copyfile(TRAIN, tmp_path / "train.txt")
    shutil.copyfile(TRAIN, tmp_path / "chk-1.gguf")  # training data that happens to have an output's name
    shutil.copyfile(CHK_A4, tmp_path / "chk.gguf")
    (tmp_path / "link.bin").symlink_to(tmp_path / "base.gguf")
    return tmp_path


@pytest.mark.parametrize(
    "args, named",
    [
        (["--checkpoint-out", "train.txt", "--lora-out", "base.gguf"], "train.txt"),
        (["--lora-out", "base.gguf"], "base.gguf"),
        (["--lora-out", "link.bin"], "link.bin"),  # a symlink to the base model
        (["--train-data", "chk-1.gguf", "--checkpoint-out", "chk-ITERATION.gguf"], "chk-1.gguf"),
        (["--checkpoint-in", "chk.gguf", "--lora-out", "chk.gguf"], "chk.gguf"),
        (["--checkpoint-in", "chk.gguf", "--lora-out", "chk.gguf", "--only-write-lora"], "chk.gguf"),
        (["--log-jsonl", "base.gguf"], "base.gguf"),
        (["--log-jsonl", "chk.gguf", "--checkpoint-in", "chk.gguf"], "chk.gguf"),
        (["--log-jsonl", "log.jsonl", "--checkpoint-out", "log.jsonl"], "log.jsonl"),
    ],
)
def test_output_over_an_input_is_refused(capsys, inputs, monkeypatch, args, named):
    monkeypatch.chdir(inputs)
    (inputs / "log.jsonl").write_text("{}\n")
    argv = ["finetune", "--model-base", "base.gguf", "--train-data", "train.txt", "-t", "1", "--checkpoint-in", "",
            "--ctx", "8", "--batch", "1", "--seed", "1", "--adam-iter", "1", "--backend", "cpu-torch",
            "--checkpoint-out", "chk-out-ITERATION.gguf", "--lora-out", "lora-ITERATION.bin", *args]  # fmt: skip
    line = expect_failure(capsys, inputs, argv, named, code=2)
    assert "overwrite" in line or "append" in line


def test_new_latest_checkpoint_over_checkpoint_in_is_allowed(capsys, tmp_path, monkeypatch):
    """Resuming from chk-LATEST.gguf and writing the next chk-LATEST.gguf is llama.cpp's own workflow."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(CHK_A4, "chk-LATEST.gguf")
    before = _snapshot(tmp_path)
    argv = _base("--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
                 "--lora-out", "lora-ITERATION.bin")  # fmt: skip
    _ok(capsys, argv)
    assert _snapshot(tmp_path)["chk-LATEST.gguf"] != before["chk-LATEST.gguf"]
    assert (tmp_path / "chk-5.gguf").read_bytes() == (tmp_path / "chk-LATEST.gguf").read_bytes()


# --------------------------------------------------------------------------- 8: --adam-iter


@pytest.mark.parametrize("n", ["0", "-1"])
def test_adam_iter_below_one_trains_nothing_and_says_so(capsys, tmp_path, n):
    """llama.cpp: no iteration, nothing saved, exit 0. lorakit does the same and says so in one line."""
    argv = _finetune(tmp_path, TINY_Q8, "--adam-iter", n)
    before = _snapshot(tmp_path)
    _, err = _ok(capsys, argv)
    assert err.strip() == f"lorakit: note: --adam-iter {n}: no iterations to run; nothing is written"
    assert _snapshot(tmp_path) == before


def test_only_write_lora_ignores_adam_iter(capsys, tmp_path):
    _ok(capsys, _base("--adam-iter", "0", "--only-write-lora", "--lora-out", str(tmp_path / "lora-ITERATION.bin")))
    assert read_ggla(tmp_path / "lora-0.bin").pairs


# --------------------------------------------------------------------------- names


def test_checkpoint_and_adapter_under_one_name_is_refused(capsys, tmp_path):
    argv = _finetune(tmp_path, TINY_Q8)
    argv[argv.index("--lora-out") + 1] = argv[argv.index("--checkpoint-out") + 1]
    line = expect_failure(capsys, tmp_path, argv, None, code=2)
    assert "--lora-out and --checkpoint-out both write this file" in line


def test_empty_pattern_puts_the_iteration_in_front(capsys, tmp_path, monkeypatch):
    """llama.cpp's replace_str finds an empty --pattern-fn-it at the start of the name (of the whole path: with a
    directory in front, the iteration goes before the directory, as there)."""
    monkeypatch.chdir(tmp_path)
    _ok(capsys, _base("--pattern-fn-it", "", "--checkpoint-out", "chk.gguf", "--lora-out", "lora.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1chk.gguf", "1lora.bin", "LATESTchk.gguf", "LATESTlora.bin"]


# --------------------------------------------------------------------------- moment layout through the CLI


def test_fresh_run_writes_right_to_left_moments_and_a_resumed_run_keeps_its_order(capsys, tmp_path):
    """README: a fresh run writes llama.cpp's RIGHT_TO_LEFT moment layout (its choice for the seed command); a resumed
    run keeps the layout of the checkpoint it read (llama.cpp's a-2 here, written LEFT_TO_RIGHT)."""
    from lorakit.checkpoint import read_checkpoint
    from lorakit.moments import LEFT_TO_RIGHT, RIGHT_TO_LEFT

    _ok(capsys, _base("--checkpoint-out", str(tmp_path / "fresh-ITERATION.gguf")))
    assert read_checkpoint(tmp_path / "fresh-LATEST.gguf").moment_order == RIGHT_TO_LEFT
    a2 = CHK_A4.parent / "chk-a-2.gguf"
    assert read_checkpoint(a2).moment_order == LEFT_TO_RIGHT
    _ok(capsys, _base("--checkpoint-in", str(a2), "--ctx", "16", "--batch", "2", "--seed", "42",
                      "--checkpoint-out", str(tmp_path / "res-ITERATION.gguf")))  # fmt: skip
    assert read_checkpoint(tmp_path / "res-LATEST.gguf").moment_order == LEFT_TO_RIGHT


# --------------------------------------------------------------------------- stdout's reader goes away


def test_closed_stdout_does_not_stop_the_run(tmp_path):
    """`lorakit finetune ... | head -1`: the reader is gone before the first log line. The run goes on (its files
    are what it is for: llama.cpp's finetune would die of SIGPIPE mid-training), writes its adapter and checkpoint,
    and exits 0 with nothing on stderr."""
    argv = ["finetune", "--model-base", str(TINY_Q8), "--train-data", str(TRAIN), "-t", "1", "--checkpoint-in", "",
            "--ctx", "8", "--batch", "1", "--adam-iter", "2", "--backend", "cpu-torch", "--checkpoint-out",
            str(tmp_path / "chk-ITERATION.gguf"), "--lora-out", str(tmp_path / "l-ITERATION.bin")]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has written anything (importing torch takes a while)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert err == ""
    assert read_ggla(tmp_path / "l-LATEST.bin") and (tmp_path / "chk-LATEST.gguf").stat().st_size > 0
