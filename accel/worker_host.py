"""The engine-neutral worker loop: messages in, one engine step, text deltas out.

    take waiting messages -> engine.step() -> detokenize + stop strings -> one Outputs message

Everything here is shared by every engine: the loop, cancellation, stop strings, failure
isolation (one bad request never takes the others down) and stats. The engine core
(accel/engine_core.py) only adds, steps, aborts and decodes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from medserve.accel.engine_core import EngineCore, InvalidPrompt, PromptInput, StepOutput
from medserve.accel.protocol import (
    Abort,
    Add,
    BlockingChannel,
    Delta,
    Failed,
    Outputs,
    Shutdown,
    StatsQuery,
    StatsReply,
)
from medserve.accel.text_stream import TextStream

IDLE_POLL_S = 0.05
"""How long an idle worker blocks waiting for a message: no CPU when idle, 50 ms to wake."""
STEP_WINDOW = 512
"""Recent engine steps kept for the step-time figures in stats."""


@dataclass
class _Running:
    stream: TextStream
    num_prompt_tokens: int
    num_completion_tokens: int = 0


class WorkerHost:
    def __init__(self, engine: EngineCore, channel: BlockingChannel) -> None:
        self.engine = engine
        self.channel = channel
        self.running: dict[str, _Running] = {}
        self.step_seconds: deque[float] = deque(maxlen=STEP_WINDOW)
        """Durations of recent engine steps that produced tokens: the engine's own speed,
        against which the latency a client sees is judged."""

    def run(self) -> None:
        """Serve until Shutdown or until the server's end of the channel closes."""
        try:
            self._serve()
        except (EOFError, OSError):
            return  # the server is gone (even kill -9): nothing left to serve

    def _serve(self) -> None:
        while True:
            busy = bool(self.running) or self.engine.has_work()
            messages = self.channel.receive(0.0 if busy else IDLE_POLL_S)
            for message in messages:
                if isinstance(message, Shutdown):
                    self._fail_all("server is shutting down")
                    return
                self._handle(message)
            # Keep stepping after the last request was cancelled: engines free a cancelled
            # request's KV blocks on their next step.
            if self.engine.has_work():
                started = time.perf_counter()
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a failed step poisons every running request
                    self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
                    continue
                if any(output.token_ids for output in outputs):
                    self.step_seconds.append(time.perf_counter() - started)
                deltas = self._deltas(outputs)
                if deltas:
                    self.channel.send(Outputs(deltas))

    def _handle(self, message: Any) -> None:
        if isinstance(message, Add):
            self._add(message)
        elif isinstance(message, Abort):
            if self.running.pop(message.request_id, None) is not None:
                self.engine.abort(message.request_id)
        elif isinstance(message, StatsQuery):
            self.channel.send(StatsReply(message.token, self.stats()))

    def _add(self, message: Add) -> None:
        request = PromptInput(
            request_id=message.request_id,
            sampling=message.sampling,
            prompt=message.prompt,
            messages=message.messages,
            tools=message.tools,
        )
        try:
            num_prompt = self.engine.add(request)
        except InvalidPrompt as exc:
            self.channel.send(Failed(message.request_id, "invalid_prompt", str(exc)))
            return
        except Exception as exc:
            self.channel.send(Failed(message.request_id, "backend", _describe(exc)))
            return
        self.running[message.request_id] = _Running(
            stream=TextStream(self.engine.decode, message.sampling.stop),
            num_prompt_tokens=num_prompt,
        )

    def _deltas(self, outputs: list[StepOutput]) -> list[Delta]:
        deltas: list[Delta] = []
        for output in outputs:
            running = self.running.get(output.request_id)
            if running is None:
                continue  # aborted while the step ran
            try:
                delta = self._delta(output, running)
            except Exception as exc:  # one bad request must not take the others down
                self.running.pop(output.request_id, None)
                self.engine.abort(output.request_id)
                self.channel.send(Failed(output.request_id, "backend", _describe(exc)))
                continue
            if delta is not None:
                deltas.append(delta)
        return deltas

    def _delta(self, output: StepOutput, running: _Running) -> Delta | None:
        running.num_completion_tokens += len(output.token_ids)
        text = running.stream.push(output.token_ids) if output.token_ids else ""
        finish_reason = output.finish_reason
        if running.stream.stopped and finish_reason is None:
            self.engine.abort(output.request_id)  # a stop string matched: free the KV now
            finish_reason = "stop"
        if finish_reason is not None:
            text += running.stream.flush()
            del self.running[output.request_id]
        elif not text:
            return None
        return Delta(
            output.request_id,
            text,
            finish_reason,
            running.num_prompt_tokens,
            running.num_completion_tokens,
        )

    def stats(self) -> dict[str, Any]:
        engine = self.engine.stats()
        return {
            "pid": os.getpid(),
            "running_requests": len(self.running),
            "engine_requests": engine.engine_requests,
            "kv_cache_usage": engine.kv_cache_usage,
            "kv_cache_bytes": engine.kv_cache_bytes,
            "kv_capacity_tokens_estimate": engine.kv_capacity_tokens,
            **step_figures(self.step_seconds),
            **engine.extra,
        }

    def _fail_all(self, reason: str) -> None:
        for request_id in list(self.running):
            self.engine.abort(request_id)
            self.channel.send(Failed(request_id, "backend", reason))
        self.running.clear()


def step_figures(durations: deque[float]) -> dict[str, float]:
    """Median and p90 of recent step times in ms (0 before the first step)."""
    if not durations:
        return {"step_ms_p50": 0.0, "step_ms_p90": 0.0}
    ordered = sorted(durations)
    return {
        "step_ms_p50": round(statistics.median(ordered) * 1000, 3),
        "step_ms_p90": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 3),
    }


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
