"""chatglm.cpp engine: serves a model folder written by ``medserve export --engine chatglm-cpp``.

Runs only in ``.venv-chatglm-cpp`` (chatglm-cpp 0.4.2 compiled with -march=native), in its own
worker process: a forward pass holds the GIL from start to end, which would freeze the
server's event loop. The model file (quant/chatglm_cpp_export.py) is memory-mapped by
chatglm.cpp; ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat run through its ggml kernels.

One sequence at a time. chatglm.cpp's model owns exactly one KV cache, preallocated for the
whole context (f16), and a forward with ``n_past == 0`` overwrites it from position 0. So the
oldest request runs to its end (stop, length, abort) and the others wait in arrival order
(FIFO); switching sequences midway would drop the first one's KV and cost a full re-prefill
on every switch. Aggregate tokens/s is that of one stream; a queued request waits for whole
answers (``max_num_seqs`` only bounds how many wait inside the engine).

Token level, not chatglm.cpp's helpers: ``Pipeline.generate()`` is broken in 0.4.2 and its
``chat()`` silently drops the start of prompts beyond ``max_context_length`` (512 by default).
Each ``step()`` is one ``model.generate_next_token`` call: the prompt's prefill when
``n_past == 0``, else one token. Chat turns go through the tokenizer's own message encoding
(``apply_chat_template``: the family's official prompt ids), never truncated: a prompt that
does not fit is refused.

Sampling is chatglm.cpp's (temperature, top-k, top-p over the logits in C++; greedy when the
temperature is 0). Its random generator is seeded from ``std::random_device`` per thread and
cannot be set from Python, so ``seed`` is not honoured: sampled answers are not reproducible.

Threads: stock chatglm.cpp picks its own count on every forward (the CPU count, halved above
four, CPU affinity ignored), and its ggml threads spin-wait for each other between graph
nodes, so when other processes share the cores every step stalls for whole scheduler time
slices (a tiny model fell from ~4,000 to ~5 tokens/s on a loaded 2-core machine). medserve's
build carries a one-line patch (installer/patches/chatglm-cpp-0.4.2-threads.patch) that reads
``CHATGLM_NUM_THREADS``; the worker sets it from ``engine.num_threads``, by default one less
than the cores on a machine of at most four (the server beside it must keep a core), else
chatglm.cpp's own choice (half the cores).
"""

from __future__ import annotations

import base64
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medserve.accel.engine_core import (
    EngineStats,
    InvalidPrompt,
    PromptInput,
    StepOutput,
    prompt_room,
    served_manifest,
)
from medserve.accel.protocol import Configure, FinishReason, ModelDescription, Sampling
from medserve.models.manifest import ModelManifest
from medserve.quant.chatglm_cpp_export import (
    FORMAT,
    MODEL_FILE,
    ModelFileHeader,
    ModelType,
    read_header,
)

ENGINE = "chatglm-cpp"
THREADS_VARIABLE = "CHATGLM_NUM_THREADS"
_NO_TRUNCATION = 2**31 - 1
"""max_length handed to the tokenizer: chatglm.cpp would cut the prompt's start silently."""
_ROLES = {"tool": "observation"}


@dataclass(eq=False)
class _Sequence:
    request_id: str
    ids: list[int]
    """The prompt, then every generated token: chatglm.cpp takes the whole list each step."""
    num_prompt: int
    max_new_tokens: int
    sampling: Sampling
    generation: Any
    """chatglm_cpp.GenerationConfig of the request."""
    n_past: int = 0
    """Positions already in the KV cache (0: the prefill has not run)."""
    num_generated: int = 0


