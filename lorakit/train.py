"""The finetune loop: llama.cpp's `ggml_opt_adam` timeline driven by its `train_opt_callback`.

No printing here: progress goes out through `on_event` (IterationEvent, SaveEvent, MessageEvent).
Timeline (spec §4.4): a prologue computes the gradient of the first batch; then each of the
`adam_iter` iterations updates the LoRA with the current gradient and the schedule value computed
at the previous callback, and computes the next gradient. The callback at micro-step 0 saves when
due, computes the schedule for opt.iter and reports the loss of the batch whose gradient the
update just used. The base model stays quantized; base and LoRA paths are computed separately.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .backends import AdamHyper, get_backend
from .errors import LorakitError
from .fused_ops import ops_for
from .gguf_io import GGUFFile
from .lora import LoraAdapter, LoraPair, LoraRanks, lora_shapes, model_fns
from .lora_init import init_lora
from .lora_pack import pack_lora
from .loss import cross_entropy
from .model import forward_hidden, load_model, rope_tables
from .optim import OptimConfig, learning_schedule
from .options import uint32_seed
from .state import TrainerState, check_outputs, load_or_init, save_outputs
from .tokenizer import Tokenizer

log = logging.getLogger("lorakit.train")


@dataclass(frozen=True)
class FinetuneConfig:
    model_base: str
    train_data: str = "shakespeare.txt"
    checkpoint_in: str = "checkpoint.gguf"
    checkpoint_out: str = "checkpoint-ITERATION.gguf"
    lora_out: str = "ggml-lora-ITERATION-f32.gguf"
    pattern_fn_it: str = "ITERATION"
    fn_latest: str = "LATEST"
    save_every: int = 10
    only_write_lora: bool = False
    seed: int = -1
    n_ctx: int = 128
    n_batch: int = 8
    threads: int = 6
    lora_r: int = 4
    lora_alpha: int = 4
    ranks: LoraRanks = LoraRanks.default(4)
    norm_rms_eps: float | None = None
    rope_freq_base: float | None = None
    rope_freq_scale: float | None = None
    sample_start: str = ""
    include_sample_start: bool = False
    escape: bool = False
    overlapping_samples: bool = False
    fill_with_next_samples: bool = False
    separate_with_eos: bool = False
    separate_with_bos: bool = True
    sample_random_offsets: bool = False
    force_reshuffle: bool = False
    use_checkpointing: bool = True
    epochs: int = -1
    optim: OptimConfig = OptimConfig()
    backend: str = "auto"
    compute_dtype: str = "f32"
    cuda_graph: bool = True  # on a CUDA backend, replay each micro-step as one captured graph
    log_jsonl: str | None = None  # written by the CLI; here so that check_outputs protects and checks it


@dataclass(frozen=True)
class IterationEvent:
    iter: int
    first_iter: int
    last_iter: int
    loss: float
    sched: float
    lr: float
    sample: int
    sample_count: int
    epochs: int
    tokens: int
    dt: float
    tokens_per_s: float


@dataclass(frozen=True)
class SaveEvent:
    iter: int
    paths: tuple[str, ...]


@dataclass(frozen=True)
class MessageEvent:
    text: str
    warning: bool = False


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: the last finished iteration was saved (CLI exit code 130)."""


EventFn = Callable[[object], None]


