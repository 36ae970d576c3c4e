"""The backend interface: pure functions over tensors that the model and trainer call.

`cpu-torch` is the executable specification; `cuda-triton` implements the same ops with fused
Triton kernels and is checked against it. Pick one with get_backend("auto" | "cpu-torch" | "cuda-triton").

Conventions (shared by every backend):
  * a weight W is a `Q8Weight` (int8 qs [out, in] + fp16 d [out, in/32]) or a float tensor [out, in];
  * LoRA factors are stored as llama.cpp stores them: a = lora_a as an (in, r) array, b = lora_b as
    an (out, r) array, so the delta is  dW(out, in) = b @ a.T  and  y = x @ W.T + s * (x @ a) @ b.T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from lorakit.errors import UsageError
from lorakit.kernels import triton_release
from lorakit.quant import Weight

if TYPE_CHECKING:
    from lorakit.model import LlamaModel

BACKEND_NAMES = ("auto", "cpu-torch", "cuda-triton")


@dataclass(frozen=True)
class AdamHyper:
    """One AdamW update, llama.cpp semantics (ggml_opt_adam)."""

    alpha: float  # peak learning rate
    decay: float  # weight decay, relative to the learning rate
    beta1: float
    beta2: float
    eps: float  # added after the square root
    gclip: float  # global-norm clip; 0 disables
    sched: float  # schedule factor for this update
    t: int  # 1-based iteration number after the increment


def add_lora_terms(
    y: torch.Tensor,
    x: torch.Tensor,
    loras: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """y + sum_i s_i * (x @ a_i) @ b_i.T in x's dtype, term by term (t: x @ a_1, already formed)."""
    for i, (a, b, s) in enumerate(loras):
        xa = x @ a.to(x.dtype) if t is None or i else t.view(*x.shape[:-1], -1)
        y = y + s * (xa @ b.to(x.dtype).T)
    return y


