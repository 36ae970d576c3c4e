"""lorakit.lora_init against llama.cpp's initial LoRA for seed 42
(runs/f2_only_write_lora_init/lora-init-0.bin)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.lora import LoraRanks, lora_shapes
from lorakit.lora_init import init_lora
from lorakit.model import ModelArgs

INIT_BIN = Path(__file__).parent / "fixtures" / "llamacpp" / "runs" / "f2_only_write_lora_init" / "lora-init-0.bin"
TINY = ModelArgs(n_vocab=400, n_embd=64, n_ff=192, n_head=4, n_head_kv=4, n_layer=2)


def parse_ggla(path: Path) -> tuple[tuple[int, int, int, int], list[tuple[str, np.ndarray]]]:
    """Spec §7: 16-byte header, then records (n_dims, name_len, type, ne..., name, pad to 32, F32 data)."""
    data = path.read_bytes()
    header = struct.unpack_from("<4I", data, 0)
    recs, off = [], 16
    while off < len(data):
        n_dims, name_len, ftype = struct.unpack_from("<3i", data, off)
        assert ftype == 0 and n_dims in (1, 2)
        off += 12
        ne = struct.unpack_from(f"<{n_dims}i", data, off)
        off += 4 * n_dims
        name = data[off : off + name_len].decode()
        off = (off + name_len + 31) // 32 * 32
        count = int(np.prod(ne))
        arr = np.frombuffer(data, dtype=np.float32, count=count, offset=off).reshape(ne[::-1])
        off += 4 * count
        recs.append((name, arr))
    return header, recs


@pytest.fixture(scope="module")
def init42():
    return init_lora(lora_shapes(TINY, LoraRanks.default(4)), 42)


def test_init_matches_llamacpp_bitwise(init42):
    header, recs = parse_ggla(INIT_BIN)
    assert header == (0x67676C61, 1, 4, 4)
    names = [n for n, _ in recs]
    # records: A then B per tensor, in the same (llama.cpp) order as the shapes dict
    assert names == [f"{k}.lora{w}" for k in init42 for w in "AB"]
    n_a = 0
    for (name_a, ref_a), (_name_b, ref_b) in zip(recs[0::2], recs[1::2], strict=True):
        base = name_a[: -len(".loraA")]
        a, b = init42[base]
        assert a.dtype == torch.float32 and b.dtype == torch.float32
        assert tuple(a.shape) == ref_a.shape
        assert np.array_equal(a.numpy().view(np.uint32), ref_a.view(np.uint32)), base
        assert b.numel() == ref_b.size and not b.any() and not ref_b.any()
        n_a += ref_a.size
    assert n_a == 5440


def test_init_matches_ggla_reader(init42):
    try:
        from lorakit.adapters import read_ggla
    except ImportError:
        try:
            from lorakit.ggla import read_ggla
        except ImportError:
            pytest.skip("no ggla reader in lorakit")
    ad = read_ggla(INIT_BIN)
    assert list(ad.pairs) == list(init42)
    for name, (a, b) in init42.items():
        p = ad.pairs[name]
        assert torch.equal(p.a.view(torch.int32), a.view(torch.int32)), name
        assert torch.equal(p.b.reshape(b.shape), b)


def test_init_scale_and_clamp(init42):
    a, _ = init42["blk.0.ffn_down.weight"]  # ggml ne [4, 192]
    s = np.float32(1.0) / np.sqrt(np.float32(196.0))
    assert float(a.abs().max()) <= float(s)
    a, _ = init42["output_norm.weight"]  # ggml ne [1, 64]: still 2-D, scale 1/sqrtf(65)
    assert float(a.abs().max()) <= float(np.float32(1.0) / np.sqrt(np.float32(65.0)))


def test_init_stream_is_shared_in_order():
    shapes = lora_shapes(TINY, LoraRanks.default(4))
    full = init_lora(shapes, 42)
    # the stream is shared: the second tensor of a dict starting at output_norm differs from the full run's
    names = list(shapes)
    partial = init_lora({k: shapes[k] for k in names[1:]}, 42)
    assert not torch.equal(partial[names[1]][0], full[names[1]][0])
    assert torch.equal(init_lora(shapes, 42)[names[-1]][0], full[names[-1]][0])
