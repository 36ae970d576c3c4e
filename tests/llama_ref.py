"""Independent references for tests/test_llamacpp_reference.py.

* `LlamaCppRunner`: llama-cpp-python (the real llama.cpp) driven token by token: logits of every
  position and greedy decoding by our own argmax, with any number of scaled GGUF LoRA adapters set
  through the low-level `llama_adapter_lora_init` / `llama_set_adapters_lora` API.
* `RefModel` / `forward_f64`: a float64 NumPy llama forward pass over a GGUF read with `gguf`'s own
  reader and dequantizer (no lorakit code). It can also *emulate* llama.cpp's CPU arithmetic:
  - `act_q8=True`: every activation row that enters a matmul with a Q8_0 weight is first quantized
    to Q8_0 blocks of 32 (ggml's `quantize_row_q8_0`: d = amax/127 stored as fp16, q = round(x*127/amax)),
    because ggml's CPU `mul_mat` converts src1 to the weight's `vec_dot_type` (Q8_0 for Q8_0);
  - `kv_f16=True`: the KV cache is F16 (llama.cpp's default), so K and V are rounded to fp16, and
    (without flash attention) Q and the softmax probabilities are converted to fp16 before
    `mul_mat(k, q)` and `mul_mat(v, kq)` for the same vec_dot_type reason.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

QK8_0 = 32
NORM_SUFFIX = "_norm.weight"


# --------------------------------------------------------------------------- float64 reference


@dataclass
class RefModel:
    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_layer: int
    eps: float
    rope_base: float
    w: dict[str, np.ndarray]  # float64, numpy order (out, in); norms 1-D
    q8: set[str] = field(default_factory=set)  # names stored as Q8_0 in the file

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def weight(self, name: str) -> np.ndarray:
        if name == "output.weight" and name not in self.w:
            return self.w["token_embd.weight"]
        return self.w[name]

    def is_q8(self, name: str) -> bool:
        if name == "output.weight" and name not in self.w:
            name = "token_embd.weight"
        return name in self.q8


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_ref_model(path: str | os.PathLike) -> RefModel:
    """Weights dequantized by gguf-py (exact: q8_0 value = int8 * fp16 scale fits in float32)."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(str(path))
    w: dict[str, np.ndarray] = {}
    q8: set[str] = set()
    for t in r.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            q8.add(t.name)
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne -> numpy order
        w[t.name] = np.asarray(arr, dtype=np.float64).reshape(shape if len(shape) > 1 else (-1,))
    n_head = int(_field(r, "llama.attention.head_count"))
    tokens = _field(r, "tokenizer.ggml.tokens")
    return RefModel(
        n_vocab=len(tokens) if tokens is not None else w["token_embd.weight"].shape[0],
        n_embd=int(_field(r, "llama.embedding_length")),
        n_head=n_head,
        n_head_kv=int(_field(r, "llama.attention.head_count_kv", n_head)),
        n_layer=int(_field(r, "llama.block_count")),
        eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(_field(r, "llama.rope.freq_base", 10000.0)),
        w=w,
        q8=q8,
    )


@dataclass
class RefLora:
    """GGUF LoRA pairs in the file's own convention: lora_a (r, in), lora_b (out, r), float64.

    token_embd is flipped in GGUF: lora_a (V, r), lora_b (E, r); row v gains lora_b @ lora_a[v].
    """

    pairs: dict[str, tuple[np.ndarray, np.ndarray, float]]  # base -> (A, B, alpha/rank or 1)


def read_ref_lora(path: str | os.PathLike) -> RefLora:
    import gguf

    r = gguf.GGUFReader(str(path))
    alpha = float(_field(r, "adapter.lora.alpha", 0.0) or 0.0)
    arrs = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        arrs[t.name] = np.asarray(t.data, dtype=np.float64).reshape(shape)
    pairs = {}
    for name in arrs:
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        if base.endswith(NORM_SUFFIX):
            continue  # llama.cpp never applies norm LoRAs
        a, b = arrs[name], arrs[base + ".lora_b"]
        rank = b.shape[1]  # lora_b.ne0, as llama.cpp reads it (token_embd included)
        pairs[base] = (a, b, alpha / rank if alpha != 0 else 1.0)
    return RefLora(pairs)


