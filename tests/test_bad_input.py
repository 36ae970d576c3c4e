"""Bad input through the real CLI (`lorakit.cli.main`) for predict, inspect and finetune.

Every failure: exit code 1 (usage errors 2), exactly one line on stderr that names the file and
has no traceback, and no file the user had is modified (finetune's existing output targets too).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lorakit.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "llamacpp"
MODELS = FIX / "models"
TINY_Q8 = MODELS / "tiny-q8_0.gguf"
TINY_F32 = MODELS / "tiny-f32.gguf"
STORIES = MODELS / "stories260K-f32.gguf"
CHK_A4 = FIX / "runs" / "a_fresh_q8_0" / "chk-a-4.gguf"
LORA_A4 = FIX / "runs" / "a_fresh_q8_0" / "lora-a-4.bin"
ADAPTER = FIX / "adapter" / "adapter.gguf"
TRAIN = FIX / "data" / "train.txt"
VOCAB = ROOT / "assets" / "ggml-vocab-llama-spm.gguf"
TARGETS = ("chk-1.gguf", "chk-LATEST.gguf", "lora-1.bin", "lora-LATEST.bin")


# --------------------------------------------------------------------------- bad files


def _write_gguf(path: Path, arch: str, fill) -> Path:
    w = gguf.GGUFWriter(path, arch)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_missing(tmp: Path) -> Path:
    return tmp / "no-such-model.gguf"


def make_directory(tmp: Path) -> Path:
    (tmp / "a-directory").mkdir()
    return tmp / "a-directory"


def make_truncated(tmp: Path) -> Path:
    data = TINY_Q8.read_bytes()
    (tmp / "truncated.gguf").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.gguf"


def make_random(tmp: Path) -> Path:
    (tmp / "random.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    return tmp / "random.gguf"


def make_absurd_counts(tmp: Path) -> Path:
    head = b"GGUF" + struct.pack("<IQQ", 3, 2**60, 2**60)
    (tmp / "absurd.gguf").write_bytes(head + b"\0" * (64 - len(head)))
    return tmp / "absurd.gguf"


def make_absurd_array(tmp: Path) -> Path:
    """One key whose u32 array claims 2**62 elements: the gguf reader alone would loop forever."""
    kv = struct.pack("<Q", 3) + b"abc" + struct.pack("<IIQ", 9, 4, 2**62)
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv
    (tmp / "absurd-array.gguf").write_bytes(head + b"\0" * (96 - len(head)))
    return tmp / "absurd-array.gguf"


def _other_arch(tmp: Path, arch: str) -> Path:
    def fill(w):
        w.add_block_count(1)
        w.add_embedding_length(8)
        w.add_context_length(64)
        if arch == "gpt2":
            w.add_tokenizer_model("gpt2")
            w.add_token_list(["a", "b", "c", "d"])
        w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))

    return _write_gguf(tmp / f"{arch}.gguf", arch, fill)


def make_gpt2(tmp: Path) -> Path:
    return _other_arch(tmp, "gpt2")


def make_falcon(tmp: Path) -> Path:
    return _other_arch(tmp, "falcon")


def make_missing_tensor(tmp: Path) -> Path:
    """tiny-f32's metadata and every tensor except blk.1.ffn_up.weight."""
    r = gguf.GGUFReader(TINY_F32)

    def fill(w):
        for key, field in r.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            vtype = gguf.GGUFValueType(field.types[0])
            sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub_type=sub)
        for t in r.tensors:
            if t.name != "blk.1.ffn_up.weight":
                w.add_tensor(t.name, np.array(t.data))

    return _write_gguf(tmp / "missing-tensor.gguf", "llama", fill)


def _with_metadata(tmp: Path, name: str, key: str, value, vtype: gguf.GGUFValueType) -> Path:
    """tiny-f32 with one metadata value replaced."""
    r = gguf.GGUFReader(TINY_F32)

    def fill(w):
        for k, field in r.fields.items():
            if k.startswith("GGUF.") or k in ("general.architecture", key):
                continue
            vt = gguf.GGUFValueType(field.types[0])
            sub = gguf.GGUFValueType(field.types[-1]) if vt == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(k, field.contents(), vt, sub_type=sub)
        w.add_key_value(key, value, vtype)
        for t in r.tensors:
            w.add_tensor(t.name, np.array(t.data))

    return _write_gguf(tmp / name, "llama", fill)


