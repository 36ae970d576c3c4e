"""`lorakit predict --act-q8` on a GPU: every decode step as one launch of the decode megakernel
(kernels/decode_mega.py), with llama.cpp's arithmetic for the q8_0 products.

MegaDecoder is a GraphDecoder (the same step loop: greedy argmax or the sampler's stages inside the captured step,
tokens() one step ahead of the host) whose forward pass is the megakernel instead of ~210 launches: the step's graph
forms the token's embedding row (the kernel's h, its residual stream), launches the kernel (which reads the loop's
position tensor and zeroes the logits before it adds into them) and returns its logits; the products' sums are zeroed
with a greedy step's argmax for the next step (backend.greedy_next: one launch for the argmax, the next position and
the zeroing), else by a memset before the launch. It
applies (`applies`) on sm_90+ GPUs when every product of the step (the packed q|k|v and gate|up, the output and down
projections, the vocabulary product) is q8_0 and the shapes fit the kernel (head size <= 128, rows <= 16384,
adapters' ranks <= MAX_RANK per product). Adapters stay unmerged, in float32 as the eager --act-q8 step adds them
(llama.cpp converts activations only for quantized weights): per product, the adapters' terms as one term (A of all
of them stacked, B block-diagonal with the scales in it, lora.fused_lora_term, lora_factors), which a warp of its own
per program adds beside the weight stream (kernels.decode_mega._lora_worker); the norm gains' and the token
embedding's terms are formed as the eager step forms them (lora.model_fns). It keeps its own copy of the q8_0
weights in the kernel's tile-major layout (the model's copy stays for the prompt's batched products): about the
weights' size again in GPU memory, formed once per Generator (`tiled`). LORAKIT_MEGAKERNEL=0 turns it off.
"""

from __future__ import annotations

import os

import torch

from .decode import GraphDecoder
from .errors import LorakitError
from .generate import SamplingParams
from .lora import fused_lora_term, lora_terms, model_fns
from .model import KVCache, LlamaModel, fused_members
from .quant import Q8Weight

XMAX = 16384  # kernels.decode_mega.XMAX: the longest input row
MAX_LAYERS = 204  # the kernel resets its sync words (kernels.decode_mega.sync_words) with one 2048-wide store
MAX_RANK = 64  # the adapters' ranks summed over a product's terms (the kernel holds a row of B in registers)


def _weight_names(model: LlamaModel, i: int, kind: str | None) -> list[str]:
    """The weight names of layer i's product `kind` in packing order (the adapters' terms are per weight name); kind
    None: the vocabulary product."""
    if kind is None:
        return ["output.weight"]
    name = f"blk.{i}.{kind}"
    return fused_members(name) if kind in ("attn_qkv", "ffn_gate_up") else [f"{name}.weight"]


def _members(model: LlamaModel, i: int, kind: str) -> list:
    """Layer i's weights of the step's product `kind`: the packed FUSED_KINDS weight where the model has one, else its
    members in packing order (_weight_names; one weight for the output and down projections)."""
    packed = model.fused.get(f"blk.{i}.{kind}")
    return [packed] if packed is not None else [model.weight(m) for m in _weight_names(model, i, kind)]


def _product(model: LlamaModel, i: int, kind: str) -> Q8Weight:
    """The product's q8_0 weight as one Q8Weight (members concatenated where the model keeps them apart)."""
    ws = _members(model, i, kind)
    return ws[0] if len(ws) == 1 else Q8Weight(torch.cat([w.qs for w in ws]), torch.cat([w.d for w in ws]))


KINDS = ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")


def _products(model: LlamaModel) -> list[tuple[int, str | None]]:
    """(layers, kind) of the step's product kinds: KINDS per layer, then the vocabulary product (kind None)."""
    return [(model.args.n_layer, kind) for kind in KINDS] + [(1, None)]


def lora_factors(model: LlamaModel, adapters) -> list:
    """Per product kind (KINDS, then the vocabulary product): None without adapter terms, else (A [L, R, K], B [L, N,
    R]) fp32: each layer's terms of the product's weights as one term (lora.fused_lora_term: A's of all terms, B
    block-diagonal in the members' rows with the scales in it), zero-padded to the kind's largest rank."""
    terms = lora_terms(adapters)
    out = []
    for layers, kind in _products(model):
        formed = []
        for i in range(layers):
            members = _weight_names(model, i, kind)
            rows = [model.tensors[m].shape[0] for m in members]
            formed.append(fused_lora_term([terms.get(m, []) for m in members], rows))
        if not any(formed):
            out.append(None)
            continue
        r = max(f[0][0].shape[1] for f in formed if f)
        members = _weight_names(model, 0, kind)
        n, k = sum(model.tensors[m].shape[0] for m in members), model.tensors[members[0]].shape[1]
        dev = next(f[0][0].device for f in formed if f)
        a, b = torch.zeros(layers, r, k, device=dev), torch.zeros(layers, n, r, device=dev)
        for i, f in enumerate(formed):
            if f:
                a_cat, b_cat, _ = f[0]
                a[i, : a_cat.shape[1]] = a_cat.T
                b[i, :, : b_cat.shape[1]] = b_cat
        out.append((a, b))
    return out