class ChatGLMCppEngine:
    def __init__(
        self, cpp: Any, model_file: Path, manifest: ModelManifest, config: Configure
    ) -> None:
        self._cpp = cpp
        self._manifest = manifest
        self._name = config.model_name
        self._header = read_header(model_file)
        record = self._header.config
        head_dim = record.hidden_size // record.num_attention_heads
        # K and V of every layer, f16 (chatglm.cpp's KV type), per token.
        self._kv_bytes_per_token = (
            4 * record.num_hidden_layers * record.num_key_value_heads * head_dim
        )
        budget = int(config.kv_cache_gb * 1024**3) // self._kv_bytes_per_token
        limits = [config.max_context_tokens, record.max_length]
        self.context_length = min(limits + ([budget] if budget > 0 else []))
        # The KV cache is allocated here for context_length tokens, once.
        self._pipeline = cpp.Pipeline(str(model_file), self.context_length)
        self._model = self._pipeline.model
        self._tokenizer = self._pipeline.tokenizer
        model_config = self._model.config
        self._stop_ids = frozenset(
            {model_config.eos_token_id, *model_config.extra_eos_token_ids} - {-1}
        )
        self._glm4_bytes = _glm4_token_bytes(self._header)
        # Decoded text skips the special tokens (numbered after the vocabulary) and the
        # embedding's padding rows past them, whose ids crash the C++ SentencePiece decode.
        self._text_ids = frozenset(_text_tokens(self._header, self._glm4_bytes))
        self._waiting: deque[_Sequence] = deque()
        self._current: _Sequence | None = None
        self._max_used = 0
        self._requested_threads = int(config.options.get("num_threads") or 0)

    def describe(self) -> ModelDescription:
        return ModelDescription(
            name=self._name,
            architecture=self._manifest.architecture,
            precision=self._manifest.precision,
            context_length=self.context_length,
            engine=ENGINE,
            pid=os.getpid(),
        )

    def encode(self, request: PromptInput) -> list[int]:
        """Prompt ids as the family's official tokenizer makes them ([gMASK] <sop> first)."""
        try:
            if request.messages is not None:
                if not request.messages:
                    raise InvalidPrompt("messages is empty")
                # OpenAI's "tool" turn is what ChatGLM3 / GLM-4 call an observation.
                turns = [
                    self._cpp.ChatMessage(_ROLES.get(t.role, t.role), t.content)
                    for t in request.messages
                ]
                return list(self._tokenizer.apply_chat_template(turns, _NO_TRUNCATION))
            ids = list(self._tokenizer.encode(request.prompt or "", _NO_TRUNCATION))
        except (RuntimeError, IndexError, ValueError) as exc:  # C++ checks: roles, order
            raise InvalidPrompt(f"the chat turns do not fit this model: {_reason(exc)}") from exc
        if len(ids) <= 2:  # only the [gMASK] <sop> prefix
            raise InvalidPrompt("prompt is empty after tokenization")
        return ids

    def add(self, request: PromptInput) -> int:
        prompt_ids = self.encode(request)
        room = prompt_room(prompt_ids, self.context_length)
        sampling = request.sampling
        self._waiting.append(
            _Sequence(
                request_id=request.request_id,
                ids=prompt_ids,
                num_prompt=len(prompt_ids),
                max_new_tokens=max(1, min(sampling.max_tokens, room)),
                sampling=sampling,
                generation=self._generation_config(sampling),
            )
        )
        return len(prompt_ids)

    def _generation_config(self, sampling: Sampling) -> Any:
        greedy = sampling.temperature == 0.0
        return self._cpp.GenerationConfig(
            max_length=self.context_length,
            max_context_length=self.context_length,
            do_sample=not greedy,
            top_k=max(0, int(sampling.top_k)),
            top_p=float(sampling.top_p),
            temperature=1.0 if greedy else float(sampling.temperature),
            repetition_penalty=1.0,
        )

    def abort(self, request_id: str) -> None:
        if self._current is not None and self._current.request_id == request_id:
            # Its KV positions become free: the next prefill overwrites them from 0.
            self._current = None
            return
        for sequence in self._waiting:
            if sequence.request_id == request_id:
                self._waiting.remove(sequence)
                return

    def has_work(self) -> bool:
        return self._current is not None or bool(self._waiting)

    def step(self) -> list[StepOutput]:
        if self._current is None:
            if not self._waiting:
                return []
            self._current = self._waiting.popleft()
        sequence = self._current
        token = int(
            self._model.generate_next_token(
                sequence.ids, None, sequence.generation, sequence.n_past, sequence.num_prompt
            )
        )
        sequence.n_past = len(sequence.ids)
        sequence.ids.append(token)
        sequence.num_generated += 1
        self._max_used = max(self._max_used, sequence.n_past)
        finish: FinishReason | None = None
        token_ids = [token]
        if token in self._stop_ids and not sequence.sampling.ignore_eos:
            finish, token_ids = "stop", []  # the end-of-turn token is not part of the text
        elif sequence.num_generated >= sequence.max_new_tokens:
            finish = "length"
        if finish is not None:
            self._current = None
        return [StepOutput(sequence.request_id, token_ids, finish)]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of the tokens, special tokens skipped; a character split across tokens
        reads as U+FFFD, never an error (the host decodes windows that may cut one)."""
        ids = [int(i) for i in token_ids if i in self._text_ids]
        if self._glm4_bytes is not None:
            # GLM-4's tokens are bytes: the C++ decode returns them raw and pybind raises
            # UnicodeDecodeError on a character split across tokens.
            table = self._glm4_bytes
            return b"".join(table.get(i, b"") for i in ids).decode("utf-8", "replace")
        try:
            return self._tokenizer.decode(ids)
        except (ValueError, RuntimeError):  # UnicodeDecodeError, or a C++ conversion error
            return "".join(self._decode_one(i) for i in ids)

    def _decode_one(self, token_id: int) -> str:
        try:
            return self._tokenizer.decode([token_id])
        except (ValueError, RuntimeError):
            return "\ufffd"

    def stats(self) -> EngineStats:
        used = self._current.n_past if self._current is not None else 0
        return EngineStats(
            engine_requests=len(self._waiting) + (self._current is not None),
            kv_cache_usage=used / self.context_length,
            kv_cache_bytes=used * self._kv_bytes_per_token,
            kv_capacity_tokens=self.context_length,
            extra={
                "kv_cache_max_usage": self._max_used / self.context_length,
                "kv_cache_reserved_bytes": self.context_length * self._kv_bytes_per_token,
                "running_sequences": int(self._current is not None),
                "waiting_sequences": len(self._waiting),
                "scheduler": "one sequence at a time, FIFO",
                "model_type": self._header.model_type.name,
                "num_threads": _chatglm_cpp_threads(),
                "num_threads_requested": self._requested_threads,
                "chatglm_cpp": getattr(self._cpp, "__version__", "unknown"),
            },
        )

    def close(self) -> None:
        self._waiting.clear()
        self._current = None


def _reason(exc: Exception) -> str:
    """A chatglm.cpp error without its source path ("/build/.../chatglm.cpp:166 check ...")."""
    if isinstance(exc, IndexError):  # std::out_of_range from a role lookup
        return "a role it does not know (it knows system, user, assistant, observation)"
    text = str(exc)
    _, found, after = text.partition("check failed (")
    return after.partition(") ")[2] or text if found else text


def _glm4_token_bytes(header: ModelFileHeader) -> dict[int, bytes] | None:
    """id -> bytes of GLM-4's ranked tokens (its C++ decode cannot be used, see decode)."""
    if header.model_type != ModelType.CHATGLM4:
        return None
    table: dict[int, bytes] = {}
    for line in header.tokenizer.decode("ascii").splitlines():
        if line.strip():
            token, rank = line.split()
            table[int(rank)] = base64.b64decode(token)
    return table


