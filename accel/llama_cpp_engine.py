"""llama.cpp engine core: continuous batching over one shared KV cache, one sequence id each.

Runs only in ``.venv-llama-cpp`` (llama-cpp-python built from its sdist with -march=native,
installer/engine_venv.sh), in its own worker process, through llama.cpp's C API (ctypes):
the high-level ``llama_cpp.Llama`` runs one sequence at a time, which would serialize every
stream. Here each request gets a sequence id in one ``llama_context`` whose KV cache is
unified (``kv_unified``: every sequence draws cells from one pool of ``n_ctx``), and every
step is one ``llama_decode`` over a batch holding one new token per decoding sequence plus
chunks of waiting prompts (chunked prefill, at most ``max_num_batched_tokens`` per step).
Aborting a request removes its cells at once (``llama_memory_seq_rm``).

Prefix cache (``enable_prefix_caching``, on by default as for OpenVINO): the prompt of the last
request that finished stays in the cache under one spare sequence id; a new prompt sharing its
start (the system prompt, an earlier turn of the same conversation) gets those cells added to
its own sequence (``llama_memory_seq_cp``: in a unified cache cells are shared, not copied)
and prefills only the rest.

Admission reserves each request's worst case (prompt + max new tokens, within the context)
against the pool, so a running sequence never finds the cache full midway; a request alone
is always admitted. Sampling is llama.cpp's own sampler chain per sequence (greedy at
temperature 0), so the logits never cross into Python.

The chat template comes from the GGUF (``tokenizer.chat_template``) and is rendered like
transformers renders it (accel/chat_template.py), then tokenized without adding BOS, as the
OpenVINO engine does, so both engines see the same prompt tokens.
"""

from __future__ import annotations

import ctypes
import os
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medserve.accel.chat_template import ChatTemplate, ChatTemplateError
from medserve.accel.cpu_features import check_native_build
from medserve.accel.engine_core import (
    EngineStats,
    InvalidPrompt,
    PromptInput,
    StepOutput,
    prompt_room,
    served_manifest,
)
from medserve.accel.protocol import Configure, FinishReason, ModelDescription, Sampling

ENGINE = "llama-cpp"
FORMAT = "gguf"
# KV cells are allocated in multiples of this (llama.cpp pads n_ctx to 256 anyway).
_CTX_ALIGN = 256
# Shorter shared prefixes are not worth a cache look-up and a copy of cell ids.
_MIN_PREFIX_REUSE = 8


@dataclass(eq=False)
class _Sequence:
    request_id: str
    seq_id: int
    prompt: list[int]
    sampling: Sampling
    max_new_tokens: int
    reserve: int
    sampler: Any
    n_past: int = 0
    """Tokens of this sequence already in the KV cache."""
    generated: int = 0
    next_token: int = -1
    """The sampled token not yet fed back (decode phase)."""
    reused: int = 0
    """Prompt tokens whose KV cells came from the prefix cache."""

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


def load(config: Configure) -> LlamaCppEngine:
    check_native_build(ENGINE)
    return LlamaCppEngine(config)


