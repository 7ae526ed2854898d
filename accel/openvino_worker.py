"""The OpenVINO GenAI engine loop, run in its own process.

ContinuousBatchingPipeline.step() holds the GIL for the whole forward pass, so running it in the
server process would freeze the event loop (no streaming, no health checks) while a batch runs.
This process owns one pipeline and talks to the server over a multiprocessing Pipe:

  server -> worker: ("add", request_id, payload) | ("abort", request_id) | ("stats", token)
                    ("shutdown",)
  worker -> server: ("ready", model_info) | ("fatal", message)
                    ("chunk", request_id, text, finish_reason, num_prompt, num_completion)
                    ("error", request_id, kind, message) | ("stats", token, stats)

The loop is: take new commands -> one engine step -> read each request's new tokens.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from medserve.accel.text_stream import TextStream
from medserve.kv_cache.planner import KVGeometry, plan_kv_cache

IDLE_POLL_S = 0.05


@dataclass
class WorkerConfig:
    model_name: str
    model_dir: str
    device: str
    kv_cache_gb: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    max_context_tokens: int
    num_threads: int


@dataclass
class _Active:
    handle: Any
    stream: TextStream
    num_prompt_tokens: int
    num_generated: int = 0


def worker_main(config: WorkerConfig, conn: Connection) -> None:
    # The server handles Ctrl-C and SIGTERM and then tells us to shut down.  systemd (and
    # `timeout`, and a terminal's Ctrl-C) signal the whole process group at once; dying
    # mid-step on that signal would turn a clean stop into a crash and a restart.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = _Engine(config)
    except Exception as exc:  # report any load failure to the server instead of vanishing
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", engine.model_info()))
    engine.run(conn)


class _Engine:
    def __init__(self, config: WorkerConfig) -> None:
        import openvino_genai as ov_genai

        self._ov_genai = ov_genai
        self.config = config
        model_dir = Path(config.model_dir)
        self.manifest = json.loads((model_dir / "medserve.json").read_text(encoding="utf-8"))

        scheduler = ov_genai.SchedulerConfig()
        scheduler.cache_size = config.kv_cache_gb
        scheduler.max_num_seqs = config.max_num_seqs
        scheduler.max_num_batched_tokens = config.max_num_batched_tokens
        scheduler.enable_prefix_caching = config.enable_prefix_caching
        scheduler.dynamic_split_fuse = True
        properties: dict[str, Any] = {}
        if config.num_threads > 0:
            properties["INFERENCE_NUM_THREADS"] = config.num_threads
        self.pipeline = ov_genai.ContinuousBatchingPipeline(
            str(model_dir), scheduler, config.device, properties
        )
        self.tokenizer = self.pipeline.get_tokenizer()
        self.default_config = self.pipeline.get_config()
        self.context_length = min(
            int(self.manifest.get("context_length") or config.max_context_tokens),
            config.max_context_tokens,
        )
        self.active: dict[str, _Active] = {}
        self._next_numeric_id = 0
        self.kv_plan = plan_kv_cache(KVGeometry.from_model_dir(model_dir), config.kv_cache_gb)

    def model_info(self) -> dict[str, Any]:
        return {
            "name": self.config.model_name,
            "architecture": self.manifest.get("architecture", "unknown"),
            "precision": self.manifest.get("precision", "unknown"),
            "context_length": self.context_length,
            "pid": os.getpid(),
        }

    def run(self, conn: Connection) -> None:
        while True:
            # Block briefly when idle so an idle server costs no CPU; never block while
            # requests are running.
            timeout = 0.0 if self.active else IDLE_POLL_S
            try:
                messages = _drain(conn, timeout)
            except (EOFError, OSError):
                return  # the server is gone (even kill -9): nothing left to serve
            for message in messages:
                if message[0] == "shutdown":
                    self._abort_all(conn)
                    return
                self._handle(conn, message)
            # Keep stepping after the last request was cancelled: the scheduler frees a
            # cancelled request's KV blocks on its next step.
            if self.active or self.pipeline.has_non_finished_requests():
                try:
                    self.pipeline.step()
                except Exception as exc:  # a failed step poisons every running request
                    self._fail_all(conn, f"engine step failed: {type(exc).__name__}: {exc}")
                    continue
                self._collect(conn)

    def _handle(self, conn: Connection, message: tuple[Any, ...]) -> None:
        kind, request_id = message[0], message[1]
        if kind == "stats":
            conn.send(("stats", request_id, self._stats()))
            return
        if kind == "abort":
            active = self.active.pop(request_id, None)
            if active is not None:
                active.handle.cancel()
            return
        if kind == "add":
            try:
                self._add(request_id, message[2])
            except InvalidPromptError as exc:
                conn.send(("error", request_id, "invalid_prompt", str(exc)))
            except Exception as exc:
                conn.send(("error", request_id, "backend", f"{type(exc).__name__}: {exc}"))

    def _add(self, request_id: str, payload: dict[str, Any]) -> None:
        ov_genai = self._ov_genai
        if payload.get("messages") is not None:
            prompt = self.tokenizer.apply_chat_template(
                payload["messages"], add_generation_prompt=True
            )
            # The template already wrote any BOS/special tokens the model expects.
            encoded = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            encoded = self.tokenizer.encode(payload["prompt"])
        input_ids = encoded.input_ids
        num_prompt = int(input_ids.get_shape()[-1])
        if num_prompt == 0:
            raise InvalidPromptError("prompt is empty after tokenization")
        room = self.context_length - num_prompt
        if room <= 0:
            raise InvalidPromptError(
                f"prompt is {num_prompt} tokens; this model accepts at most "
                f"{self.context_length - 1} prompt tokens"
            )

        params = payload["params"]
        config = ov_genai.GenerationConfig()
        config.eos_token_id = self.default_config.eos_token_id
        config.stop_token_ids = set(self.default_config.stop_token_ids)
        config.max_new_tokens = min(int(params["max_tokens"]), room)
        if params["temperature"] == 0.0:
            config.do_sample = False
        else:
            config.do_sample = True
            config.temperature = float(params["temperature"])
            config.top_p = float(params["top_p"])
            if params["top_k"] > 0:
                config.top_k = int(params["top_k"])
        if params.get("seed") is not None:
            config.rng_seed = int(params["seed"])

        numeric_id = self._next_numeric_id
        self._next_numeric_id += 1
        handle = self.pipeline.add_request(numeric_id, input_ids, config)
        stream = TextStream(decode=self._decode, stop=tuple(params.get("stop") or ()))
        self.active[request_id] = _Active(
            handle=handle, stream=stream, num_prompt_tokens=num_prompt
        )

    def _stats(self) -> dict[str, Any]:
        if not self.active:
            # GenAI computes metrics at the start of a step; an idle step makes them current
            # (e.g. shows the blocks of a just-cancelled request as freed).
            self.pipeline.step()
        metrics = self.pipeline.get_metrics()
        return {
            "pid": os.getpid(),
            "running_requests": len(self.active),
            "engine_requests": int(metrics.requests),
            "kv_cache_usage": float(metrics.cache_usage),
            "kv_cache_max_usage": float(metrics.max_cache_usage),
            "kv_cache_bytes": int(metrics.kv_cache_size_in_bytes),
            "kv_capacity_tokens_estimate": self.kv_plan.capacity_tokens,
        }

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _collect(self, conn: Connection) -> None:
        finished: list[str] = []
        for request_id, active in self.active.items():
            try:
                if self._collect_one(conn, request_id, active):
                    finished.append(request_id)
            except Exception as exc:  # one bad request must not take the others down
                active.handle.cancel()
                conn.send(("error", request_id, "backend", f"{type(exc).__name__}: {exc}"))
                finished.append(request_id)
        for request_id in finished:
            del self.active[request_id]

    def _collect_one(self, conn: Connection, request_id: str, active: _Active) -> bool:
        """Send the request's new text; True when the request is finished."""
        ov_genai = self._ov_genai
        handle = active.handle
        new_ids: list[int] = []
        finish_reason: str | None = None
        if handle.can_read():
            for output in handle.read().values():
                new_ids.extend(output.generated_ids)
                if output.finish_reason == ov_genai.GenerationFinishReason.LENGTH:
                    finish_reason = "length"
                elif output.finish_reason == ov_genai.GenerationFinishReason.STOP:
                    finish_reason = "stop"
        active.num_generated += len(new_ids)
        text = active.stream.push(new_ids) if new_ids else ""
        if active.stream.stopped:
            handle.cancel()  # a stop string matched: free the KV blocks now
            finish_reason = "stop"
        elif finish_reason is None and handle.get_status() != ov_genai.GenerationStatus.RUNNING:
            finish_reason = "stop"
        if finish_reason is not None:
            text += active.stream.flush()
        if text or finish_reason is not None:
            conn.send(
                (
                    "chunk",
                    request_id,
                    text,
                    finish_reason,
                    active.num_prompt_tokens,
                    active.num_generated,
                )
            )
        return finish_reason is not None

    def _abort_all(self, conn: Connection) -> None:
        self._fail_all(conn, "server is shutting down")

    def _fail_all(self, conn: Connection, reason: str) -> None:
        for request_id, active in self.active.items():
            active.handle.cancel()
            conn.send(("error", request_id, "backend", reason))
        self.active.clear()


def _drain(conn: Connection, timeout: float) -> list[tuple[Any, ...]]:
    """Every message waiting on the pipe, waiting up to ``timeout`` for the first one."""
    messages = []
    while conn.poll(timeout if not messages else 0):
        messages.append(conn.recv())
    return messages


class InvalidPromptError(Exception):
    pass
