"""Weights of every supported storage type: F32, F16, BF16, Q8_0 (kept quantized) and other ggml
quant types (dequantized to f32 at load, which `inspect` reports)."""

from __future__ import annotations

import gguf
import pytest
import torch

from lorakit.backends import get_backend
from lorakit.gguf_io import GGUFFile, write_gguf_atomic
from lorakit.inspect import inspect_file
from lorakit.lora import model_fns
from lorakit.model import forward_hidden, load_model, rope_tables
from lorakit.quant import Q8Weight
from tests.finetune_util import FIX

TINY = FIX / "models/tiny-f32.gguf"


def _rewrite(dst, qtype: gguf.GGMLQuantizationType):
    """tiny-f32.gguf with every 2-D weight stored as `qtype` (metadata copied)."""
    src = GGUFFile(TINY)

    def fill(w):
        for key, value in src.fields.items():
            vtype = gguf.GGUFValueType(src.field_types[key])
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_array(key, list(value))
            else:
                w.add_key_value(key, value, vtype)
        for info in src.infos():
            arr = src.float_array(info.name)
            if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
                w.add_tensor(info.name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(info.name, arr)

    write_gguf_atomic(dst, fill)
    return dst


def _last_logits(path) -> torch.Tensor:
    model = load_model(path)
    lin, norm, emb = model_fns(model, get_backend("cpu-torch"), [])
    x = torch.tensor([[1, 300, 301, 302, 303]])
    with torch.no_grad():
        h = forward_hidden(model.args, x, lin, norm, emb, rope_tables(model.args, 8))
        return lin(h, "output.weight")[0, -1]


@pytest.mark.parametrize(
    "qtype,held,max_err",
    [
        # max |logit error| bounds from each type's rounding step (relative): f16 2^-11, bf16 2^-8,
        # q8_0 ~1/254 of a block's max, q5_0 ~1/32, q4_0 ~1/16; logits are O(1) sums of 64 products
        ("F16", "as is", 0.01),
        ("BF16", "as is", 0.05),
        ("Q8_0", "kept quantized", 0.05),
        ("Q5_0", "dequantized to f32 at load", 0.6),
        ("Q4_0", "dequantized to f32 at load", 1.2),
    ],
)
def test_storage_types_load_and_run(tmp_path, qtype, held, max_err):
    t = gguf.GGMLQuantizationType[qtype]
    path = _rewrite(tmp_path / f"tiny-{qtype}.gguf", t)
    model = load_model(path)
    w = model.tensors["blk.0.attn_q.weight"]
    if qtype == "Q8_0":
        assert isinstance(w, Q8Weight)
    else:
        assert isinstance(w, torch.Tensor) and w.shape == (64, 64)
    err = float((_last_logits(path) - _last_logits(TINY)).abs().max())
    assert 0 < err < max_err, err
    report = inspect_file(path).to_json_dict()
    assert held in str(report), report
