"""Read and write SentencePiece ``tokenizer.model`` files with no sentencepiece or protobuf.

Why: ChatGLM2/3 ship their vocabulary as a SentencePiece model. The server's stack has neither
the sentencepiece library nor protobuf, and nothing from a checkpoint folder may run, so the
file is decoded here: it is a protobuf ``ModelProto``, of which a BPE tokenizer needs only the
pieces (text, score, type), the model type, byte fallback and the normalizer flags. Writing is
used by the tiny test tokenizers, which must look exactly like a real ``tokenizer.model``.

Field numbers follow sentencepiece's ``sentencepiece_model.proto``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path


class PieceType(IntEnum):
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ModelType(IntEnum):
    UNIGRAM = 1
    BPE = 2
    WORD = 3
    CHAR = 4


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    kind: PieceType = PieceType.NORMAL


@dataclass(frozen=True)
class SentencePieceModel:
    """The parts of a ``ModelProto`` that decide how text becomes ids (defaults as the proto's)."""

    pieces: tuple[Piece, ...]
    model_type: ModelType = ModelType.UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    normalizer_name: str = "nmt_nfkc"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    treat_whitespace_as_suffix: bool = False
    # Training-only options, kept so a written tiny model states how it was "trained".
    split_digits: bool = False
    allow_whitespace_only_pieces: bool = False


class SentencePieceFormatError(ValueError):
    """The file is not a SentencePiece model this reader understands."""


# ModelProto fields
_PIECES, _TRAINER_SPEC, _NORMALIZER_SPEC = 1, 2, 3
# SentencePiece (a piece) fields
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
# TrainerSpec fields
_MODEL_TYPE, _VOCAB_SIZE, _TREAT_WS_AS_SUFFIX, _SPLIT_DIGITS, _ALLOW_WS_ONLY = 3, 4, 24, 25, 26
_BYTE_FALLBACK, _UNK_ID, _BOS_ID, _EOS_ID, _PAD_ID = 35, 40, 41, 42, 43
# NormalizerSpec fields
_NORM_NAME, _CHARSMAP, _DUMMY_PREFIX, _REMOVE_EXTRA_WS, _ESCAPE_WS = 1, 2, 3, 4, 5


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    """Decode ``path``; raise ``SentencePieceFormatError`` when it is not a SentencePiece model."""
    data = Path(path).read_bytes()
    pieces: list[Piece] = []
    trainer: dict[int, int | bytes] = {}
    normalizer: dict[int, int | bytes] = {}
    try:
        for field, value in _fields(data):
            if field == _PIECES and isinstance(value, bytes):
                pieces.append(_read_piece(value))
            elif field == _TRAINER_SPEC and isinstance(value, bytes):
                trainer = dict(_fields(value))
            elif field == _NORMALIZER_SPEC and isinstance(value, bytes):
                normalizer = dict(_fields(value))
    except (IndexError, ValueError, struct.error) as exc:
        raise SentencePieceFormatError(f"{path} is not a SentencePiece model: {exc}") from exc
    if not pieces:
        raise SentencePieceFormatError(f"{path} holds no SentencePiece pieces")

    def flag(spec: dict[int, int | bytes], field: int, default: bool) -> bool:
        value = spec.get(field)
        return default if value is None else bool(value)

    def number(field: int, default: int) -> int:
        value = trainer.get(field)
        return default if not isinstance(value, int) else _signed32(value)

    name = normalizer.get(_NORM_NAME, b"nmt_nfkc")
    charsmap = normalizer.get(_CHARSMAP, b"")
    return SentencePieceModel(
        pieces=tuple(pieces),
        model_type=ModelType(number(_MODEL_TYPE, ModelType.UNIGRAM)),
        byte_fallback=flag(trainer, _BYTE_FALLBACK, False),
        unk_id=number(_UNK_ID, 0),
        bos_id=number(_BOS_ID, 1),
        eos_id=number(_EOS_ID, 2),
        pad_id=number(_PAD_ID, -1),
        normalizer_name=name.decode("utf-8") if isinstance(name, bytes) else "",
        precompiled_charsmap=charsmap if isinstance(charsmap, bytes) else b"",
        add_dummy_prefix=flag(normalizer, _DUMMY_PREFIX, True),
        remove_extra_whitespaces=flag(normalizer, _REMOVE_EXTRA_WS, True),
        escape_whitespaces=flag(normalizer, _ESCAPE_WS, True),
        treat_whitespace_as_suffix=flag(trainer, _TREAT_WS_AS_SUFFIX, False),
        split_digits=flag(trainer, _SPLIT_DIGITS, False),
        allow_whitespace_only_pieces=flag(trainer, _ALLOW_WS_ONLY, False),
    )


def write_sentencepiece_model(path: Path, model: SentencePieceModel) -> None:
    """Serialize ``model`` as a ``ModelProto`` that the sentencepiece library loads."""
    out = bytearray()
    for piece in model.pieces:
        body = (
            _bytes_field(_PIECE_TEXT, piece.text.encode("utf-8"))
            + _key(_PIECE_SCORE, 5)
            + struct.pack("<f", piece.score)
            + _int_field(_PIECE_TYPE, int(piece.kind))
        )
        out += _bytes_field(_PIECES, body)
    trainer = (
        _int_field(_MODEL_TYPE, int(model.model_type))
        + _int_field(_VOCAB_SIZE, len(model.pieces))
        + _int_field(_TREAT_WS_AS_SUFFIX, int(model.treat_whitespace_as_suffix))
        + _int_field(_SPLIT_DIGITS, int(model.split_digits))
        + _int_field(_ALLOW_WS_ONLY, int(model.allow_whitespace_only_pieces))
        + _int_field(_BYTE_FALLBACK, int(model.byte_fallback))
        + _int_field(_UNK_ID, model.unk_id)
        + _int_field(_BOS_ID, model.bos_id)
        + _int_field(_EOS_ID, model.eos_id)
        + _int_field(_PAD_ID, model.pad_id)
    )
    out += _bytes_field(_TRAINER_SPEC, trainer)
    normalizer = (
        _bytes_field(_NORM_NAME, model.normalizer_name.encode("utf-8"))
        + _bytes_field(_CHARSMAP, model.precompiled_charsmap)
        + _int_field(_DUMMY_PREFIX, int(model.add_dummy_prefix))
        + _int_field(_REMOVE_EXTRA_WS, int(model.remove_extra_whitespaces))
        + _int_field(_ESCAPE_WS, int(model.escape_whitespaces))
    )
    out += _bytes_field(_NORMALIZER_SPEC, normalizer)
    Path(path).write_bytes(bytes(out))


def _read_piece(data: bytes) -> Piece:
    text, score, kind = "", 0.0, PieceType.NORMAL
    for field, value in _fields(data):
        if field == _PIECE_TEXT and isinstance(value, bytes):
            text = value.decode("utf-8")
        elif field == _PIECE_SCORE and isinstance(value, bytes):
            score = struct.unpack("<f", value)[0]
        elif field == _PIECE_TYPE and isinstance(value, int):
            kind = PieceType(value)
    return Piece(text, score, kind)


def _fields(data: bytes):
    """Yield (field number, value): ints for varints, bytes for the other wire types."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield field, value
        elif wire == 1:
            yield field, data[pos : pos + 8]
            pos += 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated length-delimited field")
            yield field, data[pos : pos + size]
            pos += size
        elif wire == 5:
            yield field, data[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _signed32(value: int) -> int:
    """int32 fields carry negatives as 64-bit two's complement varints."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32: ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _encode_varint(field << 3 | wire)


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _encode_varint(value)


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _encode_varint(len(value)) + value
