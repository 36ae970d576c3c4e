"""`lorakit predict` through the command line: streamed text, greedy reference, adapters, dtypes."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from pathlib import Path

import pytest
import torch

from lorakit.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests/fixtures/llamacpp"
REF_TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the p"


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("conv", ROOT / "examples" / "convert_llama2c.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    out = tmp_path_factory.mktemp("m") / "stories260K-q8_0.gguf"
    conv.convert(ROOT / "assets/stories260K.bin", ROOT / "assets/tok512.model", out, "q8_0")
    return out


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_greedy_text_matches_llama2c_reference(stories, capsys, dtype):
    rc = main(["predict", "-m", str(stories), "-p", "Once upon a time", "-n", "24", "--temp", "0",
               "--compute-dtype", dtype, "--backend", "cpu-torch"])  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.strip() == REF_TEXT


def test_act_q8(stories, capsys):
    """--act-q8 (llama.cpp's arithmetic for q8_0 products) gives the llama2c reference text too."""
    rc = main(["predict", "-m", str(stories), "-p", "Once upon a time", "-n", "24", "--temp", "0", "--act-q8",
               "--backend", "cpu-torch"])  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.strip() == REF_TEXT


def test_prompt_from_file_and_adapters(tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("From fairest creatures")
    tiny = str(FIX / "models/tiny-q8_0.gguf")
    base = ["predict", "-m", tiny, "-f", str(prompt), "-n", "16", "--temp", "0", "--backend", "cpu-torch"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--lora", str(FIX / "adapter/adapter.gguf")]) == 0
    with_lora = capsys.readouterr().out
    assert main([*base, "--lora-scaled", str(FIX / "adapter/adapter.gguf"), "0.0"]) == 0
    assert capsys.readouterr().out == plain  # scale 0 is the base model
    assert plain.startswith("From fairest creatures") and with_lora != plain


def test_sampling_is_seeded(stories, capsys):
    argv = ["predict", "-m", str(stories), "-p", "Once", "-n", "20", "--temp", "0.9", "-s", "7",
            "--backend", "cpu-torch"]  # fmt: skip
    assert main(argv) == 0
    a = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == a


def test_prompt_runs_with_the_collector_paused_and_the_loaded_objects_frozen(monkeypatch, capsys):
    """Every forward of the generation (the prompt's, and the CPU's steps through Generator.logits) runs with the
    cyclic collector paused and, under the CLI, the loaded objects frozen; afterwards both are as they were."""
    import gc

    import lorakit.generate as generate

    seen = []
    forward = generate.forward_hidden

    def spy(*args, **kwargs):
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
        return forward(*args, **kwargs)

    monkeypatch.setattr(generate, "forward_hidden", spy)
    tiny = str(FIX / "models/tiny-q8_0.gguf")
    assert main(["predict", "-m", tiny, "-p", "From", "-n", "3", "--temp", "0", "--backend", "cpu-torch"]) == 0
    assert capsys.readouterr().out.startswith("From")
    assert len(seen) == 3 and set(seen) == {(False, True)}  # the prompt, then two steps (none after the third token)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_gc_paused_restores_the_collector():
    import gc

    from lorakit.generate import gc_paused

    @gc_paused
    def state(fail: bool) -> bool:
        if fail:
            raise ValueError("x")
        return gc.isenabled()

    assert state(False) is False and gc.isenabled()
    with pytest.raises(ValueError):
        state(True)
    assert gc.isenabled()
    gc.disable()
    try:  # a caller that paused it itself keeps it paused
        assert state(False) is False and not gc.isenabled()
    finally:
        gc.enable()


# --------------------------------------------------------------------------- llama.cpp main's conventions

TINY = str(FIX / "models/tiny-q8_0.gguf")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["predict", "-m", TINY, "--backend", "cpu-torch", "-c", "64", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_prompt_file_loses_one_trailing_newline(tmp_path, capsys):
    """llama.cpp's -f drops one trailing newline: a prompt file saved by an editor reads as the -p prompt."""
    (tmp_path / "p.txt").write_text("From fairest\n")
    (tmp_path / "pp.txt").write_text("From fairest\n\n")
    greedy = ("-n", "8", "--temp", "0")
    from_p = _run(capsys, "-p", "From fairest", *greedy)
    assert from_p[0] == 0
    assert _run(capsys, "-f", str(tmp_path / "p.txt"), *greedy) == from_p
    assert _run(capsys, "-f", str(tmp_path / "pp.txt"), *greedy)[1] != from_p[1]  # only one goes


def test_escape_processes_the_prompt(capsys):
    greedy = ("-n", "6", "--temp", "0")
    real = _run(capsys, "-p", "a\nb\t'c'", *greedy)
    assert real[0] == 0 and real[1].startswith("a\nb\t'c'")
    assert _run(capsys, "-e", "-p", "a\\nb\\t\\'c\\'", *greedy) == real
    assert _run(capsys, "-p", "a\\nb", *greedy)[1].startswith("a\\nb")  # off by default, as in llama.cpp's main


def test_repeat_last_n_minus_one_is_the_context(capsys):
    pen = ("-p", "hi", "-n", "30", "--temp", "0", "--repeat-penalty", "1.5")
    whole = _run(capsys, *pen, "--repeat-last-n", "64")  # -c 64
    assert whole[0] == 0
    assert _run(capsys, *pen, "--repeat-last-n", "-1") == whole
    assert _run(capsys, *pen, "--repeat-last-n", "0")[1] != whole[1]


def test_main_options_that_do_not_apply_are_accepted(capsys):
    plain = _run(capsys, "-p", "hi", "-n", "4", "--temp", "0")
    ignored = ("-ngl", "99", "--n_gpu_layers", "99", "-b", "512", "--color", "--no-mmap", "--mlock")
    assert _run(capsys, "-p", "hi", "-n", "4", "--temp", "0", *ignored) == plain
    rc, out, err = _run(capsys, "-p", "hi", "-n", "4", "--temp", "0", "--lora-base", "base-f16.gguf")
    assert (rc, out) == plain[:2] and "--lora-base is not needed" in err


def test_option_values_keep_their_underscores(capsys):
    """'_' -> '-' applies to option names only; a prompt that looks like an option is the prompt."""
    rc, out, _ = _run(capsys, "-p", "--snake_case_name = 1", "-n", "0")
    assert rc == 0 and out == "--snake_case_name = 1\n"
    rc, out, _ = _run(capsys, "--prompt=--a_b", "-n", "0")
    assert rc == 0 and out == "--a_b\n"
    rc, out, _ = _run(capsys, "-p", "--lora-scaled", "-n", "0")
    assert rc == 0 and out == "--lora-scaled\n"


def test_negative_seeds_wrap_as_in_llama_cpp(capsys):
    """llama.cpp's seed is a uint32: -2 is 4294967294 (fixed), only -1 draws one."""
    sampled = ("-p", "hi", "-n", "12", "--temp", "1.0")
    wrapped = _run(capsys, *sampled, "-s", "-2")
    assert wrapped[0] == 0 and _run(capsys, *sampled, "-s", "4294967294") == wrapped


def test_context_full_is_said(capsys):
    rc, out, err = _run(capsys, "-p", "hi", "-n", "200", "--temp", "0", "-c", "16")
    assert rc == 0 and "the context of 16 tokens is full" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _run(capsys, "-p", "hi", "-n", "5", "--temp", "0", "-c", "16")
    assert rc == 0 and err == ""


def test_context_above_the_models_is_a_note(capsys):
    rc, _, err = _run(capsys, "-p", "hi", "-n", "2", "--temp", "0", "-c", "300")  # tiny: 256
    assert rc == 0 and "trained on only 256 tokens of context (300 asked)" in err


@pytest.mark.parametrize("argv", [["-h"], ["predict", "-h"], ["inspect", "-h"], ["finetune", "-h"]])
def test_short_help(argv, capsys):
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("Usage: lorakit")


class _ClosedPipe(io.StringIO):
    """stdout whose reader has gone (`| head`)."""

    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


CLOSED_PIPE_CASES = [
    ["inspect", TINY],
    ["inspect", "--json", TINY],
    ["predict", "-m", TINY, "-p", "hi", "-n", "3", "-c", "64", "--backend", "cpu-torch"],
]


@pytest.mark.parametrize("argv", CLOSED_PIPE_CASES)
def test_closed_pipe_is_quiet(argv, monkeypatch, capsys):
    """`lorakit inspect m.gguf | head -1`: exit 0 and nothing on stderr once the reader has gone."""
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


def test_interrupt_while_importing(monkeypatch, capsys):
    """A Ctrl-C before the CLI is imported (typer, rich: a moment) gives the CLI's line and code, no traceback."""
    import importlib.abc

    class Interrupted(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "lorakit.cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "lorakit.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    from lorakit.__main__ import main as entry

    assert entry() == 130
    assert capsys.readouterr().err == "lorakit: interrupted\n"


def test_seed_minus_one_draws_a_seed(capsys):
    sampled = ("-p", "hi", "-n", "24", "--temp", "1.0", "--top-k", "0", "--top-p", "1.0", "--min-p", "0")
    runs = {_run(capsys, *sampled, "-s", "-1")[1] for _ in range(3)}
    assert len(runs) > 1  # three draws of 24 tokens from a near-flat distribution: equal only by a fluke


def test_threads_are_capped_at_the_core_count(capsys):
    before = torch.get_num_threads()
    try:
        assert _run(capsys, "-p", "hi", "-n", "1", "-t", "1000")[0] == 0
        assert torch.get_num_threads() == min(1000, os.cpu_count())
    finally:
        torch.set_num_threads(before)


def test_adapters_of_both_formats_mix(capsys):
    """--lora with a GGUF adapter and a ggla .bin together: the sum of their terms, in any order."""
    gguf_ad, ggla_ad = str(FIX / "adapter/adapter.gguf"), str(FIX / "runs/a_fresh_q8_0/lora-a-4.bin")
    greedy = ("-p", "From fairest", "-n", "12", "--temp", "0")
    both = _run(capsys, *greedy, "--lora", gguf_ad, "--lora-scaled", ggla_ad, "3")
    assert both[0] == 0
    assert _run(capsys, *greedy, "--lora-scaled", ggla_ad, "3", "--lora", gguf_ad) == both
    assert both[1] not in {
        _run(capsys, *greedy, "--lora", gguf_ad)[1],
        _run(capsys, *greedy, "--lora-scaled", ggla_ad, "3")[1],
    }
