"""A prompt's forward on the cuda-triton backend as lean launches (a prefill, no autograd).

An eager prefill launches about eleven kernels per layer, and on a GPU the host is its limit: through the generic
forward (model.block over lora.model_fns and fused_ops, each op checking and allocating) a launch cost the H200's
host 45-100 us in context, 21-40 ms for a 512-token prompt of open_llama_3b, against 11 ms of GPU work
(bench/prefill_lean_lab.py). CudaPrompt runs the same kernels in the same order on the same operands, so its numbers
are the generic forward's, bit for bit, but it checks the model once (CudaPrompt.build), allocates one set of
buffers per prompt that every layer reuses, chooses each product's path once per prompt, and launches through the
kernels' unchecked entry points (train_ops.rms_norm_rows, rope_heads_launch, silu_mul_rows,
q8_0_matmul.q8_0_matmul_into). Each layer's residual sum h + ffn is formed by the next layer's add_rms_norm (the
same rounding as the generic forward's separate sum: one launch fewer per layer).

Per layer, h [T, E] the residual stream (updated in place), the other buffers shared by all layers:
    h, a = h + ffn, rms_norm(h + ffn, attn_norm)        (layer 0: a = rms_norm(h, attn_norm))
    qkv = a @ Wqkv.T                                    (the packed q | k | v)
    RoPE(q), RoPE(k), v -> padded heads [T, H + 2 Hkv, Dp], and RoPE(k), v -> the KV cache's rows 0..T-1
    out_p = flash(q, k, v)                              (torch's causal flash kernel; lorakit.flash)
    out [T, H*D] = out_p's D columns per head
    h, f = h + out @ Wo.T, rms_norm(h + out @ Wo.T, ffn_norm)
    s = silu(gate) * up,  [gate | up] = f @ Wgu.T       (the packed gate | up)
    ffn = s @ Wdown.T
and at the end rms_norm(h + ffn, output_norm) of the last row: what Generator.logits multiplies by the output
weight. Adapters: the gains, the token embedding and every product with a LoRA term go through the generation's own
functions (lora.model_fns: its formed terms, the generic forward's numbers); the products without one through the
unchecked entry point (with llama.cpp's --act-q8 arithmetic every product through the generation's functions). It
applies (build returns one) to a model whose layers' products are packed q8_0 weights (model.pack_fused), at a
position 0 prompt of one sequence into a KVCache.empty cache, where lorakit.flash runs the heads; the generic forward
computes everything else.
"""

from __future__ import annotations

import math

import torch

from lorakit import flash
from lorakit.fused_ops import joint_kv, qkv_heads
from lorakit.lora import lora_terms
from lorakit.model import KVCache, LlamaModel, fused_members
from lorakit.quant import Q8Weight

KINDS = ("attn_qkv", "attn_output.weight", "ffn_gate_up", "ffn_down.weight")  # a layer's products, in order


