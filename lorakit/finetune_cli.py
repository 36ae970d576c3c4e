"""`lorakit finetune`: llama.cpp finetune's options (spec §1.1-1.2), same names and defaults.

Kept apart from cli.py because the option list is long; it only builds a FinetuneConfig and
hands it to train.run_finetune, drawing progress with rich. Option help texts follow llama.cpp.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import LorakitError, UsageError
from .optim import OptimConfig
from .options import check_finite, uint32_seed

O = typer.Option
I = Annotated[int, O()]  # noqa: E741


def finetune(
    model_base: Annotated[str, O("--model-base", help="base model GGUF (llama; q8_0, f16, f32, ...)")] = "",
    lora_out: Annotated[
        str, O("--lora-out", help="adapter path: .bin = llama.cpp ggla, .gguf = GGUF LoRA adapter")
    ] = "ggml-lora-ITERATION-f32.gguf",
    only_write_lora: Annotated[bool, O("--only-write-lora", help="only write the LoRA, do not train")] = False,
    norm_rms_eps: Annotated[float | None, O("--norm-rms-eps", help="RMS-Norm epsilon (default: model)")] = None,
    rope_freq_base: Annotated[float | None, O("--rope-freq-base", help="RoPE base (default: model)")] = None,
    rope_freq_scale: Annotated[float | None, O("--rope-freq-scale", help="RoPE scale (default: model)")] = None,
    lora_alpha: Annotated[int | None, O("--lora-alpha", help="LoRA alpha (header only; default = r)")] = None,
    lora_r: Annotated[int, O("--lora-r", help="default LoRA rank")] = 4,
    rank_att_norm: Annotated[int, O("--rank-att-norm")] = 1,
    rank_ffn_norm: Annotated[int, O("--rank-ffn-norm")] = 1,
    rank_out_norm: Annotated[int, O("--rank-out-norm")] = 1,
    rank_tok_embd: Annotated[int | None, O("--rank-tok-embd")] = None,
    rank_out: Annotated[int | None, O("--rank-out")] = None,
    rank_wq: Annotated[int | None, O("--rank-wq")] = None,
    rank_wk: Annotated[int | None, O("--rank-wk")] = None,
    rank_wv: Annotated[int | None, O("--rank-wv")] = None,
    rank_wo: Annotated[int | None, O("--rank-wo")] = None,
    rank_ffn_gate: Annotated[int | None, O("--rank-ffn-gate", "--rank-w1")] = None,
    rank_ffn_down: Annotated[int | None, O("--rank-ffn-down", "--rank-w2")] = None,
    rank_ffn_up: Annotated[int | None, O("--rank-ffn-up", "--rank-w3")] = None,
    train_data: Annotated[str, O("--train-data", help="training text file")] = "shakespeare.txt",
    checkpoint_in: Annotated[str, O("--checkpoint-in", help="resume from this checkpoint if it exists")] = (
        "checkpoint.gguf"
    ),
    checkpoint_out: Annotated[str, O("--checkpoint-out")] = "checkpoint-ITERATION.gguf",
    pattern_fn_it: Annotated[str, O("--pattern-fn-it")] = "ITERATION",
    fn_latest: Annotated[str, O("--fn-latest")] = "LATEST",
    save_every: Annotated[int, O("--save-every", help="save every N iterations (0: only at the end)")] = 10,
    seed: Annotated[int, O("-s", "--seed", help="RNG seed (-1: time)")] = -1,
    ctx: Annotated[int, O("-c", "--ctx", help="context (tokens per sample)")] = 128,
    threads: Annotated[int, O("-t", "--threads")] = 6,
    batch: Annotated[int, O("-b", "--batch")] = 8,
    grad_acc: Annotated[int, O("--grad-acc")] = 1,
    sample_start: Annotated[str, O("--sample-start", help="sample separator ('' = every token)")] = "",
    include_sample_start: Annotated[bool, O("--include-sample-start")] = False,
    escape: Annotated[bool, O("--escape", help="process escapes in --sample-start")] = False,
    overlapping_samples: Annotated[bool, O("--overlapping-samples")] = False,
    fill_with_next_samples: Annotated[bool, O("--fill-with-next-samples")] = False,
    separate_with_eos: Annotated[bool, O("--separate-with-eos/--no-separate-with-eos")] = False,
    separate_with_bos: Annotated[bool, O("--separate-with-bos/--no-separate-with-bos")] = True,
    sample_random_offsets: Annotated[bool, O("--sample-random-offsets")] = False,
    force_reshuffle: Annotated[bool, O("--force-reshuffle")] = False,
    no_flash: Annotated[bool, O("--no-flash/--use-flash", help="accepted for compatibility", hidden=True)] = True,
    use_checkpointing: Annotated[bool, O("--use-checkpointing/--no-checkpointing")] = True,
    warmup: Annotated[int, O("--warmup")] = 100,
    cos_decay_steps: Annotated[int, O("--cos-decay-steps")] = 1000,
    cos_decay_restart: Annotated[float, O("--cos-decay-restart")] = 1.1,
    cos_decay_min: Annotated[float, O("--cos-decay-min")] = 0.1,
    enable_restart: Annotated[bool, O("--enable-restart/--disable-restart")] = False,
    opt_past: Annotated[int, O("--opt-past")] = 0,
    opt_delta: Annotated[float, O("--opt-delta")] = 1e-5,
    opt_max_no_improvement: Annotated[int, O("--opt-max-no-improvement")] = 0,
    epochs: Annotated[int, O("--epochs", help="stop after N epochs (<=0: unlimited)")] = -1,
    adam_iter: Annotated[int, O("--adam-iter", help="optimizer iterations in this run")] = 256,
    adam_alpha: Annotated[float, O("--adam-alpha")] = 1e-3,
    adam_min_alpha: Annotated[float, O("--adam-min-alpha")] = 0.0,
    adam_decay: Annotated[float, O("--adam-decay")] = 0.1,
    adam_decay_min_ndim: Annotated[int, O("--adam-decay-min-ndim")] = 2,
    adam_beta1: Annotated[float, O("--adam-beta1")] = 0.9,
    adam_beta2: Annotated[float, O("--adam-beta2")] = 0.999,
    adam_gclip: Annotated[float, O("--adam-gclip")] = 1.0,
    adam_epsf: Annotated[float, O("--adam-epsf")] = 0.0,
    n_gpu_layers: Annotated[int, O("-ngl", "--n-gpu-layers", help="ignored (use --backend)", hidden=True)] = 0,
    backend: Annotated[str, O("--backend", help="auto | cpu-torch | cuda-triton")] = "auto",
    compute_dtype: Annotated[str, O("--compute-dtype", help="f32 (llama.cpp's numbers) | bf16")] = "f32",
    cuda_graph: Annotated[
        bool, O("--cuda-graph/--no-cuda-graph", help="GPU: replay each training step as one CUDA graph")
    ] = True,
    log_jsonl: Annotated[str | None, O("--log-jsonl", help="write one JSON object per iteration")] = None,
) -> None:
    from .lora import LoraRanks
    from .train import FinetuneConfig

    if not model_base:
        raise UsageError("--model-base is required")
    if compute_dtype not in ("f32", "bf16"):
        raise UsageError(f"--compute-dtype {compute_dtype!r}: choose f32 or bf16")
    for name, v in (("--ctx", ctx), ("--batch", batch), ("--lora-r", lora_r)):
        if v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    check_finite(
        {
            "--norm-rms-eps": norm_rms_eps,
            "--rope-freq-base": rope_freq_base,
            "--rope-freq-scale": rope_freq_scale,
            "--cos-decay-restart": cos_decay_restart,
            "--cos-decay-min": cos_decay_min,
            "--opt-delta": opt_delta,
            "--adam-alpha": adam_alpha,
            "--adam-min-alpha": adam_min_alpha,
            "--adam-decay": adam_decay,
            "--adam-beta1": adam_beta1,
            "--adam-beta2": adam_beta2,
            "--adam-gclip": adam_gclip,
            "--adam-epsf": adam_epsf,
        }
    )
    for name, v in (("--adam-beta1", adam_beta1), ("--adam-beta2", adam_beta2)):
        if not 0 <= v < 1:  # llama.cpp's help: "in interval [0,1)"; at 1 the bias correction divides by 0 (NaN)
            raise UsageError(f"{name} must be in [0, 1), got {v}")
    _check_schedule(cos_decay_steps, cos_decay_restart, enable_restart)
    # deviation: llama.cpp trains with a negative --opt-past as with 0 but writes it into the checkpoint as the
    # u32 4294967295; the spec gives it no meaning
    if opt_past < 0:
        raise UsageError(f"--opt-past must be >= 0 (0 switches the delta test off), got {opt_past}")
    if adam_iter < 1 and not only_write_lora:  # llama.cpp: no iteration, nothing saved, exit 0; lorakit says so
        print(f"lorakit: note: --adam-iter {adam_iter}: no iterations to run; nothing is written", file=sys.stderr)
    # deviation: llama.cpp writes a negative --lora-alpha into the ggla header as a u32 (-1: 4294967295)
    if lora_alpha is not None and not 0 <= lora_alpha < 2**32:
        raise UsageError(f"--lora-alpha must be >= 0 (an unsigned 32-bit number), got {lora_alpha}")
    seed = uint32_seed(seed)  # llama.cpp's uint32 seed (spec §1.2): -2 is 4294967294, -1 "from the clock"
    r = lora_r
    ranks = LoraRanks(
        {
            "token_embd": r if rank_tok_embd is None else rank_tok_embd,
            "output_norm": rank_out_norm,
            "output": r if rank_out is None else rank_out,
            "attn_norm": rank_att_norm,
            "attn_q": r if rank_wq is None else rank_wq,
            "attn_k": r if rank_wk is None else rank_wk,
            "attn_v": r if rank_wv is None else rank_wv,
            "attn_output": r if rank_wo is None else rank_wo,
            "ffn_norm": rank_ffn_norm,
            "ffn_gate": r if rank_ffn_gate is None else rank_ffn_gate,
            "ffn_down": r if rank_ffn_down is None else rank_ffn_down,
            "ffn_up": r if rank_ffn_up is None else rank_ffn_up,
        }
    )
    if any(v < 0 for v in ranks.ranks.values()):
        raise UsageError("ranks must be >= 0 (0 switches a tensor kind off)")
    optim = OptimConfig(
        adam_iter=adam_iter,
        alpha=adam_alpha,
        min_alpha=adam_min_alpha,
        decay=adam_decay,
        decay_min_ndim=adam_decay_min_ndim,
        beta1=adam_beta1,
        beta2=adam_beta2,
        gclip=adam_gclip,
        eps_f=adam_epsf,
        warmup=warmup,
        cos_decay_steps=cos_decay_steps,
        cos_decay_restart=cos_decay_restart,
        cos_decay_min=cos_decay_min,
        enable_restart=enable_restart,
        opt_past=opt_past,
        opt_delta=opt_delta,
        opt_max_no_improvement=opt_max_no_improvement,
        grad_acc=max(1, grad_acc),
    )
    cfg = FinetuneConfig(
        model_base=model_base,
        train_data=train_data,
        checkpoint_in=checkpoint_in,
        checkpoint_out=checkpoint_out,
        lora_out=lora_out,
        pattern_fn_it=pattern_fn_it,
        fn_latest=fn_latest,
        save_every=save_every,
        only_write_lora=only_write_lora,
        seed=seed,
        n_ctx=ctx,
        n_batch=batch,
        threads=threads,
        lora_r=lora_r,
        lora_alpha=lora_r if lora_alpha is None else lora_alpha,
        ranks=ranks,
        norm_rms_eps=norm_rms_eps,
        rope_freq_base=rope_freq_base,
        rope_freq_scale=rope_freq_scale,
        sample_start=sample_start,
        include_sample_start=include_sample_start,
        escape=escape,
        overlapping_samples=overlapping_samples,
        fill_with_next_samples=fill_with_next_samples,
        separate_with_eos=separate_with_eos,
        separate_with_bos=separate_with_bos,
        sample_random_offsets=sample_random_offsets,
        force_reshuffle=force_reshuffle,
        use_checkpointing=use_checkpointing,
        epochs=epochs,
        optim=optim,
        backend=backend,
        compute_dtype=compute_dtype,
        cuda_graph=cuda_graph,
        log_jsonl=log_jsonl or None,
    )
    _run(cfg)


def _check_schedule(cos_decay_steps: int, cos_decay_restart: float, enable_restart: bool) -> None:
    """Schedule settings for which llama.cpp's learning_schedule (spec §4.3) gives NaN or never returns."""
    # deviation: llama.cpp divides by --cos-decay-steps (0: a NaN schedule, so NaN weights), and with restarts
    # `while (step > C) step -= C` never ends for C <= 0
    if cos_decay_steps < 1:
        raise UsageError(f"--cos-decay-steps must be >= 1, got {cos_decay_steps}")
    if not enable_restart:
        return  # --cos-decay-restart is only used by restarts
    # each restart sets C = trunc(float(restart) * C): with a factor below 1 the period shrinks to 0 and the loop
    # above never ends once a step passes the sum of the periods; a factor >= 1 never shrinks it
    factor = float(np.float32(cos_decay_restart))
    if factor < 1:
        raise UsageError(f"--cos-decay-restart must be >= 1 with --enable-restart, got {cos_decay_restart}")
    if factor * cos_decay_steps >= 2.0**63:  # llama.cpp keeps C in an int64
        raise UsageError(f"--cos-decay-restart {cos_decay_restart} x --cos-decay-steps {cos_decay_steps} is too large")


