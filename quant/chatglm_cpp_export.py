"""``chatglm`` checkpoint -> a chatglm.cpp model folder, written by medserve's own writer.

    medserve export --engine chatglm-cpp --hf-dir D --name N --weight-format q4_0|q8_0|f16|f32

chatglm.cpp's own converter loads the checkpoint through its ``modeling_chatglm.py`` (remote
code, which medserve never runs) and needs torch. The file format is small enough to write
directly from the weights: ``b"ggml"``, the model type (2 ChatGLM2, 3 ChatGLM3, 4 GLM-4), the
config record version 2 (13 little-endian int32/float32 fields), the tokenizer (ChatGLM2/3: the
SentencePiece ``tokenizer.model`` bytes; GLM-4: its tiktoken rank file), then each tensor:
name, dims (outermost first), ggml type, data at the next 16-byte file offset. chatglm.cpp
memory-maps the file and uses the tensors in place, so their bytes are ggml's own blocks:
q8_0 is [f16 scale, 32 x int8], q4_0 [f16 scale, 16 bytes: low nibbles hold values 0-15,
high nibbles 16-31] per 32 values of a row (``gguf.quants`` writes exactly these).

Only the layout the file stores changes nothing about the network: chatglm.cpp's ChatGLM2
block reads the checkpoint's own tensor names (fused ``query_key_value`` [q | k | v],
``dense_h_to_4h`` [gate; up]), so tensors are copied as they are, cast or quantized. Linear
and embedding weights take the chosen type; norms and biases stay f32, as chatglm.cpp declares
them. Safetensors shards are read with numpy (bf16 too), tensor by tensor and row block by row
block, so a 9B model never needs its size in RAM; ``.bin`` shards need torch
(``weights_only``: data, never pickled code).

Runs in the main environment; the engine (accel/chatglm_cpp_engine.py) reads the header back
with ``read_header``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from medserve.models.layouts import LayoutError, read_config
from medserve.models.manifest import ModelManifest, sha256_of, write_manifest
from medserve.quant.export import staged_dir

if TYPE_CHECKING:  # numpy is imported where tensors are handled: the engine reads headers only
    import numpy as np

ENGINE = "chatglm-cpp"
FORMAT = "chatglm-cpp"
MODEL_FILE = "model.chatglm.bin"
WEIGHT_FORMATS = ("q4_0", "q8_0", "f16", "f32")
MAGIC = b"ggml"
VERSION = 2
ALIGNMENT = 16
QUANT_BLOCK = 32
_ROW_CHUNK_VALUES = 1 << 24
"""Values converted at a time (64 MB of f32): bounds the memory of a large tensor's cast."""
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# chatglm.cpp numbers the special tokens after the vocabulary in these orders (its tokenizers).
CHATGLM3_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                     "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")  # fmt: skip
CHATGLM2_SPECIALS = CHATGLM3_SPECIALS[:5]
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                 "<|user|>", "<|assistant|>", "<|observation|>", "<|begin_of_image|>",
                 "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>")  # fmt: skip


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q8_0 = 8


class ModelType(IntEnum):
    CHATGLM2 = 2
    CHATGLM3 = 3
    CHATGLM4 = 4


_WEIGHT_TYPES = {"q4_0": GGMLType.Q4_0, "q8_0": GGMLType.Q8_0, "f16": GGMLType.F16,
                 "f32": GGMLType.F32}  # fmt: skip
_FAMILY_TYPES = {"chatglm2": ModelType.CHATGLM2, "chatglm3": ModelType.CHATGLM3,
                 "glm4-chatglm": ModelType.CHATGLM4}  # fmt: skip


@dataclass(frozen=True)
class ConfigRecord:
    """chatglm.cpp's ``ModelConfigRecordV2``, field for field."""

    dtype: int
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    intermediate_size: int
    norm_eps: float
    num_virtual_tokens: int
    rope_theta: float
    max_length: int
    eos_token_id: int
    pad_token_id: int

    STRUCT = struct.Struct("<iiiiiiififiii")


@dataclass(frozen=True)
class ModelFileHeader:
    model_type: ModelType
    version: int
    config: ConfigRecord
    tokenizer: bytes
    tensors_offset: int


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int
    nbytes: int


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLType) -> int:
    count = math.prod(shape)
    if ggml_type == GGMLType.Q8_0:
        return count // QUANT_BLOCK * 34
    if ggml_type == GGMLType.Q4_0:
        return count // QUANT_BLOCK * 18
    return count * (4 if ggml_type == GGMLType.F32 else 2)


# -- writing ----------------------------------------------------------------------------


