#!/usr/bin/env python3
"""Write a llama GGUF with random q8_0 weights and a real SPM vocabulary, for benchmarks.

    python bench/make_model.py out/open_llama_3b-q8_0.gguf            # open_llama_3b shapes
    python bench/make_model.py out/small.gguf --layers 2               # same widths, fewer layers

Shapes default to open_llama_3b (V 32000, E 3200, F 8640, 26 layers, 32 heads), the model of the
seed's README. The vocabulary comes from assets/ggml-vocab-llama-spm.gguf (LLaMA's 32000 pieces).
Weights: int8 values uniform in [-127, 127] with fp16 block scales chosen so each row has std
~1/sqrt(n_in) (random but numerically tame); norms are 1. Written atomically (temp + rename).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorakit.gguf_io import GGUFFile, write_gguf_atomic  # noqa: E402

VOCAB = ROOT / "assets" / "ggml-vocab-llama-spm.gguf"


def q8_rows(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """uint8 [rows, cols/32*34]: GGUF q8_0 blocks (fp16 d, 32 int8)."""
    nb = cols // 32
    blocks = np.empty((rows, nb, 34), dtype=np.uint8)
    qs = rng.integers(-127, 128, size=(rows, nb, 32), dtype=np.int8)
    d = np.full((rows, nb, 1), std / 73.3, dtype=np.float16)  # uniform int8 has std ~73.3
    blocks[:, :, :2] = d.view(np.uint8)
    blocks[:, :, 2:] = qs.view(np.uint8)
    return blocks.reshape(rows, nb * 34)


def make(out: Path, vocab: int, embd: int, ff: int, layers: int, heads: int, kv_heads: int, seed: int) -> None:
    import gguf

    rng = np.random.default_rng(seed)
    voc = GGUFFile(VOCAB)
    tokens = voc.get("tokenizer.ggml.tokens")[:vocab]
    scores = voc.get("tokenizer.ggml.scores")[:vocab]
    types = voc.get("tokenizer.ggml.token_type")[:vocab]
    kv_dim = embd // heads * kv_heads
    Q8 = gguf.GGMLQuantizationType.Q8_0

    def fill(w) -> None:
        w.add_string("general.architecture", "llama")
        w.add_string("general.name", f"random-llama-{layers}L-{embd}E")
        w.add_uint32("general.file_type", 7)
        w.add_uint32("llama.context_length", 2048)
        w.add_uint32("llama.embedding_length", embd)
        w.add_uint32("llama.block_count", layers)
        w.add_uint32("llama.feed_forward_length", ff)
        w.add_uint32("llama.rope.dimension_count", embd // heads)
        w.add_uint32("llama.attention.head_count", heads)
        w.add_uint32("llama.attention.head_count_kv", kv_heads)
        w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
        w.add_string("tokenizer.ggml.model", "llama")
        w.add_array("tokenizer.ggml.tokens", list(tokens))
        w.add_array("tokenizer.ggml.scores", [float(s) for s in scores])
        w.add_array("tokenizer.ggml.token_type", [int(t) for t in types])
        w.add_uint32("tokenizer.ggml.bos_token_id", 1)
        w.add_uint32("tokenizer.ggml.eos_token_id", 2)
        w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
        w.add_tensor("token_embd.weight", q8_rows(rng, vocab, embd, 1.0), raw_dtype=Q8)
        w.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
        w.add_tensor("output.weight", q8_rows(rng, vocab, embd, embd**-0.5), raw_dtype=Q8)
        for i in range(layers):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", np.ones(embd, dtype=np.float32))
            w.add_tensor(p + "attn_q.weight", q8_rows(rng, embd, embd, embd**-0.5), raw_dtype=Q8)
            w.add_tensor(p + "attn_k.weight", q8_rows(rng, kv_dim, embd, embd**-0.5), raw_dtype=Q8)
            w.add_tensor(p + "attn_v.weight", q8_rows(rng, kv_dim, embd, embd**-0.5), raw_dtype=Q8)
            w.add_tensor(p + "attn_output.weight", q8_rows(rng, embd, embd, embd**-0.5), raw_dtype=Q8)
            w.add_tensor(p + "ffn_norm.weight", np.ones(embd, dtype=np.float32))
            w.add_tensor(p + "ffn_gate.weight", q8_rows(rng, ff, embd, embd**-0.5), raw_dtype=Q8)
            w.add_tensor(p + "ffn_down.weight", q8_rows(rng, embd, ff, ff**-0.5), raw_dtype=Q8)
            w.add_tensor(p + "ffn_up.weight", q8_rows(rng, ff, embd, embd**-0.5), raw_dtype=Q8)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf_atomic(out, fill)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--embd", type=int, default=3200)
    ap.add_argument("--ff", type=int, default=8640)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    make(a.out, a.vocab, a.embd, a.ff, a.layers, a.heads, a.kv_heads or a.heads, a.seed)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
