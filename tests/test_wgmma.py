"""The Gluon q8_0 matmul (kernels/q8_0_wgmma.py) and its place among the product's paths.

Gluon kernels cannot run under triton's interpreter: on the CPU (CI) the kernels are compiled for sm_90a for every
config (each must build and fit the H200's shared memory, and the register-operand kernel's SASS must leave an
in-flight wgmma's operand A alone); on a GPU (marker gpu) its products are checked against
cpu-torch with the derived bounds of test_kernels.py, forced configs and the measured one, odd shapes, LoRA ranks
up to 32, bf16 and fp16, and in a CUDA graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.kernels import q8_0_matmul as qmm
from lorakit.kernels.q8_0_wgmma import RS_CONFIGS, WGMMA_CONFIGS, WS_CONFIGS, WS_GRAD_CONFIGS, configs_for
from tests.test_kernels import assert_gpu_grad_input, assert_gpu_matmul, make_weight, needs_gpu, on, rand
from tests.wgmma_build import CONFIGS, hgmma_a_hazards

gpu = pytest.mark.gpu
SMEM_SM90 = 232448  # bytes of shared memory a block may use on sm_90 (227 KB)


@pytest.fixture(scope="module")
def builds() -> list[dict]:
    """tests.wgmma_build.builds() in a fresh process without TRITON_INTERPRET: the interpreter, once it has run
    triton kernels in this process, leaves triton.language patched for its own use, and Gluon compiles triton_util's
    shared helpers from that module's names (a GPU process never runs the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json, sys; sys.path.insert(0, '.'); import tests.wgmma_build as b; print(json.dumps(b.builds()))"
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ids(cfg: dict) -> str:
    kind = ("-grad" if cfg.get("GRAD") else "") + ("-ws" if cfg.get("WS") else "-rs" if cfg.get("RS") else "")
    return "x".join(str(v) for key, v in cfg.items() if key not in ("RS", "WS", "GRAD")) + kind


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=lambda i: _ids(CONFIGS[i]))
def test_compiles_for_sm90_and_fits_shared_memory(builds, i):
    """Every config builds for sm_90a (PTX and cubin, without a GPU), issues the expected wgmma (the register-operand
    kernel: operand A in registers) and fits the shared memory, and the register-operand kernel's SASS writes no
    register of an in-flight wgmma's operand A (see tests/wgmma_build.py)."""
    mine = [b for b in builds if b["cfg"] == i]
    assert mine
    for b in mine:
        assert b["cubin"] and b["wgmma"], b
        assert b["shared"] <= SMEM_SM90, b
        assert b["hazards"] == [], b
    assert any(b["dtype"] == "fp16" and b["rs"] for b in builds)
    assert any(b["dtype"] == "fp16" and not b["rs"] for b in builds)
    assert any(b["dtype"] == "fp16" and b["grad"] for b in builds)


_LOOP = """
        .L_x_5:
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x256x16.F32.BF16 R24, R160, gdesc[UR20], R24, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0040*/                   LDS.U16 R{reg}, [R4+UR7+0x20000] ;
        /*0050*/               @P0 BRA `(.L_x_5) ;
"""


def test_hazard_check_finds_a_write_to_an_in_flight_operand():
    """The SASS check itself: the loop's LDS into R161 meets the previous iteration's HGMMA (R160-R163 as operand A)
    still in flight (DEPBAR.LE 1 leaves it); into R164 it does not."""
    assert len(hgmma_a_hazards(_LOOP.format(reg=161))) == 1
    assert hgmma_a_hazards(_LOOP.format(reg=164)) == []


def test_candidates_add_the_gluon_path_above_64_rows():
    """A measured candidate, never the default without a measurement."""
    c = qmm._candidates
    assert c(100, True, True, half=True, wgmma=True) == (["large", "wgmma"], "large")
    assert c(300, True, True, half=True, wgmma=True) == (["large", "wgmma", "dequant"], "large")
    assert c(qmm.DEQUANT_DEFAULT_M, True, True, half=True, wgmma=True)[1] == "dequant"
    assert c(64, True, True, half=True, wgmma=True) == (["skinny"], "skinny")
    assert c(300, True, True, half=True) == (["large", "dequant"], "large")