class LlamaCppEngine:
    def __init__(self, config: Configure) -> None:
        import llama_cpp

        self._ll = llama_cpp
        self._config = config
        model_dir, self._manifest = served_manifest(config, FORMAT)
        options = config.options
        self._silence_logs()
        llama_cpp.llama_backend_init()

        model_params = llama_cpp.llama_model_default_params()
        model_params.use_mmap = True
        model_path = _gguf_file(model_dir)
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

        trained = int(llama_cpp.llama_model_n_ctx_train(self._model)) or config.max_context_tokens
        self.context_length = min(
            self._manifest.context_length or trained, trained, config.max_context_tokens
        )
        self._max_seqs = max(1, config.max_num_seqs)
        self._kv_bytes_per_token = self._kv_token_bytes()
        budget = int(config.kv_cache_gb * 1e9) // max(1, self._kv_bytes_per_token)
        n_ctx = min(max(budget, self.context_length), self._max_seqs * self.context_length)
        self._n_ctx = -(-n_ctx // _CTX_ALIGN) * _CTX_ALIGN
        self._max_batch = int(options.get("max_num_batched_tokens") or 512)

        threads = int(options.get("num_threads") or 0) or (os.cpu_count() or 1)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = self._n_ctx
        ctx_params.n_batch = self._max_batch
        ctx_params.n_ubatch = min(self._max_batch, 512)
        self._prefix_caching = bool(options.get("enable_prefix_caching", True))
        # One spare sequence id holds the cached prefix.
        self._cache_seq = self._max_seqs
        ctx_params.n_seq_max = self._max_seqs + (1 if self._prefix_caching else 0)
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.kv_unified = True
        ctx_params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {self._n_ctx} tokens")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self._max_batch + self._max_seqs, 0, 1)

        self._template = self._chat_template()
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[str, _Sequence] = {}
        self._free_seq_ids = list(range(self._max_seqs - 1, -1, -1))
        self._reserved = 0
        self._cached: list[int] = []
        """Prompt tokens held under the cache sequence id, positions 0..len-1."""
        self.prefix_hits = 0
        self._token_buf = (llama_cpp.llama_token * max(self.context_length, 16))()

    # -- EngineCore ---------------------------------------------------------------------

    def describe(self) -> ModelDescription:
        return ModelDescription(
            name=self._config.model_name,
            architecture=self._manifest.architecture,
            precision=self._manifest.precision,
            context_length=self.context_length,
            engine=ENGINE,
            pid=os.getpid(),
        )

    def add(self, request: PromptInput) -> int:
        if request.messages is not None:
            if self._template is None:
                raise InvalidPrompt("this model has no chat template; use /v1/completions")
            try:
                turns = [{"role": t.role, "content": t.content} for t in request.messages]
                text = self._template.render(turns)
            except ChatTemplateError as exc:
                raise InvalidPrompt(str(exc)) from exc
            prompt = self._tokenize(text, add_special=False)
        else:
            prompt = self._tokenize(request.prompt or "", add_special=True)
        max_new = min(request.sampling.max_tokens, prompt_room(prompt, self.context_length))
        self._waiting.append(
            _Sequence(
                request_id=request.request_id,
                seq_id=-1,
                prompt=prompt,
                sampling=request.sampling,
                max_new_tokens=max_new,
                reserve=len(prompt) + max_new,
                sampler=None,
            )
        )
        return len(prompt)

    def abort(self, request_id: str) -> None:
        for seq in self._waiting:
            if seq.request_id == request_id:
                self._waiting.remove(seq)
                return
        seq = self._running.get(request_id)
        if seq is not None:
            self._release(seq)  # its KV cells are free before the next step

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        self._admit()
        if not self._running:
            return outputs

        ll = self._ll
        batch = self._batch
        batch.n_tokens = 0
        sampled_at: list[tuple[_Sequence, int]] = []
        # One token per decoding sequence first, so streams never stall behind a long prompt.
        for seq in self._running.values():
            if not seq.prefilling:
                sampled_at.append((seq, self._push(seq.next_token, seq.n_past, seq.seq_id, True)))
                seq.n_past += 1
        budget = self._max_batch - batch.n_tokens
        for seq in self._running.values():
            if not seq.prefilling or budget <= 0:
                continue
            chunk = seq.prompt[seq.n_past : seq.n_past + budget]
            last = seq.n_past + len(chunk) == len(seq.prompt)
            for offset, token in enumerate(chunk):
                is_last = last and offset == len(chunk) - 1
                index = self._push(token, seq.n_past + offset, seq.seq_id, is_last)
                if is_last:
                    sampled_at.append((seq, index))
            seq.n_past += len(chunk)
            budget -= len(chunk)

        status = ll.llama_decode(self._ctx, batch)
        if status != 0:
            # Reservations make a full cache unexpected; fail the step's requests cleanly.
            raise RuntimeError(f"llama_decode failed (status {status})")

        for seq, index in sampled_at:
            token = int(ll.llama_sampler_sample(seq.sampler, self._ctx, index))
            out = StepOutput(seq.request_id)
            is_end = ll.llama_vocab_is_eog(self._vocab, token) and not seq.sampling.ignore_eos
            finish: FinishReason | None = None
            if is_end:
                finish = "stop"
            else:
                out.token_ids.append(token)
                seq.generated += 1
                seq.next_token = token
                if seq.generated >= seq.max_new_tokens:
                    finish = "length"
            if finish is not None:
                out.finish_reason = finish
                self._release(seq, keep_prompt=True)
            outputs.append(out)
        return outputs

    def decode(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        tokens = (self._ll.llama_token * len(token_ids))(*token_ids)
        size = 8 * len(token_ids) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._ll.llama_detokenize(
                self._vocab, tokens, len(token_ids), buf, size, False, False
            )
            if n >= 0:
                # Split multi-byte characters come out as U+FFFD; the worker host holds a
                # trailing U+FFFD back until the next token completes the character.
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 16

    def stats(self) -> EngineStats:
        used = len(self._cached) + sum(seq.n_past - seq.reused for seq in self._running.values())
        return EngineStats(
            engine_requests=len(self._running) + len(self._waiting),
            kv_cache_usage=min(1.0, used / self._n_ctx),
            kv_cache_bytes=used * self._kv_bytes_per_token,
            kv_capacity_tokens=self._n_ctx,
            extra={
                "running_sequences": len(self._running),
                "waiting_sequences": len(self._waiting),
                "prefix_cache_tokens": len(self._cached),
                "prefix_cache_hits": self.prefix_hits,
            },
        )

    def close(self) -> None:
        for seq in list(self._running.values()):
            self._release(seq)
        self._ll.llama_batch_free(self._batch)
        self._ll.llama_free(self._ctx)
        self._ll.llama_model_free(self._model)

    # -- internals ----------------------------------------------------------------------

    def _admit(self) -> None:
        while self._waiting and self._free_seq_ids:
            seq = self._waiting[0]
            alone = not self._running
            if self._reserved + len(self._cached) + seq.reserve > self._n_ctx and self._cached:
                self._drop_cached_prefix()  # live requests come before a cached prefix
            if not alone and self._reserved + seq.reserve > self._n_ctx:
                return
            self._waiting.popleft()
            seq.seq_id = self._free_seq_ids.pop()
            seq.sampler = self._new_sampler(seq.sampling)
            self._reserved += seq.reserve
            self._running[seq.request_id] = seq
            self._reuse_cached_prefix(seq)

    def _reuse_cached_prefix(self, seq: _Sequence) -> None:
        shared = 0
        for cached, token in zip(self._cached, seq.prompt, strict=False):
            if cached != token:
                break
            shared += 1
        shared = min(shared, len(seq.prompt) - 1)  # the last prompt token must run: its logits
        if shared < _MIN_PREFIX_REUSE:
            return
        self._ll.llama_memory_seq_cp(self._memory, self._cache_seq, seq.seq_id, 0, shared)
        seq.n_past = seq.reused = shared
        self.prefix_hits += 1

    def _drop_cached_prefix(self) -> None:
        self._ll.llama_memory_seq_rm(self._memory, self._cache_seq, -1, -1)
        self._cached = []

    def _release(self, seq: _Sequence, *, keep_prompt: bool = False) -> None:
        ll = self._ll
        if keep_prompt and self._prefix_caching and not seq.prefilling:
            # The newest finished prompt replaces the cached one (same cells, a new owner).
            self._drop_cached_prefix()
            ll.llama_memory_seq_cp(self._memory, seq.seq_id, self._cache_seq, 0, len(seq.prompt))
            self._cached = list(seq.prompt)
        ll.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        ll.llama_sampler_free(seq.sampler)
        self._reserved -= seq.reserve
        self._free_seq_ids.append(seq.seq_id)
        del self._running[seq.request_id]

    def _push(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        batch = self._batch
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits
        batch.n_tokens = i + 1
        return i

    def _new_sampler(self, sampling: Sampling) -> Any:
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if sampling.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        if sampling.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(sampling.top_k))
        if sampling.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(sampling.top_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(sampling.temperature))
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(32)
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _tokenize(self, text: str, *, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n = self._ll.llama_tokenize(
            self._vocab, data, len(data), self._token_buf, len(self._token_buf), add_special, True
        )
        if n < 0:  # longer than the buffer (the context): report the real length
            return [0] * -n
        return list(self._token_buf[:n])

    def _chat_template(self) -> ChatTemplate | None:
        source = self._ll.llama_model_chat_template(self._model, None)
        if not source:
            return None
        return ChatTemplate(
            source.decode("utf-8"),
            bos_token=self._token_text(self._ll.llama_vocab_bos(self._vocab)),
            eos_token=self._token_text(self._ll.llama_vocab_eos(self._vocab)),
        )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = self._ll.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def _kv_token_bytes(self) -> int:
        ll = self._ll
        layers = ll.llama_model_n_layer(self._model)
        heads = max(1, ll.llama_model_n_head(self._model))
        kv_heads = ll.llama_model_n_head_kv(self._model) or heads
        head_dim = ll.llama_model_n_embd(self._model) // heads
        return 2 * layers * kv_heads * head_dim * 2  # K and V, f16 cells

    def _silence_logs(self) -> None:
        """llama.cpp prints every load detail to stderr; keep only its errors."""
        ll = self._ll

        def log(level: int, text: bytes, _user: Any) -> None:
            if level == 4 and text:  # GGML_LOG_LEVEL_ERROR (5 continues a line: load dots)
                os.write(2, text)

        self._log_callback = ll.llama_log_callback(log)
        ll.llama_log_set(self._log_callback, ctypes.c_void_p(0))


def _gguf_file(model_dir: Path) -> Path:
    files = sorted(model_dir.glob("*.gguf"))
    if len(files) != 1:
        raise ValueError(f"{model_dir} must hold exactly one .gguf file, found {len(files)}")
    return files[0]
