#!/usr/bin/env python3
"""End-to-end GPU checks for the cuda-triton backend (run on the GPU machine before benchmarks).

1. llama.cpp fixture run a (q8_0 base) replayed with --backend cuda-triton: per-iteration losses
   against llama.cpp's printed ones (the CPU path matches them to 1e-5).
2. Greedy tokens on the GPU (CUDA-graph decode) equal the CPU path's: stories260K f32 and q8_0
   against the llama2.c reference, and the tiny q8_0 model with llama.cpp's adapter at scales 1.0 and
   0.5 (the fixture's generation.json ids) and two adapters mixed against the cpu-torch backend.
Prints one JSON object per check; exit code 1 if any check fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REF = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411,
       322, 265, 282]  # fmt: skip


def check_fixture_losses(backend: str) -> dict:
    from lorakit.cli import main
    from tests.finetune_util import fixture_args, fixture_losses, make_tree

    root = make_tree(Path(tempfile.mkdtemp()))
    run = root / "runs" / "a_fresh_q8_0"
    run.mkdir()
    cwd = os.getcwd()
    os.chdir(run)
    try:
        rc = main(["finetune", *fixture_args("a_fresh_q8_0"), "--backend", backend, "--log-jsonl", "log.jsonl"])
    finally:
        os.chdir(cwd)
    ours = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    theirs = fixture_losses("a_fresh_q8_0")
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs, strict=True))
    return {"check": f"fixture run a losses ({backend})", "rc": rc, "max_abs_diff": diff, "ok": rc == 0 and diff < 1e-4}


def greedy(model_path: str, backend, prompt: list[int], n: int, adapters=()) -> list[int]:
    from lorakit.adapters import load_adapter
    from lorakit.generate import Generator, SamplingParams
    from lorakit.model import load_model

    model = load_model(model_path).to(backend.device)
    ads = [(load_adapter(p).to(backend.device), s) for p, s in adapters]
    return list(Generator(model, backend, ads, n_ctx=128).generate(prompt, n, SamplingParams(temp=0)))


def main() -> int:
    from lorakit.backends import get_backend

    gpu = get_backend("cuda-triton")
    cpu = get_backend("cpu-torch")
    results = []
    if "--skip-fixture" not in sys.argv:
        results.append(check_fixture_losses("cuda-triton"))
        print(json.dumps(results[-1]), flush=True)
    spec = importlib.util.spec_from_file_location("conv", ROOT / "examples" / "convert_llama2c.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    tmp = Path(tempfile.mkdtemp())
    for qt in ("f32", "q8_0"):
        path = tmp / f"stories-{qt}.gguf"
        conv.convert(ROOT / "assets/stories260K.bin", ROOT / "assets/tok512.model", path, qt)
        ids = greedy(str(path), gpu, [1, 403, 407, 261, 378], 24)
        results.append({"check": f"stories260K {qt} greedy on GPU", "ok": ids == REF, "ids": ids})
        print(json.dumps(results[-1]), flush=True)
    fx = ROOT / "tests/fixtures/llamacpp"
    gen = json.loads((fx / "adapter/generation.json").read_text())
    tiny = str(fx / "models/tiny-q8_0.gguf")
    ad = str(fx / "adapter/adapter.gguf")
    bin_ad = str(fx / "runs/a_fresh_q8_0/lora-a-4.bin")
    for case in gen["cases"]:
        s = case["lora_scale"]
        ads = [] if s is None else [(ad, s)]
        g_ids = greedy(tiny, gpu, case["prompt_ids"], 32, ads)
        c_ids = greedy(tiny, cpu, case["prompt_ids"], 32, ads)
        results.append({"check": f"tiny q8_0 adapter scale {s}: GPU == CPU", "ok": g_ids == c_ids,
                        "equals_llamacpp": g_ids == case["generated_ids"]})  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    mix = [(ad, 0.7), (bin_ad, 0.4)]
    g_ids = greedy(tiny, gpu, gen["cases"][0]["prompt_ids"], 32, mix)
    c_ids = greedy(tiny, cpu, gen["cases"][0]["prompt_ids"], 32, mix)
    results.append({"check": "tiny q8_0, two adapters mixed: GPU == CPU", "ok": g_ids == c_ids})
    print(json.dumps(results[-1]), flush=True)
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
