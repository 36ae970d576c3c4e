"""The SPM tokenizer against llama.cpp's own outputs (its tokenizer test vocab and the finetune fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from lorakit.errors import LorakitError
from lorakit.gguf_io import GGUFFile
from lorakit.tokenizer import StreamDecoder, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
FIX = ROOT / "tests" / "fixtures" / "llamacpp"
SEP = "\n__ggml_vocab_test__\n"


def _llamacpp_cases() -> list[tuple[str, list[int]]]:
    # every case, the last included, is followed by the separator, so the split ends with ""
    inputs = (ASSETS / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split(SEP)
    assert inputs[-1] == ""
    outputs = (ASSETS / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8").split("\n")
    assert outputs[-1] == ""
    inputs, outputs = inputs[:-1], outputs[:-1]
    assert len(inputs) == len(outputs) == 46
    return [(i, [int(x) for x in o.split()]) for i, o in zip(inputs, outputs, strict=True)]


CASES = _llamacpp_cases()


@pytest.fixture(scope="module")
def llama_tok() -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(ASSETS / "ggml-vocab-llama-spm.gguf"))


@pytest.fixture(scope="module")
def stories_tok() -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(FIX / "models" / "stories260K-f32.gguf"))


@pytest.mark.parametrize("text,expected", CASES, ids=[f"case{i:02d}" for i in range(len(CASES))])
def test_llamacpp_vocab_cases(llama_tok: Tokenizer, text: str, expected: list[int]):
    assert llama_tok.encode(text) == expected


def test_llama_vocab_properties(llama_tok: Tokenizer):
    assert (llama_tok.n_vocab, llama_tok.bos_id, llama_tok.eos_id, llama_tok.unk_id) == (32000, 1, 2, 0)
    assert llama_tok.add_bos is True
    assert len(llama_tok.pieces()) == 32000
    assert llama_tok.max_token_bytes() == max(len(p.encode()) for p in llama_tok.pieces())
    assert llama_tok.token_bytes(1) == b""  # <s> is a control token
    assert llama_tok.token_bytes(3 + 0xAB) == b"\xab"  # <0xAB>
    assert llama_tok.token_bytes(llama_tok.encode("hi")[0]) == b" hi"


def test_train_txt_matches_llamacpp():
    tok = Tokenizer.from_gguf(GGUFFile(FIX / "models" / "tiny-q8_0.gguf"))
    expected = json.loads((FIX / "data" / "train.tokens.json").read_text())
    assert isinstance(expected, list) and len(expected) == 2566
    data = (FIX / "data" / "train.txt").read_bytes()
    assert tok.encode(data) == expected
    assert tok.encode(data.decode("utf-8")) == expected


def test_stories260k(stories_tok: Tokenizer):
    assert stories_tok.encode("Once upon a time") == [403, 407, 261, 378]
    assert stories_tok.encode("Once upon a time", add_bos=True) == [1, 403, 407, 261, 378]
    ids = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408]
    ids += [419, 292, 411, 322, 265, 282]
    assert stories_tok.decode(ids) == ", there was a little girl named Lily. She loved to play outside in the p"
    assert stories_tok.decode(stories_tok.encode("Once upon a time", add_bos=True)) == "Once upon a time"


@pytest.mark.parametrize(
    "text", ["Once upon a time", "Lily and  Tom\n\tplayed 1234 times!", "héllo 日本 🦙", " lead", ""]
)
def test_sentencepiece_file_matches_gguf(stories_tok: Tokenizer, text: str):
    tok = Tokenizer.from_sentencepiece_file(ASSETS / "tok512.model")
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.unk_id) == (512, 1, 2, 0)
    assert tok.encode(text) == stories_tok.encode(text)
    assert tok.pieces() == stories_tok.pieces()


def _write_vocab_gguf(path: Path, model: str, tokens=("<unk>", "<s>", "</s>", "a"), scores=None, types=None):
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model(model)
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores if scores is not None else [0.0] * len(tokens)))
    w.add_token_types(list(types if types is not None else [2, 3, 3] + [1] * (len(tokens) - 3)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def test_gpt2_vocab_is_rejected(tmp_path: Path):
    gf = _write_vocab_gguf(tmp_path / "bpe.gguf", "gpt2")
    with pytest.raises(LorakitError, match="not supported") as e:
        Tokenizer.from_gguf(gf)
    assert e.value.path == str(gf.path) and "\n" not in str(e.value)


def test_bad_vocabularies_are_rejected(tmp_path: Path):
    with pytest.raises(LorakitError, match="'bert' is not supported"):
        Tokenizer.from_gguf(_write_vocab_gguf(tmp_path / "a.gguf", "bert"))
    with pytest.raises(LorakitError, match="scores has 3 entries"):
        Tokenizer.from_gguf(_write_vocab_gguf(tmp_path / "b.gguf", "llama", scores=[0.0] * 3))
    w = gguf.GGUFWriter(tmp_path / "c.gguf", arch="llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LorakitError, match="tokenizer.ggml.model is missing"):
        Tokenizer.from_gguf(GGUFFile(tmp_path / "c.gguf"))


def test_duplicate_and_empty_pieces_keep_their_ids(tmp_path: Path):
    tokens = ["<unk>", "<s>", "</s>", "\u2581a", "b", "\u2581ab", "b", ""]
    gf = _write_vocab_gguf(tmp_path / "d.gguf", "llama", tokens=tokens, scores=[0, 0, 0, -1, -2, -3, -4, -5])
    tok = Tokenizer.from_gguf(gf)
    assert tok.n_vocab == 8 and tok.pieces() == tokens
    assert tok.encode("ab b") == [5, 0, 4]  # no "▁" piece and no byte fallback: <unk>
    assert tok.token_bytes(6) == b"b"


def test_stream_decoder_round_trips_multibyte(llama_tok: Tokenizer):
    text = "héllo → wörld 日本 🦙✨ naïve"
    ids = llama_tok.encode(text)
    assert any(llama_tok.pieces()[i].startswith("<0x") for i in ids)  # byte fallback is exercised
    dec = StreamDecoder(llama_tok, strip_space=True)
    parts = [dec.push(i) for i in ids]
    assert "" in parts  # incomplete UTF-8 was held back
    assert "".join(parts) + dec.flush() == text
    assert llama_tok.decode(ids) == text


def test_invalid_utf8_bytes_become_byte_tokens(llama_tok: Tokenizer):
    # llama.cpp cuts b"\xff" as a 4-byte "character" (b"\xffabc"), which is not in the vocab -> 4 byte
    # tokens; b"\xc3(" likewise; the valid stretches between are tokenized alone (no dummy prefix)
    ids = llama_tok.encode(b"\xffabc d\xc3(x")
    pieces = [llama_tok.pieces()[i] for i in ids]
    assert pieces == ["\u2581", "<0xFF>", "<0x61>", "<0x62>", "<0x63>", "\u2581d", "<0xC3>", "<0x28>", "x"]
    assert llama_tok.decode(ids) == "\ufffdabc d\ufffd(x"