def q8_0_roundtrip(x: np.ndarray) -> np.ndarray:
    """What ggml's `quantize_row_q8_0` (x86 SIMD) does to an activation row, dequantized again.

    d = amax/127 stored as fp16; q = round_half_even(x * 127/amax) (the AVX path uses
    _mm256_round_ps(.., NEAREST)); the dot product then sees q * fp16(d).
    """
    shape = x.shape
    xb = x.astype(np.float32).reshape(*shape[:-1], shape[-1] // QK8_0, QK8_0)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    d16 = (amax / np.float32(127.0)).astype(np.float16).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(xb * iscale)
    return (q * d16).reshape(shape)


def _to_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(np.float16).astype(np.float64)


def forward_f64(
    m: RefModel,
    ids: list[int],
    loras: list[tuple[RefLora, float]] = (),
    act_q8: bool = False,
    kv_f16: bool = False,
) -> np.ndarray:
    """Logits [T, V] (float64) of every position of `ids`, causal attention from position 0.

    Adapters are applied unmerged, as llama.cpp's llm_build_lora_mm does:
    y = W x + sum_i s_i * (alpha_i/r_i) * B_i (A_i x). The LoRA products never see act_q8 (the
    adapter tensors are F32 in every file used here, so ggml keeps the activations in f32 for them).
    """
    E, H, Hkv, D = m.n_embd, m.n_head, m.n_head_kv, m.head_dim
    T = len(ids)
    by_name: dict[str, list] = {}
    for lora, s in loras:
        for name, (a, b, f) in lora.pairs.items():
            by_name.setdefault(name, []).append((a, b, s * f))

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        w = m.weight(name)
        xin = q8_0_roundtrip(x) if (act_q8 and m.is_q8(name)) else x
        y = xin @ w.T
        for a, b, s in by_name.get(name, []):
            y = y + s * ((x @ a.T) @ b.T)
        return y

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + m.eps) * g

    tok = np.asarray(ids)
    h = m.w["token_embd.weight"][tok].copy()
    for a, b, s in by_name.get("token_embd.weight", []):
        h = h + s * (a[tok] @ b.T)

    inv = m.rope_base ** (-np.arange(0, D // 2, dtype=np.float64) * 2.0 / D)
    theta = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]

    def rope(x):  # x [T, heads, D], adjacent pairs
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for i in range(m.n_layer):
        a = rms(h, m.w[f"blk.{i}.attn_norm.weight"])
        q = rope(linear(a, f"blk.{i}.attn_q.weight").reshape(T, H, D))
        k = rope(linear(a, f"blk.{i}.attn_k.weight").reshape(T, Hkv, D))
        v = linear(a, f"blk.{i}.attn_v.weight").reshape(T, Hkv, D)
        if kv_f16:
            q, k, v = _to_f16(q), _to_f16(k), _to_f16(v)
        rep = H // Hkv
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / math.sqrt(D) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        if kv_f16:
            att = _to_f16(att)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, E)
        h = h + linear(o, f"blk.{i}.attn_output.weight")
        f = rms(h, m.w[f"blk.{i}.ffn_norm.weight"])
        g = linear(f, f"blk.{i}.ffn_gate.weight")
        u = linear(f, f"blk.{i}.ffn_up.weight")
        h = h + linear(g / (1.0 + np.exp(-g)) * u, f"blk.{i}.ffn_down.weight")
    return linear(rms(h, m.w["output_norm.weight"]), "output.weight")


