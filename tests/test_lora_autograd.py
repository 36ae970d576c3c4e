"""lora_pack: the trainer's LoRA tensors cast, packed (block-diagonal terms of packed weights) and padded to the
backend's rank multiple by one gather. Its terms and its gradients equal those of the tensor-by-tensor path
(cast, cat, block_diag, zero padding: torch's own autograd) exactly, since both only move numbers; and a
training step with padded and packed terms equals the spec's step up to the order of fp32 sums."""

from __future__ import annotations

import pytest
import torch
from test_decode import ARGS, _model
from test_train_step_backends import _step, assert_step_close

from lorakit.backends.cpu_torch import CpuTorchBackend
from lorakit.lora import LoraRanks, kind_of, lora_shapes
from lorakit.lora_init import init_lora
from lorakit.lora_pack import pack_lora
from lorakit.model import FUSED_KINDS, pack_fused

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _lora(off: dict, rank: int = 3, seed: int = 7):
    lora = init_lora(lora_shapes(ARGS, LoraRanks.default(rank, **off)), seed=seed)
    g = torch.Generator().manual_seed(3)
    return {n: (a, torch.randn(b.shape, generator=g) * 0.1) for n, (a, b) in lora.items()}


def _pad(t: torch.Tensor, m: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, -t.shape[1] % m))


def _reference(params, model, m: int, dtype):
    """The tensor-by-tensor path: cast, cat / block_diag for packed weights, zero columns."""
    cast = {n: (a.to(dtype), b.to(dtype)) for n, (a, b) in params.items()}
    pairs, packed, used = {}, {}, set()
    for name in model.fused:
        _, i, kind = name.split(".")
        members = [f"blk.{i}.{k}.weight" for k in FUSED_KINDS[kind]]
        if not any(x in cast for x in members):
            continue
        used.update(members)
        a = torch.cat([cast[x][0] for x in members if x in cast], dim=1)
        blocks = [cast[x][1] if x in cast else a.new_zeros(model.tensors[x].shape[0], 0) for x in members]
        packed[name] = (_pad(a, m), _pad(torch.block_diag(*blocks), m))
    for n, (a, b) in cast.items():
        if n not in used:
            mm = 1 if kind_of(n) in ("attn_norm", "ffn_norm", "output_norm", "token_embd") else m
            pairs[n] = (_pad(a, mm), _pad(b, mm))
    return pairs, packed


@pytest.mark.parametrize("m,dtype", [(8, torch.bfloat16), (8, torch.float32), (1, torch.bfloat16)])
@pytest.mark.parametrize("off", [{}, {"attn_k": 0, "ffn_up": 0}, {"attn_q": 0, "attn_k": 0, "attn_v": 0}])
def test_pack_lora_equals_tensor_by_tensor(m, dtype, off):
    model = pack_fused(_model())
    assert model.fused
    lora = _lora(off)
    runs = []
    for fn in (lambda p: pack_lora(p, model, m, dtype), lambda p: _reference(p, model, m, dtype)):
        params = {n: (a.clone().requires_grad_(), b.clone().requires_grad_()) for n, (a, b) in lora.items()}
        pairs, packed = fn(params)
        outs = {**{(n, "pair"): ab for n, ab in pairs.items()}, **{(n, "packed"): ab for n, ab in packed.items()}}
        g = torch.Generator().manual_seed(11)
        loss = sum((t.float() * torch.randn(t.shape, generator=g)).sum() for k in sorted(outs) for t in outs[k])
        loss.backward()
        runs.append((outs, {n: (a.grad, b.grad) for n, (a, b) in params.items()}))
    (got, got_g), (ref, ref_g) = runs
    assert got.keys() == ref.keys()
    for k in got:
        for x, y in zip(got[k], ref[k], strict=True):
            assert x.dtype == dtype and x.shape == y.shape and torch.equal(x, y), k
            assert x.shape[1] % m == 0 or k[0].split(".")[-2] in ("attn_norm", "ffn_norm", "output_norm", "token_embd")
    for n in ref_g:
        for x, y in zip(got_g[n], ref_g[n], strict=True):
            assert x.dtype == torch.float32 and torch.equal(x, y), n


class _Padding(CpuTorchBackend):
    lora_rank_multiple = 8


class _Recording(CpuTorchBackend):
    """cpu-torch recording which of itself and its checkpointed_training() form computed the step's products."""

    def __init__(self, log: set, form: str = "plain"):
        super().__init__()
        self.log, self.form = log, form

    def checkpointed_training(self):
        return _Recording(self.log, "checkpointed")

    def lora_linear(self, *args, **kw):
        self.log.add(("fwd", self.form))
        return super().lora_linear(*args, **kw)

    def matmul_grad_input(self, *args, **kw):
        self.log.add(("grad", self.form))
        return super().matmul_grad_input(*args, **kw)


@pytest.mark.parametrize("ckpt", [False, True])
def test_train_step_products_run_on_the_checkpointed_form_when_checkpointing(ckpt):
    """loss_and_backward computes every product, forward and input gradient, on backend.checkpointed_training()
    exactly when it checkpoints the layers (cuda-triton's form shares dequantized weights between the recompute and
    the gradient), and the numbers are the spec's."""
    log: set = set()
    lora = _lora({})
    loss, g = _step(_model(), _Recording(log), lora, ckpt)
    form = "checkpointed" if ckpt else "plain"
    assert log == {("fwd", form), ("grad", form)}
    loss_ref, g_ref = _step(_model(), CpuTorchBackend(), lora, ckpt)
    assert loss == loss_ref and all(torch.equal(g[k], g_ref[k]) for k in g_ref)


@pytest.mark.parametrize("ckpt", [False, True])
def test_train_step_with_packed_padded_terms_matches_spec(ckpt):
    """cpu-torch on the packed model with ranks padded to 8 vs the spec (unpacked, rank 3): same loss and
    gradients up to fp32 reassociation (the bound of test_train_step_backends)."""
    lora = _lora({"attn_k": 0})
    base = _model()
    loss_ref, g_ref = _step(base, CpuTorchBackend(), lora, ckpt)
    loss, g = _step(pack_fused(base), _Padding(), lora, ckpt)
    assert_step_close(loss, g, loss_ref, g_ref, lora)
