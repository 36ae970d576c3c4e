"""Builds of the Gluon q8_0 matmuls for sm_90a without a GPU (tests/test_wgmma.py runs builds() in a fresh process
without TRITON_INTERPRET), and a check of the register-operand kernel's SASS (hgmma_a_hazards)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch

from lorakit.kernels.q8_0_wgmma import RS_CONFIGS, WGMMA_CONFIGS, WS_CONFIGS, WS_GRAD_CONFIGS

CONFIGS = WGMMA_CONFIGS + RS_CONFIGS + WS_CONFIGS + WS_GRAD_CONFIGS


def _compile(cfg: dict, dtype: str, lora: bool, d_words: bool = True):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from lorakit.kernels.q8_0_wgmma import _q8_wgmma_kernel, _q8_wgmma_rs_kernel, _q8_wgmma_ws_kernel

    tdt, gdt = (torch.bfloat16, gl.bfloat16) if dtype == "bf16" else (torch.float16, gl.float16)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    x = torch.zeros(64, 64, dtype=tdt)
    q = torch.zeros(64, 128, dtype=torch.int8)
    qbox = [bk, bn] if cfg.get("GRAD") else [bn, bk]  # the input gradient reads W's [BLOCK_K rows, 128] tiles
    xd = TensorDescriptor.from_tensor(x, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gdt))
    qd = TensorDescriptor.from_tensor(q, qbox, gl.NVMMASharedLayout.get_default_for(qbox, gl.int8))
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
    kernel = _q8_wgmma_kernel
    if cfg.get("RS") or cfg.get("WS"):  # K % 64 == 0 only: the scales always come as words
        kernel = _q8_wgmma_ws_kernel if cfg.get("WS") else _q8_wgmma_rs_kernel
        del sig["D_WORDS"], consts["D_WORDS"]
    if cfg.get("GRAD"):
        sig["GRAD"], consts["GRAD"], consts["HAS_LORA"] = "constexpr", True, False
    consts["num_warps"] = 4 if cfg.get("WS") else 8  # the WS kernel's default partition: one warpgroup
    src = GluonASTSource(kernel, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": consts["num_warps"]})


def _sass(cubin: bytes) -> str:
    from triton.backends.nvidia import compiler

    nvdisasm = os.path.join(os.path.dirname(compiler.__file__), "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


_INSTR = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;")
_NO_REG_DEST = ("HGMMA", "ST", "BAR", "BRA", "SYNCS", "UTMA", "LDGSTS", "WARPGROUP", "DEPBAR", "RED", "EXIT", "NOP")


def _written(op: str, args: str) -> set[int]:
    """The general registers an instruction writes (its first operand), as far as the A-operand check needs."""
    if op.startswith(_NO_REG_DEST):
        return set()
    m = re.match(r"R(\d+)\b", args)
    if not m:
        return set()
    width = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op or op[0] == "D") else 1
    return set(range(int(m.group(1)), int(m.group(1)) + width))


def hgmma_a_hazards(sass: str) -> list[str]:
    """Instructions that write a register an in-flight HGMMA reads as its operand A, in every loop that issues
    HGMMAs (the loop body scanned twice, so that groups issued late in an iteration meet the next one's writes).
    A group is the HGMMAs up to one marked gsb0; WARPGROUP.DEPBAR.LE gsb0, n retires the oldest until n remain."""
    lines = [ln.strip() for ln in sass.splitlines()]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"\.L_x_\d+:$", ln)}
    found = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA `?\((\.L_x_\d+)\)", ln)
        if not m or labels.get(m.group(1), i) >= i:
            continue  # a forward branch
        body = lines[labels[m.group(1)] : i + 1]
        if not any("HGMMA" in b for b in body):
            continue
        in_flight: list[set[int]] = []
        open_group: set[int] = set()
        for n, b in enumerate(body + body):
            im = _INSTR.search(b)
            if not im:
                continue
            op, args = im.groups()
            if op.startswith("HGMMA"):
                a = re.match(r"R\d+, R(\d+),", args)
                if a:
                    open_group |= set(range(int(a.group(1)), int(a.group(1)) + 4))
                if "gsb0" in args:
                    in_flight.append(open_group)
                    open_group = set()
                continue
            d = re.match(r"WARPGROUP\.DEPBAR\.LE", op + " ")
            if d:
                keep = int(re.search(r"0x([0-9a-f]+)", args).group(1), 16)
                in_flight = in_flight[len(in_flight) - keep :] if keep else []
                continue
            hit = _written(op, args) & set().union(open_group, *in_flight)
            if hit and n >= len(body):
                found.append(f"{b}  (writes R{min(hit)} of an in-flight HGMMA's operand A)")
    return found


def builds() -> list[dict]:
    """Every config for bf16 with the largest LoRA tiles (rank 32) and the scales' cp.async ring, the first of the
    shared-memory and register-operand kernels for fp16 (the former with the scales loaded into registers,
    K % 64 != 0): what each build produced, with the register-operand kernels' SASS hazards."""
    cases = [(i, "bf16", True, True) for i in range(len(CONFIGS))]
    cases += [(0, "fp16", False, False), (len(WGMMA_CONFIGS), "fp16", False, True)]
    cases += [(len(CONFIGS) - len(WS_GRAD_CONFIGS), "fp16", False, True)]
    out = []
    for i, dtype, lora, d_words in cases:
        cfg = CONFIGS[i]
        k = _compile(cfg, dtype, lora, d_words)
        t = {"bf16": "bf16", "fp16": "f16"}[dtype]
        regs = bool(cfg.get("RS") or cfg.get("WS"))
        if regs:  # y.T = W @ x.T: instruction N = BLOCK_M, operand A four registers
            mma = rf"\.m64n{cfg['BLOCK_M']}k16\.f32\.{t}\.{t} \{{[^}}]*\}}, \{{%r\d+(,%r\d+){{3}}\}}, %rd"
        else:
            mma = rf"\.m64n{cfg['BLOCK_N']}k16\.f32\.{t}\.{t} "
        cubin = k.asm.get("cubin")
        hazards = hgmma_a_hazards(_sass(cubin)) if regs and cubin else []
        wgmma = bool(re.search("wgmma.mma_async.sync.aligned" + mma, k.asm["ptx"]))
        out.append(dict(cfg=i, rs=regs, grad=bool(cfg.get("GRAD")), dtype=dtype, cubin=bool(cubin),
                        shared=k.metadata.shared, wgmma=wgmma, hazards=hazards))  # fmt: skip
    return out
