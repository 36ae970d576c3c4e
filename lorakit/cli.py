"""The `lorakit` command line: finetune, predict, inspect. With finetune_cli (finetune's options and progress) and
render (inspect's tables, on the console this module hands it), the only modules that print.

Exit codes: 0 ok, 1 runtime/data error (one line on stderr naming the file and the problem),
2 usage error, 130 interrupted (finetune saves its last finished iteration first).
Long options accept '_' for '-' as llama.cpp does (`--adam_iter` == `--adam-iter`).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import LorakitError, UsageError
from .options import check_finite, uint32_seed

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Fine-tune and apply LoRA adapters directly on quantized GGUF llama models.",
)


class PipeClosed(Exception):
    """The reader of stdout went away (`lorakit inspect m.gguf | head`): not an OSError, so click passes it on."""


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich's own handler exits 1
        raise PipeClosed


err = _Console(stderr=True, highlight=False, soft_wrap=True, markup=False)  # paths may hold "[...]"
out = _Console(highlight=False, soft_wrap=True)


def _quiet_on_closed_pipe(command):
    """A command whose stdout reader may go away (`lorakit inspect m.gguf | head`): its BrokenPipeError leaves as
    PipeClosed, which click passes on to main (click itself turns EPIPE into exit 1)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:
            raise PipeClosed from None

    return run


_SEP = "\x00"  # joins the two values of --lora-scaled FN SCALE into one option value


@functools.cache
def _value_options() -> dict[str, dict[str, int]]:
    """Per command, the options that take values and how many (from the click command typer builds)."""
    group = typer.main.get_command(app)
    return {
        name: {
            o: p.nargs
            for p in cmd.params
            if getattr(p, "param_type_name", "") == "option" and not p.is_flag and not p.count
            for o in p.opts + p.secondary_opts
        }
        for name, cmd in group.commands.items()
    }


def normalize_argv(argv: list[str]) -> list[str]:
    """llama.cpp spellings: '_' -> '-' in long option names (not in their values: `-p "--a_b"` stays);
    --lora-scaled takes two values."""
    res: list[str] = []
    command = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":  # the rest is positional
            res += argv[i:]
            break
        if a.startswith("--") and len(a) > 2:
            name, eq, val = a.partition("=")
            a = name.replace("_", "-") + eq + val
        elif command is None and not a.startswith("-"):
            command = a
        if a == "--lora-scaled":
            if i + 2 >= len(argv):
                raise UsageError("--lora-scaled needs two values: FN SCALE")
            res += [a, argv[i + 1] + _SEP + argv[i + 2]]
            i += 3
            continue
        res.append(a)
        i += 1
        n = 0 if "=" in a else _value_options().get(command or "", {}).get(a, 0)
        res += argv[i : i + n]
        i += n
    return res


def parse_lora_args(lora: list[str] | None, lora_scaled: list[str] | None) -> list[tuple[str, float]]:
    pairs = [(p, 1.0) for p in (lora or [])]
    for item in lora_scaled or []:
        fn, _, scale = item.partition(_SEP)
        try:
            value = float(scale)
        except ValueError:
            raise UsageError(f"--lora-scaled {fn}: scale {scale!r} is not a number") from None
        check_finite({f"--lora-scaled {fn}: the scale": value})
        pairs.append((fn, value))
    return pairs


def _backend_opt():
    return typer.Option("--backend", help="auto | cpu-torch | cuda-triton")


