"""One training micro-step (lorakit.train.loss_and_backward: forward, ggml cross-entropy, backward) on the
cuda-triton backend — packed q/k/v and gate/up weights with block-diagonal LoRA terms, fused RMSNorm /
RoPE / SiLU*up, q8_0 kernels; Triton's CPU interpreter without a GPU — against the cpu-torch spec path
(member-by-member products, model.py's torch ops), on tiny random q8_0 llamas with all 12 LoRA kinds: one
with GQA, one with as many key as query heads and head size 12 (the fused attention: flash on heads padded
to 16, gradients straight into the packed q/k/v product).

Tolerance (float32): both paths do the same arithmetic in another association (fused LoRA terms,
one packed product instead of three, fp32 reductions in the kernels' order), so every intermediate
moves by a few fp32 ulps relative to its magnitude (<= K * 2^-24 ~ 6e-6 for K <= 96 here). The loss
(a mean of logs) and the LoRA gradients pass through ~2 layers of such ops: we allow 1e-5 relative to
each tensor's largest magnitude.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from test_decode import ARGS, MHA_ARGS, _model  # noqa: E402

from lorakit.backends.cpu_torch import CpuTorchBackend  # noqa: E402
from lorakit.lora import LoraRanks, lora_shapes  # noqa: E402
from lorakit.lora_init import init_lora  # noqa: E402
from lorakit.model import pack_fused, rope_tables  # noqa: E402
from lorakit.train import loss_and_backward  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _triton():
    pytest.importorskip("triton")
    from lorakit.backends.cuda_triton import CudaTritonBackend
    from lorakit.kernels import q8_0_matmul

    if not CUDA and not q8_0_matmul.interpreting():
        pytest.skip("lorakit.kernels was imported before TRITON_INTERPRET=1 was set")
    return CudaTritonBackend(DEVICE)


def _step(model, backend, lora, ckpt: bool, shape=(2, 9)):
    dev, args = backend.device, model.args
    params = {n: (a.clone().to(dev).requires_grad_(), b.clone().to(dev).requires_grad_()) for n, (a, b) in lora.items()}
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, args.n_vocab, shape, generator=g).to(dev)
    y = torch.randint(0, args.n_vocab, shape, generator=g).to(dev)
    loss = loss_and_backward(model, backend, params, torch.float32, rope_tables(args, shape[1], dev), x, y, ckpt)
    grads = {(n, h): t.grad.cpu() for n, ab in params.items() for h, t in zip("ab", ab, strict=True)}
    return float(loss), grads


@pytest.mark.parametrize(
    "ckpt,off,args",
    [
        (False, {}, ARGS),
        (True, {}, ARGS),
        (False, {"attn_k": 0, "ffn_up": 0}, ARGS),  # packed members without a LoRA
        (False, {}, MHA_ARGS),
        (True, {"attn_k": 0}, MHA_ARGS),
    ],
)
def test_train_step_cuda_triton_matches_spec(ckpt, off, args):
    tri = _triton()
    lora = init_lora(lora_shapes(args, LoraRanks.default(3, **off)), seed=7)
    # llama.cpp starts b at zero; give b values so every path's gradient is non-trivial
    gen = torch.Generator().manual_seed(3)
    lora = {n: (a, torch.randn(b.shape, generator=gen) * 0.1) for n, (a, b) in lora.items()}
    base = _model(args)
    loss_ref, g_ref = _step(base, CpuTorchBackend(), lora, ckpt)
    packed = pack_fused(base.to(DEVICE))
    assert packed.fused
    loss, g = _step(packed, tri, lora, ckpt)
    assert_step_close(loss, g, loss_ref, g_ref, lora)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="256 rows through the interpreter take minutes")
@pytest.mark.parametrize("ckpt", [False, True])
def test_train_step_256_rows_matches_spec(ckpt):
    """The step at 4 x 64 = 256 rows, where dequantize + cuBLAS is a candidate: with checkpointing every product on
    it (checkpointed_training: the recompute and the input gradient share one dequantized copy), without it the
    chooser's paths; the spec's loss and gradients either way."""
    tri = _triton()
    lora = init_lora(lora_shapes(ARGS, LoraRanks.default(3)), seed=7)
    gen = torch.Generator().manual_seed(3)
    lora = {n: (a, torch.randn(b.shape, generator=gen) * 0.1) for n, (a, b) in lora.items()}
    base = _model(ARGS)
    loss_ref, g_ref = _step(base, CpuTorchBackend(), lora, ckpt, (4, 64))
    loss, g = _step(pack_fused(base.to(DEVICE)), tri, lora, ckpt, (4, 64))
    assert_step_close(loss, g, loss_ref, g_ref, lora)


def assert_step_close(loss, g, loss_ref, g_ref, lora) -> None:
    """Loss and every LoRA gradient within 1e-5 of the reference's magnitude (the module docstring)."""
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref)
    for key, ref in g_ref.items():
        err = (g[key] - ref).abs().max().item()
        mag = ref.abs().max().item()
        name, half = key
        if "norm" in name and half == "b":
            # a norm's b (1, 1) gets db = sum_e dgain_e * a_e, a sum that cancels: its natural scale is
            # sum|a| * max|dgain|, with dgain = da / b (rank 1)
            a, b = lora[name]
            mag = a.abs().sum().item() * g_ref[(name, "a")].abs().max().item() / abs(b.item())
        assert err <= 1e-5 * mag, f"{key}: {err:.3g} vs scale {mag:.3g}"