def _largest_rank(model: LlamaModel, adapters) -> int:
    """The adapters' ranks summed over one product's terms, the largest over the step's products (lora_factors' R,
    without forming them)."""
    terms = lora_terms(adapters)
    return max(
        sum(a.shape[1] for m in _weight_names(model, i, kind) for a, _, _ in terms.get(m, []))
        for layers, kind in _products(model)
        for i in range(layers)
    )


def applies(model: LlamaModel, adapters, cache: KVCache) -> str | None:
    """None when MegaDecoder can run this model's decode steps, else why not (one line)."""
    if os.environ.get("LORAKIT_MEGAKERNEL", "1") == "0":
        return "LORAKIT_MEGAKERNEL=0"
    a = model.args
    if a.head_dim > 128 or a.head_dim % 2 or a.n_head % a.n_head_kv:
        return f"head size {a.head_dim} / {a.n_head} heads over {a.n_head_kv}: not for the decode megakernel"
    if max(a.n_embd, a.n_ff, a.n_head * a.head_dim) > XMAX or a.n_layer > MAX_LAYERS:
        return "the model is larger than the decode megakernel's buffers"
    for i in range(a.n_layer):
        for kind in KINDS:
            if not all(isinstance(w, Q8Weight) for w in _members(model, i, kind)):
                return f"blk.{i}.{kind} is not q8_0"
    if not isinstance(model.weight("output.weight"), Q8Weight):
        return "output.weight is not q8_0"
    rank = _largest_rank(model, adapters)
    if rank > MAX_RANK:
        return f"the adapters' ranks on one product add up to {rank} (the decode megakernel takes {MAX_RANK})"
    k0 = cache.k[0]
    per_layer = 2 * a.n_head_kv * k0.shape[2] * a.head_dim
    offsets = [cache.k[i].data_ptr() - k0.data_ptr() for i in range(a.n_layer)]
    if (
        k0.shape[0] != 1
        or not k0.is_contiguous()
        or offsets != [i * per_layer * k0.element_size() for i in range(a.n_layer)]
    ):
        return "the KV cache is not one [layers, 2 kv heads, n_ctx, D] buffer of batch 1"
    dev = k0.device
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (9, 0):
        return "the decode megakernel needs an sm_90+ GPU"
    from .kernels.triton_util import gluon_enabled

    if not gluon_enabled():
        return "the Gluon kernels are off (LORAKIT_GLUON=0, or a triton other than the one they are written for)"
    if a.n_head > torch.cuda.get_device_properties(dev).multi_processor_count:
        return "more heads than SMs"
    return None


