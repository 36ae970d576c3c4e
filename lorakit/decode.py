"""Decoding that is bound by memory bandwidth: a static KV cache and one CUDA-graph-captured step.

The step takes the token and its position as device tensors, so nothing in it depends on Python
values and the whole forward pass of one token replays as a single CUDA graph (no launch or Python
overhead per kernel). Attention runs over the full static cache with a mask `key_pos <= pos`.
Every matmul goes through the backend (q8_0 GEMV reading each weight byte once, adapters fused as
low-rank terms, never merged). Prefill uses the ordinary batched forward (q8_0 GEMM) on the same cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import KVCache, LlamaModel, ModelArgs, apply_rope, feed_forward, rms_norm


def _attention_step(args: ModelArgs, i: int, x, linear, cos, sin, cache: KVCache, pos, mask):
    """x [1, 1, E] at position `pos` (a 1-element long tensor); cache updated in place."""
    H, Hkv, D = args.n_head, args.n_head_kv, args.head_dim
    q = linear(x, f"blk.{i}.attn_q.weight").view(1, 1, H, D)
    k = linear(x, f"blk.{i}.attn_k.weight").view(1, 1, Hkv, D)
    v = linear(x, f"blk.{i}.attn_v.weight").view(1, 1, Hkv, D)
    q = apply_rope(q, cos, sin).transpose(1, 2)
    k = apply_rope(k, cos, sin).transpose(1, 2)
    cache.k[i].index_copy_(2, pos, k.to(cache.k[i].dtype))
    cache.v[i].index_copy_(2, pos, v.transpose(1, 2).to(cache.v[i].dtype))
    kk, vv = cache.k[i], cache.v[i]
    if Hkv != H:
        kk = kk.repeat_interleave(H // Hkv, dim=1)
        vv = vv.repeat_interleave(H // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q, kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask, scale=1 / math.sqrt(D))
    return linear(out.transpose(1, 2).reshape(1, 1, H * D), f"blk.{i}.attn_output.weight")


class GraphDecoder:
    """One decode step of `model` as a replayable CUDA graph (falls back to eager off CUDA)."""

    def __init__(self, model: LlamaModel, fns, rope, cache: KVCache, n_ctx: int, dtype, use_graph: bool = True):
        self.model, self.fns, self.cache, self.n_ctx, self.dtype = model, fns, cache, n_ctx, dtype
        self.cos_table, self.sin_table = rope
        dev = cache.k[0].device
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_pos = torch.arange(n_ctx, device=dev)
        self.graph = None
        self.use_graph = use_graph and dev.type == "cuda"
        self.out = None

    def _step(self) -> torch.Tensor:
        args = self.model.args
        linear, norm, embed = self.fns
        cos = self.cos_table.index_select(0, self.pos)
        sin = self.sin_table.index_select(0, self.pos)
        mask = (self.key_pos <= self.pos).view(1, 1, 1, -1)
        h = embed(self.tok)
        for i in range(args.n_layer):
            a = rms_norm(h, args.norm_eps) * norm(f"blk.{i}.attn_norm.weight").to(h.dtype)
            h = h + _attention_step(args, i, a, linear, cos, sin, self.cache, self.pos, mask)
            f = rms_norm(h, args.norm_eps) * norm(f"blk.{i}.ffn_norm.weight").to(h.dtype)
            h = h + feed_forward(i, f, linear)
        h = rms_norm(h, args.norm_eps) * norm("output_norm.weight").to(h.dtype)
        return linear(h, "output.weight")[0, -1].float()

    @torch.no_grad()
    def __call__(self, token: int, pos: int) -> torch.Tensor:
        self.tok.fill_(token)
        self.pos.fill_(pos)
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            # warm up on a side stream (autotuning, allocator), then capture; the warm-up writes
            # the cache at `pos`, which the captured replay below rewrites identically
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._step()
        self.graph.replay()
        return self.out
