"""Builds of the Gluon q8_0 matmul for sm_90a without a GPU (tests/test_wgmma.py runs builds() in a fresh process
without TRITON_INTERPRET)."""

from __future__ import annotations

import torch
from lorakit.kernels.q8_0_wgmma import WGMMA_CONFIGS


def _compile(cfg: dict, dtype: str, lora: bool, d_words: bool = True):
    import triton
    from lorakit.kernels.q8_0_wgmma import _q8_wgmma_kernel
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    tdt, gdt = (torch.bfloat16, gl.bfloat16) if dtype == "bf16" else (torch.float16, gl.float16)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    x = torch.zeros(64, 64, dtype=tdt)
    q = torch.zeros(64, 64, dtype=torch.int8)
    xd = TensorDescriptor.from_tensor(x, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gdt))
    qd = TensorDescriptor.from_tensor(q, [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))
    sig = {"x_desc": mangle_type(xd), "q_desc": mangle_type(qd), "d_ptr": "*fp16", "y_ptr": f"*{dtype}",
           "t_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32", "stride_dn": "i32",
           "stride_ym": "i32", "stride_tm": "i32", "stride_bn": "i32", "R": "i32", "scale": "fp32",
           "STAGES": "constexpr", "GROUP_M": "constexpr", "HAS_LORA": "constexpr", "BLOCK_R": "constexpr",
           "D_WORDS": "constexpr", "num_warps": "constexpr"}  # fmt: skip
    consts = {
        "STAGES": cfg["STAGES"],
        "GROUP_M": 8,
        "HAS_LORA": lora,
        "BLOCK_R": 32,
        "D_WORDS": d_words,
        "num_warps": 8,
    }
    src = GluonASTSource(_q8_wgmma_kernel, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})


def builds() -> list[dict]:
    """Every config for bf16 with the largest LoRA tiles (rank 32) and the scales' cp.async ring, and the first
    config for fp16 (scales loaded into registers, K % 64 != 0): what each build produced."""
    cases = [(i, "bf16", True, True) for i in range(len(WGMMA_CONFIGS))] + [(0, "fp16", False, False)]
    out = []
    for i, dtype, lora, d_words in cases:
        k = _compile(WGMMA_CONFIGS[i], dtype, lora, d_words)
        ptx_type = {"bf16": "bf16", "fp16": "f16"}[dtype]
        mma = f"wgmma.mma_async.sync.aligned.m64n{WGMMA_CONFIGS[i]['BLOCK_N']}k16.f32.{ptx_type}.{ptx_type}"
        out.append(dict(cfg=i, dtype=dtype, cubin=bool(k.asm.get("cubin")), shared=k.metadata.shared,
                        wgmma=mma in k.asm["ptx"]))  # fmt: skip
    return out