def _run(cfg) -> None:
    from .train import IterationEvent, MessageEvent, SaveEvent, run_finetune

    err = Console(stderr=True, highlight=False)
    show_bar = err.is_terminal
    jsonl = None  # opened at the first iteration: a run refused before training leaves no log file behind
    progress = Progress(
        TextColumn("iter {task.fields[it]}/{task.total:.0f}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
        TextColumn("sample {task.fields[sample]}  epoch {task.fields[epoch]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not show_bar,
        transient=False,
    )
    task = None
    t_start = time.perf_counter()
    # with the bar on the same terminal, log lines go through its console so they print above it
    shared_tty = show_bar and sys.stdout.isatty()

    stdout_closed = False

    def say(text: str, warning: bool = False) -> None:
        nonlocal stdout_closed
        if shared_tty:
            progress.console.print(text, markup=False, highlight=False)
        elif warning:
            print(text, file=sys.stderr, flush=True)
        elif not stdout_closed:
            try:
                print(text, flush=True)
            except BrokenPipeError:  # `lorakit finetune ... | head`: the run goes on, its files are what it is for
                from .cli import quiet_stdout

                stdout_closed = True
                quiet_stdout()

    def on_event(ev) -> None:
        nonlocal task, jsonl
        if isinstance(ev, IterationEvent):
            # llama.cpp's log line, so existing scripts that grep losses keep working
            say(
                f"train_opt_callback: iter={ev.iter:6d} sample={ev.sample}/{ev.sample_count} "
                f"sched={ev.sched:.6f} loss={ev.loss:.6f} dt={ev.dt:.3f}s tok/s={ev.tokens_per_s:.1f}"
            )
            if task is None:
                task = progress.add_task(
                    "train",
                    total=ev.last_iter,
                    completed=0,
                    it=ev.iter,
                    loss=ev.loss,
                    lr=ev.lr,
                    tps=0.0,
                    sample="",
                    epoch=0,
                )
            progress.update(
                task,
                completed=ev.iter - ev.first_iter,
                total=ev.last_iter - ev.first_iter,
                it=ev.iter,
                loss=ev.loss,
                lr=ev.lr,
                tps=ev.tokens_per_s,
                sample=f"{ev.sample}/{ev.sample_count}",
                epoch=ev.epochs,
            )
            if cfg.log_jsonl:
                if jsonl is None:
                    try:
                        jsonl = open(cfg.log_jsonl, "a", encoding="utf-8")  # noqa: SIM115
                    except OSError as e:
                        raise LorakitError(f"--log-jsonl: cannot open ({e.strerror or e})", cfg.log_jsonl) from None
                rec = {
                    "iter": ev.iter,
                    "loss": ev.loss,
                    "sched": ev.sched,
                    "lr": ev.lr,
                    "tokens": ev.tokens,
                    "seconds": round(time.perf_counter() - t_start, 4),
                    "dt": ev.dt,
                    "sample": ev.sample,
                    "epochs": ev.epochs,
                }
                jsonl.write(json.dumps(rec) + "\n")
                jsonl.flush()
        elif isinstance(ev, SaveEvent):
            for p in ev.paths:
                say(f"save: {p}")
        elif isinstance(ev, MessageEvent):
            say(ev.text, ev.warning)

    try:
        with progress:
            run_finetune(cfg, on_event)
    finally:
        if jsonl is not None:
            jsonl.close()


__all__ = ["finetune", "Path"]