class TermByTermLora:
    """lora_linear and fuse_loras of a backend that adds the LoRA terms one by one after its own matmul."""

    def lora_linear(
        self,
        x: torch.Tensor,
        w: Weight,
        loras: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
        t: torch.Tensor | None = None,
        prefetch: object | None = None,
    ) -> torch.Tensor:
        return add_lora_terms(self.matmul(x, w), x, loras, t)

    def fuse_loras(
        self, loras: Sequence[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """Term by term, as lora_linear adds them, the factors already in dtype (as add_lora_terms casts them)."""
        return [(a.to(dtype), b.to(dtype), s) for a, b, s in loras]


class Backend(Protocol):
    name: str
    device: torch.device
    lora_rank_multiple: int  # the trainer pads LoRA ranks to a multiple of it (lora_pack; zero columns: exact)

    def checkpointed_training(self) -> Backend:
        """The same ops and numbers, for a training step with activation checkpointing (each layer's forward runs
        twice, its input gradients right after the recompute): may choose its products' paths for that."""

    def eager_inference(self) -> Backend:
        """The same ops and numbers, for eager host-bound work (a prefill): may prefer fewer launches."""

    def prompt_runner(
        self, model: LlamaModel, dtype: torch.dtype, adapters=(), products_by_fns: bool = False
    ) -> object | None:
        """A lean runner of a prompt's forward with the generic forward's numbers (with these adapters; its calls take
        the generation's lora.model_fns, and with products_by_fns every product through them), or None where the
        backend has none: cuda-triton's CudaPrompt (its build says where it applies)."""

    def matmul(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        """x [..., in] @ W.T -> [..., out], float32 accumulation, result in x's dtype."""

    def matmul_grad_input(self, dy: torch.Tensor, w: Weight) -> torch.Tensor:
        """dy [..., out] @ W -> [..., in] (the base is frozen: no weight gradient)."""

    def lora_linear(
        self,
        x: torch.Tensor,
        w: Weight,
        loras: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
        t: torch.Tensor | None = None,
        prefetch: object | None = None,
    ) -> torch.Tensor:
        """x @ W.T + sum_i s_i * (x @ a_i) @ b_i.T (no autograd: inference, and LoraLinear's forward).
        t: x @ a_1 in x's dtype, [rows, r], already formed for a single term (LoraLinear keeps it for db).
        prefetch: a prefetch_hint for the product after this one (decode: its launch's last programs request it)."""

    def prefetch_hint(self, w: Weight, start: int, nbytes: int, kind: int = 2) -> object | None:
        """A hint a product can carry (lora_linear's prefetch=): ask the memory system for bytes [start, start +
        nbytes) of w's storage as the product ends, so that the product after it finds them cached; no effect on
        any result. None where the backend has no such thing."""

    def fuse_loras(
        self, loras: Sequence[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """The terms as lora_linear combines them for x of `dtype`, formed ahead for products whose adapters do
        not change (a generation): lora_linear(x, w, fuse_loras(loras, x.dtype)) == lora_linear(x, w, loras)."""

    def add_rms_norm(
        self, h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, y): s = h + delta (h when delta is None), y = rms_norm(s, eps) * w, in h's dtype (model.block)."""

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
        """One token's [q | k | v]: RoPE on q, k at device position pos; k, v into cache row pos; q [1, H, 1, D]."""

    def attention_decode(
        self,
        q: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        pos: torch.Tensor,
        counters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [1, H, 1, D] attending over cache rows 0..pos (GQA), scale 1/sqrt(D) -> [1, 1, H*D] in q's dtype.
        counters: int32 zeros (>= H) a GPU launch may use and leaves zero (kept by a caller that replays the
        step, instead of a memset per launch); ignored where not needed."""

    def greedy_next(
        self,
        logits: torch.Tensor,
        tok: torch.Tensor,
        pos: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
        hist: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A greedy decode step's end, written in place (a captured step's state): tok (one int64 element) =
        torch.argmax(logits) of the 1-D logits (the first index of the largest value), pos (one int64 element) += 1,
        zero (a float32 buffer) = 0, hist (int64 [n], with pos) [pos before the increment] = tok when that position
        is in [0, n); returns tok."""

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
        """attention_decode(rope_kv_write(qkv, cos, sin, pos, cache_k, cache_v, n_head, n_head_kv), cache_k, cache_v,
        pos, counters): the decode step's RoPE, cache write and attention (one launch on cuda-triton)."""

    def rms_norm_fwd(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, rstd): y = rms_norm(x, eps) * w.to(x.dtype) as model.block; rstd fp32 [rows] = 1/rms for the backward."""

    def add_rms_norm_fwd(
        self, h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, y, rstd): s = h + delta in h's dtype (a residual sum), then rms_norm_fwd of s."""

    def rms_norm_bwd(
        self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, dres: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx in x's dtype, dw fp32 [E]): rms_norm_fwd's gradient (rounding of the normed x as identity);
        dres: x's gradient along another use, added to dx in x's dtype (as autograd adds it)."""

    def rope_fwd(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """model.apply_rope on x [B, T, H, D] with cos/sin [T, D/2]; inverse=True turns by -theta (the backward)."""

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
        """out[..., :D] = rope_fwd of x's first n_rot heads, x's other heads unchanged; out[..., D:] = 0.
        x [B, T, H, D], out [B, T, H, W >= D] (views into packed or padded buffers). last [B, T, Hl, D]: also
        gets out[:, :, H - Hl:, :D] (a prompt's k and v into a KV cache). Returns out."""

    def silu_mul_fwd(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """F.silu(g) * u as model.feed_forward (silu rounded to the dtype, then the product)."""

    def silu_mul_bwd(
        self, dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dg, du) in g's dtype: silu_mul_fwd's gradient, fp32 math rounded once; written into out if given."""

    def embedding(self, w: Weight, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows of W selected by tokens, dequantized."""

    def adamw_step(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        m: Sequence[torch.Tensor],
        v: Sequence[torch.Tensor],
        decayed: Sequence[bool],
        hp: AdamHyper,
    ) -> float:
        """In-place AdamW over all tensors (global clip, decay only where decayed[i]); returns the grad norm."""

    def dequantize(self, w: Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight (for merges, exports and as a test oracle)."""


TRITON_MIN = (3, 6)  # the triton release the kernels are written and tested for


def triton_version_problem(version: str) -> str | None:
    """None when this triton release can run the kernels (>= TRITON_MIN), else why not (one line)."""
    found = triton_release(version)
    if found is None:
        return f"cannot read the triton version {version!r}"
    if found < TRITON_MIN:
        want = ".".join(map(str, TRITON_MIN))
        return f"the kernels need triton >= {want}, found {version} (pip install 'lorakit[triton]')"
    return None


def cuda_triton_available() -> tuple[bool, str]:
    """Whether cuda-triton can run here, and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch"
    try:
        import triton
    except ImportError:
        return False, "the triton package is not installed (pip install 'lorakit[triton]')"
    why = triton_version_problem(triton.__version__)
    return (False, why) if why else (True, "")


def get_backend(name: str = "auto") -> Backend:
    if name not in BACKEND_NAMES:
        raise UsageError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        ok, _ = cuda_triton_available()
        name = "cuda-triton" if ok else "cpu-torch"
    if name == "cpu-torch":
        from .cpu_torch import CpuTorchBackend

        return CpuTorchBackend()
    ok, why = cuda_triton_available()
    if not ok:
        raise UsageError(f"--backend cuda-triton cannot run here: {why}")
    from .cuda_triton import CudaTritonBackend

    return CudaTritonBackend()