def write_header(
    f: BinaryIO, model_type: ModelType, config: ConfigRecord, tokenizer: bytes
) -> None:
    f.write(MAGIC + struct.pack("<ii", int(model_type), VERSION))
    f.write(ConfigRecord.STRUCT.pack(*astuple(config)))
    f.write(struct.pack("<i", len(tokenizer)) + tokenizer)


def write_tensor(f: BinaryIO, name: str, values: np.ndarray, ggml_type: GGMLType) -> None:
    """One tensor record; quantized types need rows of a multiple of 32 values."""
    if ggml_type in (GGMLType.Q4_0, GGMLType.Q8_0) and values.shape[-1] % QUANT_BLOCK:
        raise LayoutError(
            f"{name}: rows of {values.shape[-1]} values cannot be cut into {QUANT_BLOCK}-value "
            f"{ggml_type.name.lower()} blocks; export this checkpoint as f16"
        )
    encoded = name.encode("utf-8")
    f.write(struct.pack("<i", len(encoded)) + encoded)
    f.write(struct.pack(f"<i{values.ndim}ii", values.ndim, *values.shape, int(ggml_type)))
    f.write(b"\0" * (-f.tell() % ALIGNMENT))  # chatglm.cpp reads data at the next 16 bytes
    rows = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values.reshape(1, -1)
    step = max(1, _ROW_CHUNK_VALUES // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        f.write(encode_rows(rows[start : start + step], ggml_type).tobytes())


def encode_rows(rows: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """Rows of values in ggml's storage for ``ggml_type`` (a flat uint8/f16/f32 array)."""
    import numpy as np

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if ggml_type == GGMLType.F32:
        return rows
    if ggml_type == GGMLType.F16:
        return rows.astype(np.float16)
    from gguf import GGMLQuantizationType, quants  # block layouts identical to ggml's

    return quants.quantize(rows, GGMLQuantizationType(int(ggml_type)))


# -- reading back (the engine and the tests) ------------------------------------------------


def read_header(path: Path) -> ModelFileHeader:
    """Magic, model type, config and tokenizer of a chatglm.cpp file (tensors not read)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != MAGIC:
            raise ValueError(f"{path} is not a chatglm.cpp model file (no {MAGIC!r} magic)")
        model_type, version = struct.unpack("<ii", head[4:])
        if version != VERSION or model_type not in ModelType._value2member_map_:
            raise ValueError(f"{path}: model type {model_type} version {version} not supported")
        config = ConfigRecord(*ConfigRecord.STRUCT.unpack(f.read(ConfigRecord.STRUCT.size)))
        (size,) = struct.unpack("<i", f.read(4))
        tokenizer = f.read(size)
        return ModelFileHeader(ModelType(model_type), version, config, tokenizer, f.tell())


def read_tensor_records(path: Path) -> list[TensorRecord]:
    """Where each tensor's data lies, walked as chatglm.cpp's loader walks the file."""
    header = read_header(path)
    records: list[TensorRecord] = []
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        f.seek(header.tensors_offset)
        while f.tell() < size:
            (name_size,) = struct.unpack("<i", f.read(4))
            name = f.read(name_size).decode("utf-8")
            (ndim,) = struct.unpack("<i", f.read(4))
            shape = struct.unpack(f"<{ndim}i", f.read(4 * ndim))
            ggml_type = GGMLType(struct.unpack("<i", f.read(4))[0])
            offset = f.tell() + (-f.tell() % ALIGNMENT)
            nbytes = tensor_nbytes(shape, ggml_type)
            records.append(TensorRecord(name, tuple(shape), ggml_type, offset, nbytes))
            f.seek(offset + nbytes)
    return records


# -- the checkpoint ---------------------------------------------------------------------------


def checkpoint_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of one weight shard: safetensors as numpy (bf16 as f32), ``.bin`` via torch."""
    import numpy as np

    if path.suffix != ".safetensors":
        from medserve.models.chatglm_convert import iter_tensors  # torch, weights_only

        for name, tensor in iter_tensors(path):
            yield name, tensor.float().numpy()
        return
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda item: item[1]["data_offsets"][0],  # file order: sequential reads
    )
    for name, entry in entries:
        start, end = entry["data_offsets"]
        raw, shape = data[start:end], tuple(entry["shape"])
        kind = entry["dtype"]
        if kind == "BF16":  # numpy has no bfloat16: its bits are the top half of an f32
            values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif kind in ("F16", "F32"):
            values = raw.view(np.float16 if kind == "F16" else np.float32)
        else:
            raise LayoutError(f"{path}: tensor {name} is {kind}, not f32/f16/bf16 weights")
        yield name, values.reshape(shape)


def expected_shapes(config: ConfigRecord) -> dict[str, tuple[int, ...]]:
    """Every tensor chatglm.cpp's ChatGLM2 model loads, with its shape as the checkpoint has it.

    2-D tensors (linear and embedding weights) take the weight type, 1-D ones (norms, the qkv
    bias) stay f32: the types chatglm.cpp declares them with.
    """
    hidden, ffn = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    qkv = hidden + 2 * head_dim * config.num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (config.vocab_size, hidden),
        "transformer.encoder.final_layernorm.weight": (hidden,),
        "transformer.output_layer.weight": (config.vocab_size, hidden),
    }
    for i in range(config.num_hidden_layers):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attention.query_key_value.weight": (qkv, hidden),
            p + "self_attention.query_key_value.bias": (qkv,),
            p + "self_attention.dense.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.dense_h_to_4h.weight": (2 * ffn, hidden),
            p + "mlp.dense_4h_to_h.weight": (hidden, ffn),
        }
    return shapes


