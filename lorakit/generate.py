"""Sampling and KV-cached decoding with any number of scaled adapters applied unmerged.

Sampler chain and defaults follow current llama.cpp (`llama-cli`): repetition penalty over the
last `repeat_last_n` tokens, then top-k, top-p, min-p, temperature, and a seeded draw (the inverse CDF of one
uniform per token from a torch generator seeded with --seed: lorakit's stream, not llama.cpp's RNG);
`temp <= 0` is greedy (argmax after the penalties).
"""

from __future__ import annotations

import functools
import gc
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .errors import UsageError
from .fused_ops import ops_for
from .lora import LoraAdapter, model_fns
from .model import KVCache, LlamaModel, forward_hidden, rope_tables


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = -1


def apply_repeat_penalty(logits: torch.Tensor, recent: Sequence[int], penalty: float) -> torch.Tensor:
    """llama.cpp's penalty: positive logits are divided, negative ones multiplied, once per distinct token."""
    if penalty == 1.0 or not recent:
        return logits
    logits = logits.clone()
    idx = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    vals = logits[idx]
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def survivors(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The top-k, top-p and min-p stages of the sampler chain where the logits are, without a host sync (a decode
    step captures them in its CUDA graph): float32 [2k + 1] = the k largest logits (descending), their token ids,
    and n, how many of them survive top-p and min-p (always a prefix: the logits are sorted). top_k <= 0: k = V."""
    vals, idx = torch.topk(logits.float(), p.top_k if 0 < p.top_k < logits.numel() else logits.numel())
    k = vals.numel()
    first = torch.arange(k, device=vals.device)
    keep = torch.full((), k, device=vals.device)
    if p.top_p < 1.0:  # the smallest prefix whose probability reaches top_p
        keep = ((torch.cumsum(torch.softmax(vals, dim=-1), dim=-1) < p.top_p).sum() + 1).clamp(max=k)
    if p.min_p > 0:  # ... then those of at least min_p times the first's probability among them (none of them
        # for min_p > 1: then, as llama.cpp's min-p sampler, the stage keeps what it got)
        probs = torch.softmax(vals.masked_fill(first >= keep, float("-inf")), dim=-1)
        passed = ((probs >= p.min_p * probs[0]) & (first < keep)).sum()
        keep = torch.where(passed > 0, passed, keep)
    return torch.cat([vals, idx.float(), keep.float().view(1)])


def pick(packed: torch.Tensor, temp: float, u: torch.Tensor) -> torch.Tensor:
    """The last stages, where survivors() left its result (a captured decode step runs them on the GPU): the
    temperature over its n logits, then the token at the inverse CDF of u (a uniform in [0, 1)): the first
    survivor whose cumulative probability exceeds u. A 0-dim long tensor on packed's device."""
    k = (packed.numel() - 1) // 2
    n = packed[2 * k].long()
    z = torch.where(torch.arange(k, device=packed.device) < n, packed[:k] / temp, float("-inf"))
    c = torch.cumsum(torch.softmax(z, dim=-1), dim=-1)
    i = torch.minimum((c <= u * c[-1]).sum(), n - 1)
    return packed[k : 2 * k].gather(0, i.view(1))[0].long()  # a tensor index (no host sync: capturable)


def draw(packed: torch.Tensor, p: SamplingParams, rng: torch.Generator) -> int:
    """The last stages on the CPU: pick() with the next uniform of rng (one per token)."""
    return int(pick(packed.cpu(), p.temp, torch.rand((), generator=rng)))


def sample_token(logits: torch.Tensor, p: SamplingParams, history: Sequence[int], rng: torch.Generator) -> int:
    """One token from float32 logits [V]: repetition penalty, then argmax (temp <= 0) or survivors() and draw()
    (on a GPU only the survivors reach the host)."""
    logits = logits.float()
    recent = list(history[-p.repeat_last_n :]) if p.repeat_last_n > 0 else []
    logits = apply_repeat_penalty(logits, recent, p.repeat_penalty)
    if p.temp <= 0:
        return int(torch.argmax(logits))
    return draw(survivors(logits, p), p, rng)


def no_penalty(p: SamplingParams) -> bool:
    """Whether the repetition penalty leaves the logits as they are (the chain does not depend on history)."""
    return p.repeat_penalty == 1.0 or p.repeat_last_n <= 0


def greedy_only(p: SamplingParams) -> bool:
    """Whether sample_token is the plain argmax of the logits (no temperature, no repetition penalty)."""
    return p.temp <= 0 and no_penalty(p)


def gc_paused(fn):
    """fn run with Python's cyclic garbage collector paused (as it was before, after; nested calls leave it alone). A
    prompt on a GPU is bound by the host's launches, and a full collection in the middle of one scans every object of
    torch and triton: 140-170 ms on the H200's host during a process's first 512-token prompts, against ~25 ms for
    the prompt itself (bench/host_lab.py). The objects a prompt makes are freed by their reference counts; the
    collection its allocations would have started runs at the next one after it (`lorakit predict` freezes the
    imports' objects first, so that even a full one is short)."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return paused


def prompt_too_long(n_prompt: int, n_ctx: int) -> str:
    """The usage error of a prompt that leaves no room in the context for a generated token."""
    return f"the prompt has {n_prompt} tokens, which leaves no room to generate in a context of {n_ctx} (-c)"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    context_full: bool = False  # the generation stopped because the context had no room left


class Generator:
    """Holds the model, adapters, KV cache and sampler state for one generation."""

    def __init__(
        self,
        model: LlamaModel,
        backend,
        adapters: Sequence[tuple[LoraAdapter, float]] = (),
        n_ctx: int = 512,
        dtype: torch.dtype = torch.float32,
        act_q8: bool = False,
        lean_prompt: bool = True,
    ):
        """act_q8: llama.cpp's arithmetic for q8_0 products (backends.act_q8): the prompt and the CPU's steps through
        ActQ8Inference, a GPU's decode steps through the decode megakernel where it applies (decode_mega.applies),
        else eager. lean_prompt: a prompt through the backend's prompt_runner where it has one
        (cuda-triton: backends/cuda_prompt.py; the same numbers, less host time); False: the generic forward
        (benchmarks compare both)."""
        self.model, self.backend, self.n_ctx, self.dtype = model, backend, n_ctx, dtype
        self.adapters = list(adapters)
        # prompt and eager steps launch op by op (the host is the limit on a GPU); decode steps replay a graph
        products = backend.eager_inference()
        if act_q8:
            from .backends.act_q8 import ActQ8Inference

            products = ActQ8Inference(products)
        self.fns = model_fns(model, products, adapters, dtype, frozen=True)
        self.ops = ops_for(backend)
        self.rope = rope_tables(model.args, n_ctx, backend.device)
        self.stats = GenerationStats()
        self.act_q8 = act_q8
        # (act_q8: every product through self.fns, ActQ8Inference's)
        self.prompt = backend.prompt_runner(model, dtype, self.adapters, act_q8) if lean_prompt else None
        self._tiled: dict = {}  # MegaDecoder's weights in its layout, formed on the first generation's decoder
        self.use_graph = backend.device.type == "cuda"

    @gc_paused
    @torch.no_grad()
    def logits(self, tokens: Sequence[int], cache: KVCache, n_past: int) -> torch.Tensor:
        """Run tokens at positions n_past.. and return the last position's logits [V] (float32)."""
        linear, norm, embed = self.fns
        t = torch.tensor([list(tokens)], dtype=torch.long, device=self.backend.device)
        rows = None if self.prompt is None else self.prompt.cache_rows(t, cache, n_past)
        if rows is not None:  # the backend's lean prompt forward
            h = self.prompt.last_hidden(t, rows, self.rope, self.fns)
        else:
            h = forward_hidden(self.model.args, t, linear, norm, embed, self.rope, cache, n_past, ops=self.ops)
            # the last row as a [1, 1, E] tensor of its own, laid out as the lean forward's: torch's CPU matmul
            # (the --act-q8 LoRA terms' x @ a) may sum a row in another order for another leading stride
            h = h[0, -1].view(1, 1, -1)
        return linear(h, "output.weight")[0, -1].float()

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.model.args, 1, self.n_ctx, self.dtype, self.backend.device)

    def generate(
        self, prompt: Sequence[int], n_predict: int, params: SamplingParams, stop_ids: Sequence[int] = ()
    ) -> Iterator[int]:
        """Yield generated token ids; stops at n_predict (<0: until EOS or the context is full)."""
        if not prompt:
            raise UsageError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise UsageError(prompt_too_long(len(prompt), self.n_ctx))
        seed = params.seed if params.seed >= 0 else random.SystemRandom().randrange(2**31)
        rng = torch.Generator().manual_seed(seed)
        cache = self.new_cache()
        t0 = time.perf_counter()
        logits = self.logits(prompt, cache, 0)
        self.stats = GenerationStats(prompt_tokens=len(prompt), prefill_s=time.perf_counter() - t0)
        history = list(prompt)
        n_past = len(prompt)
        step = self._decoder(cache, params) if self.use_graph else None
        if step is not None and (step.greedy or step.sampler is not None):
            first = sample_token(logits, params, history, rng)
            yield from self._on_device(step, first, n_past, n_predict, stop_ids, None if step.greedy else rng)
            return
        t1 = time.perf_counter()  # the host loop: CPU, or a chain with a repetition penalty (it needs the history)
        while n_predict < 0 or self.stats.generated < n_predict:
            tok = sample_token(logits, params, history, rng)
            self.stats.generated += 1
            if tok in stop_ids:
                break
            yield tok
            history.append(tok)
            if n_past >= self.n_ctx or self.stats.generated == n_predict:  # no step for a token not asked for
                self.stats.context_full = self.stats.generated != n_predict
                break
            logits = step(tok, n_past) if step is not None else self.logits([tok], cache, n_past)
            n_past += 1
            self.stats.decode_s = time.perf_counter() - t1
        self.stats.decode_s = time.perf_counter() - t1

    def _decoder(self, cache: KVCache, params: SamplingParams):
        """The GPU's captured decode step for this generation: GraphDecoder, or with act_q8 MegaDecoder (None where
        it does not apply: eager steps)."""
        greedy, fixed = greedy_only(params), no_penalty(params)  # fixed: the chain does not depend on history
        sampler = params if fixed and not greedy else None
        if self.act_q8:
            from .decode_mega import MegaDecoder, applies

            if applies(self.model, self.adapters, cache) is not None:
                return None
            return MegaDecoder(self.model, self.backend, self.rope, cache, self.adapters, greedy=greedy,
                               sampler=sampler, device_draw=sampler is not None, tiled=self._tiled)  # fmt: skip
        from .decode import GraphDecoder

        return GraphDecoder(self.model, self.backend, self.adapters, self.rope, cache, self.dtype, greedy=greedy,
                            sampler=sampler, device_draw=sampler is not None)  # fmt: skip

    def _on_device(
        self, step, first: int, n_past: int, n_predict: int, stop_ids: Sequence[int], rng: torch.Generator | None
    ) -> Iterator[int]:
        """generate()'s loop on a GPU where the captured step picks each next token itself (greedy, or the seeded
        draw from rng's next uniforms: the same uniforms the host loop would draw), from the prompt's token
        `first`: the same tokens, each step launched before the host has read the previous one's token
        (GraphDecoder.tokens)."""
        if n_predict == 0:
            return
        t1 = time.perf_counter()
        steps = self.n_ctx - n_past if n_predict < 0 else min(n_predict - 1, self.n_ctx - n_past)
        limited = n_predict < 0 or n_predict - 1 > self.n_ctx - n_past  # the context, not n_predict, ends it
        uniforms = None if rng is None else torch.rand(steps, generator=rng)
        tokens = step.tokens(first, n_past, steps, uniforms)
        tok = first
        while True:
            self.stats.generated += 1
            if tok in stop_ids:
                break
            yield tok
            tok = next(tokens, None)
            self.stats.decode_s = time.perf_counter() - t1
            if tok is None:
                self.stats.context_full = limited
                break
        tokens.close()
        self.stats.decode_s = time.perf_counter() - t1
