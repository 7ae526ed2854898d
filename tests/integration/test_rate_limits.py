"""Per-key limits against a real `medserve serve` with the bundled model: requests per minute
(own value, config default, 0 = unlimited), tokens per minute charged from real usage, and
concurrent generations; each refusal is a 429 in the OpenAI shape with Retry-After, which the
official client reads as a RateLimitError.  Chat requests also leave an audit record."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.test_auth_scopes import bearer, create_key
from tests.server_process import ServerProcess

QUESTION = [{"role": "user", "content": "Name a colour of the rainbow."}]
DEFAULT_RPM = 5


@pytest.fixture(scope="module")
def rig(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("limits_home")
    keys_file = home / "keys.json"
    keys = {
        "rpm3": create_key(keys_file, "rpm-job", "chat", "--rpm", "3"),
        "default": create_key(keys_file, "default-job", "chat"),
        "unlimited": create_key(keys_file, "batch-job", "chat", "--rpm", "0"),
        "tpm": create_key(keys_file, "token-job", "chat", "--tpm", "40"),
        "streams": create_key(keys_file, "stream-job", "chat", "--max-streams", "1"),
    }
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_CASES_ENABLED": "false",
        "MEDSERVE_AUTH_KEYS_FILE": str(keys_file),
        "MEDSERVE_AUTH_DEFAULT_RPM": str(DEFAULT_RPM),
        "MEDSERVE_AUDIT_DIR": str(home / "audit"),
    }
    with ServerProcess.start(tmp_path_factory.mktemp("limits_log"), env=env) as server:
        yield {"server": server, "audit": home / "audit", **keys}


def _models(rig: dict[str, Any], key: str) -> httpx.Response:
    return httpx.get(rig["server"].base_url + "/v1/models", headers=bearer(rig[key][1]))


def _chat(rig: dict[str, Any], key: str, **extra: Any) -> httpx.Response:
    body = {"messages": QUESTION, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(
        rig["server"].base_url + "/v1/chat/completions",
        json=body,
        headers=bearer(rig[key][1]),
        timeout=120,
    )


def _assert_429(response: httpx.Response, limit_words: str) -> int:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert limit_words in error["message"]
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    return retry_after


def test_requests_per_minute_own_default_and_unlimited(rig: dict[str, Any]) -> None:
    for _ in range(3):
        assert _models(rig, "rpm3").status_code == 200
    _assert_429(_models(rig, "rpm3"), "3 requests per minute")
    for _ in range(DEFAULT_RPM):
        assert _models(rig, "default").status_code == 200
    _assert_429(_models(rig, "default"), f"{DEFAULT_RPM} requests per minute")
    for _ in range(DEFAULT_RPM + 3):
        assert _models(rig, "unlimited").status_code == 200
    # the official client surfaces it as a RateLimitError
    client = openai.OpenAI(
        base_url=rig["server"].base_url + "/v1", api_key=rig["rpm3"][1], max_retries=0
    )
    with pytest.raises(openai.RateLimitError):
        client.models.list()


def test_tokens_per_minute_are_charged_from_real_usage(rig: dict[str, Any]) -> None:
    first = _chat(rig, "tpm")
    assert first.status_code == 200, first.text
    usage = first.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] >= 40  # this one overshoots
    _assert_429(_chat(rig, "tpm"), "40 tokens per minute")
    _assert_429(_models(rig, "tpm"), "40 tokens per minute")  # the key is out of budget


def test_concurrent_generations_are_capped_per_key(rig: dict[str, Any]) -> None:
    server: ServerProcess = rig["server"]
    first_chunk = threading.Event()
    release = threading.Event()

    def hold_a_stream() -> None:
        body = {"messages": QUESTION, "max_tokens": 400, "stream": True, "temperature": 0}
        with httpx.stream(
            "POST",
            server.base_url + "/v1/chat/completions",
            json=body,
            headers=bearer(rig["streams"][1]),
            timeout=120,
        ) as response:
            for _ in response.iter_bytes():
                first_chunk.set()
                if release.wait(0):
                    return  # closing the connection aborts the generation

    holder = threading.Thread(target=hold_a_stream)
    holder.start()
    try:
        assert first_chunk.wait(60)
        _assert_429(_chat(rig, "streams"), "1 concurrent generations")
        assert _chat(rig, "unlimited").status_code == 200  # other keys still run
    finally:
        release.set()
        holder.join(60)
    deadline = time.monotonic() + 15
    while (response := _chat(rig, "streams")).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert response.status_code == 200, response.text


def test_chat_requests_are_audited_without_text(rig: dict[str, Any]) -> None:
    assert _chat(rig, "unlimited").status_code == 200
    lines = (rig["audit"] / "audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    chat = [r for r in records if r["action"] == "chat.create"]
    assert chat and chat[-1]["key_id"] == rig["unlimited"][0] and chat[-1]["status"] == 200
    assert chat[-1]["key_name"] == "batch-job" and chat[-1]["route"] == "/v1/chat/completions"
    # refused by a limit: no access to the model, so no audit record
    assert not any(r["status"] == 429 for r in records)
    assert "rainbow" not in "".join(lines)
