"""`lorakit finetune` accepts every option of llama.cpp's finetune, with llama.cpp's default (README: "Every option of
llama.cpp's finetune is accepted with the same default (`lorakit finetune --help`), including the underscore
spellings (`--adam_iter`)").

The option list below is a transcription of the specification's §1 tables (docs/llamacpp-finetune.md), kept here
as data so that a change to either side shows up as a failing test.
lorakit's side is the click command typer builds from `lorakit.finetune_cli.finetune`, its `--help` text, and real
runs through `lorakit.cli.main` on the tiny fixture model.
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import pytest
import typer

import lorakit.cli
from lorakit.cli import main, normalize_argv
from tests.test_bad_input import TINY_Q8, TRAIN
from tests.test_finetune_options import _base, _ok


class Flag(NamedTuple):
    """A boolean option: is the first spelling's effect on by default? Further spellings switch it off."""

    on: bool


ON, OFF = Flag(True), Flag(False)


class FromModel(NamedTuple):
    """No option given: the base model's value. `spec` is the spec table's number, which llama.cpp uses only where
    the GGUF has no such key (§3.1); the option overrides the model only when given (finetune.cpp sets
    `custom_f_norm_rms_eps` etc. only while parsing the option; the spec's checklist §14: "RMSNorm eps from the
    model"). lorakit spells this as a parameter default of None."""

    spec: float


LORA_R = "same as --lora-r"  # spec §1.1: "= --lora-r if not given" / "lora_r"; lorakit's parameter default is None
HELP = "usage"  # -h/--help: no default, prints the usage

N, F, S = int, float, str  # the spec's N (std::stoi), F (std::stof), FNAME / STR

# Copied from the specification "llama.cpp `finetune` (LoRA) and llama.cpp LoRA adapter formats"
# (shared/spec/llamacpp-finetune.md), §1 "Command line (last version, `4b0eff3df`)": the table of §1.1 "Options
# defined by `finetune.cpp`" and the table of §1.2 "Options from `common/train.cpp`", in their order.
# (spellings, value kind or "flag", llama.cpp's default as lorakit should see it)
# Value options: every spelling is a synonym. Flags: the first spelling switches the effect on, the others off.
SPEC_OPTIONS: list[tuple[tuple[str, ...], type | str, object]] = [
    # ---- §1.1
    (("--model-base",), S, ""),
    (("--lora-out",), S, "ggml-lora-ITERATION-f32.gguf"),
    (("--only-write-lora",), "flag", OFF),
    (("--norm-rms-eps",), F, FromModel(1e-5)),
    (("--rope-freq-base",), F, FromModel(10000.0)),
    (("--rope-freq-scale",), F, FromModel(1.0)),
    (("--lora-alpha",), N, LORA_R),
    (("--lora-r",), N, 4),
    (("--rank-att-norm",), N, 1),
    (("--rank-ffn-norm",), N, 1),
    (("--rank-out-norm",), N, 1),
    (("--rank-tok-embd",), N, LORA_R),
    (("--rank-out",), N, LORA_R),
    (("--rank-wq",), N, LORA_R),
    (("--rank-wk",), N, LORA_R),
    (("--rank-wv",), N, LORA_R),
    (("--rank-wo",), N, LORA_R),
    # 2024 spellings. llama.cpp turns '_' into '-' before comparing, so these can never match there (spec §1.4:
    # "unknown argument: --rank-ffn-gate", exit 1). lorakit deliberately accepts them (README, "Differences, all
    # deliberate": `--rank-ffn-gate/-down/-up` and `--rank-w1/w2/w3` work), so the test expects them to work.
    (("--rank-ffn_gate",), N, LORA_R),
    (("--rank-ffn_down",), N, LORA_R),
    (("--rank-ffn_up",), N, LORA_R),
    # 2023 spellings: w1 = gate, w2 = down, w3 = up
    (("--rank-w1",), N, LORA_R),
    (("--rank-w2",), N, LORA_R),
    (("--rank-w3",), N, LORA_R),
    # ---- §1.2
    (("--train-data",), S, "shakespeare.txt"),
    (("--checkpoint-in",), S, "checkpoint.gguf"),
    (("--checkpoint-out",), S, "checkpoint-ITERATION.gguf"),
    (("--pattern-fn-it",), S, "ITERATION"),
    (("--fn-latest",), S, "LATEST"),
    (("--save-every",), N, 10),
    (("-s", "--seed"), N, -1),
    (("-c", "--ctx"), N, 128),
    (("-t", "--threads"), N, 6),
    (("-b", "--batch"), N, 8),
    (("--grad-acc",), N, 1),
    (("--sample-start",), S, ""),
    (("--include-sample-start",), "flag", OFF),
    (("--escape",), "flag", OFF),
    (("--overlapping-samples",), "flag", OFF),
    (("--fill-with-next-samples",), "flag", OFF),
    (("--separate-with-eos", "--no-separate-with-eos"), "flag", OFF),
    (("--separate-with-bos", "--no-separate-with-bos"), "flag", ON),
    (("--sample-random-offsets",), "flag", OFF),
    (("--force-reshuffle",), "flag", OFF),
    # late 2023: on, 2024 (the last version, which §1 describes): off. Same math either way (§1.5); lorakit accepts
    # and ignores both spellings (hidden in --help).
    (("--use-flash", "--no-flash"), "flag", OFF),
    (("--use-checkpointing", "--no-checkpointing"), "flag", ON),
    (("--warmup",), N, 100),
    (("--cos-decay-steps",), N, 1000),
    (("--cos-decay-restart",), F, 1.1),
    (("--cos-decay-min",), F, 0.1),
    (("--enable-restart", "--disable-restart"), "flag", OFF),
    (("--opt-past",), N, 0),
    (("--opt-delta",), F, 1e-5),
    (("--opt-max-no-improvement",), N, 0),
    (("--epochs",), N, -1),
    (("--adam-iter",), N, 256),
    (("--adam-alpha",), F, 1e-3),
    (("--adam-min-alpha",), F, 0.0),
    (("--adam-decay",), F, 0.1),
    (("--adam-decay-min-ndim",), N, 2),
    (("--adam-beta1",), F, 0.9),
    (("--adam-beta2",), F, 0.999),
    (("--adam-gclip",), F, 1.0),
    (("--adam-epsf",), F, 0.0),
    (("-ngl", "--n-gpu-layers"), N, 0),  # lorakit: accepted and ignored (--backend picks the device), hidden
    (("-h", "--help"), HELP, None),
]

