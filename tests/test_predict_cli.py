"""`lorakit predict` through the command line: streamed text, greedy reference, adapters, dtypes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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
