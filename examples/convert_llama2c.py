#!/usr/bin/env python3
"""Convert a llama2.c checkpoint (legacy "version 0" .bin) + SentencePiece model to a GGUF model.

    python examples/convert_llama2c.py assets/stories260K.bin assets/tok512.model out.gguf [--type f32|q8_0]

The weights map to GGUF names as llama.cpp's converter does; llama2.c already rotates adjacent
pairs (ggml RoPE mode 0), so attn_q/attn_k need no permutation. With --type q8_0 every 2-D weight
whose rows are a multiple of 32 is quantized with ggml's reference q8_0 quantizer; the others and
the norms stay f32 (as llama.cpp's quantize does). A tied classifier (positive vocab_size in the
header) is written without output.weight. The file is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from lorakit.gguf_io import write_gguf_atomic
from lorakit.quant import q8_0_to_bytes, quantize_q8_0


# sentencepiece piece types -> GGUF token types (1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte)
def _token_type(sp: spm.SentencePieceProcessor, i: int) -> int:
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_unused(i):
        return 5
    if sp.is_byte(i):
        return 6
    return 1


def read_llama2c(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    raw = path.read_bytes()
    if len(raw) < 28:
        raise SystemExit(f"{path}: too short for a llama2.c checkpoint")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hp = dict(
        dim=dim,
        hidden=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab=vocab,
        seq_len=seq_len,
        shared=shared,
    )
    head = dim // n_heads
    kv_dim = n_kv_heads * head
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > data.size:
            raise SystemExit(f"{path}: truncated llama2.c checkpoint")
        arr = data[pos : pos + n].reshape(shape)
        pos += n
        return arr

    w = {}
    w["token_embd.weight"] = take(vocab, dim)
    att_norm = take(n_layers, dim)
    wq, wk = take(n_layers, dim, dim), take(n_layers, kv_dim, dim)
    wv, wo = take(n_layers, kv_dim, dim), take(n_layers, dim, dim)
    ffn_norm = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    w["output_norm.weight"] = take(dim)
    take(seq_len, head // 2)  # freq_cis_real (unused)
    take(seq_len, head // 2)  # freq_cis_imag (unused)
    if not shared:
        w["output.weight"] = take(vocab, dim)
    for i in range(n_layers):
        w[f"blk.{i}.attn_norm.weight"] = att_norm[i]
        w[f"blk.{i}.attn_q.weight"] = wq[i]
        w[f"blk.{i}.attn_k.weight"] = wk[i]
        w[f"blk.{i}.attn_v.weight"] = wv[i]
        w[f"blk.{i}.attn_output.weight"] = wo[i]
        w[f"blk.{i}.ffn_norm.weight"] = ffn_norm[i]
        w[f"blk.{i}.ffn_gate.weight"] = w1[i]
        w[f"blk.{i}.ffn_down.weight"] = w2[i]
        w[f"blk.{i}.ffn_up.weight"] = w3[i]
    return hp, w


def convert(bin_path: Path, sp_path: Path, out: Path, qtype: str = "f32", name: str | None = None) -> None:
    import gguf

    hp, weights = read_llama2c(bin_path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    if sp.get_piece_size() != hp["vocab"]:
        raise SystemExit(f"{sp_path}: vocabulary has {sp.get_piece_size()} pieces, the model {hp['vocab']}")

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_string("general.architecture", "llama")
        w.add_string("general.name", name or bin_path.stem)
        w.add_uint32("general.file_type", 7 if qtype == "q8_0" else 0)
        w.add_uint32("llama.context_length", hp["seq_len"])
        w.add_uint32("llama.embedding_length", hp["dim"])
        w.add_uint32("llama.block_count", hp["n_layers"])
        w.add_uint32("llama.feed_forward_length", hp["hidden"])
        w.add_uint32("llama.rope.dimension_count", hp["dim"] // hp["n_heads"])
        w.add_uint32("llama.attention.head_count", hp["n_heads"])
        w.add_uint32("llama.attention.head_count_kv", hp["n_kv_heads"])
        w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        w.add_string("tokenizer.ggml.model", "llama")
        n = sp.get_piece_size()
        w.add_array("tokenizer.ggml.tokens", [sp.id_to_piece(i) for i in range(n)])
        w.add_array("tokenizer.ggml.scores", [float(sp.get_score(i)) for i in range(n)])
        w.add_array("tokenizer.ggml.token_type", [_token_type(sp, i) for i in range(n)])
        w.add_uint32("tokenizer.ggml.bos_token_id", sp.bos_id())
        w.add_uint32("tokenizer.ggml.eos_token_id", sp.eos_id())
        w.add_uint32("tokenizer.ggml.unknown_token_id", sp.unk_id())
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_bool("tokenizer.ggml.add_eos_token", False)
        for tname, arr in weights.items():
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if qtype == "q8_0" and arr.ndim == 2 and arr.shape[1] % 32 == 0:
                q = q8_0_to_bytes(quantize_q8_0(torch.from_numpy(arr.copy())))
                w.add_tensor(tname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(tname, arr)

    write_gguf_atomic(out, fill)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="llama2.c .bin checkpoint")
    ap.add_argument("tokenizer", type=Path, help="SentencePiece .model")
    ap.add_argument("out", type=Path, help="output GGUF path")
    ap.add_argument("--type", choices=("f32", "q8_0"), default="f32")
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    for p in (a.checkpoint, a.tokenizer):
        if not p.is_file():
            print(f"{p}: file not found", file=sys.stderr)
            return 1
    convert(a.checkpoint, a.tokenizer, a.out, a.type, a.name)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
