"""The trainer's resumable state: start it (fresh or from --checkpoint-in) and save it.

Fresh start (spec §5, §6.4): LoRA from llama.cpp's init for the seed, m = v = 0, iteration 0.
Resume: the checkpoint's LoRA, moments (in the order the file was written), counters and
shuffle state; its ranks and --opt-past must equal the command line's, as llama.cpp requires.
A --checkpoint-in that does not exist (or is '') starts fresh, as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapters import write_gguf_adapter
from .checkpoint import RIGHT_TO_LEFT, Checkpoint, flatten_moments, read_checkpoint, write_checkpoint
from .data import ShuffleState
from .errors import LorakitError
from .ggla import write_ggla
from .gguf_io import copy_atomic
from .lora import KINDS
from .model import ModelArgs


@dataclass
class TrainerState:
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    m: dict[tuple[str, str], torch.Tensor]
    v: dict[tuple[str, str], torch.Tensor]
    opt_iter: int = 0
    train_its: int = 0
    train_samples: int = 0
    train_tokens: int = 0
    train_epochs: int = 0
    shuffle: ShuffleState | None = None
    just_initialized: bool = True
    fx_best: float = 0.0
    fx_prev: float = 0.0
    n_no_improvement: int = 0
    past_loss: np.ndarray | None = None
    moment_order: str = RIGHT_TO_LEFT
    resumed_from: str | None = None
    notes: list[str] = field(default_factory=list)


def _zeros_like_lora(lora) -> dict:
    return {(n, h): torch.zeros_like(t) for n, (a, b) in lora.items() for h, t in (("a", a), ("b", b))}


def load_or_init(cfg, args: ModelArgs, shapes: dict, seed: int, emit: Callable, init_fn) -> TrainerState:
    from .train import MessageEvent

    o = cfg.optim
    path = cfg.checkpoint_in
    if path and Path(path).is_file():
        ck = read_checkpoint(path, args)
        diff = [k for k in KINDS if ck.ranks[k] != cfg.ranks[k]]
        if diff:
            detail = ", ".join(f"{k} {ck.ranks[k]} vs {cfg.ranks[k]}" for k in diff)
            raise LorakitError(
                f"Provided rank differs from checkpoint file ({detail}). To use different rank start finetune "
                "from scratch with empty input checkpoint, e.g --checkpoint-in ''",
                path,
            )
        if ck.opt_past != o.opt_past:
            raise LorakitError(
                f"--opt-past {o.opt_past} differs from the checkpoint's {ck.opt_past}; start from scratch "
                "with --checkpoint-in '' to change it",
                path,
            )
        m, v = ck.moments()
        st = TrainerState(
            lora={n: (a.float().clone(), b.float().clone()) for n, (a, b) in ck.lora.items()},
            m={k: t.clone() for k, t in m.items()},
            v={k: t.clone() for k, t in v.items()},
            opt_iter=ck.train_its,
            train_its=ck.train_its,
            train_samples=ck.train_samples,
            train_tokens=ck.train_tokens,
            train_epochs=ck.train_epochs,
            shuffle=ShuffleState(
                ck.shuffle_rng_state,
                "",
                ck.shuffle_sample_count,
                ck.shuffle_next_sample,
                ck.shuffle_samples_hash,
            ),
            just_initialized=ck.just_initialized,
            fx_best=ck.best_loss,
            fx_prev=ck.previous_loss,
            n_no_improvement=ck.no_improvement_count,
            past_loss=None if ck.past_loss_values is None else ck.past_loss_values.numpy().copy(),
            moment_order=ck.moment_order,
            resumed_from=str(path),
        )
        emit(MessageEvent(f"{path}: resuming at iteration {st.opt_iter} (moment order {ck.moment_order})"))
        return st
    if path:
        emit(MessageEvent(f"{path}: not found, starting from scratch"))
    lora = init_fn(shapes, seed)
    return TrainerState(
        lora=lora,
        m=_zeros_like_lora(lora),
        v=_zeros_like_lora(lora),
        past_loss=np.zeros(o.opt_past, dtype=np.float32) if o.opt_past > 0 else None,
    )


def check_output_dirs(cfg) -> None:
    """Fail before training (and before any save) when an output directory is missing or read-only."""
    import os

    for opt, template in (("--checkpoint-out", cfg.checkpoint_out), ("--lora-out", cfg.lora_out)):
        if not template or (opt == "--checkpoint-out" and cfg.only_write_lora):
            continue
        parent = Path(template).parent
        if not parent.is_dir():
            raise LorakitError(f"{opt}: directory {str(parent)!r} does not exist", template)
        if not os.access(parent, os.W_OK):
            raise LorakitError(f"{opt}: directory {str(parent)!r} is not writable", template)


def fill_pattern(template: str, pattern: str, value: str) -> str:
    """llama.cpp replaces the first occurrence of --pattern-fn-it in an output name."""
    return template.replace(pattern, value, 1) if pattern else template


def to_checkpoint(cfg, args: ModelArgs, st: TrainerState) -> Checkpoint:
    sh = st.shuffle or ShuffleState()
    nx = sum(int(a.numel() + b.numel()) for a, b in st.lora.values())
    return Checkpoint(
        n_ctx=cfg.n_ctx,
        n_embd=args.n_embd,
        n_ff=args.n_ff,
        n_head=args.n_head,
        n_head_kv=args.n_head_kv,
        n_layer=args.n_layer,
        rope_dim=args.head_dim,
        norm_eps=args.norm_eps,
        rope_freq_base=args.rope_freq_base,
        rope_scale_linear=args.rope_freq_scale,  # finetune writes freq_scale here (spec §6.2)
        ranks=cfg.ranks,
        lora={n: (a.detach().cpu(), b.detach().cpu()) for n, (a, b) in st.lora.items()},
        train_its=st.train_its,
        train_samples=st.train_samples,
        train_tokens=st.train_tokens,
        train_epochs=st.train_epochs,
        shuffle_samples_hash=sh.samples_hash,
        shuffle_rng_state=sh.rng_state_current,
        shuffle_sample_count=sh.sample_count,
        shuffle_next_sample=sh.next_sample,
        opt_past=cfg.optim.opt_past,
        nx=nx,
        opt_iter=st.opt_iter,
        just_initialized=False,
        best_loss=st.fx_best,
        previous_loss=st.fx_prev,
        no_improvement_count=st.n_no_improvement,
        m=flatten_moments({k: t.detach().cpu() for k, t in st.m.items()}, st.moment_order),
        v=flatten_moments({k: t.detach().cpu() for k, t in st.v.items()}, st.moment_order),
        past_loss_values=None if st.past_loss is None else torch.from_numpy(np.asarray(st.past_loss, np.float32)),
        moment_order=st.moment_order,
    )


def write_adapter(path: str, cfg, st: TrainerState, tied_output: bool) -> list[str]:
    """--lora-out by extension: .gguf -> GGUF LoRA adapter (spec §9.4 bake), anything else -> ggla."""
    pairs = {n: (a.detach().cpu(), b.detach().cpu()) for n, (a, b) in st.lora.items()}
    if path.lower().endswith(".gguf"):
        return write_gguf_adapter(path, pairs, float(cfg.lora_alpha), int(cfg.lora_r), tied_output)
    write_ggla(path, pairs, int(cfg.lora_r), int(cfg.lora_alpha))
    return []


def save_outputs(
    cfg, args: ModelArgs, st: TrainerState, iteration: int, tied_output: bool, lora_only: bool = False
) -> list[str]:
    """checkpoint(iter), checkpoint(LATEST), lora(iter), lora(LATEST): llama.cpp's order; each atomic."""
    written: list[str] = []
    values = (str(iteration), cfg.fn_latest)
    if cfg.checkpoint_out and not lora_only:
        first, latest = (fill_pattern(cfg.checkpoint_out, cfg.pattern_fn_it, v) for v in values)
        write_checkpoint(first, to_checkpoint(cfg, args, st))
        _also_as(first, latest)
        written += [first, latest]
    if cfg.lora_out:
        first, latest = (fill_pattern(cfg.lora_out, cfg.pattern_fn_it, v) for v in values)
        dropped = write_adapter(first, cfg, st, tied_output)
        _also_as(first, latest)
        written += [first, latest]
        if dropped and not st.notes:
            st.notes.append(
                f"{first}: GGUF adapters cannot carry {len(dropped)} of the trained LoRAs "
                "(norm LoRAs, which llama.cpp ignores; on a tied-output base also token_embd/output); "
                "use a .bin --lora-out to keep them"
            )
    return written


def _also_as(first: str, latest: str) -> None:
    """The LATEST file is a byte copy of the iteration's (llama.cpp writes the same bytes twice)."""
    if Path(latest).resolve() != Path(first).resolve():
        copy_atomic(first, latest)
