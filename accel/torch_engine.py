"""An EngineCore over a Hugging Face-style causal LM in PyTorch, one forward per step.

Shared by the PyTorch engines (ipex-llm low-bit models, IPEX-optimized models): they differ in
how the model is loaded, not in how it is driven. Each request owns its KV cache (the
``past_key_values`` the model returns; ipex-llm preallocates it per sequence in 256-token
blocks and grows it in place), so aborting or finishing a request frees its KV at once by
dropping that object. ``step()`` runs exactly one batch-1 forward, a prefill or one decode
token, for the request whose turn it is (accel/round_robin.py): the host streams token by
token and sees an abort between any two forwards.

Imported only inside an engine's own virtual environment (it imports torch).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from medserve.accel.engine_core import (
    EngineStats,
    PromptInput,
    StepOutput,
    prompt_room,
)
from medserve.accel.protocol import Configure, FinishReason, ModelDescription, Sampling
from medserve.accel.round_robin import RoundRobinScheduler
from medserve.accel.torch_sampling import choose_token, new_generator
from medserve.kv_cache.planner import KVGeometry
from medserve.models.manifest import ModelManifest


@dataclass(eq=False)
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    generator: torch.Generator
    past: Any = None
    """The request's KV cache; None until its prefill ran."""
    last_token: int = -1
    num_generated: int = 0
    kv_bytes: int = 0

    @property
    def reserve_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(frozen=True)
class TorchModel:
    """What a PyTorch engine hands over after loading: the model and how to talk to it."""

    model: Any
    tokenizer: Any
    """A transformers tokenizer with the model's chat template."""
    stop_token_ids: frozenset[int]
    kv_bytes_per_token: int
    """K and V of one token over all layers, in the KV dtype (for the capacity estimate)."""
    engine: str
    extra_stats: dict[str, Any] = field(default_factory=dict)
    new_cache: Callable[[], Any] | None = None
    """An empty KV cache for a new request, for models that cannot start from None (IPEX's
    indirect-access cache is a tuple it must be handed on the first forward)."""
    attention_mask: bool = False
    """Pass an all-ones attention mask over the whole sequence (IPEX's attention needs it)."""


