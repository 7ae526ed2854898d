"""The serving contract every engine must pass, over real HTTP against a real worker process.

An engine's test module subclasses ``EngineContract`` and provides the class-scoped
``contract`` fixture (``@pytest.fixture(scope="class")`` over ``@classmethod``): a running
server (started with ``contract_env(...)``, so one sequence runs and one waits) and the model
name to test. The tests are the same for every engine:
streaming equals the non-streamed answer, stop strings, max_tokens, cancel frees the KV cache
inside the engine, back-pressure, and a worker killed like an OOM kill fails its in-flight
request at once and comes back.

Not collected by itself (the module name does not start with ``test_``).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.server_process import ServerProcess


def contract_env(models_dir: Path, model: str, **extra: str) -> dict[str, str]:
    """Server settings the contract assumes: 1 running + 1 queued, no prefix cache."""
    return {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MODEL": model,
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "1",
        "MEDSERVE_ENGINE_MAX_QUEUE": "1",
        # off so that freed KV blocks read as zero usage after a cancel
        "MEDSERVE_ENGINE_ENABLE_PREFIX_CACHING": "false",
        "MEDSERVE_CASES_ENABLED": "false",
        **extra,
    }


@dataclass(frozen=True)
class Contract:
    server: ServerProcess
    model: str
    short_prompt: list[dict[str, str]] = field(
        default_factory=lambda: [{"role": "user", "content": "Name three primary colours."}]
    )
    long_prompt: list[dict[str, str]] = field(
        default_factory=lambda: [
            {"role": "user", "content": "Write a very long essay about medicine."}
        ]
    )
    """Must make the model generate for seconds (a random-weight model rarely stops)."""
    queued_max_tokens: int = 40
    """max_tokens of the back-pressure test's two admitted requests: enough that they are
    still in flight when the third arrives (an engine running a tiny model at thousands of
    tokens/s needs thousands)."""

    def url(self, path: str) -> str:
        return self.server.base_url + path

    def chat(self, timeout: float = 120, **body: Any) -> httpx.Response:
        body.setdefault("model", self.model)
        body.setdefault("messages", self.short_prompt)
        return httpx.post(self.url("/v1/chat/completions"), json=body, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url("/metrics.json"), timeout=30).json()["models"][self.model]

    def in_flight(self) -> int:
        return httpx.get(self.url("/ready"), timeout=30).json()["in_flight"][self.model]


FOUR_QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "What does a stethoscope do?",
    "Write a very long essay about medicine.",
)


def alone_then_together(
    contract: Contract, questions: tuple[str, ...], body: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """Each question's answer asked alone, then all at once (checked to run at once)."""
    prompts = [[{"role": "user", "content": q}] for q in questions]
    alone = [
        contract.chat(messages=p, **body).json()["choices"][0]["message"]["content"]
        for p in prompts
    ]
    peak = {"running": 0}

    def watch() -> bool:
        peak["running"] = max(peak["running"], contract.stats()["running_sequences"])
        return peak["running"] == len(prompts)

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(contract.chat, messages=p, **body) for p in prompts]
        wait_until(watch, 60, f"{len(prompts)} sequences running at once")
        together = [f.result().json()["choices"][0]["message"]["content"] for f in futures]
    return alone, together


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stream_text(contract: Contract, body: dict[str, Any]) -> tuple[str, list[str], str | None]:
    """(whole text, the content deltas, finish_reason) of a streamed chat completion."""
    deltas: list[str] = []
    finish = None
    payload = {"model": contract.model, "messages": contract.short_prompt, **body, "stream": True}
    with httpx.stream("POST", contract.url("/v1/chat/completions"), json=payload, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["delta"].get("content"):
                deltas.append(choice["delta"]["content"])
            finish = choice["finish_reason"] or finish
    return "".join(deltas), deltas, finish


class EngineContract:
    """Subclass in an engine's test module and provide the ``contract`` fixture."""

    def test_model_is_listed_with_its_engine(self, contract: Contract) -> None:
        models = httpx.get(contract.url("/v1/models")).json()["data"]
        assert contract.model in [m["id"] for m in models]
        stats = contract.stats()
        for key in (
            "pid",
            "in_flight",
            "restarts",
            "running_requests",
            "engine_requests",
            "kv_cache_usage",
            "kv_capacity_tokens_estimate",
        ):
            assert key in stats, key
        assert 0.0 <= stats["kv_cache_usage"] <= 1.0

    def test_stream_equals_non_stream_for_greedy(self, contract: Contract) -> None:
        body = {"temperature": 0, "max_tokens": 24}
        whole = contract.chat(**body).json()
        text = whole["choices"][0]["message"]["content"]
        again = contract.chat(**body).json()["choices"][0]["message"]["content"]
        assert text == again and text.strip()
        streamed, deltas, finish = stream_text(contract, body)
        assert streamed == text
        assert len(deltas) > 3  # token by token, not one lump at the end
        assert all("\ufffd" not in d for d in deltas)
        assert finish == whole["choices"][0]["finish_reason"]

    def test_max_tokens_ends_with_length(self, contract: Contract) -> None:
        body = contract.chat(messages=contract.long_prompt, temperature=0, max_tokens=5).json()
        assert body["usage"]["completion_tokens"] == 5
        assert body["choices"][0]["finish_reason"] == "length"

    def test_stop_string_cuts_the_answer(self, contract: Contract) -> None:
        body = {"messages": contract.long_prompt, "temperature": 0, "max_tokens": 24}
        full = contract.chat(**body).json()["choices"][0]["message"]["content"]
        # A stop string taken from the middle of the answer: the output must end just before.
        words = [w for w in full.split() if len(w) >= 2]
        assert len(words) >= 4, full
        stop = words[len(words) // 2]
        cut = contract.chat(**body, stop=[stop]).json()
        text = cut["choices"][0]["message"]["content"]
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert text == full[: full.index(stop)]
        streamed, _, finish = stream_text(contract, {**body, "stop": [stop]})
        assert streamed == text and finish == "stop"

    def test_disconnect_mid_stream_frees_the_kv_cache(self, contract: Contract) -> None:
        payload = {
            "model": contract.model,
            "messages": contract.long_prompt,
            "temperature": 0,
            "max_tokens": 2000,
            "stream": True,
        }
        with httpx.stream(
            "POST", contract.url("/v1/chat/completions"), json=payload, timeout=60
        ) as response:
            # Hold the line iterator: dropping it (a `break` out of the loop) closes the
            # response, which is the disconnect this test wants to make only later.
            lines = response.iter_lines()
            received = 0
            while received < 5:
                received += next(lines).startswith("data: ")
            during = contract.stats()
            lines.close()
        assert during["engine_requests"] == 1, during
        assert during["kv_cache_usage"] > 0.0, during
        # Closing the connection is the disconnect: the engine itself must drop the request
        # and free its KV cache, not just the HTTP layer.
        wait_until(
            lambda: (s := contract.stats())["in_flight"] == 0 and s["engine_requests"] == 0,
            30,
            "the engine to drop the request",
        )
        after = contract.stats()
        assert after["running_requests"] == 0 and after["kv_cache_usage"] == 0.0

    def test_full_queue_is_503_and_admitted_requests_finish(self, contract: Contract) -> None:
        body = {"model": contract.model, "messages": contract.long_prompt, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            admitted = [
                pool.submit(contract.chat, **{**body, "max_tokens": contract.queued_max_tokens})
                for _ in range(2)
            ]
            wait_until(lambda: contract.in_flight() == 2, 30, "two requests in flight")
            refused = contract.chat(**{**body, "max_tokens": 40}, timeout=30)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "overloaded"
            assert [f.result().status_code for f in admitted] == [200, 200]

    def test_killed_worker_fails_in_flight_and_restarts(self, contract: Contract) -> None:
        before = contract.stats()
        outcome: dict[str, Any] = {}

        def long_request() -> None:
            response = contract.chat(
                messages=contract.long_prompt, temperature=0, max_tokens=3000, timeout=60
            )
            outcome["status"] = response.status_code
            outcome["body"] = response.json()

        client = threading.Thread(target=long_request)
        client.start()
        wait_until(lambda: contract.stats()["running_requests"] == 1, 30, "the request to run")
        os.kill(before["pid"], signal.SIGKILL)
        client.join(30)
        assert not client.is_alive(), "the in-flight request hung after its worker died"
        assert outcome["status"] == 503
        assert outcome["body"]["error"]["code"] == "backend_error"
        wait_until(lambda: httpx.get(contract.url("/ready")).status_code == 200, 180, "the restart")
        after = contract.stats()
        assert after["pid"] != before["pid"]
        assert after["restarts"] == before["restarts"] + 1
        assert contract.chat(temperature=0, max_tokens=8).status_code == 200
        assert contract.server.process.poll() is None  # the server itself never went down
