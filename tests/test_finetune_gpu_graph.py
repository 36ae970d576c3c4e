"""finetune's CUDA-graph step (lorakit/train_graph.py: each micro-step captured once, then replayed) against
`--no-cuda-graph` (the same step launched op by op) on the GPU: the same kernels on the same inputs in the same
order, so the losses, the adapter and the checkpoint must be byte-identical — with and without activation
checkpointing, with several micro-batches per iteration (--grad-acc), in f32 and bf16. A replay that read a stale
static input (the batch, the learning rate, the step count) or missed a captured write would change them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from tests.test_bad_input import TINY_Q8, TRAIN

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the graph is a CUDA graph)"),
]


def _run(tmp: Path, capsys, graph: bool, extra: list[str]) -> tuple[list[float], bytes, bytes]:
    out = tmp / ("graph" if graph else "eager")
    out.mkdir()
    argv = ["finetune", "--model-base", str(TINY_Q8), "--train-data", str(TRAIN), "--checkpoint-in", "",
            "--checkpoint-out", str(out / "chk-ITERATION.gguf"), "--lora-out", str(out / "lora-ITERATION.bin"),
            "--log-jsonl", str(out / "log.jsonl"), "--adam-iter", "6", "--ctx", "16", "-b", "4", "--seed", "3",
            "--save-every", "0", "--backend", "cuda-triton", "--cuda-graph" if graph else "--no-cuda-graph",
            *extra]  # fmt: skip
    rc = main(argv)
    _, err = capsys.readouterr()
    assert rc == 0, err
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    return losses, (out / "lora-LATEST.bin").read_bytes(), (out / "chk-LATEST.gguf").read_bytes()


@pytest.mark.parametrize(
    "extra",
    [[], ["--no-checkpointing"], ["--grad-acc", "3"], ["--compute-dtype", "bf16"]],
    ids=["ckpt", "no-ckpt", "grad-acc", "bf16"],
)
def test_cuda_graph_step_is_the_eager_step(tmp_path, capsys, extra):
    losses, lora, chk = _run(tmp_path, capsys, True, extra)
    losses_eager, lora_eager, chk_eager = _run(tmp_path, capsys, False, extra)
    assert len(losses) == 7  # iterations 0 (before the first step: loss 0, as llama.cpp prints it) to 6
    assert losses == losses_eager
    assert lora == lora_eager
    assert chk == chk_eager
