"""cuda-triton: the Backend ops on fused Triton kernels (lorakit.kernels), checked against cpu-torch.

q8_0 weights are never dequantized for a product: the matmul kernels read int8 qs + fp16 d directly
(and fuse the LoRA term into the epilogue); float weights fall back to torch matmuls (cuBLAS). AdamW
runs as one fused pass over the LoRA tensors (global-norm clip included).

Triton is imported only when a backend object is built. For tests without a GPU, the backend can be
built on CPU tensors when TRITON_INTERPRET=1 was set before lorakit.kernels was first imported:
    CudaTritonBackend(device="cpu")
get_backend("cuda-triton") still requires CUDA.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorakit.errors import UsageError
from lorakit.quant import Q8Weight, Weight

from . import AdamHyper, add_lora_terms, triton_version_problem

if TYPE_CHECKING:
    from lorakit.kernels.triton_util import Prefetch
    from lorakit.model import LlamaModel

    from .cuda_prompt import CudaPrompt


class CudaTritonBackend:
    name = "cuda-triton"
    lora_rank_multiple = 8  # the trainer pads LoRA ranks to it (lora_pack): cuBLAS's aligned kernels, ~25% faster

    def __init__(self, device: torch.device | str = "cuda", host_bound: bool = False):
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError("cuda-triton needs a CUDA GPU visible to torch")
        elif os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError(f"cuda-triton runs on CUDA devices (got {dev}); on CPU only with TRITON_INTERPRET=1")
        try:
            import triton
        except ImportError as e:  # triton missing
            raise UsageError(f"cuda-triton needs the triton package ({e})") from e
        why = triton_version_problem(triton.__version__)
        if why:
            raise UsageError(f"cuda-triton cannot run here: {why}")
        from lorakit.kernels import decode_ops, lora_update, q8_0_matmul, train_ops, triton_util

        if dev.type != "cuda" and not q8_0_matmul.interpreting():
            raise UsageError(
                "the triton kernels were imported before TRITON_INTERPRET=1 was set; they cannot run on CPU"
            )
        self.device = dev
        self.host_bound = host_bound
        self._mm = q8_0_matmul
        self._adam = lora_update
        self._dec = decode_ops
        self._train = train_ops
        self._prefetch = triton_util.Prefetch
        # the dequantize + cuBLAS path's last few dequantized weights (a checkpointed layer's recompute and
        # backward share them)
        self._wcache = q8_0_matmul.DequantCache(size=4)
        self.shared_dequant = False  # checkpointed_training()'s variant

    def checkpointed_training(self) -> CudaTritonBackend:
        """This backend for a checkpointed training step: its products of >= 256 rows take dequantize + cuBLAS,
        the recomputed forward and the input gradient sharing one dequantized copy of each weight (the DequantCache,
        shared with this backend); q8_0_matmul's shared_dequant."""
        if self.shared_dequant:
            return self
        variant = copy.copy(self)
        variant.shared_dequant = True
        return variant

    def eager_inference(self) -> CudaTritonBackend:
        """This backend for eager, host-bound work (a prefill): products choose their path by the wall time of
        back-to-back eager calls (host and GPU together) instead of GPU time."""
        return self if self.host_bound else CudaTritonBackend(self.device, host_bound=True)

    def prompt_runner(
        self, model: LlamaModel, dtype: torch.dtype, adapters=(), products_by_fns: bool = False
    ) -> CudaPrompt | None:
        from .cuda_prompt import CudaPrompt

        return CudaPrompt.build(self.eager_inference(), model, dtype, adapters, products_by_fns)

    # -- products -----------------------------------------------------------------------------------

    def _paths(self) -> dict:
        """q8_0_matmul's arguments for how this backend's products choose their path."""
        return dict(host_bound=self.host_bound, dequant_cache=self._wcache, shared_dequant=self.shared_dequant)

    def matmul(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        if not isinstance(w, Q8Weight):
            return x @ w.to(x.dtype).T
        return self._mm.q8_0_matmul(x, w.qs, w.d, **self._paths())

    def matmul_grad_input(self, dy: torch.Tensor, w: Weight) -> torch.Tensor:
        if not isinstance(w, Q8Weight):
            return dy @ w.to(dy.dtype)
        return self._mm.q8_0_matmul_grad_input(
            dy, w.qs, w.d, dequant_cache=self._wcache, shared_dequant=self.shared_dequant
        )

    def lora_linear(
        self,
        x: torch.Tensor,
        w: Weight,
        loras: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
        t: torch.Tensor | None = None,
        prefetch: Prefetch | None = None,
    ) -> torch.Tensor:
        loras = [(a, b, float(s)) for a, b, s in loras if float(s) != 0.0]
        t = t if len(loras) == 1 else None  # t belongs to a single term (and none when its scale is 0)
        if not isinstance(w, Q8Weight):
            return add_lora_terms(x @ w.to(x.dtype).T, x, loras, t)
        kw = dict(self._paths(), prefetch=prefetch)
        if not loras:
            return self._mm.q8_0_matmul(x, w.qs, w.d, **kw)
        (a, b, s), *rest = loras if len(loras) == 1 else self.fuse_loras(loras, x.dtype)
        return add_lora_terms(self._mm.q8_0_matmul(x, w.qs, w.d, a, b, s, lora_t=t, **kw), x, rest)

    def prefetch_hint(self, w: Weight, start: int, nbytes: int, kind: int = 2) -> Prefetch | None:
        """kernels.triton_util.Prefetch for a q8_0 weight (bytes of its qs, and those blocks' scales); None for a
        float weight or no bytes."""
        if not isinstance(w, Q8Weight) or nbytes <= 0:
            return None
        return self._prefetch(w.qs, w.d, start, nbytes, kind)

    def fuse_loras(
        self, loras: Sequence[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """Several adapters as one term for the q8_0 kernels' fused LoRA (up to MAX_FUSED_RANK in all):
        sum_i s_i (x a_i) b_i^T = (x [a_1..a_k]) [s_1 b_1..s_k b_k]^T, the scaled b in fp32 rounded once to dtype;
        the terms beyond that rank after it; the factors in dtype. Terms with scale 0 are dropped."""
        loras = [(a, b, float(s)) for a, b, s in loras if float(s) != 0.0]
        fused, rest, r = [], [], 0
        for a, b, s in loras:
            if r + a.shape[1] <= self._mm.MAX_FUSED_RANK:
                fused.append((a, b, s))
                r += a.shape[1]
            else:
                rest.append((a.to(dtype), b.to(dtype), s))
        if len(loras) == 1 or not fused:  # nothing to join (a lone term keeps its scale)
            return [(a.to(dtype), b.to(dtype), s) for a, b, s in fused] + rest
        a_cat = torch.cat([a.to(dtype) for a, _, _ in fused], dim=1)
        b_cat = torch.cat([(s * b.to(torch.float32)).to(dtype) for _, b, s in fused], dim=1)
        return [(a_cat, b_cat, 1.0), *rest]

    # -- training ops ---------------------------------------------------------------------------------

    def rms_norm_fwd(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._train.rms_norm_fwd(x, w, eps)

    def add_rms_norm_fwd(
        self, h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._train.add_rms_norm_fwd(h, delta, w, eps)

    def rms_norm_bwd(
        self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, dres: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._train.rms_norm_bwd(dy, x, w, rstd, dres)

    def rope_fwd(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        return self._train.rope_fwd(x, cos, sin, inverse)

    def rope_heads(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        n_rot: int,
        out: torch.Tensor,
        inverse: bool = False,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._train.rope_heads(x, cos, sin, n_rot, out, inverse, last)

    def silu_mul_fwd(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self._train.silu_mul_fwd(g, u)

    def silu_mul_bwd(
        self, dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._train.silu_mul_bwd(dy, g, u, out)

    # -- decode ops -----------------------------------------------------------------------------------

    def add_rms_norm(
        self, h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dec.add_rms_norm(h, delta, w, eps)

    def rope_kv_write(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pos: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        n_head: int,
        n_head_kv: int,
    ) -> torch.Tensor:
        return self._dec.rope_kv_write(qkv, cos, sin, pos, cache_k, cache_v, n_head, n_head_kv)

    def attention_decode(
        self,
        q: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        pos: torch.Tensor,
        counters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._dec.attention_decode(q, cache_k, cache_v, pos, counters)

    def greedy_next(
        self,
        logits: torch.Tensor,
        tok: torch.Tensor,
        pos: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
        hist: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._dec.greedy_next(logits, tok, pos, zero, hist)

    def rope_attention_decode(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pos: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        n_head: int,
        n_head_kv: int,
        counters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._dec.rope_attention_decode(qkv, cos, sin, pos, cache_k, cache_v, n_head, n_head_kv, counters)

    # -- lookups --------------------------------------------------------------------------------------

    def embedding(self, w: Weight, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if isinstance(w, Q8Weight):
            return self._mm.q8_0_dequantize(w.qs, w.d, dtype, index=tokens)
        return w[tokens].to(dtype)

    def dequantize(self, w: Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if isinstance(w, Q8Weight):
            return self._mm.q8_0_dequantize(w.qs, w.d, dtype)
        return w.to(dtype)

    # -- optimizer ------------------------------------------------------------------------------------

    def adamw_step(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        m: Sequence[torch.Tensor],
        v: Sequence[torch.Tensor],
        decayed: Sequence[bool],
        hp: AdamHyper,
    ) -> float:
        return self._adam.adamw_step(params, grads, m, v, decayed, hp)