def test_grad_candidates_and_gluon_eligibility(monkeypatch):
    """The input gradient's Gluon path: a candidate only with LORAKIT_GLUON_GRAD=1 (measured slower end to end), for
    K % 64 == 0 with W's scale rows as int32 words, like the forward's register-operand kernels, and never on the
    CPU or under the interpreter."""
    w = make_weight(64, 128)
    dy = rand(100, 64, dtype=torch.bfloat16)
    monkeypatch.setenv("LORAKIT_GLUON_GRAD", "1")
    assert not qmm.wgmma_grad_ok(dy, w.qs, w.d)
    if torch.cuda.is_available() and not qmm.interpreting():
        sm90 = torch.cuda.get_device_capability()[0] == 9
        wc = on(w)
        assert qmm.wgmma_grad_ok(dy.cuda(), wc.qs, wc.d) == sm90
        monkeypatch.delenv("LORAKIT_GLUON_GRAD")
        assert not qmm.wgmma_grad_ok(dy.cuda(), wc.qs, wc.d)
        monkeypatch.setenv("LORAKIT_GLUON_GRAD", "1")
        w96 = on(make_weight(64, 96))
        assert not qmm.wgmma_grad_ok(dy.cuda(), w96.qs, w96.d)
        assert not qmm.wgmma_grad_ok(dy.cuda().float(), wc.qs, wc.d)
        w130 = on(make_weight(130, 128))  # dy's rows of 130 values: not 16-byte multiples
        assert not qmm.wgmma_grad_ok(rand(100, 130, dtype=torch.bfloat16).cuda(), w130.qs, w130.d)


def test_grad_kernel_refuses_shapes_it_cannot_read():
    """Before any launch: dy's rows must be 16-byte multiples (TMA) and K a multiple of 64 (scale words)."""
    from lorakit.kernels.q8_0_wgmma import wgmma_grad_input

    for n, k in [(130, 128), (64, 96)]:
        w = make_weight(n, k)
        dy = rand(10, n, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="N % 8 == 0"):
            wgmma_grad_input(dy, w.qs, w.d, torch.empty(10, k), WS_GRAD_CONFIGS[0])


def test_config_choice_without_a_search(monkeypatch):
    """LORAKIT_AUTOTUNE=0: the first config, nothing run or timed, nothing cached (a later search may still pick)."""
    from lorakit.kernels import q8_0_tuning

    monkeypatch.setenv("LORAKIT_AUTOTUNE", "0")
    ran = []
    key = ("test-key",)
    assert q8_0_tuning.pick_wgmma_config(key, ran.append, CONFIGS) is CONFIGS[0]
    assert ran == [] and key not in q8_0_tuning._WGMMA_BEST


def test_config_choice_is_measured_once_per_key(monkeypatch):
    """A key's kept choice is returned as it is, nothing run or timed again (even where a search would run)."""
    from lorakit.kernels import q8_0_tuning

    monkeypatch.setenv("LORAKIT_AUTOTUNE", "1")
    monkeypatch.setattr(q8_0_tuning, "_WGMMA_BEST", {("test-key",): CONFIGS[1]})
    ran = []
    assert q8_0_tuning.pick_wgmma_config(("test-key",), ran.append, CONFIGS) is CONFIGS[1]
    assert ran == []


def test_configs_for_take_the_register_operand_kernel_first_where_it_can_run():
    d = torch.zeros(64, 100, dtype=torch.float16)  # K = 3200: 100 scales a row
    assert configs_for(3200, d) == WS_CONFIGS + RS_CONFIGS + WGMMA_CONFIGS
    assert configs_for(3200, d)[0]["WS"]
    assert configs_for(96, d[:, :3]) == WGMMA_CONFIGS  # K % 64 != 0
    assert configs_for(3200, torch.zeros(64, 101, dtype=torch.float16)[:, :100]) == WGMMA_CONFIGS  # rows not 4-aligned


def test_fastest_runs_each_option_once_before_timing_it(monkeypatch):
    from lorakit.kernels import q8_0_tuning

    ran, timed = [], []
    cost = {"large": 3.0, "wgmma": 1.0, "dequant": 2.0}

    def bench(fn, **kw):
        before = len(ran)
        fn()
        timed.append(ran[before])
        return cost[ran[before]]

    monkeypatch.setattr(q8_0_tuning.triton.testing, "do_bench", bench)
    assert q8_0_tuning._fastest(list(cost), ran.append) == "wgmma"
    assert timed == list(cost) and ran == ["large", "large", "wgmma", "wgmma", "dequant", "dequant"]


def test_wgmma_ok_only_for_sm90_half_activations(monkeypatch):
    w = make_weight(64, 64)
    x = rand(100, 64, dtype=torch.bfloat16)
    assert not qmm.wgmma_ok(x, w.qs, 0)  # CPU tensors (or the interpreter)
    if torch.cuda.is_available() and not qmm.interpreting():
        wc = on(w)
        sm90 = torch.cuda.get_device_capability()[0] == 9
        assert qmm.wgmma_ok(x.cuda(), wc.qs, 16) == sm90
        assert not qmm.wgmma_ok(x.cuda().float(), wc.qs, 0)
        assert not qmm.wgmma_ok(x.cuda(), wc.qs, 64)
        monkeypatch.setenv("LORAKIT_GLUON", "0")
        assert not qmm.wgmma_ok(x.cuda(), wc.qs, 16)


