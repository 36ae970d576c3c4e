"""SPM (llama) tokenizer built from a GGUF file's `tokenizer.ggml.*` vocabulary.

Why: training data and prompts must become exactly the ids llama.cpp would produce, or adapters trained
here and there diverge. llama.cpp's SPM tokenizer is score-ordered BPE merging with byte fallback, which
is what SentencePiece's BPE model does, so rather than reimplementing it we turn the GGUF vocabulary
into a SentencePiece ModelProto (written by hand in protobuf wire format, so `protobuf` is not needed)
and let `sentencepiece` do the work. The dummy-prefix space is added here, not by SentencePiece, so that
raw bytes that are not valid UTF-8 can be handled the way llama.cpp handles them (see `encode`).
"""

from __future__ import annotations

import codecs
import os
import re
import struct

import sentencepiece as spm

from .errors import LorakitError
from .gguf_io import GGUFFile

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_UTF8_LEN = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)  # llama.cpp's utf8_len, by high nibble


# protobuf wire format ------------------------------------------------------------------------------
def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int32 values are sent as 64-bit two's complement
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _int(field: int, v: int) -> bytes:
    return _varint(field << 3) + _varint(v)


def _msg(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _float(field: int, v: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", v)


def _read_fields(buf: bytes):
    """Yield (field, value) of one message; value is an int (varint/fixed32 raw bits) or bytes."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        wire = key & 7
        if wire == 0:
            v, i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            v, i = buf[i : i + n], i + n
        elif wire == 5:
            v, i = struct.unpack_from("<I", buf, i)[0], i + 4
        elif wire == 1:
            v, i = struct.unpack_from("<Q", buf, i)[0], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, v


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, i


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# tokenizer -----------------------------------------------------------------------------------------
class Tokenizer:
    """llama.cpp-compatible SPM tokenizer (`encode` never adds BOS unless asked, never parses specials)."""

    def __init__(self, tokens: list[str], scores: list[float], types: list[int], *, bos_id: int = 1,
                 eos_id: int = 2, unk_id: int = 0, add_bos: bool = True, add_space_prefix: bool = True,
                 source: str | os.PathLike | None = None):  # fmt: skip
        n = len(tokens)
        for name, arr in (("scores", scores), ("token_type", types)):
            if len(arr) != n:
                raise LorakitError(f"tokenizer.ggml.{name} has {len(arr)} entries, tokens has {n}", source)
        for name, v in (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id)):
            if not 0 <= v < n:
                raise LorakitError(f"tokenizer.ggml.{name}_token_id {v} is outside the vocabulary of {n}", source)
        self.n_vocab, self.bos_id, self.eos_id, self.unk_id = n, bos_id, eos_id, unk_id
        self.add_bos, self.add_space_prefix = bool(add_bos), bool(add_space_prefix)
        self._pieces = list(tokens)
        self._byte_id: dict[int, int] = {}
        self._bytes: list[bytes] = []
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True)):
            m = _BYTE_RE.fullmatch(t) if ty == BYTE else None
            if ty == BYTE and not m:
                raise LorakitError(f"byte token {i} has text {t!r}, expected <0xXX>", source)
            if m:
                self._byte_id.setdefault(int(m.group(1), 16), i)
                self._bytes.append(bytes([int(m.group(1), 16)]))
            elif ty == NORMAL or ty == 0:
                self._bytes.append(t.replace("\u2581", " ").encode())
            elif ty == USER_DEFINED:
                self._bytes.append(t.encode())
            elif i == unk_id or ty == UNKNOWN:
                self._bytes.append("\u2585".encode())  # what llama.cpp prints for <unk>
            else:  # control, unused
                self._bytes.append(b"")
        byte_fallback = len(self._byte_id) == 256
        seen: set[str] = set()
        out = bytearray()
        for i, (t, s, ty) in enumerate(zip(tokens, scores, types, strict=True)):
            ty = NORMAL if ty not in (1, 2, 3, 4, 5, 6) else ty
            if i == unk_id:
                ty = UNKNOWN  # SentencePiece wants exactly one UNKNOWN piece
            elif ty == UNKNOWN or (ty == BYTE and not byte_fallback):
                ty = CONTROL
            if not t or t in seen:  # SentencePiece rejects empty/duplicate pieces: keep the id, never emit it
                t, ty = f"\u2581<lorakit-unreachable-{i}>", UNUSED
            seen.add(t)
            out += _msg(1, _msg(1, t.encode()) + _float(2, float(s)) + _int(3, ty))
        trainer = (_int(3, 2) + _int(4, n) + _int(35, byte_fallback) + _int(40, unk_id) + _int(41, bos_id)
                   + _int(42, eos_id) + _int(43, -1))  # fmt: skip
        normalizer = _msg(1, b"identity") + _int(3, 0) + _int(4, 0) + _int(5, 1)
        out += _msg(2, trainer) + _msg(3, normalizer)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=bytes(out))
        except Exception as e:
            raise LorakitError(f"sentencepiece rejected the vocabulary ({e})", source) from None

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> Tokenizer:
        model = gf.get("tokenizer.ggml.model")
        if model is None:
            raise LorakitError("no tokenizer in this file (tokenizer.ggml.model is missing)", gf.path)
        if model == "gpt2":
            raise LorakitError("BPE ('gpt2') vocabularies are not supported yet", gf.path)
        if model != "llama":
            raise LorakitError(f"tokenizer model {model!r} is not supported (only 'llama' SPM is)", gf.path)
        arrays = [gf.require(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type")]
        return cls(*arrays, bos_id=int(gf.get("tokenizer.ggml.bos_token_id", 1)),
                   eos_id=int(gf.get("tokenizer.ggml.eos_token_id", 2)),
                   unk_id=int(gf.get("tokenizer.ggml.unknown_token_id", 0)),
                   add_bos=bool(gf.get("tokenizer.ggml.add_bos_token", True)),
                   add_space_prefix=bool(gf.get("tokenizer.ggml.add_space_prefix", True)),
                   source=gf.path)  # fmt: skip

    @classmethod
    def from_sentencepiece_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a SentencePiece `.model` the way llama.cpp's converter does (pieces, scores, types, ids)."""
        try:
            with open(path, "rb") as f:
                fields = list(_read_fields(f.read()))
            tokens, scores, types = [], [], []
            ids = {40: 0, 41: 1, 42: 2}
            prefix = True
            for field, v in fields:
                if field == 1:
                    p = dict(_read_fields(v))
                    tokens.append(p.get(1, b"").decode())
                    scores.append(struct.unpack("<f", struct.pack("<I", p.get(2, 0)))[0])
                    types.append(p.get(3, NORMAL))
                elif field == 2:
                    ids.update((k, _int32(x)) for k, x in _read_fields(v) if k in ids)
                elif field == 3:
                    prefix = bool(dict(_read_fields(v)).get(3, 1))
        except OSError as e:
            raise LorakitError(f"cannot read file ({e.strerror})", path) from None
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as e:
            raise LorakitError(f"not a SentencePiece model ({e})", path) from None
        return cls(tokens, scores, types, unk_id=ids[40], bos_id=ids[41], eos_id=ids[42],
                   add_space_prefix=prefix, source=path)  # fmt: skip

    def encode(self, text: str | bytes, add_bos: bool = False) -> list[int]:
        """Token ids as llama.cpp's `llama_tokenize(..., add_special=add_bos, parse_special=false)`.

        A space is prepended (when the vocabulary asks for it) and spaces become '▁'. Bytes input is
        tokenized as raw bytes, like llama.cpp reads a training file: when it is not valid UTF-8, the
        invalid sequences (cut the way llama.cpp cuts characters) become byte tokens and the valid
        stretches between them are tokenized on their own. A str with lone surrogates is treated as
        its 'surrogatepass' bytes.
        """
        ids = [self.bos_id] if add_bos else []
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = text.encode("utf-8", "surrogatepass")
        if isinstance(text, (bytes, bytearray, memoryview)):
            data = bytes(text)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                return ids + self._encode_raw(b" " + data if self.add_space_prefix else data)
        if text:
            ids += self._sp.encode(" " + text if self.add_space_prefix else text)
        return ids

    def _encode_raw(self, data: bytes) -> list[int]:
        out: list[int] = []
        start = i = 0
        while i < len(data):
            sym = data[i : i + _UTF8_LEN[data[i] >> 4]]
            try:
                sym.decode("utf-8")
            except UnicodeDecodeError:
                if start < i:
                    out += self._sp.encode(data[start:i].decode("utf-8"))
                out += [self._byte_id.get(b, self.unk_id) for b in sym]
                start = i + len(sym)
            i += len(sym)
        if start < len(data):
            out += self._sp.encode(data[start:].decode("utf-8"))
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (control tokens dropped; the dummy-prefix space of the first token removed)."""
        d = StreamDecoder(self, strip_space=True)
        return "".join(d.push(i) for i in ids) + d.flush()

    def token_bytes(self, id: int) -> bytes:
        """Bytes llama.cpp's token_to_piece gives: '▁' -> ' ', <0xAB> -> b'\\xab', control -> b''."""
        return self._bytes[id]

    def pieces(self) -> list[str]:
        return list(self._pieces)

    def max_token_bytes(self) -> int:
        """Longest token text in UTF-8 bytes, as finetune's max_token_text_size (strlen of the text)."""
        return max((len(p.encode()) for p in self._pieces), default=0)


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text completed by this token.

    Bytes of a multi-byte UTF-8 character split over several byte tokens are held back until the
    character is complete; invalid sequences become U+FFFD. `strip_space` drops the leading space
    of the first non-empty token (use it when the stream starts at the beginning of a text).
    """

    def __init__(self, tokenizer: Tokenizer, strip_space: bool = False):
        self._tok = tokenizer
        self._strip = strip_space and tokenizer.add_space_prefix
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        b = self._tok.token_bytes(id)
        if self._strip and b:
            self._strip = False
            b = b[1:] if b.startswith(b" ") else b
        return self._dec.decode(b)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        return self._dec.decode(b"", final=True)