class _Sigint:
    """First Ctrl-C sets a flag checked between micro-batches; a second one aborts at once."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class Trainer:
    def __init__(self, cfg: FinetuneConfig, on_event: EventFn):
        self.cfg, self.emit = cfg, on_event
        if cfg.threads > 0:
            torch.set_num_threads(min(cfg.threads, os.cpu_count() or cfg.threads))  # never oversubscribe
        self.backend = get_backend(cfg.backend)
        gf = GGUFFile(cfg.model_base)
        model = load_model(cfg.model_base, gf)
        args = model.args
        overrides = {}
        if cfg.norm_rms_eps is not None:
            overrides["norm_eps"] = cfg.norm_rms_eps
        if cfg.rope_freq_base is not None:
            overrides["rope_freq_base"] = cfg.rope_freq_base
        if cfg.rope_freq_scale is not None:
            overrides["rope_freq_scale"] = cfg.rope_freq_scale
        model.args = args = replace(args, **overrides)
        self.model = model.to(self.backend.device)
        self.args = args
        self.tok = Tokenizer.from_gguf(gf)
        self.dtype = torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float32
        self.shapes = lora_shapes(args, cfg.ranks)
        # llama.cpp keeps the seed as a uint32 (-2 is 4294967294); only 0xFFFFFFFF (-1) means time(NULL) (spec §1.2)
        seed = uint32_seed(cfg.seed)
        if seed < 0:
            seed = int(time.time()) & 0xFFFFFFFF
        self.seed = seed
        if note := args.context_note(cfg.n_ctx):  # llama.cpp takes --ctx as it is (spec §3.1); lorakit notes it
            self.emit(MessageEvent(f"{cfg.model_base}: {note}", warning=True))
        # LoRA, optimizer and training counters: from --checkpoint-in, or fresh (spec §5, §6.4)
        self.st: TrainerState = load_or_init(cfg, args, self.shapes, seed, self.emit, init_lora)
        check_outputs(cfg, self.st.opt_iter)
        dev = self.backend.device
        # LoRA tensors and AdamW moments as views into one flat buffer each, in the optimizer's order
        # (a, b per name): the fused AdamW then updates them in place without gathering them per step
        self._keys = keys = [(n, h) for n in self.st.lora for h in "ab"]
        self.params = flat_lora(self.st.lora, dev)
        self.m = dict(zip(keys, flat_views([self.st.m[k] for k in keys], dev), strict=True))
        self.v = dict(zip(keys, flat_views([self.st.v[k] for k in keys], dev), strict=True))
        self.rope = rope_tables(args, cfg.n_ctx, dev)
        self._flat_params = [t for ab in self.params.values() for t in ab]
        self._decayed = [_n_dims(x) >= cfg.optim.decay_min_ndim for x in self._flat_params]  # AdamW's decay mask
        self._graphed = None
        if cfg.cuda_graph and dev.type == "cuda":
            from .train_graph import GraphedStep

            self._graphed = GraphedStep(self._loss_and_backward, self._flat_params)
        if cfg.only_write_lora:
            return
        self._prepare_data()

    # ------------------------------------------------------------------ data
    def _prepare_data(self) -> None:
        cfg = self.cfg
        path = Path(cfg.train_data)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise LorakitError("training data not found", path) from None
        except OSError as e:
            raise LorakitError(f"cannot read training data ({e.strerror})", path) from None
        self.samples = D.make_samples(
            raw,
            cfg.n_ctx,
            self.tok.encode,
            sample_start=cfg.sample_start,
            include_sample_start=cfg.include_sample_start,
            escape=cfg.escape,
            overlapping_samples=cfg.overlapping_samples,
            max_token_bytes=self.tok.max_token_bytes(),
        )
        if self.samples.count == 0:
            raise LorakitError("no training samples (the file is empty or has no text after tokenizing)", path)
        self.emit(
            MessageEvent(
                f"{path}: {self.samples.count} samples, {len(self.samples.tokens)} tokens, "
                f"{len(np.unique(self.samples.tokens))} distinct tokens"
            )
        )
        self.ds = D.start_data_state(
            self.samples,
            cfg.train_data,
            self.seed,
            self.st.shuffle,
            force_reshuffle=cfg.force_reshuffle,
            train_samples=self.st.train_samples,
            train_epochs=self.st.train_epochs,
        )
        self.batch_opts = D.BatchOptions(
            n_batch=cfg.n_batch,
            ctx=cfg.n_ctx,
            n_vocab=self.args.n_vocab,
            bos=self.tok.bos_id,
            eos=self.tok.eos_id,
            separate_with_eos=cfg.separate_with_eos,
            separate_with_bos=cfg.separate_with_bos,
            fill_with_next_samples=cfg.fill_with_next_samples,
            sample_random_offsets=cfg.sample_random_offsets,
        )

    # ------------------------------------------------------------------ math
    def _loss_and_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_and_backward(self.model, self.backend, self.params, self.dtype, self.rope, x, y,
                                 self.cfg.use_checkpointing)  # fmt: skip

    def forward_backward(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss of one micro-batch and the gradients of the LoRA tensors (a, b per name, params order)."""
        if self._graphed is not None:
            return self._graphed(inputs, targets)
        dev = self.backend.device
        loss = self._loss_and_backward(torch.from_numpy(inputs).to(dev), torch.from_numpy(targets).to(dev))
        grads = []
        for t in self._flat_params:
            grad, t.grad = t.grad, None
            grads.append(grad if grad is not None else torch.zeros_like(t))
        return loss, grads

    def _accumulate(self, g: dict, grads: list[torch.Tensor], n_acc: int) -> None:
        """g += grad / G per micro-batch (ggml_opt_acc_grad); with G = 1 the gradient is taken as is."""
        for key, grad in zip(self._keys, grads, strict=True):
            if n_acc == 1:
                g[key] = grad
            else:
                g[key].add_(grad * (1.0 / n_acc))

    def _update(self, g: dict, sched: float, t: int) -> None:
        o = self.cfg.optim
        keys = self._keys  # the order of _flat_params and of the flat moment buffers
        hp = AdamHyper(o.alpha, o.decay, o.beta1, o.beta2, o.eps, o.gclip, sched, t)
        with torch.no_grad():
            self.backend.adamw_step(self._flat_params, [g[k] for k in keys], [self.m[k] for k in keys],
                                    [self.v[k] for k in keys], self._decayed, hp)  # fmt: skip

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg, o, st = self.cfg, self.cfg.optim, self.st
        G = o.grad_acc
        tokens_per_iter = G * cfg.n_batch * cfg.n_ctx
        iter0 = st.opt_iter
        last = iter0 + o.adam_iter
        self.last_save_iter = iter0
        first_epoch = self.ds.train_epochs
        iter_at_last_epoch = -1
        sched = 1.0
        loss_after = 0.0  # what llama.cpp prints at the first callback of a run
        dev = self.backend.device
        # with G = 1 the gradients are taken as they are (_accumulate); only G > 1 needs buffers
        g = (
            {(n, h): torch.zeros_like(t) for n, ab in self.params.items() for h, t in zip("ab", ab, strict=True)}
            if G > 1
            else {}
        )
        t_last = time.perf_counter()
        dt_avg = 0.0
        snapshot = self.ds  # data state right after the last update (what a save records)
        pf = st.past_loss

        with _Sigint() as sigint:

            def callback(a: int):
                nonlocal sched, t_last, dt_avg, snapshot, iter_at_last_epoch
                if sigint.hit:
                    raise _Stop(interrupted=True)
                if a == 0:
                    snapshot = self.ds
                    if cfg.save_every > 0 and st.opt_iter - self.last_save_iter >= cfg.save_every:
                        self._save(tokens_per_iter)
                    sched = learning_schedule(st.opt_iter, o)
                    now = time.perf_counter()
                    if st.opt_iter > iter0:
                        dt = now - t_last
                        dt_avg = dt if dt_avg == 0.0 else 0.7 * dt_avg + 0.3 * dt
                    t_last = now
                    sh = self.ds.shuffle
                    self.emit(
                        IterationEvent(
                            iter=st.opt_iter,
                            first_iter=iter0,
                            last_iter=last,
                            loss=loss_after,
                            sched=sched,
                            lr=o.alpha * sched,
                            sample=min(1 + sh.next_sample, sh.sample_count),
                            sample_count=sh.sample_count,
                            epochs=self.ds.train_epochs,
                            tokens=st.train_tokens + (st.opt_iter - self.last_save_iter) * tokens_per_iter,
                            dt=dt_avg,
                            tokens_per_s=(tokens_per_iter / dt_avg) if dt_avg else 0.0,
                        )
                    )
                inputs, targets, used, self.ds = D.draw_batch(self.samples, self.ds, self.batch_opts)
                if cfg.epochs > 0 and self.ds.train_epochs - first_epoch >= cfg.epochs:
                    if iter_at_last_epoch < 0:
                        iter_at_last_epoch = st.opt_iter
                    elif st.opt_iter > iter_at_last_epoch:
                        raise _Stop(interrupted=False)
                return inputs, targets

            def gradient() -> float:
                fx = torch.zeros((), dtype=torch.float32, device=dev)
                if G > 1:
                    for k in g.values():
                        k.zero_()
                for a in range(G):
                    inputs, targets = callback(a)
                    loss, grads = self.forward_backward(inputs, targets)
                    fx += loss
                    self._accumulate(g, grads, G)
                return float(fx * (1.0 / G)) if G > 1 else float(fx)

            interrupted = False
            try:
                fx = gradient()
                st.fx_prev = st.fx_best = fx
                if pf is not None:
                    pf[st.opt_iter % o.opt_past] = fx
                loss_after = fx
                if st.just_initialized:
                    st.n_no_improvement = 0
                    st.just_initialized = False
                for t in range(o.adam_iter):
                    st.opt_iter = iter0 + t + 1
                    self._update(g, sched, st.opt_iter)
                    fx = gradient()
                    loss_after = fx
                    if _converged(st, fx, o, iter0 + t, pf):
                        self.emit(MessageEvent(f"converged at iteration {st.opt_iter}"))
                        break
                    st.fx_prev = fx
            except _Stop as stop:
                interrupted = stop.interrupted
                self.ds = snapshot if interrupted else self.ds
                if stop.interrupted:
                    self.emit(MessageEvent("interrupted: saving the last finished iteration", warning=True))
                else:
                    self.emit(MessageEvent(f"reached --epochs {cfg.epochs}; stopping"))
            if st.opt_iter - self.last_save_iter > 0:
                self._save(tokens_per_iter)
            if interrupted:
                raise Interrupted()

    def _save(self, tokens_per_iter: int) -> None:
        st = self.st
        new_iters = st.opt_iter - self.last_save_iter
        st.train_its += new_iters
        st.train_tokens += new_iters * tokens_per_iter
        st.lora = {n: (a.detach(), b.detach()) for n, (a, b) in self.params.items()}
        st.m, st.v = self.m, self.v
        st.shuffle = self.ds.shuffle
        st.train_samples, st.train_epochs = self.ds.train_samples, self.ds.train_epochs
        n_notes = len(st.notes)
        paths = save_outputs(self.cfg, self.args, st, st.opt_iter, self.model.tied_output)
        self.last_save_iter = st.opt_iter
        self.emit(SaveEvent(st.opt_iter, tuple(paths)))
        self._emit_notes(n_notes)

    def write_lora_only(self) -> None:
        st = self.st
        n_notes = len(st.notes)
        paths = save_outputs(self.cfg, self.args, st, st.opt_iter, self.model.tied_output, lora_only=True)
        self.emit(SaveEvent(st.opt_iter, tuple(paths)))
        self._emit_notes(n_notes)

    def _emit_notes(self, start: int) -> None:
        """Warnings save_outputs recorded (e.g. LoRAs a GGUF adapter cannot carry), once each."""
        for note in self.st.notes[start:]:
            self.emit(MessageEvent(note, warning=True))


