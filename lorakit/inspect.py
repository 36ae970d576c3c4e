"""Turn any file lorakit reads into a plain report object; cli.py renders it (nothing here prints).

Kinds: `model` (a llama GGUF with tensors), `checkpoint` (finetune_lora GGUF), `gguf_adapter`,
`ggla_adapter` (finetune's .bin), `vocab` (a GGUF with no tensors), `other_gguf` (a GGUF lorakit
does not run, e.g. another architecture: described from its metadata, with a problem saying why).
A file that parses but that lorakit could not use gets its reasons in `problems`, not an error;
only files that cannot be read at all (missing, truncated, not GGUF/ggla) raise LorakitError.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LorakitError
from .gguf_io import GGLA_MAGIC, GGUF_MAGIC, GGUFFile, file_magic
from .lora import KINDS, kind_of
from .model import ModelArgs

KIND_LABELS = {
    "model": "GGUF model",
    "checkpoint": "finetune checkpoint",
    "gguf_adapter": "GGUF LoRA adapter",
    "ggla_adapter": "ggla LoRA adapter (.bin)",
    "vocab": "vocabulary-only GGUF",
    "other_gguf": "GGUF file",
}
KEPT_QUANTIZED, AS_IS, DEQUANTIZED = "kept quantized", "as is", "dequantized to f32 at load"


@dataclass(frozen=True)
class Field:
    key: str  # JSON key
    label: str  # what people read
    value: Any  # None | bool | int | float | str | tuple
    unit: str = ""  # "bytes": rendered with a human size


@dataclass(frozen=True)
class Section:
    """Key/value fields, or a table when `columns` is set (JSON: a list of rows, or a dict keyed by
    the first column when `keyed`)."""

    key: str
    title: str
    fields: tuple[Field, ...] = ()
    columns: tuple[tuple[str, str], ...] = ()  # (JSON key, header)
    rows: tuple[tuple, ...] = ()
    keyed: bool = False

    def to_json(self):
        if not self.columns:
            return {f.key: _jsonable(f.value) for f in self.fields}
        keys = [k for k, _ in self.columns]
        dicts = [{k: _jsonable(v) for k, v in zip(keys, row, strict=True)} for row in self.rows]
        return {d.pop(keys[0]): d for d in dicts} if self.keyed else dicts


@dataclass(frozen=True)
class Report:
    path: str
    kind: str
    file_size: int
    sections: tuple[Section, ...]
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # why lorakit could not use this file as what it is

    @property
    def kind_label(self) -> str:
        return KIND_LABELS[self.kind]

    def section(self, key: str) -> Section | None:
        return next((s for s in self.sections if s.key == key), None)

    def to_json_dict(self) -> dict:
        out: dict = {"path": self.path, "kind": self.kind, "kind_label": self.kind_label}
        out["file_size"] = self.file_size
        out["usable"] = not self.problems
        out.update({s.key: s.to_json() for s in self.sections})
        out["problems"] = list(self.problems)
        out["notes"] = list(self.notes)
        return out


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf
    if isinstance(v, (os.PathLike, bytes)):
        return os.fsdecode(v)
    return v


def _f32(x) -> float | None:
    """A float32 metadata value as its shortest decimal (9.999999747e-06 -> 1e-05)."""
    return None if x is None else float(str(np.float32(x)))


def _uniform(values):
    """One value when all are equal, else the sorted distinct values as a tuple."""
    distinct = sorted(set(values))
    return distinct[0] if len(distinct) == 1 else tuple(distinct)


def _kv(key: str, title: str, *fields: Field) -> Section:
    return Section(key, title, tuple(f for f in fields if f is not None))


# --------------------------------------------------------------------------- entry point


def inspect_file(path: str | os.PathLike, with_tensors: bool = False) -> Report:
    """Describe a GGUF model, finetune checkpoint, GGUF/ggla adapter, vocabulary or other GGUF."""
    p = Path(path)
    magic = file_magic(p)
    size = p.stat().st_size
    if magic == GGLA_MAGIC:
        return _ggla_report(p, size, with_tensors)
    if magic != GGUF_MAGIC:
        what = f"only {size} bytes" if size < 4 else f"file magic {magic!r}"
        raise LorakitError(f"not a GGUF file or ggla LoRA adapter ({what})", p)
    gf = GGUFFile(p)
    if gf.get("training.type") is not None or gf.get("training.file_version") is not None:
        build = _checkpoint_report
    elif gf.get("general.type") == "adapter":
        build = _gguf_adapter_report
    elif not gf.tensor_names():
        build = _vocab_report
    elif gf.architecture == "llama":
        build = _model_report
    else:
        build = _other_report
    kind, sections, notes, problems = build(gf)
    if with_tensors:
        sections.append(_tensor_table(gf))
    return Report(str(p), kind, size, tuple(sections), tuple(notes), tuple(problems))


# --------------------------------------------------------------------------- GGUF sections


def _gguf_version(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<I", f.read(8)[4:8])[0]


def _file_section(gf: GGUFFile) -> Section:
    import gguf

    ftype = gf.get("general.file_type")
    try:
        ftype_name = None if ftype is None else gguf.LlamaFileType(int(ftype)).name
    except ValueError:
        ftype_name = "unknown"
    infos = list(gf.infos())
    return _kv(
        "file",
        "File",
        Field("format", "format", "GGUF"),
        Field("version", "GGUF version", _gguf_version(gf.path)),
        Field("name", "general.name", gf.get("general.name")),
        Field("architecture", "general.architecture", gf.architecture),
        Field("file_type", "general.file_type", ftype),
        Field("file_type_name", "file type", ftype_name),
        Field("metadata_keys", "metadata keys", len(gf.fields)),
        Field("tensor_count", "tensors", len(infos)),
        Field("tensor_bytes", "tensor data", sum(i.n_bytes for i in infos), "bytes"),
    )


def held_as(type_name: str) -> str:
    """How load_model holds a tensor of this ggml type."""
    if type_name == "Q8_0":
        return KEPT_QUANTIZED
    if type_name in ("F32", "F16", "BF16"):
        return AS_IS
    return DEQUANTIZED


def _type_table(gf: GGUFFile, with_holding: bool) -> Section:
    counts: dict[str, list[int]] = {}
    for info in gf.infos():
        c = counts.setdefault(info.type_name, [0, 0])
        c[0] += 1
        c[1] += info.n_bytes
    cols = (("type", "type"), ("count", "tensors"), ("bytes", "bytes"), ("held_as", "lorakit holds it"))
    rows = tuple((t, n, b, held_as(t) if with_holding else None) for t, (n, b) in counts.items())
    return Section("tensor_types", "Tensors by type", columns=cols, rows=rows, keyed=True)


def _tensor_table(gf: GGUFFile) -> Section:
    rows = tuple((i.name, i.type_name, tuple(reversed(i.shape)), i.shape, i.n_bytes) for i in gf.infos())
    return _tensor_section(rows)


def _tensor_section(rows: tuple) -> Section:
    cols = (
        ("name", "name"),
        ("type", "type"),
        ("ne", "ne (ggml)"),
        ("shape", "shape (numpy)"),
        ("bytes", "bytes"),
    )
    return Section("tensors", "Tensors", columns=cols, rows=rows)


def _model_fields(args: ModelArgs, gf: GGUFFile, with_tensors_facts: bool) -> Section:
    return _kv(
        "model",
        "Hyperparameters",
        Field("architecture", "architecture", gf.architecture),
        Field("n_vocab", "n_vocab", args.n_vocab),
        Field("n_embd", "n_embd", args.n_embd),
        Field("n_ff", "n_ff", args.n_ff),
        Field("n_head", "n_head", args.n_head),
        Field("n_head_kv", "n_head_kv", args.n_head_kv),
        Field("gqa", "grouped-query attention", args.n_head_kv != args.n_head),
        Field("n_layer", "n_layer", args.n_layer),
        Field("head_dim", "head dim", args.head_dim),
        Field("rope_dim", "rope dim", gf.get("llama.rope.dimension_count")),
        Field("rms_eps", "rms eps", _f32(args.norm_eps)),
        Field("rope_freq_base", "rope freq base", _f32(args.rope_freq_base)),
        Field("rope_freq_scale", "rope freq scale", _f32(args.rope_freq_scale)),
        Field("context_length", "context length", args.n_ctx_train),
        Field("tied_output", "tied output (no output.weight)", not gf.has("output.weight"))
        if with_tensors_facts
        else None,
    )


def _raw_hparams(gf: GGUFFile) -> Section:
    """Every scalar `<arch>.*` key, for files whose hyperparameters lorakit cannot interpret."""
    arch = gf.architecture or ""
    fields = [Field("architecture", "architecture", arch or None)]
    for k, v in gf.fields.items():
        if arch and k.startswith(arch + ".") and not isinstance(v, list):
            fields.append(Field(k[len(arch) + 1 :], k, _f32(v) if isinstance(v, float) else v))
    return Section("model", "Hyperparameters (from metadata)", tuple(fields))


def _tokenizer_section(gf: GGUFFile) -> tuple[Section | None, list[str]]:
    model = gf.get("tokenizer.ggml.model")
    if model is None:
        return None, []
    tokens = gf.get("tokenizer.ggml.tokens") or []
    problems = []
    if model != "llama":
        problems.append(f"tokenizer model {model!r} is not supported (only 'llama' SPM vocabularies)")

    def special(name: str, default: int) -> tuple[Field, Field]:
        i = gf.get(f"tokenizer.ggml.{name}_token_id", default if model == "llama" else None)
        text = tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None
        short = name[:3] if name != "unknown" else "unk"
        return Field(f"{short}_id", f"{short} id", i), Field(f"{short}_token", f"{short} token", text)

    return _kv(
        "tokenizer",
        "Tokenizer",
        Field("model", "model", model),
        Field("pre", "pre-tokenizer", gf.get("tokenizer.ggml.pre")),
        Field("vocab_size", "vocab size", len(tokens)),
        *special("bos", 1),
        *special("eos", 2),
        *special("unknown", 0),
        Field("add_bos", "add BOS", bool(gf.get("tokenizer.ggml.add_bos_token", True))),
        Field("add_eos", "add EOS", bool(gf.get("tokenizer.ggml.add_eos_token", False))),
        Field("add_space_prefix", "add space prefix", bool(gf.get("tokenizer.ggml.add_space_prefix", True))),
    ), problems


def _tokenizer_problem(gf: GGUFFile) -> list[str]:
    """Why the tokenizer predict would build from this file cannot be built (empty when it can)."""
    from .tokenizer import Tokenizer

    try:
        Tokenizer.from_gguf(gf)
    except LorakitError as e:
        return [e.problem]
    return []


def _model_args(gf: GGUFFile, problems: list[str]) -> ModelArgs | None:
    try:
        return ModelArgs.from_gguf(gf)
    except LorakitError as e:
        problems.append(e.problem)
        return None


def _model_report(gf: GGUFFile):
    problems: list[str] = []
    notes: list[str] = []
    args = _model_args(gf, problems)
    sections = [_file_section(gf), _model_fields(args, gf, True) if args else _raw_hparams(gf)]
    tok, tok_problems = _tokenizer_section(gf)
    if tok is None:
        problems.append("no tokenizer (tokenizer.ggml.model is missing)")
    else:
        sections.append(tok)
        problems += _tokenizer_problem(gf) or tok_problems
    sections.append(_type_table(gf, with_holding=True))
    if args is not None:
        bad = []
        for name, shape in args.expected_shapes().items():
            if name == "output.weight" and not gf.has(name):
                continue  # tied to token_embd
            if not gf.has(name):
                bad.append(f"missing tensor {name!r}")
            elif tuple(gf.info(name).shape) != shape:
                bad.append(f"tensor {name!r} has shape {list(gf.info(name).shape)}, expected {list(shape)}")
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        if bad:
            problems.append("; ".join(bad[:5]) + more)
        if not gf.has("output.weight"):
            notes.append("output.weight is absent: the output layer is tied to token_embd.weight")
    if any(i.type_name not in ("F32", "F16", "BF16", "Q8_0") for i in gf.infos()):
        notes.append("tensors of other quantized types are dequantized to f32 when the model is loaded")
    return "model", sections, notes, problems


def _vocab_report(gf: GGUFFile):
    sections = [_file_section(gf)]
    args = _model_args(gf, []) if gf.architecture == "llama" else None
    if args is not None:
        sec = _model_fields(args, gf, False)
        sections.append(Section(sec.key, "Hyperparameters (of the model it belongs to)", sec.fields))
    elif gf.architecture:
        sections.append(_raw_hparams(gf))
    tok, tok_problems = _tokenizer_section(gf)
    if tok is not None:
        sections.append(tok)
    problems = ["no tensors: a vocabulary only, not a model"] + tok_problems
    return "vocab", sections, [], problems


def _other_report(gf: GGUFFile):
    sections = [_file_section(gf), _raw_hparams(gf)]
    tok, _ = _tokenizer_section(gf)
    if tok is not None:
        sections.append(tok)
    sections.append(_type_table(gf, with_holding=False))
    arch = gf.architecture
    if arch is None:
        problem = "no general.architecture key: not a model lorakit can run"
    else:
        problem = f"architecture {arch!r} is not supported by lorakit (only 'llama'); described from its metadata"
    return "other_gguf", sections, [], [problem]


# --------------------------------------------------------------------------- checkpoint


def _abbreviate(state: str, keep: int = 3) -> str:
    words = state.split()
    if len(words) <= 2 * keep:
        return state
    return f"{' '.join(words[:keep])} ... {' '.join(words[-keep:])} ({len(words)} numbers)"


def _checkpoint_report(gf: GGUFFile):
    from .checkpoint import read_checkpoint

    if gf.get("training.type") not in (None, "finetune_lora"):
        kind, sections, notes, _ = _other_report(gf)
        return (
            kind,
            sections,
            notes,
            [f"training.type is {gf.get('training.type')!r}, not a finetune checkpoint"],
        )
    try:
        ck = read_checkpoint(gf.path)
    except LorakitError as e:
        kind, sections, notes, _ = _other_report(gf)
        return kind, sections, notes, [f"a finetune checkpoint lorakit cannot read: {e.problem}"]
    hp = _kv(
        "model",
        "Hyperparameters",
        Field("architecture", "architecture", gf.architecture),
        Field("n_vocab", "n_vocab (from the LoRA tensors)", ck.n_vocab),
        Field("n_embd", "n_embd", ck.n_embd),
        Field("n_ff", "n_ff", ck.n_ff),
        Field("n_head", "n_head", ck.n_head),
        Field("n_head_kv", "n_head_kv", ck.n_head_kv),
        Field("gqa", "grouped-query attention", ck.n_head_kv != ck.n_head),
        Field("n_layer", "n_layer", ck.n_layer),
        Field("head_dim", "head dim", ck.n_embd // ck.n_head),
        Field("rope_dim", "rope dim", ck.rope_dim),
        Field("rms_eps", "rms eps", _f32(ck.norm_eps)),
        Field("rope_freq_base", "rope freq base", _f32(ck.rope_freq_base)),
        Field("rope_scale_linear", "rope.scale_linear (as written)", _f32(ck.rope_scale_linear)),
        Field("context_length", "training context (-c)", ck.n_ctx),
    )
    ranks = _kv("ranks", "LoRA ranks", *(Field(k, k, ck.ranks[k]) for k in KINDS))
    training = _kv(
        "training",
        "Training state",
        Field("file_version", "training.file_version", gf.get("training.file_version")),
        Field("iteration", "iteration", ck.train_its),
        Field("samples", "samples", ck.train_samples),
        Field("tokens", "tokens", ck.train_tokens),
        Field("epochs", "epochs", ck.train_epochs),
        Field("shuffle_samples_hash", "shuffle: samples hash", ck.shuffle_samples_hash),
        Field("shuffle_sample_count", "shuffle: sample count", ck.shuffle_sample_count),
        Field("shuffle_next_sample", "shuffle: next sample", ck.shuffle_next_sample),
        Field("shuffle_rng_state", "shuffle: rng state", _abbreviate(ck.shuffle_rng_state)),
    )
    optimizer = _kv(
        "optimizer",
        "Optimizer state",
        Field("type", "type", gf.get("optimizer.type")),
        Field("parameter_count", "parameters", ck.nx),
        Field("iteration", "iteration", ck.opt_iter),
        Field("just_initialized", "just initialized", ck.just_initialized),
        Field("best_loss", "best loss", _f32(ck.best_loss)),
        Field("previous_loss", "previous loss", _f32(ck.previous_loss)),
        Field("no_improvement_count", "no-improvement count", ck.no_improvement_count),
        Field("past_count", "convergence past count", ck.opt_past),
        Field("moment_order", "moment order (detected)", ck.moment_order),
    )
    lora = _kv("lora", "LoRA tensors", Field("pairs", "pairs", len(ck.lora)))
    notes = ["resume training with --checkpoint-in; for predict --lora use the adapter written by --lora-out"]
    return "checkpoint", [_file_section(gf), hp, ranks, lora, training, optimizer], notes, []


# --------------------------------------------------------------------------- adapters


def _adapter_sections(ad, extra: tuple[Field, ...], scale_rule: str) -> list[Section]:
    by_kind: dict[str, list[int]] = {}
    for name, pair in ad.pairs.items():
        by_kind.setdefault(kind_of(name), []).append(int(pair.rank))
    order = [k for k in KINDS if k in by_kind] + sorted(set(by_kind) - set(KINDS))
    layers = {n.split(".")[1] for n in ad.pairs if n.startswith("blk.")}
    scales = [float(p.scale) for p in ad.pairs.values()]
    adapter = _kv(
        "adapter",
        "Adapter",
        Field("format", "format", ad.format),
        Field("alpha", "alpha", _f32(ad.alpha) if ad.format == "gguf" else int(ad.alpha)),
        *extra,
        Field("pairs", "LoRA pairs applied", len(ad.pairs)),
        Field("layers", "layers", len(layers)),
        Field("target_kinds", "target tensor kinds", tuple(order)),
        Field("effective_scale", "effective scale (times --lora-scaled)", _uniform(scales) if scales else None),
        Field("scale_rule", "scale rule", scale_rule),
    )
    ranks = _kv("ranks", "LoRA ranks by kind", *(Field(k, k, _uniform(by_kind[k])) for k in order))
    return [adapter, ranks]


def _gguf_adapter_report(gf: GGUFFile):
    from .adapters import read_gguf_adapter

    try:
        ad = read_gguf_adapter(gf.path)
    except LorakitError as e:
        kind, sections, notes, _ = _other_report(gf)
        return kind, sections, notes, [f"a GGUF adapter lorakit cannot use: {e.problem}"]
    ignored = tuple(ad.meta.get("ignored", ()))
    rule = "alpha / rank of each pair" if ad.alpha else "1 (adapter.lora.alpha is 0: only the user's scale)"
    extra = (
        Field("ignored_norm_pairs", "ignored norm tensors", len(ignored)),
        Field("ignored", "ignored", ignored) if ignored else None,
    )
    sections = [_file_section(gf), *_adapter_sections(ad, tuple(f for f in extra if f), rule)]
    notes = ["norm LoRAs and replacement norms are ignored, as llama.cpp does"] if ignored else []
    return "gguf_adapter", sections, notes, []


def _ggla_report(p: Path, size: int, with_tensors: bool) -> Report:
    from .ggla import read_ggla

    ad = read_ggla(p)
    records = ad.meta.get("records", [])
    file = _kv(
        "file",
        "File",
        Field("format", "format", "ggla"),
        Field("version", "ggla version", ad.meta.get("version")),
        Field("tensor_count", "tensors", len(records)),
        Field("tensor_bytes", "tensor data", sum(r[3] for r in records), "bytes"),
    )
    extra = (Field("header_rank", "header rank r", ad.rank),)
    sections = [file, *_adapter_sections(ad, extra, "alpha / r from the header, the same for every pair")]
    if with_tensors:
        sections.append(_tensor_section(tuple((n, t, ne, tuple(reversed(ne)), b) for n, t, ne, b in records)))
    notes = ["the legacy llama.cpp format; current llama.cpp reads only GGUF adapters"]
    return Report(str(p), "ggla_adapter", size, tuple(sections), tuple(notes), ())
