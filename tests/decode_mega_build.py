"""Builds of the decode megakernel (kernels/decode_mega.py) for sm_90a without a GPU: tests/test_decode_mega.py runs
builds() in a fresh process without TRITON_INTERPRET."""

from __future__ import annotations

import re

import torch

NO_LORA = dict(R=(0,) * 5, RP=(1,) * 5, LOFF=(0,) * 10, RT=1, TSL=(1,) * 5, TR=(64,) * 5)
STEP_3B = dict(S=(13, 7, 13, 17, 13), E=3200, F=8640, V=32000, H=32, HKV=32, D=100, SA=4)
LORA_3B = dict(R=(24, 8, 16, 8, 0), RP=(32, 8, 16, 8, 1), LOFF=(0, 1, 2, 3, 0, 4, 5, 6, 7, 0), RT=32)
LORA_3B.update(TSL=(32, 32, 32, 128, 1), TR=(64, 32, 128, 32, 32))  # the launcher's rows of B per round
SMALL = dict(S=(1, 1, 1, 1, 1), E=64, F=96, V=120, H=4, HKV=2, D=16, SA=4)
LORA_SMALL = dict(R=(8, 3, 6, 3, 3), RP=(8, 4, 8, 4, 4), LOFF=tuple(range(10)), RT=32, TSL=(1,) * 5, TR=(32,) * 5)
CASES = [  # (dims, cache dtype): the open_llama_3b step (bench/predict_gpu.py's shape) without adapters and with two
    # rank-4 adapters on the 7 matrices (bench/predict_gpu.two_adapters), tests' small GQA model with adapters on all
    (dict(STEP_3B, **NO_LORA), "bf16"),
    (dict(STEP_3B, **LORA_3B), "bf16"),
    (dict(SMALL, **LORA_SMALL), "fp32"),
]


def _compile(dims: dict, cache: str):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from lorakit.kernels import decode_mega as km

    qlay = gl.NVMMASharedLayout.get_default_for([km.BLOCK_N_ROWS, km.BKB], gl.int8)
    flat16 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    q = torch.zeros(1024, km.BKB, dtype=torch.int8)
    d = torch.zeros(64, 256, dtype=torch.float16)
    boxes = {
        "q": TensorDescriptor.from_tensor(q, [km.BLOCK_N_ROWS * 256 // km.BKB, km.BKB], qlay),
        "qt": TensorDescriptor.from_tensor(q, [km.BLOCK_N_ROWS, km.BKB], qlay),
        "d": TensorDescriptor.from_tensor(d, [km.BLOCK_N_ROWS * 8 // 256, 256], flat16),
    }
    sig = {"h_ptr": "*fp32", "y32_ptr": "*fp32", "logits_ptr": "*fp32", "ws_ptr": "*fp32", "cache_ptr": f"*{cache}",
           "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64", "g_ptr": "*fp32", "lora_ptr": "*fp32",
           "t_ptr": "*fp32"}  # fmt: skip
    for kind in ("q", "qt", "d"):
        sig.update({f"{kind}{i}": mangle_type(boxes[kind]) for i in range(5)})
    sig.update({"sync_ptr": "*i32", "L": "i32", "n_ctx": "i32", "eps": "fp32", "qk_scale": "fp32"})
    lora = dict(TG=km.TG, LNW=km.LNW, LREG=km.LREG[km.LNW])  # the launcher's defaults
    consts = dict(**dims, BLOCK_T=km.BLOCK_T, STAGES=km.STAGES, PROBE=0, **lora)
    consts.update(KPS=km.KPS, PDL=True)
    sig.update({k: "constexpr" for k in consts})
    sig.update({"trace_ptr": "*i64", "TRACE": "constexpr", "num_warps": "constexpr"})
    consts.update(TRACE=False, num_warps=km.WARPS)
    # the launch's specialization: every pointer argument 16-byte aligned (torch's allocations are)
    names = km._decode_step_kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}
    src = GluonASTSource(km._decode_step_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": km.WARPS, "launch_pdl": True})


def builds() -> list[dict]:
    """Per case: whether a cubin came out, its shared memory, and the int8 tensor-core products and TMA copies in
    the PTX."""
    out = []
    for dims, cache in CASES:
        k = _compile(dims, cache)
        ptx = k.asm["ptx"]
        imma = r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32"
        tma = r"cp\.async\.bulk\.tensor"
        counts = dict(imma=len(re.findall(imma, ptx)), tma=len(re.findall(tma, ptx)))
        out.append(dict(E=dims["E"], lora=any(dims["R"]), cache=cache, cubin=bool(k.asm.get("cubin")),
                        shared=k.metadata.shared, **counts))  # fmt: skip
    return out
