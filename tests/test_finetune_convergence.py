"""Finetuning the real stories260K on the sonnets lowers the loss clearly and moves predictions
toward the training text (the before/after of the README demo, as a test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.adapters import load_adapter
from lorakit.backends import get_backend
from lorakit.cli import main
from lorakit.gguf_io import GGUFFile
from lorakit.lora import model_fns
from lorakit.loss import cross_entropy
from lorakit.model import forward_hidden, load_model, rope_tables
from lorakit.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _convert(out: Path) -> Path:
    spec = importlib.util.spec_from_file_location("conv", ROOT / "examples" / "convert_llama2c.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    conv.convert(ROOT / "assets/stories260K.bin", ROOT / "assets/tok512.model", out, "q8_0")
    return out


def _text_loss(model, tok, adapters, text: str, ctx: int = 64) -> float:
    """Mean next-token loss over consecutive ctx-token windows of `text`."""
    ids = tok.encode(text)
    n = (len(ids) - 1) // ctx
    x = torch.tensor([[tok.bos_id] + ids[i * ctx : (i + 1) * ctx - 1] for i in range(n)])
    y = torch.tensor([ids[i * ctx : (i + 1) * ctx] for i in range(n)])
    be = get_backend("cpu-torch")
    lin, norm, emb = model_fns(model, be, adapters)
    with torch.no_grad():
        h = forward_hidden(model.args, x, lin, norm, emb, rope_tables(model.args, ctx))
        return float(cross_entropy(lin(h, "output.weight"), y))


@pytest.mark.slow
def test_stories260k_learns_the_sonnets(tmp_path, monkeypatch):
    base = _convert(tmp_path / "stories260K-q8_0.gguf")
    monkeypatch.chdir(tmp_path)
    rc = main(["finetune", "--model-base", str(base), "--train-data", str(ROOT / "assets/shakespeare.txt"),
               "--checkpoint-in", "", "--checkpoint-out", "", "--lora-out", "lora-ITERATION.bin",
               "--adam-iter", "120", "--batch", "8", "--ctx", "64", "--adam-alpha", "0.01", "--warmup", "10",
               "--seed", "1", "--save-every", "0", "--threads", "2", "--backend", "cpu-torch",
               "--log-jsonl", "log.jsonl"])  # fmt: skip
    assert rc == 0
    losses = [json.loads(x)["loss"] for x in (tmp_path / "log.jsonl").read_text().splitlines()][1:]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first - 1.0, (first, last)

    gf = GGUFFile(base)
    model, tok = load_model(base, gf), Tokenizer.from_gguf(gf)
    adapter = load_adapter(tmp_path / "lora-LATEST.bin")
    sonnet = (ROOT / "assets/shakespeare.txt").read_text()[20000:26000]
    story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " * 8
    before, after = _text_loss(model, tok, [], sonnet), _text_loss(model, tok, [(adapter, 1.0)], sonnet)
    assert after < before - 1.0, (before, after)  # the sonnets became much more likely
    # and the stories less so: the adapter moved the model toward the training text
    assert _text_loss(model, tok, [(adapter, 1.0)], story) > _text_loss(model, tok, [], story)