# spec §1.1: w1 = gate, w2 = down, w3 = up; lorakit: one option each
SAME_OPTION = [("--rank-w1", "--rank-ffn_gate"), ("--rank-w2", "--rank-ffn_down"), ("--rank-w3", "--rank-ffn_up")]

# accepted for compatibility but left out of `lorakit finetune --help` (hidden=True): flash attention (lorakit picks
# its own attention) and GPU layers (lorakit's --backend decides)
HIDDEN = {"--use-flash", "--no-flash", "-ngl", "--n-gpu-layers"}

ALL_SPELLINGS = [o for spellings, _, _ in SPEC_OPTIONS for o in spellings]
VALUE_ROWS = [row for row in SPEC_OPTIONS if row[1] not in ("flag", HELP)]
FLAG_ROWS = [row for row in SPEC_OPTIONS if row[1] == "flag"]


def _llama_name(opt: str) -> str:
    """What llama.cpp compares: '_' -> '-' in an argument that starts with '--' (spec §1)."""
    return opt.replace("_", "-") if opt.startswith("--") else opt


def _underscored(opt: str) -> str:
    """The underscore spelling of a long option (`--adam-iter` -> `--adam_iter`); short options have none."""
    return "--" + opt[2:].replace("-", "_") if opt.startswith("--") else opt


def _command():
    return typer.main.get_command(lorakit.cli.app).commands["finetune"]


def _params() -> dict:
    """Every option string of `lorakit finetune` -> its click parameter."""
    return {o: p for p in _command().params for o in p.opts + p.secondary_opts}


def _parse(argv: list[str]) -> dict:
    """Parse `lorakit finetune ARGV` as main does (llama.cpp spellings first), without running it."""
    args = normalize_argv(["finetune", *argv])
    assert args[0] == "finetune"
    return _command().make_context("finetune", args[1:]).params


def _ids(rows) -> list[str]:
    return ["/".join(row[0]) for row in rows]


# --------------------------------------------------------------------------- (a) every option is accepted


def test_table_covers_both_spec_sections():
    assert len(ALL_SPELLINGS) == len(set(ALL_SPELLINGS)) == 76
    assert len(SPEC_OPTIONS) == 65  # rows: 23 in §1.1 (the ranks one by one), 42 in §1.2


@pytest.mark.parametrize("opt", [o for o in ALL_SPELLINGS if o not in ("-h", "--help")])
def test_every_llamacpp_option_is_an_option_of_lorakit_finetune(opt):
    params = _params()
    assert _llama_name(opt) in params, f"{opt} (spec §1.1/§1.2) is not an option of `lorakit finetune`"


@pytest.mark.parametrize("a, b", SAME_OPTION)
def test_rank_w123_are_the_ffn_gate_down_up_ranks(a, b):
    params = _params()
    assert params[_llama_name(a)] is params[_llama_name(b)]