def loss_and_backward(model, backend, params: dict, dtype, rope, x, y, checkpointing: bool) -> torch.Tensor:
    """One micro-batch: forward with the LoRA `params` (name -> (a, b), trained at scale 1), ggml's
    cross-entropy, backward into the params' .grad; returns the loss. The LoRA tensors are cast to the
    compute dtype, packed and padded for the products once here (lora_pack: one gather each way), not at each
    of their uses in forward, recompute and backward."""
    if checkpointing:
        backend = backend.checkpointed_training()
    packed = {}
    if dtype != torch.float32 or backend.lora_rank_multiple > 1 or model.fused:
        params, packed = pack_lora(params, model, backend.lora_rank_multiple, dtype)
    adapter = LoraAdapter({n: LoraPair(a, b, 1.0) for n, (a, b) in params.items()}, format="train")
    linear, norm, embed = model_fns(model, backend, [(adapter, 1.0)], dtype, packed)
    ops = ops_for(backend)
    h = forward_hidden(model.args, x, linear, norm, embed, rope, checkpoint_layers=checkpointing, ops=ops)
    loss = cross_entropy(linear(h, "output.weight"), y)
    loss.backward()
    return loss.detach()


class _Stop(Exception):
    def __init__(self, interrupted: bool):
        self.interrupted = interrupted


