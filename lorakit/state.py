"""The trainer's resumable state: start it (fresh or from --checkpoint-in) and save it.

Fresh start (spec §5, §6.4): LoRA from llama.cpp's init for the seed, m = v = 0, iteration 0.
Resume: the checkpoint's LoRA, moments (in the order the file was written), counters and
shuffle state; its ranks and --opt-past must equal the command line's, as llama.cpp requires.
A --checkpoint-in that does not exist (or is '') starts fresh, as llama.cpp does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapters import write_gguf_adapter
from .checkpoint import RIGHT_TO_LEFT, Checkpoint, flatten_moments, read_checkpoint, write_checkpoint
from .data import ShuffleState
from .errors import LorakitError, UsageError
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


# a run stops early (convergence, --epochs, Ctrl-C) and saves under any iteration number up to its last; past this
# many iterations only the first ones and the last one are checked
_MAX_CHECKED_ITERATIONS = 100_000


def output_names(cfg, iter0: int) -> list[tuple[str, str]]:
    """(option, path) for every file a run that starts at iteration iter0 can write (spec §4.6): each output under
    each iteration number it can be saved at and under --fn-latest, and --log-jsonl."""
    if cfg.only_write_lora:
        iterations = [iter0]
    else:
        last = iter0 + cfg.optim.adam_iter
        iterations = [*range(iter0 + 1, min(last, iter0 + _MAX_CHECKED_ITERATIONS) + 1), last]
    names = []
    for opt, template in (("--checkpoint-out", cfg.checkpoint_out), ("--lora-out", cfg.lora_out)):
        if not template or (opt == "--checkpoint-out" and cfg.only_write_lora):
            continue
        varies = cfg.pattern_fn_it in template  # an empty pattern is in every name (fill_pattern)
        values = [cfg.fn_latest, *map(str, iterations)] if varies else [cfg.fn_latest]
        names += [(opt, fill_pattern(template, cfg.pattern_fn_it, v)) for v in values]
    if cfg.log_jsonl:
        names.append(("--log-jsonl", cfg.log_jsonl))
    return list(dict.fromkeys(names))


def check_outputs(cfg, iter0: int) -> None:
    """Fail before training (and before any save) when an output cannot be written (missing or read-only
    directory, a directory in its place) or would replace an input: the base model, the training data, the
    --checkpoint-in file (which only --checkpoint-out may replace: resuming from LATEST) or the --log-jsonl file."""
    given = [
        ("--model-base", cfg.model_base),
        ("--train-data", cfg.train_data),
        ("--checkpoint-in", cfg.checkpoint_in),
    ]
    inputs = [(opt, p, os.path.realpath(p), _file_id(p)) for opt, p in given if p and os.path.exists(p)]
    if cfg.log_jsonl:  # appended to, so no output may take its place (it may not exist yet)
        inputs.append(("--log-jsonl", cfg.log_jsonl, os.path.realpath(cfg.log_jsonl), _file_id(cfg.log_jsonl)))
    checked_dirs = set()
    owner: dict[str, str] = {}
    for opt, name in output_names(cfg, iter0):
        real = os.path.realpath(name)
        other = owner.setdefault(real, opt)
        if other != opt:  # the adapter would replace the checkpoint saved under the same name just before
            raise UsageError(f"{opt} and {other} both write this file; choose different names", name)
        parent = os.path.dirname(name) or "."
        if parent not in checked_dirs:
            if not os.path.isdir(parent):
                raise LorakitError(f"{opt}: directory {parent!r} does not exist", name)
            if not os.access(parent, os.W_OK):
                raise LorakitError(f"{opt}: directory {parent!r} is not writable", name)
            checked_dirs.add(parent)
        if os.path.isdir(name):
            raise LorakitError(f"{opt}: is a directory, not a file", name)
        if opt == "--log-jsonl" and os.path.exists(name) and not os.access(name, os.W_OK):
            raise LorakitError(f"{opt}: file is not writable", name)
        file_id = _file_id(name)
        for in_opt, in_path, in_real, in_id in inputs:
            if in_opt == opt or (in_opt == "--checkpoint-in" and opt == "--checkpoint-out"):
                continue  # a new LATEST checkpoint over the one resumed from is the usual resume pattern
            if real == in_real or (file_id is not None and file_id == in_id):
                what = f"the {in_opt} file" + ("" if in_path == name else f" {in_path!r}")
                verb = "append to" if opt == "--log-jsonl" else "overwrite"
                raise UsageError(f"{opt} would {verb} {what}; choose another name", name)


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of an existing file, following links: two names of one file (os.path.samefile)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def fill_pattern(template: str, pattern: str, value: str) -> str:
    """llama.cpp replaces the first occurrence of --pattern-fn-it in an output name (replace_str: an empty pattern is
    found at the start, so the value is put in front; Python's str.replace does the same)."""
    return template.replace(pattern, value, 1)


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