def _text_tokens(header: ModelFileHeader, glm4_bytes: dict[int, bytes] | None) -> set[int]:
    """Ids that decode to text: the vocabulary without its control tokens (<unk> <s> </s>);
    chatglm.cpp numbers its special tokens after the vocabulary."""
    if glm4_bytes is not None:
        return set(glm4_bytes)
    import tempfile

    from medserve.models.sentencepiece_model import PieceType, read_sentencepiece_model

    with tempfile.NamedTemporaryFile(suffix=".model") as f:
        f.write(header.tokenizer)
        f.flush()
        pieces = read_sentencepiece_model(Path(f.name)).pieces
    control = (PieceType.CONTROL, PieceType.UNKNOWN)
    return {i for i, piece in enumerate(pieces) if piece.kind not in control}


def _chatglm_cpp_threads() -> int:
    """What chatglm.cpp uses: CHATGLM_NUM_THREADS (medserve's patch), else the CPU count
    (affinity ignored), halved above four."""
    forced = int(os.environ.get(THREADS_VARIABLE, "0") or 0)
    if forced > 0:
        return forced
    cpus = os.cpu_count() or 4
    return cpus if cpus <= 4 else cpus // 2


def _set_threads(requested: int) -> None:
    """Before the first forward: chatglm.cpp reads the variable on every graph it runs."""
    cpus = os.cpu_count() or 1
    threads = requested if requested > 0 else (max(1, cpus - 1) if cpus <= 4 else 0)
    if threads > 0:
        os.environ[THREADS_VARIABLE] = str(threads)


def load(config: Configure) -> ChatGLMCppEngine:
    model_dir, manifest = served_manifest(config, FORMAT)
    model_file = model_dir / str(manifest.source.get("model_file") or MODEL_FILE)
    if not model_file.is_file():  # chatglm_cpp.Pipeline would try to convert a folder
        raise ValueError(f"{model_dir} has no {model_file.name}; re-run `medserve export`")
    from medserve.accel.cpu_features import check_native_build

    check_native_build(ENGINE)  # a clear error instead of SIGILL in a ggml kernel
    _set_threads(int(config.options.get("num_threads") or 0))
    import chatglm_cpp

    return ChatGLMCppEngine(_Bindings(chatglm_cpp), model_file, manifest, config)


class _Bindings:
    """The parts of chatglm_cpp the engine uses: the C++ Pipeline, never the Python wrapper
    (which converts a model folder it is given by running the folder's remote code)."""

    def __init__(self, module: Any) -> None:
        self.Pipeline = module._C.Pipeline
        self.ChatMessage = module.ChatMessage
        self.GenerationConfig = module._C.GenerationConfig
        self.__version__ = getattr(module, "__version__", "unknown")