class SteppedCausalLM:
    def __init__(self, loaded: TorchModel, manifest: ModelManifest, config: Configure) -> None:
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._stop_ids = loaded.stop_token_ids
        self._engine = loaded.engine
        self._new_cache = loaded.new_cache
        self._attention_mask = loaded.attention_mask
        self._extra = dict(loaded.extra_stats)
        self._manifest = manifest
        self._name = config.model_name
        self.context_length = min(
            manifest.context_length or config.max_context_tokens, config.max_context_tokens
        )
        self._budget_bytes = int(config.kv_cache_gb * 1024**3)
        self._capacity_tokens = self._budget_bytes // max(1, loaded.kv_bytes_per_token)
        self._scheduler: RoundRobinScheduler[_Sequence] = RoundRobinScheduler(
            max(1, config.max_num_seqs), self._capacity_tokens
        )
        self._max_kv_bytes = 0
        # Score only the last position: a 4k-token prefill would otherwise materialize
        # 4k x vocab logits (2.4 GB at a 150k vocabulary) to use one row.
        parameters = inspect.signature(self._model.forward).parameters
        self._last_logits_only = (
            {"num_logits_to_keep": 1} if "num_logits_to_keep" in parameters else {}
        )

    def describe(self) -> ModelDescription:
        return ModelDescription(
            name=self._name,
            architecture=self._manifest.architecture,
            precision=self._manifest.precision,
            context_length=self.context_length,
            engine=self._engine,
            pid=os.getpid(),
        )

    def add(self, request: PromptInput) -> int:
        prompt_ids = self._encode(request)
        room = prompt_room(prompt_ids, self.context_length)
        sampling = request.sampling
        self._scheduler.add(
            _Sequence(
                request_id=request.request_id,
                prompt_ids=prompt_ids,
                max_new_tokens=max(1, min(sampling.max_tokens, room)),
                sampling=sampling,
                generator=new_generator(sampling.seed),
            )
        )
        return len(prompt_ids)

    def _encode(self, request: PromptInput) -> list[int]:
        if request.messages is not None:
            text = self._tokenizer.apply_chat_template(
                [{"role": t.role, "content": t.content} for t in request.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            # The template already wrote any BOS/special tokens the model expects.
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        return list(self._tokenizer.encode(request.prompt or ""))

    def abort(self, request_id: str) -> None:
        sequence = self._scheduler.remove(request_id)
        if sequence is not None:
            sequence.past = None  # the last reference: its KV tensors are freed here

    def has_work(self) -> bool:
        return len(self._scheduler) > 0

    def step(self) -> list[StepOutput]:
        sequence = self._scheduler.next()
        if sequence is None:
            return []
        token = self._forward(sequence)
        sequence.num_generated += 1
        finish: FinishReason | None = None
        token_ids = [token]
        if token in self._stop_ids and not sequence.sampling.ignore_eos:
            finish, token_ids = "stop", []  # the end-of-turn token is not part of the text
        elif sequence.num_generated >= sequence.max_new_tokens:
            finish = "length"
        sequence.last_token = token
        if finish is not None:
            self.abort(sequence.request_id)
        return [StepOutput(sequence.request_id, token_ids, finish)]

    def _forward(self, sequence: _Sequence) -> int:
        if sequence.past is None:
            input_ids = torch.tensor([sequence.prompt_ids], dtype=torch.long)
            past = self._new_cache() if self._new_cache is not None else None
        else:
            input_ids = torch.tensor([[sequence.last_token]], dtype=torch.long)
            past = sequence.past
        extra = dict(self._last_logits_only)
        if self._attention_mask:
            length = len(sequence.prompt_ids) + sequence.num_generated
            extra["attention_mask"] = torch.ones(1, length, dtype=torch.long)
        with torch.inference_mode():
            output = self._model(input_ids=input_ids, past_key_values=past, use_cache=True, **extra)
            sequence.past = output.past_key_values
            token = choose_token(output.logits[0, -1], sequence.sampling, sequence.generator)
        sequence.kv_bytes = cache_nbytes(sequence.past)
        self._max_kv_bytes = max(self._max_kv_bytes, self._kv_bytes())
        return token

    def _kv_bytes(self) -> int:
        return sum(s.kv_bytes for s in self._scheduler if s.past is not None)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def stats(self) -> EngineStats:
        used = self._kv_bytes()
        return EngineStats(
            engine_requests=len(self._scheduler),
            kv_cache_usage=min(1.0, used / self._budget_bytes) if self._budget_bytes else 0.0,
            kv_cache_bytes=used,
            kv_capacity_tokens=self._capacity_tokens,
            extra={
                "kv_cache_max_usage": min(1.0, self._max_kv_bytes / max(1, self._budget_bytes)),
                "running_sequences": self._scheduler.num_running,
                "waiting_sequences": self._scheduler.num_waiting,
                "scheduler": "round-robin, batch 1",
                **self._extra,
            },
        )

    def close(self) -> None:
        for sequence in list(self._scheduler):
            self.abort(sequence.request_id)


def cache_nbytes(past: Any) -> int:
    """Bytes of storage behind a KV cache (HF Cache object or legacy tuples), counted once.

    Storage, not visible shape: ipex-llm preallocates 256 tokens ahead, and that memory is
    as taken as the part in use.
    """
    seen: dict[int, int] = {}
    for tensor in _tensors(past):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _tensors(past: Any) -> Iterable[torch.Tensor]:
    if past is None:
        return
    if isinstance(past, torch.Tensor):
        yield past
    elif hasattr(past, "key_cache") and hasattr(past, "value_cache"):
        for tensor in [*past.key_cache, *past.value_cache]:
            if isinstance(tensor, torch.Tensor):
                yield tensor
    elif isinstance(past, list | tuple):
        for item in past:
            yield from _tensors(item)


def stop_token_ids(generation_eos: int | list[int] | None, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json, else the tokenizer's EOS: where a turn ends."""
    if isinstance(generation_eos, int):
        ids = {generation_eos}
    else:
        ids = {int(i) for i in generation_eos or ()}
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = {int(tokenizer.eos_token_id)}
    return frozenset(ids)


def kv_bytes_per_token(model_dir: Path, dtype: torch.dtype) -> int:
    """K and V of one token over all layers, from config.json's attention geometry."""
    geometry = KVGeometry.from_model_dir(model_dir)
    return 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim * dtype.itemsize


def set_threads(options: dict[str, Any]) -> None:
    """``engine.num_threads`` for torch's intra-op pool; 0 leaves torch's default."""
    threads = int(options.get("num_threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
