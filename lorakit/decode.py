"""Decoding that is bound by memory bandwidth: a static KV cache and one CUDA-graph-captured step.

The step takes the token and its position as device tensors, so nothing in it depends on Python
values and the whole forward pass of one token replays as a single CUDA graph (no launch or Python
overhead per kernel). Per layer it runs eight backend ops (and no memset: attention's split counters are
one persistent buffer that every launch leaves zero): add+RMSNorm, the q/k/v product (one product
over the packed [q; k; v] weight, model.FUSED_KINDS), RoPE + KV-cache write + attention over positions
0..pos (one launch on cuda-triton), the output product, add+RMSNorm, the packed gate/up product, SwiGLU, the
down product. Every
product is a q8_0 GEMV reading each weight byte once; adapters stay unmerged, their low-rank terms fused
into the products (one block-diagonal term for a packed weight, lora.formed_term). Norm gains (with
their adapter terms) are formed once per generation. On sm_90+ the step's kernels are programmatic dependent
launches (kernels.triton_util.pdl): each starts while the previous one finishes and waits for it before
touching memory, and the last programs of each product's launch ask L2 for the first bytes of the next product's
weight (PrefetchPlan, default_prefetch): HBM stays busy through the tail of one product, the small launches after it
and the start of the next. Greedy decoding (GraphDecoder(greedy=True).tokens) also takes the argmax and the next
position inside the step, so the host never waits for a token before launching the next step; sampled decoding
(sampler=...) captures the top-k / top-p / min-p stages (generate.survivors) and, with device_draw=True, the
temperature and the seeded draw too (generate.pick with one uniform per step, handed over from the generation's
generator in advance). Prefill uses the ordinary batched forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .generate import SamplingParams, pick, survivors
from .lora import LoraAdapter, formed_term, lora_terms, model_fns
from .model import KVCache, LlamaModel, fused_members


@dataclass(frozen=True)
class PrefetchPlan:
    """How much of each product's weight the previous product's launch asks the memory system for as it ends
    (bytes from the start, backend prefetch_hint; its first programs read those rows first). kind: 1 plain, 2 with
    the evict_last priority. Hints change no result."""

    tail: int = 0
    kind: int = 2


MiB = 1 << 20


def default_prefetch(device: torch.device) -> PrefetchPlan:
    """The plan a decode step uses unless told otherwise: the first 4 MiB of each product's weight requested by
    the previous product's tail programs, on a GPU whose L2 holds >= 32 MiB (the H200's 50 MiB: 1,973 -> 1,877 us
    per 3B q8_0 step, +5.2%, with two adapters +0.4%; 2 MiB +4.3%, 6 MiB the same as 4, 8 MiB +4.6%, 16 MiB
    +0.6%; the small launches between the products (norms, attention, SwiGLU) prefetching instead: +2.1% at 4
    MiB, slower from 16 MiB, nothing on top of the tail; bench/results/h200_session11/NOTES.md). Off elsewhere
    (not measured: a small L2 would evict the lines before their product reads them)."""
    if device.type != "cuda":
        return PrefetchPlan()
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return PrefetchPlan(tail=4 * MiB) if l2 >= 32 * MiB else PrefetchPlan()


class GraphDecoder:
    """One decode step of `model` as a replayable CUDA graph (eager off CUDA or with use_graph=False)."""

    def __init__(
        self,
        model: LlamaModel,
        backend,
        adapters: Sequence[tuple[LoraAdapter, float]],
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        dtype: torch.dtype,
        use_graph: bool = True,
        greedy: bool = False,
        sampler: SamplingParams | None = None,
        device_draw: bool = False,
        prefetch: PrefetchPlan | None = None,
    ):
        self._init_loop(model, cache, use_graph, greedy, sampler, device_draw)
        self.backend, self.dtype = backend, dtype
        self.cos_table, self.sin_table = rope
        self.linear, norm, self.embed = model_fns(model, backend, adapters, dtype)
        dev = cache.k[0].device
        args = model.args
        names = [f"blk.{i}.{k}.weight" for i in range(args.n_layer) for k in ("attn_norm", "ffn_norm")]
        with torch.no_grad():
            self.norms = {n: norm(n) for n in [*names, "output_norm.weight"]}
            terms = lora_terms(adapters)

            def one_term(members: list[str]) -> list:
                rows = [model.weight(m).shape[0] for m in members]
                return formed_term([terms.get(m, []) for m in members], rows, dtype)

            # every product of the step with its adapters folded into one low-rank term, in the compute
            # dtype, formed once (nothing is cast or concatenated per token)
            self.fused = {}  # blk.N.<fused kind> -> (packed weight, term)
            for name, w in model.fused.items():
                self.fused[name] = (w, one_term(fused_members(name)))
            single = [f"blk.{i}.{k}.weight" for i in range(args.n_layer) for k in ("attn_output", "ffn_down")]
            self.products = {n: (model.weight(n), one_term([n])) for n in [*single, "output.weight"]}
        # the step's products in order, and the prefetch hint for each, carried by the product before it (none
        # for the first: no product comes before it in the step)
        order = [
            self._weight(f"blk.{i}.{kind}")
            for i in range(args.n_layer)
            for kind in ("attn_qkv", "attn_output.weight", "ffn_gate_up", "ffn_down.weight")
        ]
        order.append(self._weight("output.weight"))
        p = default_prefetch(dev) if prefetch is None else prefetch
        self.hints = [None] + [backend.prefetch_hint(w, 0, p.tail, p.kind) for w in order[1:]]
        # attention's split counters, zero between launches (each launch leaves them zero): one buffer for
        # all layers instead of a memset per layer and token
        self.counters = torch.zeros(args.n_head, dtype=torch.int32, device=dev)

    def _init_loop(self, model: LlamaModel, cache: KVCache, use_graph: bool, greedy: bool,
                   sampler: SamplingParams | None, device_draw: bool) -> None:  # fmt: skip
        """The state of the step loop (token, position, sampler, graph) that every decoder shares."""
        if device_draw and (sampler is None or greedy):
            raise ValueError("device_draw needs a sampler (and greedy=False)")
        self.model, self.cache = model, cache
        self.greedy, self.sampler, self.device_draw = greedy, sampler, device_draw
        self.picks = None  # with a sampler: generate.survivors of the last step's logits
        dev = cache.k[0].device
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        # device_draw: one uniform per step (tokens() fills them from the generation's seeded generator), and the
        # index of the next one
        self.uniforms = torch.zeros(cache.k[0].shape[2] if device_draw else 1, device=dev)
        self.nth = torch.zeros(1, dtype=torch.long, device=dev)
        # greedy: each step's token also at hist[its position], which tokens() copies to the host on a stream of its
        # own (no copy between two steps' launches)
        self.hist = torch.zeros(cache.k[0].shape[2] if greedy else 1, dtype=torch.long, device=dev)
        self._side = None
        self._zero_next = None  # a greedy step's buffer zeroed with its argmax for the next step (MegaDecoder's sums)
        self.graph = None
        self.use_graph = use_graph and dev.type == "cuda"
        self.out = None

    def _weight(self, name: str):
        """The weight of the step's product `name` (a packed weight, else its first member's)."""
        if name in self.products:
            return self.products[name][0]
        if name in self.fused:
            return self.fused[name][0]
        return self.model.weight(fused_members(name)[0])

    def _packed(self, x: torch.Tensor, i: int, kind: str, prefetch=None) -> torch.Tensor:
        """x @ [W_1; ..; W_k].T for the layer's FUSED_KINDS members (one product when packed)."""
        packed = self.fused.get(f"blk.{i}.{kind}")
        if packed is not None:
            return self.backend.lora_linear(x, *packed, prefetch=prefetch)
        return torch.cat(self.linear(x, f"blk.{i}.{kind}"), dim=-1)  # the members one by one

    def _step(self) -> torch.Tensor:
        """The step's logits (_forward), then what the loop takes from them on the device: the sampler's survivors,
        and the next token and position (greedy, or drawn with the step's uniform)."""
        logits = self._forward()
        if self.sampler is not None:  # the sampler's device stages: only their survivors go to the host
            self.picks = survivors(logits, self.sampler)
        if self.greedy:  # the next step's token (the argmax, written in place) and position, formed on the device
            self.backend.greedy_next(logits.view(-1), self.tok, self.pos, self._zero_next, self.hist)
        elif self.device_draw:  # ... or the draw too, with the step's uniform
            nxt = pick(self.picks, self.sampler.temp, self.uniforms.index_select(0, self.nth)[0])
            self.nth.add_(1)
            self.tok.copy_(nxt.view(1, 1))
            self.pos.add_(1)
        return logits

    def _forward(self) -> torch.Tensor:
        """Logits [V] (float32) of self.tok at self.pos; writes the cache row."""
        args, be, cache = self.model.args, self.backend, self.cache
        eps = args.norm_eps
        hints = self.hints  # [product]: the prefetch hint for it, carried by the product before it
        h = self.embed(self.tok)
        delta = None
        for i in range(args.n_layer):
            p = 4 * i  # the layer's products: p (q/k/v), p + 1 (output), p + 2 (gate/up), p + 3 (down)
            h, a = be.add_rms_norm(h, delta, self.norms[f"blk.{i}.attn_norm.weight"], eps)
            qkv = self._packed(a, i, "attn_qkv", prefetch=hints[p + 1])
            o = be.rope_attention_decode(qkv, self.cos_table, self.sin_table, self.pos, cache.k[i], cache.v[i],
                                         args.n_head, args.n_head_kv, self.counters)  # fmt: skip
            delta = be.lora_linear(o, *self.products[f"blk.{i}.attn_output.weight"], prefetch=hints[p + 2])
            h, f = be.add_rms_norm(h, delta, self.norms[f"blk.{i}.ffn_norm.weight"], eps)
            gu = self._packed(f, i, "ffn_gate_up", prefetch=hints[p + 3])
            act = be.silu_mul_fwd(*gu.chunk(2, dim=-1))  # SwiGLU on the two views of the packed output
            delta = be.lora_linear(act, *self.products[f"blk.{i}.ffn_down.weight"], prefetch=hints[p + 4])
        _, h = be.add_rms_norm(h, delta, self.norms["output_norm.weight"], eps)
        return be.lora_linear(h, *self.products["output.weight"])[0, -1].float()

    def _run(self) -> torch.Tensor:
        """One step with the token and position already in self.tok / self.pos."""
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            # warm up on a side stream (autotuning, path choice, allocator), then capture; the warm-up
            # writes the cache at `pos`, which the captured replay below rewrites identically (a greedy
            # step also moves tok and pos on: they are put back)
            tok, pos, nth = self.tok.clone(), self.pos.clone(), self.nth.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._step()
                    self.tok.copy_(tok)
                    self.pos.copy_(pos)
                    self.nth.copy_(nth)
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._step()
        self.graph.replay()
        return self.out

    @torch.no_grad()
    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits [V] (float32) of `token` at position `pos`; writes the cache at `pos`."""
        self.tok.fill_(token)
        self.pos.fill_(pos)
        return self._run()

    @torch.no_grad()
    def tokens(self, token: int, pos: int, steps: int, uniforms: torch.Tensor | None = None) -> Iterator[int]:
        """The continuation of `token` at `pos`: the token each of `steps` steps (positions pos, pos + 1, ...) picks
        itself, for a decoder made with greedy=True (the argmax) or with a sampler and device_draw=True (the seeded
        draw: uniforms, one per step, as generate.draw takes them from the generator). Each step takes its token and
        position from the previous one on the device, and the host reads token i while step i + 1 runs (one step
        ahead; a caller that stops early leaves one step computed past its last token, whose cache row is never
        read). Greedy steps leave their token at hist[position] too; it reaches the host by a copy on a stream of its
        own, so nothing runs between two steps' launches."""
        if not (self.greedy or self.device_draw):
            raise ValueError("tokens() needs a GraphDecoder made with greedy=True or device_draw=True")
        if self.device_draw:
            if uniforms is None or uniforms.numel() < steps or steps > self.uniforms.numel():
                raise ValueError(f"tokens() with device_draw needs {steps} uniforms (at most {self.uniforms.numel()})")
            self.uniforms[:steps].copy_(uniforms[:steps])
            self.nth.zero_()
        self.tok.fill_(token)
        self.pos.fill_(pos)
        if not self.use_graph:
            for _ in range(steps):
                self._step()
                yield int(self.tok)
            return
        host = torch.empty(2, dtype=torch.long, pin_memory=True)
        done = [torch.cuda.Event(), torch.cuda.Event()]
        ran = [torch.cuda.Event(), torch.cuda.Event()]
        from .kernels.triton_util import launch_overlap

        side = self.greedy and pos + steps <= self.hist.numel() and launch_overlap()
        if side and self._side is None:
            self._side = torch.cuda.Stream()
        for i in range(steps + 1):
            if i < steps:
                self._run()
                if side:  # step i's token from its history slot, copied on the side stream: step i + 1 follows at once
                    ran[i % 2].record()
                    self._side.wait_event(ran[i % 2])
                    with torch.cuda.stream(self._side):
                        host[i % 2].copy_(self.hist[pos + i], non_blocking=True)
                        done[i % 2].record()
                else:
                    host[i % 2].copy_(self.tok.view(()), non_blocking=True)
                    done[i % 2].record()
            if i > 0:
                done[(i - 1) % 2].synchronize()
                yield int(host[(i - 1) % 2])