def _tiled(weights: list[Q8Weight], block_n: int, bkb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' weights of one product kind, stacked, in the kernel's tile-major layout (tile_q, pack_d), layer
    by layer into one buffer (no stacked row-major copy)."""
    from .kernels.decode_mega import pack_d, tile_q

    n = weights[0].shape[0]
    qs = d = None
    for i, w in enumerate(weights):
        tq, td = tile_q(w.qs, n, block_n, bkb), pack_d(w.d, n, block_n)
        if qs is None:
            qs = torch.empty(len(weights) * tq.shape[0], bkb, dtype=torch.int8, device=tq.device)
            d = torch.empty(len(weights) * td.shape[0], 256, dtype=torch.float16, device=td.device)
        qs[i * tq.shape[0] : (i + 1) * tq.shape[0]] = tq
        d[i * td.shape[0] : (i + 1) * td.shape[0]] = td
    return qs, d


class MegaDecoder(GraphDecoder):
    """GraphDecoder's step loop with the decode megakernel as its forward pass (see the module docstring)."""

    def __init__(
        self,
        model: LlamaModel,
        backend,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        adapters=(),
        use_graph: bool = True,
        greedy: bool = False,
        sampler: SamplingParams | None = None,
        device_draw: bool = False,
        tiled: dict | None = None,
    ):
        """adapters: [(LoraAdapter, scale)] as Generator takes them. tiled: a dict the caller keeps for later decoders
        of the same model and adapters (Generator: one per generate() call): the tile-major weights and the adapters'
        factors are formed once into it."""
        from .kernels import decode_mega as km

        why = applies(model, adapters, cache)
        if why is not None:
            raise ValueError(why)
        self._init_loop(model, cache, use_graph, greedy, sampler, device_draw)
        self.backend = backend
        a = model.args
        dev = cache.k[0].device
        L, E, F, H, HKV, D = a.n_layer, a.n_embd, a.n_ff, a.n_head, a.n_head_kv, a.head_dim
        programs = torch.cuda.get_device_properties(dev).multi_processor_count
        tiled = {} if tiled is None else tiled
        with torch.no_grad():
            if "weights" not in tiled:
                kinds = [[_product(model, i, kind) for i in range(L)] for kind in KINDS]
                tiled["weights"] = [_tiled(ws, km.BLOCK_N_ROWS, km.BKB) for ws in kinds]
                tiled["weights"].append(_tiled([model.weight("output.weight")], km.BLOCK_N_ROWS, km.BKB))
                tiled["lora"] = km.pack_lora(lora_factors(model, adapters), programs)
            self.weights = tiled["weights"]
            lora, lora_dims = tiled["lora"]
            firsts = [_members(model, 0, kind) for kind in KINDS]
            shapes = [(sum(w.shape[0] for w in ws), ws[0].shape[1]) for ws in firsts]
            shapes.append(model.weight("output.weight").shape)
            # the norm gains and the token's embedding row with their adapter terms, as the eager step forms them
            _, norm, self.embed = model_fns(model, backend, adapters, torch.float32)
            names = [f"blk.{i}.{k}.weight" for i in range(L) for k in ("attn_norm", "ffn_norm")]
            gains = torch.stack([norm(n) for n in [*names, "output_norm.weight"]]).float().contiguous()
        self.descs = km.descriptors(self.weights)
        sa = max(1, min(4, programs // H))
        self.dims = dict(L=L, E=E, F=F, V=a.n_vocab, H=H, HKV=HKV, D=D, eps=a.norm_eps, SA=sa,
                         S=[km.splits(n, k, programs) for n, k in shapes], **lora_dims)  # fmt: skip
        self.programs = programs
        f32 = dict(dtype=torch.float32, device=dev)
        cos, sin = rope
        # the products' sums and the adapters' t: one buffer, zero before each launch (a greedy step zeroes it with
        # its argmax for the next one, backend.greedy_next; else a memset before the launch); the kernel zeroes the
        # logits itself
        rsl = (H + 2 * HKV) * D + 2 * F
        self.sums = torch.zeros(L * rsl + km.t_words(L, lora_dims["RT"]), **f32)
        self._zero_next = self.sums
        self.bufs = {  # h: the step's embedding row (_forward)
            "y32": self.sums[: L * rsl].view(L, rsl),
            "t": self.sums[L * rsl :],
            "logits": torch.zeros(a.n_vocab, **f32),
            "ws": torch.zeros(H, sa, D + 2, **f32),
            "cache": cache.k[0],  # the start of the one [L, 2 HKV, n_ctx, D] buffer (applies() checked it)
            "cos": cos.float().contiguous(),
            "sin": sin.float().contiguous(),
            "pos": self.pos,  # the loop's position tensor (int64), moved on by the captured step
            "gains": gains,
            "sync": torch.zeros(km.sync_words(L) * km.SYNC_STRIDE.value, dtype=torch.int32, device=dev),
            "lora": lora,
        }
        self.err = self.bufs["sync"][(5 * L + 1) * km.SYNC_STRIDE.value]

    def _forward(self) -> torch.Tensor:
        from .kernels.decode_mega import decode_step

        # the token's embedding row is h itself: the kernel adds the residuals into it (in a captured step, the
        # graph's own buffer, at the same address every replay; no copy)
        b = dict(self.bufs, h=self.embed(self.tok).view(-1))
        if not self.greedy:  # a greedy step leaves them zero (_step's greedy_next)
            self.sums.zero_()
        decode_step(b, self.descs, self.dims, self.programs)
        return b["logits"]

    def check(self) -> None:
        """Raise if a launch's wait gave up (the kernel's programs were not all resident on the GPU at once)."""
        if int(self.err):
            raise LorakitError("the decode megakernel's programs could not all run at once on this GPU (another "
                               "process using it?); run with LORAKIT_MEGAKERNEL=0")  # fmt: skip

    @torch.no_grad()
    def __call__(self, token: int, pos: int) -> torch.Tensor:
        out = super().__call__(token, pos)
        self.check()
        return out

    @torch.no_grad()
    def tokens(self, token: int, pos: int, steps: int, uniforms: torch.Tensor | None = None):
        yield from super().tokens(token, pos, steps, uniforms)
        self.check()
