"""`lorakit predict` as a library call: load model, tokenizer and adapters, then stream text."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from .errors import LorakitError, UsageError
from .generate import GenerationStats, Generator, SamplingParams, prompt_too_long
from .gguf_io import GGUFFile
from .model import load_model


@dataclass(frozen=True)
class PredictNote:
    """Something the user should know about the generation (the CLI prints it as a note on stderr)."""

    text: str


@dataclass(frozen=True)
class PredictRequest:
    model: str
    prompt: str
    n_predict: int = -1
    sampling: SamplingParams = SamplingParams()
    n_ctx: int = 512
    threads: int = 0
    adapters: list[tuple[str, float]] = field(default_factory=list)
    backend: str = "auto"
    add_bos: bool = True
    compute_dtype: str = "f32"
    act_q8: bool = False  # llama.cpp's arithmetic for q8_0 products (Generator's act_q8)


def load_adapters(paths: list[tuple[str, float]], model) -> list:
    from .adapters import check_adapter_fits, load_adapter

    loaded = []
    for path, scale in paths:
        adapter = load_adapter(path)
        check_adapter_fits(adapter, model.args, path)
        loaded.append((adapter, scale))
    return loaded


def run_predict(req: PredictRequest) -> Iterator[str | PredictNote | GenerationStats]:
    """The generation's pieces: notes, the prompt's text once the model, adapters and generator are ready (before
    the prompt runs), then the generated text as it decodes, a note if the context filled up, last the
    GenerationStats."""
    from .backends import get_backend
    from .tokenizer import StreamDecoder, Tokenizer

    if req.threads > 0:
        torch.set_num_threads(min(req.threads, os.cpu_count() or req.threads))  # never oversubscribe
    if req.n_ctx < 0:
        raise UsageError("-c/--ctx-size must be >= 0")
    backend = get_backend(req.backend)
    gf = GGUFFile(req.model)
    model = load_model(req.model, gf)
    tok = Tokenizer.from_gguf(gf)
    adapters = load_adapters(req.adapters, model)
    model = model.to(backend.device)
    adapters = [(a.to(backend.device), s) for a, s in adapters]
    n_ctx = req.n_ctx or model.args.n_ctx_train
    ids = tok.encode(req.prompt, add_bos=req.add_bos) if req.prompt else ([tok.bos_id] if req.add_bos else [])
    if not ids:
        raise UsageError("the prompt is empty (give -p, -f, or leave BOS on)")
    if any(i >= model.args.n_vocab for i in ids):
        raise LorakitError("the tokenizer produced ids outside the model's vocabulary", req.model)
    if len(ids) >= n_ctx:  # before the prompt's echo
        raise UsageError(prompt_too_long(len(ids), n_ctx))
    if note := model.args.context_note(n_ctx):  # llama.cpp's main warns the same way and goes on
        yield PredictNote(note)
    sampling = req.sampling
    if sampling.repeat_last_n == -1:  # llama.cpp: -1 = the context size
        sampling = replace(sampling, repeat_last_n=n_ctx)
    dtype = torch.bfloat16 if req.compute_dtype == "bf16" else torch.float32
    gen = Generator(model, backend, adapters, n_ctx=n_ctx, dtype=dtype, act_q8=req.act_q8)
    dec = StreamDecoder(tok)
    yield req.prompt
    for t in gen.generate(ids, req.n_predict, sampling, stop_ids=(tok.eos_id,)):
        text = dec.push(t)
        if text:
            yield text
    if gen.stats.context_full:
        yield PredictNote(
            f"the context of {n_ctx} tokens is full; generation stopped (-c sets its size; llama.cpp's main would "
            "shift the context and go on)"
        )
    yield gen.stats