@app.command(help="Generate text with a GGUF llama model and any number of LoRA adapters (unmerged).")
@_quiet_on_closed_pipe
def predict(
    model: Annotated[Path, typer.Option("-m", "--model", help="GGUF model", readable=False)],
    prompt: Annotated[str | None, typer.Option("-p", "--prompt")] = None,
    file: Annotated[
        Path | None, typer.Option("-f", "--file", help="read the prompt from a file", readable=False)
    ] = None,
    escape: Annotated[
        bool, typer.Option("-e", "--escape/--no-escape", help="process \\n \\r \\t \\' \\\" \\\\ \\xHH in the prompt")
    ] = False,
    n_predict: Annotated[int, typer.Option("-n", "--n-predict", help="tokens to generate (-1: until EOS)")] = -1,
    temp: Annotated[float, typer.Option("--temp", help="temperature; 0 = greedy")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k")] = 40,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
    min_p: Annotated[float, typer.Option("--min-p")] = 0.05,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty")] = 1.0,
    repeat_last_n: Annotated[int, typer.Option("--repeat-last-n", help="0: off, -1: the context size")] = 64,
    seed: Annotated[int, typer.Option("-s", "--seed", help="-1: random")] = -1,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="context size (0: the model's)")] = 512,
    threads: Annotated[int, typer.Option("-t", "--threads")] = 0,
    lora: Annotated[list[str] | None, typer.Option("--lora", metavar="FN", help="adapter, scale 1")] = None,
    lora_scaled: Annotated[
        list[str] | None, typer.Option("--lora-scaled", metavar="FN SCALE", help="adapter with a scale")
    ] = None,
    backend: Annotated[str, _backend_opt()] = "auto",
    no_bos: Annotated[bool, typer.Option("--no-bos", help="do not add BOS to the prompt")] = False,
    compute_dtype: Annotated[
        str, typer.Option("--compute-dtype", help="activations: f32 (default) or bf16 (faster on GPUs)")
    ] = "f32",
    act_q8: Annotated[
        bool,
        typer.Option(
            "--act-q8",
            help="llama.cpp's arithmetic for q8_0 weights: activations quantized to q8_0, integer block products "
            "(its numbers; on sm_90 GPUs each decode step is one megakernel launch)",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="print timings to stderr")] = False,
    # llama.cpp main's options that do not apply here: accepted and ignored (hidden)
    n_gpu_layers: Annotated[int, typer.Option("-ngl", "--n-gpu-layers", "--gpu-layers", hidden=True)] = 0,
    lora_base: Annotated[str | None, typer.Option("--lora-base", hidden=True)] = None,
    batch_size: Annotated[int, typer.Option("-b", "--batch-size", "-ub", "--ubatch-size", hidden=True)] = 0,
    color: Annotated[bool, typer.Option("--color", hidden=True)] = False,
    no_mmap: Annotated[bool, typer.Option("--no-mmap", "--mlock", hidden=True)] = False,
) -> None:
    from .predict import PredictNote, PredictRequest, run_predict

    if compute_dtype not in ("f32", "bf16"):
        raise UsageError(f"--compute-dtype {compute_dtype!r}: choose f32 or bf16")
    check_finite({"--temp": temp, "--top-p": top_p, "--min-p": min_p, "--repeat-penalty": repeat_penalty})
    if repeat_last_n < -1:
        raise UsageError(f"--repeat-last-n {repeat_last_n}: 0 switches it off, -1 takes the context size")
    if prompt is not None and file is not None:
        raise UsageError("use either -p/--prompt or -f/--file, not both")
    if file is not None:
        try:
            prompt = file.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise LorakitError(f"cannot read prompt file ({e.strerror})", file) from None
        prompt = prompt.removesuffix("\n")  # as llama.cpp's -f: one trailing newline goes
    if escape and prompt:
        from .data import process_escapes

        prompt = process_escapes(prompt).decode("utf-8", errors="replace")
    if lora_base:
        err.print("lorakit: note: --lora-base is not needed (adapters are applied unmerged to the base); ignored")
    from .generate import SamplingParams

    req = PredictRequest(
        model=str(model),
        prompt=prompt or "",
        n_predict=n_predict,
        sampling=SamplingParams(
            temp=temp,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n,
            seed=uint32_seed(seed),
        ),
        n_ctx=ctx_size,
        threads=threads,
        adapters=parse_lora_args(lora, lora_scaled),
        backend=backend,
        add_bos=not no_bos,
        compute_dtype=compute_dtype,
        act_q8=act_q8,
    )
    stats, later, echoed = None, [], False
    try:
        for i, piece in enumerate(run_predict(req)):
            if i == 0:  # the prompt's echo: the model is loaded, the backend imported. Their objects and the
                # imports' (several hundred thousand: torch, triton) leave the collector's full passes, which had
                # taken 140-170 ms of a process's first prompts on the H200's host (bench/host_lab.py)
                gc.freeze()
            if isinstance(piece, str):
                _write(piece)
                echoed = True
            elif isinstance(piece, PredictNote):  # once the text has begun, after its last line
                if echoed:
                    later.append(piece.text)
                else:
                    err.print(f"lorakit: note: {piece.text}")
            else:
                stats = piece
    finally:
        gc.unfreeze()  # as it was (a caller's process, tests, goes on)
    _write("\n")
    for text in later:
        err.print(f"lorakit: note: {text}")
    if verbose and stats is not None:
        err.print(
            f"prompt {stats.prompt_tokens} tokens in {stats.prefill_s:.3f} s; "
            f"generated {stats.generated} tokens in {stats.decode_s:.3f} s "
            f"({stats.generated / max(stats.decode_s, 1e-9):.1f} tok/s)"
        )


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # a closed pipe shows here, inside the command, not at the interpreter's exit


@app.command(help="Describe a GGUF model, finetune checkpoint, GGUF adapter or ggla .bin adapter.")
@_quiet_on_closed_pipe
def inspect(
    file: Annotated[Path, typer.Argument(help="file to inspect", readable=False)],
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="list every tensor")] = False,
) -> None:
    from .inspect import inspect_file
    from .render import print_report

    report = inspect_file(file, with_tensors=tensors)
    print_report(out, report, as_json=json_out)


def _register_finetune() -> None:
    from .finetune_cli import finetune

    app.command(
        help="llama.cpp finetune: train a LoRA on a (quantized) GGUF llama model.",
        context_settings={"help_option_names": ["-h", "--help"]},
    )(finetune)


_register_finetune()


def quiet_stdout() -> None:
    """After a closed pipe: stdout to /dev/null, so that the interpreter's last flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="lorakit: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = app(normalize_argv(argv), prog_name="lorakit", standalone_mode=False)
        return rv if isinstance(rv, int) else 0  # typer returns 130 for a KeyboardInterrupt here
    except UsageError as e:
        err.print(f"lorakit: usage error: {e}")
        return 2
    except LorakitError as e:
        err.print(f"lorakit: error: {e}")
        return 1
    except KeyboardInterrupt:
        err.print("lorakit: interrupted")
        return 130
    except (PipeClosed, BrokenPipeError):  # the reader went away (`| head`): what it read was what it wanted
        quiet_stdout()
        return 0
    except SystemExit as e:  # typer/click exits (help, usage errors)
        return int(e.code or 0)
    except Exception as e:  # click usage errors and anything unexpected: one line, no traceback
        if type(e).__name__ == "NoArgsIsHelpError":  # `lorakit` alone: the help, as click gives it
            err.print(e.format_message())
            return 2
        if hasattr(e, "exit_code") and hasattr(e, "format_message"):  # click's ClickException (vendored by typer)
            kind = "usage error" if e.exit_code == 2 else "error"
            err.print(f"lorakit: {kind}: {e.format_message()}")
            return int(e.exit_code)
        if type(e).__name__ == "Abort":
            err.print("lorakit: aborted")
            return 130
        if isinstance(e, MemoryError):
            err.print("lorakit: error: out of memory")
            return 1
        err.print(f"lorakit: internal error: {type(e).__name__}: {e} (please report this)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