def make_rope_scale_zero(tmp: Path) -> Path:
    return _with_metadata(tmp, "scale0.gguf", "llama.rope.scale_linear", 0.0, gguf.GGUFValueType.FLOAT32)


def make_embd_string(tmp: Path) -> Path:
    return _with_metadata(tmp, "embd-str.gguf", "llama.embedding_length", "abc", gguf.GGUFValueType.STRING)


def make_freq_base_nan(tmp: Path) -> Path:
    return _with_metadata(tmp, "base-nan.gguf", "llama.rope.freq_base", float("nan"), gguf.GGUFValueType.FLOAT32)


def make_bos_outside(tmp: Path) -> Path:
    return _with_metadata(tmp, "bos999.gguf", "tokenizer.ggml.bos_token_id", 999, gguf.GGUFValueType.UINT32)


def make_truncated_ggla(tmp: Path) -> Path:
    data = LORA_A4.read_bytes()
    (tmp / "truncated-lora.bin").write_bytes(data[: len(data) // 2])
    return tmp / "truncated-lora.bin"


BAD_MODELS = {
    "missing": (make_missing, "not found"),
    "directory": (make_directory, "directory"),
    "truncated": (make_truncated, "truncated"),
    "random-bytes": (make_random, "not a GGUF"),
    "absurd-counts": (make_absurd_counts, "claims"),
    "absurd-array": (make_absurd_array, "past the end"),
    "gpt2": (make_gpt2, "'gpt2' is not supported"),
    "falcon": (make_falcon, "'falcon' is not supported"),
    "missing-tensor": (make_missing_tensor, "missing tensor 'blk.1.ffn_up.weight'"),
    "ggla-as-model": (lambda tmp: LORA_A4, "ggla LoRA adapter"),
    "checkpoint-as-model": (lambda tmp: CHK_A4, "checkpoint"),
    "adapter-as-model": (lambda tmp: ADAPTER, "LoRA adapter"),
    "vocab-only": (lambda tmp: VOCAB, "no tensors"),
    "rope-scale-zero": (make_rope_scale_zero, "'llama.rope.scale_linear' is 0.0, not a number above zero"),
    "embd-string": (make_embd_string, "'llama.embedding_length' is 'abc', not an integer"),
    "freq-base-nan": (make_freq_base_nan, "'llama.rope.freq_base' is nan, not a number above zero"),
}
UNREADABLE = ("missing", "directory", "truncated", "random-bytes", "absurd-counts", "absurd-array")


# --------------------------------------------------------------------------- helpers


def _snapshot(tmp: Path) -> dict[str, str]:
    return {str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp.rglob("*") if p.is_file()}


def _predict(model: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "-m",
        str(model),
        "-p",
        "Hello",
        "-n",
        "2",
        "--temp",
        "0",
        "--backend",
        "cpu-torch",
        *extra,
    ]


def _finetune(tmp: Path, model: Path, *extra: str, backend: str = "cpu-torch") -> list[str]:
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    for name in TARGETS:  # the user's earlier outputs: a failed run must leave them alone
        (out / name).write_bytes(f"precious {name}".encode())
    return ["finetune", "--model-base", str(model), "--train-data", str(TRAIN), "--checkpoint-in", "",
            "--checkpoint-out", str(out / "chk-ITERATION.gguf"),
            "--lora-out", str(out / "lora-ITERATION.bin"),
            "--adam-iter", "1", "--ctx", "8", "-b", "1", "-t", "1", "--backend", backend, *extra]  # fmt: skip


def expect_failure(capsys, tmp: Path, argv: list[str], names: Path | str | None, code: int = 1) -> str:
    """Run the CLI; check the exit code, the one-line message, and that no file in tmp changed."""
    before = _snapshot(tmp)
    rc = main(argv)
    out, err = capsys.readouterr()
    line = err.strip()
    assert rc == code, f"exit {rc}, stderr: {err}"
    assert line and "\n" not in line, f"stderr is not one line: {err!r}"
    assert "Traceback" not in err and "internal error" not in err, err
    assert line.startswith("lorakit: usage error:" if code == 2 else "lorakit: error:"), line
    if names is not None:
        assert str(names) in line, f"{names} not named in: {line}"
    assert _snapshot(tmp) == before, "a file was modified or created"
    return line


# --------------------------------------------------------------------------- bad models


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_predict_bad_model(capsys, tmp_path, case):
    make, words = BAD_MODELS[case]
    path = make(tmp_path)
    line = expect_failure(capsys, tmp_path, _predict(path), path)
    assert words in line


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_finetune_bad_model(capsys, tmp_path, case):
    make, words = BAD_MODELS[case]
    path = make(tmp_path)
    line = expect_failure(capsys, tmp_path, _finetune(tmp_path, path), path)
    assert words in line


@pytest.mark.parametrize("case", UNREADABLE)
def test_inspect_unreadable(capsys, tmp_path, case):
    make, _ = BAD_MODELS[case]
    path = make(tmp_path)
    expect_failure(capsys, tmp_path, ["inspect", str(path)], path)


@pytest.mark.parametrize("case", ["gpt2", "falcon", "missing-tensor", "rope-scale-zero", "embd-string"])
def test_inspect_describes_unusable_gguf(capsys, tmp_path, case):
    """inspect still describes a readable GGUF that lorakit cannot run, and says why."""
    import json

    make, words = BAD_MODELS[case]
    path = make(tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    j = json.loads(out)
    assert err == "" and j["usable"] is False and words in " ".join(j["problems"])


def test_inspect_truncated_ggla(capsys, tmp_path):
    path = make_truncated_ggla(tmp_path)
    assert "truncated" in expect_failure(capsys, tmp_path, ["inspect", str(path)], path)


# --------------------------------------------------------------------------- bad adapters


def test_predict_truncated_ggla(capsys, tmp_path):
    path = make_truncated_ggla(tmp_path)
    line = expect_failure(capsys, tmp_path, _predict(TINY_Q8, "--lora", str(path)), path)
    assert "truncated" in line or "cut short" in line


def test_predict_checkpoint_as_lora(capsys, tmp_path):
    line = expect_failure(capsys, tmp_path, _predict(TINY_Q8, "--lora", str(CHK_A4)), CHK_A4)
    assert "finetune checkpoint" in line and "--lora-out" in line  # and which file is the adapter


def test_predict_model_as_lora(capsys, tmp_path):
    line = expect_failure(capsys, tmp_path, _predict(TINY_Q8, "--lora", str(TINY_F32)), TINY_F32)
    assert "is a model, not a LoRA adapter" in line


@pytest.mark.parametrize("case", ["missing", "directory", "random-bytes", "absurd-counts", "truncated"])
def test_predict_unreadable_lora(capsys, tmp_path, case):
    path = BAD_MODELS[case][0](tmp_path)
    expect_failure(capsys, tmp_path, _predict(TINY_Q8, "--lora-scaled", str(path), "0.5"), path)


@pytest.mark.parametrize("adapter", [ADAPTER, LORA_A4], ids=["gguf", "ggla"])
def test_predict_adapter_for_another_model(capsys, tmp_path, adapter):
    line = expect_failure(capsys, tmp_path, _predict(STORIES, "--lora", str(adapter)), adapter)
    assert "does not fit this model" in line and "shape mismatch" in line


# --------------------------------------------------------------------------- finetune inputs


def test_finetune_ggla_as_checkpoint_in(capsys, tmp_path):
    path = make_truncated_ggla(tmp_path)
    argv = _finetune(tmp_path, TINY_Q8)
    argv[argv.index("--checkpoint-in") + 1] = str(path)
    assert "not a finetune checkpoint" in expect_failure(capsys, tmp_path, argv, path)


def test_finetune_checkpoint_for_another_model(capsys, tmp_path):
    argv = _finetune(tmp_path, STORIES)
    argv[argv.index("--checkpoint-in") + 1] = str(CHK_A4)
    assert "another model" in expect_failure(capsys, tmp_path, argv, CHK_A4)


def test_finetune_missing_train_data(capsys, tmp_path):
    argv = _finetune(tmp_path, TINY_Q8)
    argv[argv.index("--train-data") + 1] = str(tmp_path / "no-such.txt")
    expect_failure(capsys, tmp_path, argv, tmp_path / "no-such.txt")


def test_finetune_unwritable_lora_out_keeps_checkpoint_targets(capsys, tmp_path):
    argv = _finetune(tmp_path, TINY_Q8)
    bad = tmp_path / "no-such-dir" / "lora-ITERATION.bin"
    argv[argv.index("--lora-out") + 1] = str(bad)
    expect_failure(capsys, tmp_path, argv, None)


# --------------------------------------------------------------------------- usage errors (exit 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_triton_without_gpu(capsys, tmp_path):
    line = expect_failure(capsys, tmp_path, _predict(TINY_Q8, "--backend", "cuda-triton"), None, code=2)
    assert "cuda-triton" in line
    argv = _finetune(tmp_path, TINY_Q8, backend="cuda-triton")
    assert "cuda-triton" in expect_failure(capsys, tmp_path, argv, None, code=2)


def test_bad_lora_scaled_value(capsys, tmp_path):
    line = expect_failure(capsys, tmp_path, _predict(TINY_Q8, "--lora-scaled", str(ADAPTER), "abc"), ADAPTER, 2)
    assert "'abc' is not a number" in line
    line = expect_failure(capsys, tmp_path, _predict(TINY_Q8, "--lora-scaled", str(ADAPTER)), None, code=2)
    assert "two values" in line


# --------------------------------------------------------------------------- paths that look like markup


@pytest.mark.parametrize("name", ["model[v2].gguf", "model[/v2].gguf"])
def test_path_with_brackets_is_named(capsys, tmp_path, name):
    expect_failure(capsys, tmp_path, ["inspect", str(tmp_path / name)], tmp_path / name)


def test_inspect_names_a_special_token_outside_the_vocabulary(capsys, tmp_path):
    import json

    path = make_bos_outside(tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["usable"] is False and "bos_token_id 999 is outside the vocabulary" in " ".join(j["problems"])


# --------------------------------------------------------------------------- bad option values


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--top-k", "abc"], "Invalid value for '--top-k'"),  # click's own usage errors: one line too
        (["--bogus"], "No such option: --bogus"),
        (["--temp", "nan"], "--temp must be a finite number"),
        (["--repeat-penalty", "inf"], "--repeat-penalty must be a finite number"),
        (["--lora-scaled", str(ADAPTER), "nan"], "the scale must be a finite number, got nan"),
        (["-s", "99999999999999999999"], "out of range"),
        (["--repeat-last-n", "-2"], "--repeat-last-n -2"),
        (["-c", "3"], "leaves no room to generate in a context of 3"),
    ],
)
def test_predict_bad_option_values(capsys, tmp_path, extra, words):
    assert words in expect_failure(capsys, tmp_path, _predict(TINY_Q8, *extra), None, code=2)


def test_prompt_too_long_is_not_echoed(capsys, tmp_path):
    expect_failure(capsys, tmp_path, _predict(TINY_Q8, "-c", "2"), None, code=2)  # checks stderr; now stdout:
    main(_predict(TINY_Q8, "-c", "2"))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("extra", "words"), [(["--adam-iter", "1.5"], "Invalid value for '--adam-iter'"), (["--bogus"], "No such option")]
)
def test_finetune_click_usage_error_is_one_line(capsys, tmp_path, extra, words):
    argv = ["finetune", "--model-base", str(TINY_Q8), *extra]
    assert words in expect_failure(capsys, tmp_path, argv, None, code=2)