needs_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or qmm.interpreting() or torch.cuda.get_device_capability()[0] != 9,
    reason="needs an sm_90 GPU (Gluon kernels do not run under the interpreter)",
)


def _check(m, n, k, dtype, r, config):
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    w = on(make_weight(n, k, seed=m + n))
    x = rand(m, k, dtype=dtype).cuda()
    assert_gpu_matmul(x, w, r, config, f"wgmma {m}x{n}x{k} {dtype} r={r} {config}")


@gpu
@needs_gpu
@needs_sm90
@pytest.mark.parametrize("cfg", WGMMA_CONFIGS + RS_CONFIGS + WS_CONFIGS, ids=_ids)
@pytest.mark.parametrize("case", range(4))
def test_gpu_forced_configs(cfg, case):
    """Odd shapes: M and N not multiples of the tiles, an odd number of K tiles, one K tile, LoRA ranks up to 32; for
    the shared-memory kernel K = 32 * odd (a half K tile), for the register-operand kernels (K % 64 == 0) an odd tile
    count (its loop takes tiles in pairs)."""
    if cfg.get("RS") or cfg.get("WS"):
        m, n, k, r = [(37, 130, 64, 0), (300, 200, 192, 4), (513, 1000, 1088, 32), (256, 384, 512, 0)][case]
    else:
        m, n, k, r = [(37, 130, 96, 0), (300, 200, 224, 4), (513, 1000, 1056, 32), (256, 384, 512, 0)][case]
    _check(m, n, k, torch.bfloat16, r, {"path": "wgmma", **cfg})


@gpu
@needs_gpu
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,r", [(300, 3200, 3200, 0), (2048, 8640, 3200, 16), (4096, 3200, 8640, 8)])
def test_gpu_measured_config_and_real_shapes(dtype, m, n, k, r):
    _check(m, n, k, dtype, r, {"path": "wgmma"})


@gpu
@needs_gpu
@needs_sm90
@pytest.mark.parametrize("first", [WGMMA_CONFIGS[0], RS_CONFIGS[0], WS_CONFIGS[0]], ids=_ids)
def test_gpu_replays_in_a_cuda_graph(first):
    """The descriptors are built at capture: replays of the captured product give the eager bits."""
    w = on(make_weight(640, 512))
    x = rand(300, 512, dtype=torch.bfloat16).cuda()
    a = rand(512, 8, seed=2, scale=0.3).to(torch.bfloat16).cuda()
    b = rand(640, 8, seed=3, scale=0.3).to(torch.bfloat16).cuda()
    cfg = {"path": "wgmma", **first}
    eager = qmm.q8_0_matmul(x, w.qs, w.d, a, b, 0.5, config=cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qmm.q8_0_matmul(x, w.qs, w.d, a, b, 0.5, config=cfg)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


def _check_grad(m, n, k, dtype, config):
    """dx = dy @ W within test_kernels' derived bound, W's storage unchanged."""
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    w = on(make_weight(n, k, seed=m + n))
    dy = rand(m, n, dtype=dtype, seed=5).cuda()
    qs0, d0 = w.qs.clone(), w.d.clone()
    assert_gpu_grad_input(dy, w, config, f"wgmma grad {m}x{n}x{k} {dtype} {config}")
    assert torch.equal(w.qs, qs0) and torch.equal(w.d, d0)


@gpu
@needs_gpu
@needs_sm90
@pytest.mark.parametrize("cfg", WS_GRAD_CONFIGS, ids=_ids)
@pytest.mark.parametrize("case", range(5))
def test_gpu_grad_forced_configs(cfg, case):
    """Odd shapes: M not a multiple of the tile, N (the reduction, W's rows; a multiple of 8, as TMA reads dy's rows)
    neither a multiple of 64 nor even in tile pairs, K = 64 * odd (dx's last column tile half full: its scale words
    past K's end are read wrapped and meet TMA zeros), one reduction tile."""
    m, n, k = [(37, 136, 64), (300, 200, 192), (513, 1000, 1088), (256, 64, 512), (77, 3200, 8640)][case]
    _check_grad(m, n, k, torch.bfloat16, {"path": "wgmma", **cfg})


@gpu
@needs_gpu
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(300, 3200, 3200), (2048, 8640, 3200), (4096, 3200, 8640)])
def test_gpu_grad_measured_config_and_real_shapes(dtype, m, n, k):
    _check_grad(m, n, k, dtype, {"path": "wgmma"})


@gpu
@needs_gpu
@needs_sm90
def test_gpu_grad_replays_in_a_cuda_graph():
    w = on(make_weight(640, 512))
    dy = rand(300, 640, dtype=torch.bfloat16).cuda()
    cfg = {"path": "wgmma", **WS_GRAD_CONFIGS[0]}
    eager = qmm.q8_0_matmul_grad_input(dy, w.qs, w.d, config=cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qmm.q8_0_matmul_grad_input(dy, w.qs, w.d, config=cfg)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