def flat_views(ts: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Float32 copies of ts on `device`, laid end to end in one buffer (each a leaf view of it)."""
    buf = torch.empty(sum(t.numel() for t in ts), dtype=torch.float32, device=device)
    out, off = [], 0
    for t in ts:
        view = buf[off : off + t.numel()].view(t.shape)
        view.copy_(t)
        out.append(view.detach())
        off += t.numel()
    return out


def flat_lora(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], device) -> dict[str, tuple]:
    """LoRA tensors (name -> (a, b)) as float32 leaves requiring grad, views of one buffer in (name, a/b)
    order: how the trainer holds them, so the fused AdamW updates them in place."""
    flat = flat_views([t for pair in lora.values() for t in pair], device)
    return {n: (flat[2 * i].requires_grad_(), flat[2 * i + 1].requires_grad_()) for i, n in enumerate(lora)}


def _n_dims(t: torch.Tensor) -> int:
    """ggml_n_dims of a LoRA tensor stored as (in, r)/(out, r): ne = [r, rows]; trailing 1s dropped."""
    rows = t.shape[0]
    return 2 if rows > 1 else 1


def _converged(st: TrainerState, fx: float, o: OptimConfig, k: int, pf) -> bool:
    """ggml_opt_adam's tests after iteration k+1 (k = opt.iter - 1): eps_f, past/delta, no-improvement."""
    f = np.float32
    if o.eps_f > 0 and abs(f(fx) - f(st.fx_prev)) / f(fx) < f(o.eps_f):
        return True
    if pf is not None:
        done = False
        if o.opt_past <= k:
            rate = (f(pf[k % o.opt_past]) - f(fx)) / f(fx)
            done = abs(rate) < f(o.opt_delta)
        pf[k % o.opt_past] = fx
        if done:
            return True
    if o.opt_max_no_improvement > 0:
        if st.fx_best > fx:
            st.fx_best = fx
            st.n_no_improvement = 0
        else:
            st.n_no_improvement += 1
            if st.n_no_improvement >= o.opt_max_no_improvement:
                return True
    return False


def run_finetune(cfg: FinetuneConfig, on_event: EventFn) -> None:
    tr = Trainer(cfg, on_event)
    if cfg.only_write_lora:
        tr.write_lora_only()
        return
    tr.train()
