"""`lorakit inspect` through the real CLI, on files llama.cpp wrote (tests/fixtures/llamacpp)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from lorakit.cli import main
from lorakit.inspect import inspect_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "llamacpp"
MODELS = FIX / "models"
RUNS = FIX / "runs"
TINY_Q8 = MODELS / "tiny-q8_0.gguf"
TINY_F32 = MODELS / "tiny-f32.gguf"
STORIES = MODELS / "stories260K-f32.gguf"
CHK_A4 = RUNS / "a_fresh_q8_0" / "chk-a-4.gguf"
LORA_A4 = RUNS / "a_fresh_q8_0" / "lora-a-4.bin"
CHK_C = sorted(glob.glob(str(RUNS / "c_ranks_f32_gradacc" / "chk-c-*.gguf")))
LORA_C3 = RUNS / "c_ranks_f32_gradacc" / "lora-c-3.bin"
ADAPTER = FIX / "adapter" / "adapter.gguf"
VOCAB = ROOT / "assets" / "ggml-vocab-llama-spm.gguf"


def run_json(capsys, path, *extra: str) -> dict:
    rc = main(["inspect", str(path), "--json", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    return json.loads(out)  # the whole of stdout is one JSON document


def run_text(capsys, path, *extra: str) -> str:
    rc = main(["inspect", str(path), *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    return out


def test_tiny_q8_0_model(capsys):
    j = run_json(capsys, TINY_Q8)
    assert j["kind"] == "model" and j["usable"] and j["problems"] == []
    assert j["file_size"] == TINY_Q8.stat().st_size
    assert j["file"]["version"] == 3 and j["file"]["file_type_name"] == "MOSTLY_Q8_0"
    m = j["model"]
    assert (m["n_vocab"], m["n_embd"], m["n_ff"], m["n_layer"]) == (400, 64, 192, 2)
    assert (m["n_head"], m["n_head_kv"], m["gqa"], m["head_dim"]) == (4, 4, False, 16)
    assert m["rms_eps"] == pytest.approx(1e-5) and m["rope_freq_base"] == 10000.0
    assert m["rope_freq_scale"] == 1.0 and m["context_length"] == 256 and m["tied_output"] is False
    t = j["tokenizer"]
    assert (t["model"], t["vocab_size"], t["add_bos"]) == ("llama", 400, True)
    assert (t["bos_id"], t["eos_id"], t["unk_id"]) == (1, 2, 0)
    assert (t["bos_token"], t["eos_token"], t["unk_token"]) == ("<s>", "</s>", "<unk>")
    types = j["tensor_types"]
    assert types["Q8_0"] == {"count": 16, "bytes": types["Q8_0"]["bytes"], "held_as": "kept quantized"}
    assert types["F32"]["count"] == 5 and types["F32"]["held_as"] == "as is"
    assert j["file"]["tensor_count"] == 21
    assert j["file"]["tensor_bytes"] == types["Q8_0"]["bytes"] + types["F32"]["bytes"]
    assert "tensors" not in j


def test_tiny_f32_model_with_tensors(capsys):
    j = run_json(capsys, TINY_F32, "--tensors")
    assert j["kind"] == "model" and j["tensor_types"] == {
        "F32": {"count": 21, "bytes": j["file"]["tensor_bytes"], "held_as": "as is"}
    }
    rows = {r["name"]: r for r in j["tensors"]}
    assert len(rows) == 21
    assert rows["token_embd.weight"] == {
        "name": "token_embd.weight", "type": "F32", "ne": [64, 400], "shape": [400, 64], "bytes": 400 * 64 * 4
    }  # fmt: skip
    assert rows["blk.0.ffn_down.weight"]["ne"] == [192, 64]
    assert rows["blk.0.ffn_down.weight"]["shape"] == [64, 192]
    assert rows["output_norm.weight"]["shape"] == [64]


def test_tiny_text_output(capsys):
    out = run_text(capsys, TINY_Q8)
    assert "GGUF model" in out and str(TINY_Q8) in out
    for word in ("Hyperparameters", "Tokenizer", "kept quantized", "n_head_kv", "Q8_0"):
        assert word in out
    out = run_text(capsys, TINY_Q8, "--tensors")
    assert "blk.1.ffn_up.weight" in out and "[64, 192]" in out and "[192, 64]" in out


def test_stories260k_gqa(capsys):
    j = run_json(capsys, STORIES)
    m = j["model"]
    assert (m["n_vocab"], m["n_ff"], m["n_layer"], m["n_head"], m["n_head_kv"]) == (512, 172, 5, 8, 4)
    assert m["gqa"] is True and m["head_dim"] == 8 and m["context_length"] == 512
    assert j["tokenizer"]["vocab_size"] == 512
    assert set(j["tensor_types"]) == {"F32"} and j["tensor_types"]["F32"]["count"] == 48
    assert "grouped-query attention" in run_text(capsys, STORIES)


def test_checkpoint_a4(capsys):
    j = run_json(capsys, CHK_A4)
    assert j["kind"] == "checkpoint" and j["usable"]
    tr, opt = j["training"], j["optimizer"]
    assert (tr["iteration"], tr["samples"], tr["tokens"], tr["epochs"]) == (4, 8, 128, 0)
    assert tr["shuffle_next_sample"] == 8 and tr["file_version"] == 1
    assert tr["shuffle_sample_count"] > 0 and isinstance(tr["shuffle_samples_hash"], int)
    assert "..." in tr["shuffle_rng_state"] and len(tr["shuffle_rng_state"]) < 100  # abbreviated
    assert opt["parameter_count"] == 14277 and opt["moment_order"] == "left_to_right"
    assert opt["type"] == "adam" and opt["iteration"] == 4 and opt["just_initialized"] is False
    assert opt["past_count"] == 0 and opt["no_improvement_count"] == 0
    assert 5.0 < opt["best_loss"] < 7.0 and 5.0 < opt["previous_loss"] < 7.0
    norms = {"output_norm", "attn_norm", "ffn_norm"}
    assert j["ranks"] == {k: (1 if k in norms else 4) for k in j["ranks"]} and len(j["ranks"]) == 12
    m = j["model"]
    assert (m["n_vocab"], m["n_embd"], m["n_layer"], m["context_length"]) == (400, 64, 2, 16)
    assert j["lora"]["pairs"] == 21
    assert any("--lora-out" in n for n in j["notes"])
    out = run_text(capsys, CHK_A4)
    assert "finetune checkpoint" in out and "left_to_right" in out and "14277" in out


@pytest.mark.parametrize("path", CHK_C, ids=lambda p: Path(p).name)
def test_checkpoint_c_per_tensor_ranks(capsys, path):
    j = run_json(capsys, path)
    r = j["ranks"]
    assert (r["attn_q"], r["attn_v"], r["token_embd"], r["output"], r["attn_norm"]) == (2, 5, 2, 6, 2)
    assert (r["attn_k"], r["ffn_gate"], r["output_norm"], r["ffn_norm"]) == (3, 3, 1, 1)


def test_ggla_adapter_c_alpha_and_ranks(capsys):
    j = run_json(capsys, LORA_C3, "--tensors")
    assert j["kind"] == "ggla_adapter" and j["file"]["format"] == "ggla"
    a = j["adapter"]
    assert (a["format"], a["alpha"], a["header_rank"], a["pairs"]) == ("ggla", 7, 3, 21)
    assert a["effective_scale"] == pytest.approx(7 / 3)
    assert len(a["target_kinds"]) == 12
    r = j["ranks"]
    assert (r["attn_q"], r["attn_v"], r["token_embd"], r["output"], r["attn_norm"]) == (2, 5, 2, 6, 2)
    rows = {t["name"]: t for t in j["tensors"]}
    assert len(rows) == 42
    assert rows["blk.0.attn_q.weight.loraA"]["ne"] == [2, 64] and rows["blk.0.attn_q.weight.loraA"]["shape"] == [64, 2]
    assert rows["output_norm.weight.loraB"]["ne"] == [1]  # 1-D norm B (ggml_n_dims)
    assert j["file"]["tensor_bytes"] == sum(t["bytes"] for t in j["tensors"])


def test_ggla_adapter_a4(capsys):
    j = run_json(capsys, LORA_A4)
    a = j["adapter"]
    assert (a["alpha"], a["header_rank"], a["pairs"], a["layers"], a["effective_scale"]) == (4, 4, 21, 2, 1.0)
    assert j["ranks"]["attn_q"] == 4 and j["ranks"]["ffn_norm"] == 1
    assert "ggla LoRA adapter" in run_text(capsys, LORA_A4)


def test_gguf_adapter(capsys):
    j = run_json(capsys, ADAPTER, "--tensors")
    assert j["kind"] == "gguf_adapter"
    a = j["adapter"]
    assert a["format"] == "gguf" and a["alpha"] == 4.0 and a["pairs"] == 16
    assert a["ignored_norm_pairs"] == 0 and a["effective_scale"] == 1.0
    assert "attn_norm" not in a["target_kinds"] and "token_embd" in a["target_kinds"]
    assert set(j["ranks"].values()) == {4}
    rows = {t["name"]: t for t in j["tensors"]}
    assert rows["blk.0.attn_q.weight.lora_a"]["shape"] == [4, 64]  # (r, in), GGUF convention
    assert rows["token_embd.weight.lora_a"]["shape"] == [400, 4]  # flipped for token_embd


def test_vocab_only(capsys):
    j = run_json(capsys, VOCAB)
    assert j["kind"] == "vocab" and j["file"]["tensor_count"] == 0 and not j["usable"]
    assert j["tokenizer"]["vocab_size"] == 32000 and j["tokenizer"]["model"] == "llama"
    assert j["model"]["n_embd"] == 4096 and "tied_output" not in j["model"]
    assert any("no tensors" in p for p in j["problems"])


def test_other_architecture_is_described(capsys, tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(path, "falcon")
    w.add_block_count(2)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    j = run_json(capsys, path)
    assert j["kind"] == "other_gguf" and not j["usable"]
    assert j["model"]["architecture"] == "falcon" and j["model"]["block_count"] == 2
    assert j["tensor_types"]["F32"]["count"] == 1
    assert "falcon" in j["problems"][0] and "not supported" in j["problems"][0]
    assert "not supported" in run_text(capsys, path)


def test_report_is_plain_and_json_ready():
    rep = inspect_file(CHK_A4, with_tensors=True)
    d = rep.to_json_dict()
    assert json.loads(json.dumps(d)) == d  # no numpy scalars, tuples become lists
    assert rep.kind_label == "finetune checkpoint" and rep.section("optimizer") is not None
    with pytest.raises(AttributeError):
        rep.kind = "model"  # frozen
