"""cpu-torch: every backend op in the most obvious torch. This file is the specification.

Quantized weights are dequantized block by block (a slice of output rows at a time), so no full
float copy of a large weight ever exists, and the slice stays in cache for its matmul.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorakit.model import LlamaModel, apply_rope, rms_norm
from lorakit.quant import Q8Weight, Weight, dequantize

from . import AdamHyper, TermByTermLora

# rows of W dequantized at a time: an 8 MB slice (2 Mi float32 or 4 Mi bf16 values) is large enough
# for an efficient GEMM per slice and small enough that no full float copy of a weight ever exists
_CHUNK_BYTES = 8 << 20


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of the training ops: float32 (model.py's .float()), float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunk(n_in: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(16, _CHUNK_BYTES // max(1, n_in * itemsize))


def _dequant_rows(w: Q8Weight, r0: int, r1: int, buf: torch.Tensor) -> torch.Tensor:
    """W[r0:r1] into buf (int8 -> float copy, then one multiply by the block scales)."""
    out = buf[: r1 - r0]
    out.copy_(w.qs[r0:r1])
    nb = w.qs.shape[1] // 32
    out.view(r1 - r0, nb, 32).mul_(w.d[r0:r1].to(buf.dtype).unsqueeze(-1))
    return out


class CpuTorchBackend(TermByTermLora):
    name = "cpu-torch"
    lora_rank_multiple = 1  # the trainer's padding of LoRA ranks (lora_pack): none, no gain on CPU

    def __init__(self, device: torch.device | str = "cpu", fused_gemv: bool = False):
        """fused_gemv: one- and two-row products with large q8_0 weights through cpu_gemv's compiled loop (the
        inference ops; the same arithmetic up to the order of the float32 sums)."""
        self.device = torch.device(device)
        self.fused_gemv = fused_gemv
        self._inference: CpuTorchBackend | None = None

    def prompt_runner(self, model: LlamaModel, dtype: torch.dtype, adapters=(), products_by_fns: bool = False) -> None:
        return None  # the CPU's prompt goes through the generic forward (torch's ops are its kernels)

    def checkpointed_training(self) -> CpuTorchBackend:
        """The same backend: its products have one path."""
        return self

    def eager_inference(self) -> CpuTorchBackend:
        """The same ops for a generation; decode products through cpu_gemv's fused loop (LORAKIT_CPU_FUSED=0: not)."""
        if self._inference is None:
            from .cpu_gemv import enabled_by_env

            inference = CpuTorchBackend(self.device, fused_gemv=enabled_by_env())
            inference._inference = inference  # its own eager_inference()
            self._inference = inference
        return self._inference

    def matmul(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        if not isinstance(w, Q8Weight):
            return x @ w.to(x.dtype).T
        out_f, n_in = w.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n_in)
        if self.fused_gemv:
            from . import cpu_gemv

            y = cpu_gemv.product(x, w)
            if y is not None:
                return y
        y = torch.empty(x2.shape[0], out_f, dtype=x.dtype, device=x.device)
        step = _row_chunk(n_in, x.dtype)
        buf = torch.empty(min(step, out_f), n_in, dtype=x.dtype, device=x.device)
        for r0 in range(0, out_f, step):
            r1 = min(out_f, r0 + step)
            torch.matmul(x2, _dequant_rows(w, r0, r1, buf).T, out=y[:, r0:r1])
        return y.reshape(*lead, out_f)

    def matmul_grad_input(self, dy: torch.Tensor, w: Weight) -> torch.Tensor:
        if not isinstance(w, Q8Weight):
            return dy @ w.to(dy.dtype)
        out_f, n_in = w.shape
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, out_f)
        dx = torch.zeros(dy2.shape[0], n_in, dtype=dy.dtype, device=dy.device)
        step = _row_chunk(n_in, dy.dtype)
        buf = torch.empty(min(step, out_f), n_in, dtype=dy.dtype, device=dy.device)
        for r0 in range(0, out_f, step):
            r1 = min(out_f, r0 + step)
            dx.addmm_(dy2[:, r0:r1], _dequant_rows(w, r0, r1, buf))
        return dx.reshape(*lead, n_in)

    def prefetch_hint(self, w: Weight, start: int, nbytes: int, kind: int = 2) -> None:
        """None: the CPU ops take no prefetch hints."""
        return None

    def add_rms_norm(
        self, h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """model.block's `h = h + delta` then `rms_norm(h, eps) * w.to(h.dtype)`."""
        s = h if delta is None else h + delta
        return s, rms_norm(s, eps) * w.to(s.dtype)

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
        """decode.py's step: apply_rope to q and k at position pos (a device tensor), k and v to cache row pos."""
        H, Hkv, D = n_head, n_head_kv, cache_k.shape[-1]
        pos = pos.reshape(1)
        c, s = cos.index_select(0, pos), sin.index_select(0, pos)
        q, k, v = qkv.reshape(1, 1, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=2)
        q = apply_rope(q, c, s).transpose(1, 2)
        k = apply_rope(k, c, s).transpose(1, 2)
        cache_k.index_copy_(2, pos, k.to(cache_k.dtype))
        cache_v.index_copy_(2, pos, v.transpose(1, 2).to(cache_v.dtype))
        return q

    def attention_decode(
        self,
        q: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        pos: torch.Tensor,
        counters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """decode.py's step: SDPA over the full static cache with the mask key_pos <= pos."""
        H, Hkv, D = q.shape[1], cache_k.shape[1], q.shape[-1]
        mask = (torch.arange(cache_k.shape[2], device=q.device) <= pos.reshape(1)).view(1, 1, 1, -1)
        kk, vv = cache_k, cache_v
        if Hkv != H:
            kk = kk.repeat_interleave(H // Hkv, dim=1)
            vv = vv.repeat_interleave(H // Hkv, dim=1)
        out = F.scaled_dot_product_attention(q, kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask, scale=1 / math.sqrt(D))
        return out.transpose(1, 2).reshape(1, 1, H * D)

    def greedy_next(
        self,
        logits: torch.Tensor,
        tok: torch.Tensor,
        pos: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
        hist: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tok.view(()).copy_(torch.argmax(logits))
        if hist is not None and 0 <= int(pos) < hist.numel():
            hist[int(pos)] = tok.view(())
        if pos is not None:
            pos.add_(1)
        if zero is not None:
            zero.zero_()
        return tok

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
        """rope_kv_write, then attention_decode."""
        q = self.rope_kv_write(qkv, cos, sin, pos, cache_k, cache_v, n_head, n_head_kv)
        return self.attention_decode(q, cache_k, cache_v, pos, counters)

    # training ops: forward exactly model.py's op sequence, backward the gradient formulas in fp32 (float64
    # inputs compute in float64, for gradcheck)

    def rms_norm_fwd(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """model.block's `rms_norm(h, eps) * w.to(h.dtype)`, and rstd = rsqrt(mean(x^2) + eps) per row."""
        xf = x.to(_acc(x.dtype))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (xf * rstd).to(x.dtype) * w.to(x.dtype), rstd.reshape(-1)

    def add_rms_norm_fwd(
        self, h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """model.block's `h = h + delta`, then rms_norm_fwd(h)."""
        s = h + delta
        return s, *self.rms_norm_fwd(s, w, eps)

    def rms_norm_bwd(
        self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, dres: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n = x*rstd, g = dy*w: dx = rstd * (g - n * mean(g*n)); dw = sum over rows of dy * rnd(n) (fp32)."""
        E, acc = x.shape[-1], _acc(x.dtype)
        xf, dyf = x.reshape(-1, E).to(acc), dy.reshape(-1, E).to(acc)
        r = rstd.reshape(-1, 1).to(acc)
        n = xf * r
        g = dyf * w.to(x.dtype).to(acc)
        dx = (r * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype).reshape(x.shape)
        if dres is not None:
            dx = dx + dres
        return dx, (dyf * n.to(x.dtype).to(acc)).sum(0)

    def rope_fwd(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """model.apply_rope's sequence (pairs (x0, x1) -> (x0*c - x1*s, x0*s + x1*c)); inverse: s -> -s."""
        acc = _acc(x.dtype)
        xp = x.to(acc).unflatten(-1, (-1, 2))
        x0, x1 = xp[..., 0], xp[..., 1]
        c = cos.to(acc)[None, :, None, :]
        s = sin.to(acc)[None, :, None, :]
        if inverse:
            s = -s
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)

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
        """out[..., :D] = rope_fwd on the first n_rot heads, the rest copied; out[..., D:] = 0; last = the last
        heads of out[..., :D]."""
        D = x.shape[-1]
        out[..., D:] = 0
        out[:, :, :n_rot, :D] = self.rope_fwd(x[:, :, :n_rot], cos, sin, inverse)
        out[:, :, n_rot:, :D] = x[:, :, n_rot:]
        if last is not None:
            last.copy_(out[:, :, out.shape[2] - last.shape[2] :, :D])
        return out

    def silu_mul_fwd(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """model.feed_forward's F.silu(gate) * up, on g and u as given (torch's CPU silu takes a scalar exp on
        the tail of each contiguous run, so its last bits depend on the layout: the decode step passes the
        same column views of the packed [gate | up] as the model's forward)."""
        return F.silu(g) * u

    def silu_mul_bwd(
        self, dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sig = 1/(1 + exp(-g)): du = dy * rnd(silu(g)), dg = dy * u * sig * (1 + g * (1 - sig)) in fp32."""
        acc = _acc(g.dtype)
        gf, uf, dyf = g.to(acc), u.to(acc), dy.to(acc)
        sig = 1.0 / (1.0 + torch.exp(-gf))
        du = (dyf * F.silu(g).to(acc)).to(g.dtype)
        dg = (dyf * uf * sig * (1.0 + gf * (1.0 - sig))).to(g.dtype)
        if out is not None:
            out[0].copy_(dg)
            out[1].copy_(du)
            return out
        return dg, du

    def embedding(self, w: Weight, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if isinstance(w, Q8Weight):
            return w.rows(tokens, dtype)
        return w[tokens].to(dtype)

    def adamw_step(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        m: Sequence[torch.Tensor],
        v: Sequence[torch.Tensor],
        decayed: Sequence[bool],
        hp: AdamHyper,
    ) -> float:
        """ggml_opt_adam's update, op for op in float32 (spec §4.2)."""
        # global norm: float products summed in double
        sq = sum(float((g * g).double().sum()) for g in grads)
        norm = math.sqrt(sq)
        factor = 1.0
        if hp.gclip > 0 and norm > hp.gclip:
            factor = float(torch.tensor(hp.gclip / norm, dtype=torch.float32))
        f32 = torch.float32
        beta1 = torch.tensor(hp.beta1, dtype=f32)
        beta2 = torch.tensor(hp.beta2, dtype=f32)
        t = hp.t
        h1 = torch.tensor(hp.alpha, dtype=f32) * torch.tensor(hp.sched, dtype=f32)
        h1 = h1 / (1.0 - torch.pow(beta1, torch.tensor(float(t), dtype=f32)))
        h2 = 1.0 / (1.0 - torch.pow(beta2, torch.tensor(float(t), dtype=f32)))
        dec = (torch.tensor(hp.decay, dtype=f32) * torch.tensor(hp.alpha, dtype=f32)) * torch.tensor(
            hp.sched, dtype=f32
        )
        one = torch.tensor(1.0, dtype=f32)
        for x, g, mi, vi, dk in zip(params, grads, m, v, decayed, strict=False):
            gi = g * torch.tensor(factor, dtype=f32) if factor != 1.0 else g
            mi.mul_(beta1).add_(gi * (one - beta1))
            vi.mul_(beta2).add_(gi * gi * (one - beta2))
            num = mi * h1
            den = torch.sqrt(vi * h2) + torch.tensor(hp.eps, dtype=f32)
            keep = (one - dec) if dk else one
            x.data.mul_(keep).sub_(num / den)
        return norm

    def dequantize(self, w: Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(w, dtype)