def q8_activation_error_stats(m: RefModel, ids: list[int], loras=()) -> dict:
    """The size of llama.cpp's activation rounding, from the two float64 passes.

    Returns max |emulated - exact| over all logits (`d_emul`), the largest |logit| and, for the
    first Q8_0 matmul input of layer 0, the relative rms error q8_0 rounding gives an activation
    row (expected about 1/(127*sqrt(12)) * amax/rms of the block ~ 0.5-1 %).
    """
    exact = forward_f64(m, ids, loras)
    emul = forward_f64(m, ids, loras, act_q8=True)
    x = m.w["token_embd.weight"][np.asarray(ids)]
    xn = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + m.eps) * m.w["blk.0.attn_norm.weight"]
    rel = float(np.sqrt(np.mean((q8_0_roundtrip(xn) - xn) ** 2) / np.mean(xn**2)))
    return {
        "d_emul": float(np.abs(emul - exact).max()),
        "max_abs_logit": float(np.abs(exact).max()),
        "act_rel_rms": rel,
        "exact": exact,
        "emul": emul,
    }


# --------------------------------------------------------------------------- llama-cpp-python


class LlamaCppRunner:
    """One llama.cpp context over a model; adapters are switched per call.

    kv_f32=True makes the KV cache F32 so that, on an F32 model, the only difference from an exact
    computation is float32 rounding (llama.cpp's default F16 cache would add fp16 rounding of K, V,
    Q and the attention probabilities). Flash attention is off (the default of the fixture's build).
    """

    def __init__(self, model_path: str | os.PathLike, n_ctx: int = 128, kv_f32: bool = True, n_threads: int = 1):
        import llama_cpp

        self.n_threads = n_threads
        self.lc = llama_cpp
        kw = {}
        if kv_f32:
            kw.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        # use_extra_bufts=False is llama.cpp's `--no-repack`: no AMX / repacked-weight buffers.
        # On this host (AMX_INT8 advertised, AMX tiles not usable) the AMX Q8_0 kernels die with
        # SIGILL; the plain CPU kernels do the same arithmetic (activations quantized to Q8_0).
        # llama-cpp-python 0.3.36 has no keyword for it, so the default params are patched.
        lib = llama_cpp.llama_cpp
        orig = lib.llama_model_default_params

        def params():
            p = orig()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = params
        try:
            self.llm = self._open(model_path, n_ctx, kw)
        finally:
            lib.llama_model_default_params = orig
        self._adapters: dict[str, object] = {}
        self._current: tuple = ()

    def _open(self, model_path, n_ctx: int, kw: dict):
        return self.lc.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            logits_all=True,
            verbose=False,
            n_threads=self.n_threads,  # 1 for tiny models: OpenMP barriers are slow on a busy 2-core host
            n_threads_batch=self.n_threads,
            flash_attn=False,
            seed=0,
            **kw,
        )

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def _adapter(self, path: str | os.PathLike):
        key = os.fspath(path)
        if key not in self._adapters:
            # freed together with the model (llama.h: llama_adapter_lora_free is optional)
            h = self.lc.llama_adapter_lora_init(self.llm._model.model, key.encode("utf-8"))
            if not h:
                raise RuntimeError(f"llama.cpp could not load the adapter {key}")
            self._adapters[key] = h
        return self._adapters[key]

    def set_adapters(self, adapters: list[tuple[str | os.PathLike, float]] = ()) -> None:
        """Exactly these adapters with these scales (an empty list removes all)."""
        import ctypes

        key = tuple((os.fspath(p), float(s)) for p, s in adapters)
        if key == self._current:
            return
        n = len(key)
        arr = (self.lc.llama_adapter_lora_p_ctypes * max(n, 1))(*[self._adapter(p) for p, _ in key])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in key])
        rc = self.lc.llama_set_adapters_lora(self.llm._ctx.ctx, arr, n, scales)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc})")
        self._current = key

    def logits(self, ids: list[int], adapters=()) -> np.ndarray:
        """float32 logits [T, V] of every prompt position (one decode of the whole prompt)."""
        self.set_adapters(adapters)
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int, adapters=()) -> tuple[list[int], np.ndarray]:
        """n greedy ids (argmax of llama.cpp's logits, our own loop), and the first step's logits."""
        self.set_adapters(adapters)
        self.llm.reset()
        self.llm.eval(list(ids))
        first = np.array(self.llm.scores[len(ids) - 1], dtype=np.float32)
        out: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
            if len(out) == n:
                break
            self.llm.eval([tok])
        return out, first

    def close(self) -> None:
        self.llm.close()