class CudaPrompt:
    """build(backend, model, dtype, adapters) -> a runner, or None where it does not apply (see the module
    docstring). products_by_fns: every product through the generation's functions (their arithmetic is not the
    backend's: llama.cpp's --act-q8)."""

    def __init__(self, backend, model: LlamaModel, dtype: torch.dtype, layers: list):
        self.backend, self.model, self.dtype = backend, model, dtype
        self._layers = layers  # per layer: [(product name, Q8Weight, has a LoRA term)] in KINDS order
        self._train, self._mm = backend._train, backend._mm

    @classmethod
    def build(
        cls, backend, model: LlamaModel, dtype: torch.dtype, adapters=(), products_by_fns: bool = False
    ) -> CudaPrompt | None:
        args = model.args
        heads = args.n_head + 2 * args.n_head_kv
        if not flash.supported(dtype, backend.device, args.head_dim, gqa=args.n_head != args.n_head_kv):
            return None
        if args.n_embd > backend._train.MAX_ROW or args.head_dim % 2:
            return None
        with_lora = set(lora_terms(adapters))
        rows = [heads * args.head_dim, args.n_embd, 2 * args.n_ff, args.n_embd]
        layers = []
        for i in range(args.n_layer):
            names = [f"blk.{i}.{k}" for k in KINDS]
            ws = [model.fused.get(n) if n in model.fused else model.tensors.get(n) for n in names]
            ok = all(isinstance(w, Q8Weight) and w.qs.device.type == backend.device.type for w in ws)
            if not ok or not all(n in model.fused for n in names[::2]) or [w.qs.shape[0] for w in ws] != rows:
                return None
            lora = [products_by_fns or any(m in with_lora for m in (fused_members(n) if n in model.fused else [n]))
                    for n in names]  # fmt: skip
            layers.append(list(zip(names, ws, lora, strict=True)))
        return cls(backend, model, dtype, layers)

    def cache_rows(self, tokens: torch.Tensor, cache: KVCache, n_past: int) -> list[torch.Tensor] | None:
        """Each layer's cache rows 0..T-1 for the prompt's keys and values, as the [1, T, 2 Hkv, D] views its RoPE
        launch writes (the layer's k heads and then its v heads, KVCache.empty's layout), or None where last_hidden
        does not compute this prompt: a position other than 0, more than one sequence, another cache layout."""
        T = tokens.shape[1] if tokens.dim() == 2 else 0
        if n_past or T == 0 or tokens.shape[0] != 1:
            return None
        k = cache.k[0]
        if k.dtype != self.dtype or k.shape[0] != 1 or T > k.shape[2]:
            return None
        joint = [joint_kv(k, v) for k, v in zip(cache.k, cache.v, strict=True)]
        return None if any(j is None for j in joint) else [j[:, :, :T].transpose(1, 2) for j in joint]

    def last_hidden(
        self, tokens: torch.Tensor, rows: list[torch.Tensor], rope: tuple[torch.Tensor, ...], fns
    ) -> torch.Tensor:
        """The final normed hidden state of the prompt's last position [1, 1, E] (model.forward_hidden's last row),
        with the prompt's keys and values written into the cache's rows 0..T-1 (rows: cache_rows' views). tokens
        [1, T] on the device; rope: model.rope_tables' (cos, sin); fns: the generation's (linear, norm, embed) of
        lora.model_fns over the adapters build was given."""
        linear, norm, embed = fns
        args, dt, be, eps = self.model.args, self.dtype, self.backend, self.model.args.norm_eps
        T, E, F = tokens.shape[1], args.n_embd, args.n_ff
        H, Hkv, D = args.n_head, args.n_head_kv, args.head_dim
        cos, sin = rope[0][:T], rope[1][:T]
        scale = 1.0 / math.sqrt(D)  # as fused_ops._flash_causal forms it
        rms, heads, silu = self._train.rms_norm_rows, self._train.rope_heads_launch, self._train.silu_mul_rows
        mm = self._mm.q8_0_matmul_into

        def new(*shape):
            return torch.empty(*shape, dtype=dt, device=be.device)

        h = embed(tokens).view(T, E)
        a, o, f, ffn, out, s = new(T, E), new(T, E), new(T, E), new(T, E), new(T, H * D), new(T, F)
        bufs = (new(T, (H + 2 * Hkv) * D), o, new(T, 2 * F), ffn)  # the products' outputs (without a LoRA term)
        padded = new(1, T, H + 2 * Hkv, flash.padded_head(D))
        rstd = torch.empty(T, dtype=torch.float32, device=be.device)
        # each product's path, chosen once for all layers (their weights have the same shapes); none for a kind that
        # every layer computes through the generation's functions (--act-q8, say: choosing one measures the paths)
        paths = []
        for j, (x, (_, w, _), y) in enumerate(zip((a, out, f, s), self._layers[0], bufs, strict=True)):
            plain = not all(layer[j][2] for layer in self._layers)
            paths.append(self._mm.fwd_path(x, w.qs, w.d, y, None, be.host_bound) if plain else None)

        def product(j: int, x: torch.Tensor, layer: list) -> torch.Tensor:
            name, w, lora = layer[j]
            if lora:  # the generation's product with its formed LoRA term ([T, N]; a packed one's whole)
                y = linear(x, name)
                return getattr(y, "whole", y)
            mm(paths[j], x, w.qs, w.d, bufs[j], None)
            return bufs[j]

        q, k, v = qkv_heads(padded, H, Hkv)
        for i, layer in enumerate(self._layers):
            rms(h, None if i == 0 else ffn, h, norm(f"blk.{i}.attn_norm.weight"), a, rstd, eps)
            qkv = product(0, a, layer)
            heads(qkv.view(1, T, H + 2 * Hkv, D), cos, sin, H + Hkv, padded, False, rows[i])
            out_p = flash.forward(q, k, v, scale)[0]
            heads(out_p.transpose(1, 2)[..., :D], cos, sin, 0, out.view(1, T, H, D))
            o = product(1, out, layer)
            rms(h, o, h, norm(f"blk.{i}.ffn_norm.weight"), f, rstd, eps)
            gu = product(2, f, layer)
            silu(gu[:, :F], gu[:, F:], s)
            ffn = product(3, s, layer)
        last = a[-1:]
        rms(h[-1:], ffn[-1:], h[-1:], norm("output_norm.weight"), last, rstd[-1:], eps)
        return last.view(1, 1, E)
