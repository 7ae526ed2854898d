"""OpenVINO GenAI engine core: a ContinuousBatchingPipeline driven one step at a time.

Runs inside its worker process (accel/worker.py): ``step()`` holds the GIL for the whole
forward pass, which would freeze the server's event loop. The pipeline owns the paged KV
cache (32-token blocks bound to the model as tensors, no per-step copy), continuous batching
and prefix caching; this module only translates requests and reads each handle's new tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medserve.accel.chat_template import message_tools_shape, template_messages
from medserve.accel.engine_core import (
    EngineStats,
    InvalidPrompt,
    PromptInput,
    StepOutput,
)
from medserve.accel.fast_decode import verified_fast_decoder
from medserve.accel.json_grammar import compact_json_grammar
from medserve.accel.protocol import Configure, FinishReason, ModelDescription
from medserve.kv_cache.planner import KVGeometry, plan_kv_cache
from medserve.models.manifest import read_manifest


# Engine options that map to CPU plugin properties. An unset option ("", -1, 0 threads, None)
# leaves the plugin's own default, which differs between CPUs (AMX, AVX-512, AVX2).
def cpu_properties(options: Mapping[str, Any]) -> dict[str, Any]:
    """OpenVINO CPU properties from engine options (see server/settings.py EngineSettings)."""
    properties: dict[str, Any] = {}
    if int(options.get("num_threads") or 0) > 0:
        properties["INFERENCE_NUM_THREADS"] = int(options["num_threads"])
    for option, name in (
        ("performance_hint", "PERFORMANCE_HINT"),
        ("kv_cache_precision", "KV_CACHE_PRECISION"),
        ("inference_precision", "INFERENCE_PRECISION_HINT"),
    ):
        if options.get(option):
            properties[name] = str(options[option])
    group_size = options.get("dynamic_quantization_group_size")
    if group_size is not None and int(group_size) >= 0:
        properties["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = int(group_size)
    if options.get("cpu_pinning") in ("on", "off"):
        properties["ENABLE_CPU_PINNING"] = options["cpu_pinning"] == "on"
    return properties


@dataclass
class _Request:
    handle: Any
    num_prompt_tokens: int


class OpenVINOEngine:
    def __init__(self, config: Configure) -> None:
        import openvino_genai as ov_genai

        self._ov = ov_genai
        self._config = config
        model_dir = Path(config.model_dir)
        self._manifest = read_manifest(model_dir)
        options = config.options

        scheduler = ov_genai.SchedulerConfig()
        scheduler.cache_size = max(1, round(config.kv_cache_gb))
        scheduler.max_num_seqs = config.max_num_seqs
        scheduler.max_num_batched_tokens = int(options.get("max_num_batched_tokens", 2048))
        scheduler.enable_prefix_caching = bool(options.get("enable_prefix_caching", True))
        scheduler.dynamic_split_fuse = bool(options.get("dynamic_split_fuse", True))
        self.pipeline = ov_genai.ContinuousBatchingPipeline(
            str(model_dir), scheduler, str(options.get("device", "CPU")), cpu_properties(options)
        )
        self.tokenizer = self.pipeline.get_tokenizer()
        # GLM-4-9B-chat's and ChatGLM3's templates (models/chatglm_templates.py) describe tools
        # given on a system message and write calls in the model's syntax.
        self._tool_shape = message_tools_shape(self.tokenizer.chat_template)
        defaults = self.pipeline.get_config()
        self._eos_token_id = defaults.eos_token_id
        self._stop_token_ids = set(defaults.stop_token_ids)
        self.context_length = min(
            self._manifest.context_length or config.max_context_tokens, config.max_context_tokens
        )
        self._requests: dict[str, _Request] = {}
        self._next_numeric_id = 0
        self._kv_plan = plan_kv_cache(KVGeometry.from_model_dir(model_dir), config.kv_cache_gb)
        self._finish = {
            ov_genai.GenerationFinishReason.LENGTH: "length",
            ov_genai.GenerationFinishReason.STOP: "stop",
        }
        self._running_status = ov_genai.GenerationStatus.RUNNING
        special = [i for i in (self._eos_token_id, *sorted(self._stop_token_ids)) if i >= 0]
        self._decode = (
            verified_fast_decoder(model_dir, self._ov_decode, self._encode_plain, special)
            or self._ov_decode
        )

    def describe(self) -> ModelDescription:
        import os

        return ModelDescription(
            name=self._config.model_name,
            architecture=self._manifest.architecture,
            precision=self._manifest.precision,
            context_length=self.context_length,
            engine="openvino",
            pid=os.getpid(),
            structured_output=True,
            template_tools=self._tool_shape is not None,
        )

    def add(self, request: PromptInput) -> int:
        if request.messages is not None:
            messages = template_messages(request.messages, request.tools, self._tool_shape)
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            # The template already wrote any BOS/special tokens the model expects.
            input_ids = self.tokenizer.encode(prompt, add_special_tokens=False).input_ids
        else:
            input_ids = self.tokenizer.encode(request.prompt or "").input_ids
        num_prompt = int(input_ids.get_shape()[-1])
        if num_prompt == 0:
            raise InvalidPrompt("prompt is empty after tokenization")
        room = self.context_length - num_prompt
        if room <= 0:
            raise InvalidPrompt(
                f"prompt is {num_prompt} tokens; this model accepts at most "
                f"{self.context_length - 1} prompt tokens"
            )
        handle = self.pipeline.add_request(
            self._next_numeric_id, input_ids, self._generation_config(request, room)
        )
        self._next_numeric_id += 1
        self._requests[request.request_id] = _Request(handle, num_prompt)
        return num_prompt

    def _generation_config(self, request: PromptInput, room: int) -> Any:
        sampling = request.sampling
        config = self._ov.GenerationConfig()
        config.eos_token_id = self._eos_token_id
        config.stop_token_ids = set(self._stop_token_ids)
        config.max_new_tokens = min(sampling.max_tokens, room)
        config.ignore_eos = sampling.ignore_eos
        if sampling.temperature == 0.0:
            config.do_sample = False
        else:
            config.do_sample = True
            config.temperature = float(sampling.temperature)
            config.top_p = float(sampling.top_p)
            if sampling.top_k > 0:
                config.top_k = int(sampling.top_k)
        if sampling.seed is not None:
            config.rng_seed = int(sampling.seed)
        if sampling.json_schema is not None:
            config.structured_output_config = self._structured_output(sampling.json_schema)
        return config

    def _structured_output(self, json_schema: str) -> Any:
        """xgrammar masks every token the schema does not allow (the server checked the
        schema's keywords first: one the compiler rejects would break every step).  A schema
        accel/json_grammar.py covers goes in as a compact grammar (no whitespace between
        tokens); any other as the schema itself."""
        grammar = compact_json_grammar(json.loads(json_schema))
        if grammar is not None:
            return self._ov.StructuredOutputConfig(grammar=grammar)
        return self._ov.StructuredOutputConfig(json_schema=json_schema)

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            request.handle.cancel()  # the scheduler frees its blocks on the next step

    def has_work(self) -> bool:
        return bool(self._requests) or self.pipeline.has_non_finished_requests()

    def step(self) -> list[StepOutput]:
        self.pipeline.step()
        outputs: list[StepOutput] = []
        finished: list[str] = []
        for request_id, request in self._requests.items():
            output = self._read(request.handle)
            if output is None:
                continue
            token_ids, finish_reason = output
            outputs.append(StepOutput(request_id, token_ids, finish_reason))
            if finish_reason is not None:
                finished.append(request_id)
        for request_id in finished:
            del self._requests[request_id]
        return outputs

    def _read(self, handle: Any) -> tuple[list[int], FinishReason | None] | None:
        if handle.can_read():
            token_ids: list[int] = []
            finish_reason: FinishReason | None = None
            for output in handle.read().values():
                token_ids.extend(output.generated_ids)
                finish_reason = self._finish.get(output.finish_reason, finish_reason)
            return token_ids, finish_reason
        if handle.get_status() != self._running_status:
            return [], "stop"  # finished or dropped by the engine without a final read
        return None

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._decode(token_ids)

    def _ov_decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _encode_plain(self, text: str) -> list[int]:
        encoded = self.tokenizer.encode(text, add_special_tokens=False)
        return encoded.input_ids.data.tolist()[0]

    def stats(self) -> EngineStats:
        if not self._requests:
            # GenAI computes metrics at the start of a step; an idle step makes them current
            # (e.g. shows the blocks of a just-cancelled request as freed).
            self.pipeline.step()
        metrics = self.pipeline.get_metrics()
        return EngineStats(
            engine_requests=int(metrics.requests),
            kv_cache_usage=float(metrics.cache_usage) / 100.0,
            kv_cache_bytes=int(metrics.kv_cache_size_in_bytes),
            kv_capacity_tokens=self._kv_plan.capacity_tokens,
            extra={"kv_cache_max_usage": float(metrics.max_cache_usage) / 100.0},
        )

    def close(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)


def load(config: Configure) -> OpenVINOEngine:
    return OpenVINOEngine(config)