def config_record(config: dict[str, Any], weight_type: GGMLType) -> ConfigRecord:
    """The config record, after refusing (naming the key) what chatglm.cpp cannot run."""
    problems = [
        text
        for bad, text in (
            (not config.get("rmsnorm", True), "rmsnorm=false"),
            (not config.get("post_layer_norm", True), "post_layer_norm=false"),
            (config.get("add_bias_linear", False), "add_bias_linear=true"),
            (not config.get("add_qkv_bias", True), "add_qkv_bias=false"),
            (config.get("apply_residual_connection_post_layernorm"), "post-layernorm residual"),
            (not config.get("multi_query_attention", False), "multi_query_attention=false"),
            (not config.get("original_rope", True), "original_rope=false"),
            (config.get("quantization_bit"), "quantization_bit (a pre-quantized checkpoint)"),
            (config.get("pre_seq_len"), "pre_seq_len (a P-tuning prefix encoder)"),
            (config.get("tie_word_embeddings"), "tie_word_embeddings=true"),
        )
        if bad
    ]
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    if int(config.get("kv_channels") or 0) * heads != hidden:
        problems.append(f"kv_channels x num_attention_heads != hidden_size {hidden}")
    if problems:
        raise LayoutError("chatglm.cpp cannot run this chatglm checkpoint: " + "; ".join(problems))
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    pad = config.get("pad_token_id")
    return ConfigRecord(
        dtype=int(weight_type),
        vocab_size=int(config.get("padded_vocab_size") or config["vocab_size"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(config["multi_query_group_num"]),
        num_hidden_layers=int(config["num_layers"]),
        intermediate_size=int(config["ffn_hidden_size"]),
        norm_eps=float(config.get("layernorm_epsilon", 1e-5)),
        num_virtual_tokens=0,
        rope_theta=10000.0 * float(config.get("rope_ratio") or 1.0),
        max_length=int(config["seq_length"]),
        eos_token_id=-1 if eos is None else int(eos),
        pad_token_id=-1 if pad is None else int(pad),
    )


def tokenizer_bytes(hf_dir: Path, family: str, vocab_rows: int) -> tuple[bytes, int]:
    """The tokenizer as chatglm.cpp stores it, and its size (special tokens included).

    chatglm.cpp numbers the special tokens itself, right after the vocabulary, so the ids the
    checkpoint's tokenizer_config.json declares must be those (they are in the hub folders).
    """
    from medserve.models.sentencepiece_model import (
        SentencePieceFormatError,
        read_sentencepiece_model,
    )
    from medserve.models.tiktoken_ranks import RankFileError, read_ranks

    path = hf_dir / "tokenizer.model"
    try:
        if family == "glm4-chatglm":
            first, specials = len(read_ranks(path)), GLM4_SPECIALS
        else:
            first = len(read_sentencepiece_model(path).pieces)
            specials = CHATGLM3_SPECIALS if family == "chatglm3" else CHATGLM2_SPECIALS
    except (RankFileError, SentencePieceFormatError, OSError) as exc:
        raise LayoutError(f"cannot read the tokenizer of {hf_dir}: {exc}") from exc
    try:
        declared = json.loads((hf_dir / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        declared = {}
    spelling = {"sop": "<sop>", "eop": "<eop>"}
    for key, entry in dict(declared.get("added_tokens_decoder") or {}).items():
        token = spelling.get(entry.get("content"), entry.get("content"))
        if token in specials and int(key) != first + specials.index(token):
            raise LayoutError(
                f"{hf_dir / 'tokenizer_config.json'}: {token} has id {key}; chatglm.cpp gives "
                f"it {first + specials.index(token)} (after the {first}-token vocabulary)"
            )
    size = first + len(specials)
    if size > vocab_rows:
        raise LayoutError(f"{hf_dir}: {size} tokens but only {vocab_rows} embedding rows")
    return path.read_bytes(), size


def export_chatglm_cpp(
    hf_dir: Path, models_dir: Path, name: str, weight_format: str, *, progress: bool = True
) -> Path:
    """Write ``models_dir/name`` (the model file + ``medserve.json``) from ``hf_dir``.

    Built in a staging folder and renamed into place with the manifest written last, so a
    failed or killed export leaves ``models_dir/name`` as it was.
    """
    from medserve.models.chatglm_convert import source_weight_files
    from medserve.models.chatglm_tokenizer import detect_family
    from medserve.models.layouts import chatglm_family

    hf_dir, models_dir = Path(hf_dir).expanduser(), Path(models_dir).expanduser()
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format={weight_format!r}: use one of {', '.join(WEIGHT_FORMATS)}")
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"name={name!r}: use letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit (it becomes a folder name and the served model name)"
        )
    config = read_config(hf_dir)
    if config["model_type"] != "chatglm":
        raise LayoutError(
            f"{hf_dir} is in the {config['model_type']!r} layout; chatglm.cpp reads only the "
            f"original chatglm layout (THUDM/chatglm2-6b, chatglm3-6b, glm-4-9b-chat). Export "
            f"the chatglm-layout download instead, or serve this folder with another engine "
            f"(`medserve export --engine openvino`)"
        )
    family_name = chatglm_family(config, hf_dir)  # refuses first-generation ChatGLM-6B
    family = detect_family(hf_dir)
    weight_type = _WEIGHT_TYPES[weight_format]
    record = config_record(config, weight_type)
    tokenizer, tokenizer_size = tokenizer_bytes(hf_dir, family, record.vocab_size)
    files = source_weight_files(hf_dir)
    final_dir = models_dir / name
    with staged_dir(final_dir) as stage:
        _say(progress, f"{family_name}: writing {weight_format} chatglm.cpp weights")
        with open(stage / MODEL_FILE, "wb") as f:
            write_header(f, _FAMILY_TYPES[family], record, tokenizer)
            _write_weights(f, files, record, weight_type, progress)
        _say(progress, "hashing the source files ...")
        hashed = [*files, hf_dir / "tokenizer.model", hf_dir / "config.json"]
        manifest = ModelManifest(
            name=name,
            precision=weight_format,
            architecture="chatglm",
            context_length=record.max_length,
            engine=ENGINE,
            format=FORMAT,
            source={
                "hf_dir": str(hf_dir.resolve()),
                "layout": "chatglm",
                "family": family_name,
                "model_type": _FAMILY_TYPES[family].name,
                "weight_format": weight_format,
                "model_file": MODEL_FILE,
                "tokenizer_vocab_size": tokenizer_size,
                "sha256": {path.name: sha256_of(path) for path in hashed},
                "converter": "medserve.quant.chatglm_cpp_export",
            },
        )
        write_manifest(stage, manifest)
    return final_dir


def _write_weights(
    f: BinaryIO, files: list[Path], record: ConfigRecord, weight_type: GGMLType, progress: bool
) -> None:
    from tqdm import tqdm

    shapes = expected_shapes(record)
    written: set[str] = set()
    with tqdm(total=len(shapes), desc="tensors", unit="tensor", disable=not progress) as bar:
        for path in files:
            for tensor_name, values in checkpoint_tensors(path):
                if tensor_name == "transformer.rotary_pos_emb.inv_freq":
                    continue  # chatglm.cpp computes the rotary frequencies from rope_theta
                if tensor_name not in shapes:
                    raise LayoutError(
                        f"unexpected tensor {tensor_name!r} in {path.name}: not part of the "
                        f"ChatGLM2/3 / GLM-4 network chatglm.cpp runs (P-tuned or modified?)"
                    )
                if tuple(values.shape) != shapes[tensor_name] or tensor_name in written:
                    raise LayoutError(
                        f"{tensor_name} in {path.name} has shape {tuple(values.shape)} (or is "
                        f"repeated); config.json implies {shapes[tensor_name]}"
                    )
                kind = weight_type if values.ndim == 2 else GGMLType.F32
                write_tensor(f, tensor_name, values, kind)
                written.add(tensor_name)
                bar.update()
    missing = sorted(shapes.keys() - written)
    if missing:
        raise LayoutError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _say(progress: bool, text: str) -> None:
    if progress:
        import sys

        print(f"[medserve export] {text}", file=sys.stderr, flush=True)