@pytest.mark.parametrize("spellings", [row[0] for row in VALUE_ROWS], ids=_ids(VALUE_ROWS))
def test_value_options_take_a_value_of_the_spec_kind_under_every_spelling(spellings):
    """Each spelling, short, long and long with underscores, sets the same parameter; N takes an int, F a float,
    STR/FNAME a string (kept as given: llama.cpp turns '_' into '-' in option names only)."""
    row = next(r for r in VALUE_ROWS if r[0] == spellings)
    kind = row[1]
    value = {N: "3", F: "0.25", S: "--a_b-ITERATION"}[kind]
    expected = {N: 3, F: 0.25, S: "--a_b-ITERATION"}[kind]
    name = _params()[_llama_name(spellings[0])].name
    for opt in {*spellings, *map(_underscored, spellings)}:
        got = _parse([opt, value])[name]
        assert got == expected and type(got) is kind, (opt, got)


@pytest.mark.parametrize("spellings", [row[0] for row in FLAG_ROWS], ids=_ids(FLAG_ROWS))
def test_flags_take_no_value_and_switch_under_every_spelling(spellings):
    params = _params()
    p = params[_llama_name(spellings[0])]
    assert p.is_flag
    on = spellings[0] in p.opts  # the value that switches the effect on (lorakit's --no-flash/--use-flash is no_flash)
    for i, opt in enumerate(spellings):
        assert params[_llama_name(opt)] is p, f"{opt} and {spellings[0]} should be one flag"
        for spelled in {opt, _underscored(opt)}:
            assert _parse([spelled])[p.name] == (on if i == 0 else not on), spelled


# --------------------------------------------------------------------------- (b) llama.cpp's defaults


@pytest.mark.parametrize("spellings, kind, default", VALUE_ROWS, ids=_ids(VALUE_ROWS))
def test_value_option_default_is_llamacpps(spellings, kind, default):
    p = _params()[_llama_name(spellings[0])]
    assert not p.is_flag
    if isinstance(default, FromModel) or default == LORA_R:
        # None: "the model's value" / "same as --lora-r", resolved in finetune(); what that gives is checked
        # end to end in test_unset_options_mean_lora_r_and_the_models_values
        assert p.default is None, f"{spellings[0]}: {p.default!r}, expected None ({default})"
    else:
        assert p.default == default and type(p.default) is type(default), (spellings[0], p.default)
    assert _parse([])[p.name] == p.default


@pytest.mark.parametrize("spellings, kind, default", FLAG_ROWS, ids=_ids(FLAG_ROWS))
def test_flag_default_is_llamacpps(spellings, kind, default):
    p = _params()[_llama_name(spellings[0])]
    on = p.default == (spellings[0] in p.opts)  # the value the first spelling sets is the default
    assert on == default.on, f"{spellings[0]} should be {'on' if default.on else 'off'} by default"


def _ggla_header(path: Path) -> tuple[int, int]:
    """(r, alpha) of a ggla adapter (spec §7: magic, version, r, alpha as u32)."""
    _, r, alpha = struct.unpack_from("<III", path.read_bytes(), 4)
    return r, alpha


def _checkpoint_kv(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.parts[f.data[0]][0] for k, f in r.fields.items() if f.data and len(f.data) == 1}


KINDS = ("token_embd", "output_norm", "output", "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
         "ffn_gate", "ffn_down", "ffn_up")  # fmt: skip


def test_unset_options_mean_lora_r_and_the_models_values(capsys, tmp_path):
    """The None defaults: per-tensor ranks and --lora-alpha follow --lora-r (norm ranks stay 1), and RMS epsilon,
    RoPE base and scale are the model's (its keys, or §3.1's fallbacks 10000 / 1 where it has none)."""
    model = tmp_path / "eps3e-5.gguf"
    shutil.copyfile(TINY_Q8, model)
    r = gguf.GGUFReader(model, "r+")  # a model whose epsilon is not the spec table's 1e-5
    eps = r.fields["llama.attention.layer_norm_rms_epsilon"]
    eps.parts[eps.data[0]][0] = 3e-5
    assert "llama.rope.freq_base" not in r.fields and "llama.rope.scale_linear" not in r.fields
    del r

    argv = _base("--model-base", str(model), "--lora-r", "3", "--rank-wk", "2",
                 "--checkpoint-out", str(tmp_path / "chk-ITERATION.gguf"),
                 "--lora-out", str(tmp_path / "l-ITERATION.bin"))  # fmt: skip
    _ok(capsys, argv)
    kv = _checkpoint_kv(tmp_path / "chk-1.gguf")
    ranks = {k: int(kv[f"training.lora.rank.{k}"]) for k in KINDS}
    assert ranks == {k: 1 if k.endswith("norm") else 2 if k == "attn_k" else 3 for k in KINDS}
    assert _ggla_header(tmp_path / "l-1.bin") == (3, 3)  # alpha = r
    assert kv["llama.attention.layer_norm_rms_epsilon"] == np.float32(3e-5)
    assert kv["llama.rope.freq_base"] == np.float32(10000.0)
    assert kv["llama.rope.scale_linear"] == np.float32(1.0)

    # given, they override the model (and alpha is the header's only)
    argv += ["--norm-rms-eps", "2e-5", "--rope-freq-base", "5000", "--rope-freq-scale", "0.5", "--lora-alpha", "6",
             "--checkpoint-out", str(tmp_path / "chk2-ITERATION.gguf"),
             "--lora-out", str(tmp_path / "l2-ITERATION.bin")]  # fmt: skip
    _ok(capsys, argv)
    kv = _checkpoint_kv(tmp_path / "chk2-1.gguf")
    assert kv["llama.attention.layer_norm_rms_epsilon"] == np.float32(2e-5)
    assert kv["llama.rope.freq_base"] == np.float32(5000.0)
    assert kv["llama.rope.scale_linear"] == np.float32(0.5)  # spec §6.2 key 13: the freq_scale in use, as it is
    assert _ggla_header(tmp_path / "l2-1.bin") == (3, 6)


# --------------------------------------------------------------------------- (c) underscore spellings, end to end


def test_underscore_spellings_run_end_to_end(capsys, tmp_path):
    argv = ["finetune", "--model_base", str(TINY_Q8), "--train_data", str(TRAIN), "--checkpoint_in", "",
            "--checkpoint_out", str(tmp_path / "chk-ITERATION.gguf"), "--lora_out", str(tmp_path / "l-ITERATION.bin"),
            "--adam_iter", "2", "--save_every", "1", "--lora_r", "5", "--rank_wq", "2", "--rank-ffn_gate", "3",
            "--rank_ffn_down", "4", "--no_separate_with_bos", "--n_gpu_layers", "0", "--use_flash", "-t", "1",
            "--ctx", "8", "--batch", "1", "--seed", "1", "--backend", "cpu-torch"]  # fmt: skip
    _ok(capsys, argv)
    # --save_every 1: a save after each of the --adam_iter 2 iterations (the default 10 would save only the last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chk-1.gguf", "chk-2.gguf", "chk-LATEST.gguf",
                                                         "l-1.bin", "l-2.bin", "l-LATEST.bin"]  # fmt: skip
    kv = _checkpoint_kv(tmp_path / "chk-2.gguf")
    ranks = {k: int(kv[f"training.lora.rank.{k}"]) for k in KINDS}
    assert ranks["attn_q"] == 2 and ranks["ffn_gate"] == 3 and ranks["ffn_down"] == 4 and ranks["attn_k"] == 5
    assert _ggla_header(tmp_path / "l-2.bin") == (5, 5)


def test_unknown_option_with_underscores_is_still_a_usage_error(capsys):
    # the normalisation must not make anything acceptable (README: unknown option, exit 2)
    assert main(["finetune", "--adam_iters", "1"]) == 2
    assert "--adam-iters" in capsys.readouterr().err


# --------------------------------------------------------------------------- (d) --help lists them


def _help(capsys, opt: str) -> str:
    assert main(["finetune", opt]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("Usage: lorakit finetune")
    return out


def test_help_lists_every_llamacpp_option_except_the_hidden_compatibility_ones(capsys):
    out = _help(capsys, "--help")
    assert _help(capsys, "-h") == out  # spec §1.2: -h, --help
    missing = [
        o
        for o in ALL_SPELLINGS
        if o not in HIDDEN and not re.search(rf"(?<![\w-]){re.escape(_llama_name(o))}(?![\w-])", out)
    ]
    assert not missing, f"not in `lorakit finetune --help`: {missing}"
    # exactly the documented compatibility options are hidden, and they do not show
    hidden = {o for p in _command().params if p.hidden for o in p.opts + p.secondary_opts}
    assert hidden == HIDDEN
    assert not [o for o in HIDDEN if re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", out)]


def test_help_shows_llamacpps_defaults(capsys):
    out = " ".join(_help(capsys, "--help").split())  # unwrap the help's columns
    for spellings, _kind, default in VALUE_ROWS:
        if _llama_name(spellings[-1]) in HIDDEN or not isinstance(default, int | float):
            continue  # hidden, or None in lorakit (FromModel / LORA_R: the help says "default: model" / "= r")
        opt = re.escape(_llama_name(spellings[-1]))
        # the option's own "[default: ...]", not a later option's: no " -" or "[" in between
        assert re.search(rf"{opt} <\w+>(?:(?!\s-)[^\[])*\[default: {re.escape(repr(default))}\]", out), spellings
