"""/metrics in the Prometheus text format, scraped over HTTP from a real server.

Counters are compared before and after real requests (chat, streamed chat, a bad request,
case writes, a search, a lookup of a missing case, a path no route matches), so each must move
by exactly what those requests did -- and no label may carry a raw path or request content.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BUNDLED_MODEL
from tests.server_process import ServerProcess

CANARY_ID = "canary-id-7f3a"
CANARY_TEXT = "canarytext zebra-quokka 9051"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("prom_home")
    env = {
        "MEDSERVE_HOME": str(home),
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "2",
        "MEDSERVE_ENGINE_KV_CACHE_GB": "1",
        "MEDSERVE_CASES_ENABLED": "true",
        "MEDSERVE_CASES_DATA_DIR": str(home / "cases"),
    }
    with ServerProcess.start(tmp_path_factory.mktemp("prom_log"), env=env) as srv:
        yield srv


def _scrape(server: ServerProcess) -> tuple[str, Samples]:
    response = httpx.get(server.base_url + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _chat(server: ServerProcess, *, stream: bool) -> dict[str, int]:
    body = {
        "model": BUNDLED_MODEL,
        "messages": [{"role": "user", "content": f"Say hello. {CANARY_TEXT}"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    url = server.base_url + "/v1/chat/completions"
    if not stream:
        response = httpx.post(url, json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["usage"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    usage: dict[str, int] = {}
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: ") :])
                usage = event.get("usage") or usage
    assert usage, "the stream carried no usage event"
    return usage


def test_counters_move_by_what_the_requests_did(server: ServerProcess) -> None:
    _, before = _scrape(server)

    usages = [_chat(server, stream=False), _chat(server, stream=False), _chat(server, stream=True)]
    bad = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprobs"
    cases = [
        {"id": CANARY_ID, "text": f"Chest pain, troponin raised. {CANARY_TEXT}", "age": 61},
        {"id": "case-2", "text": "Community-acquired pneumonia, CURB-65 of 2.", "age": 74},
    ]
    created = httpx.post(server.base_url + "/v1/cases", json={"cases": cases}, timeout=120)
    assert created.status_code == 200, created.text
    found = httpx.post(
        server.base_url + "/v1/cases/search", json={"text": "chest pain", "k": 2}, timeout=120
    )
    assert found.status_code == 200, found.text
    missing = httpx.get(server.base_url + "/v1/cases/no-such-case-" + CANARY_ID, timeout=30)
    assert missing.status_code == 404
    unrouted = httpx.get(server.base_url + "/no/such/path/" + CANARY_ID, timeout=30)
    assert unrouted.status_code == 404

    text, after = _scrape(server)
    chat = {"method": "POST", "route": "/v1/chat/completions"}
    assert _delta(before, after, "medserve_http_requests_total", **chat, status="200") == 3
    assert _delta(before, after, "medserve_http_requests_total", **chat, status="400") == 1
    assert _delta(before, after, "medserve_http_request_duration_seconds_count", **chat) == 4
    lookup = {"method": "GET", "route": "/v1/cases/{case_id}", "status": "404"}
    assert _delta(before, after, "medserve_http_requests_total", **lookup) == 1
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert _delta(before, after, "medserve_http_requests_total", **unmatched) == 1

    model = {"model": BUNDLED_MODEL}
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    completion_tokens = sum(u["completion_tokens"] for u in usages)
    assert completion_tokens >= 3
    assert _delta(before, after, "medserve_prompt_tokens_total", **model) == prompt_tokens
    assert _delta(before, after, "medserve_generation_tokens_total", **model) == completion_tokens
    ttft = "medserve_time_to_first_token_seconds_count"
    assert _delta(before, after, ttft, **model) == 3
    assert _delta(before, after, "medserve_generation_duration_seconds_count", **model) == 3
    # Every token after the first of each generation is one inter-token observation.
    itl = _delta(before, after, "medserve_inter_token_latency_seconds_count", **model)
    assert itl == completion_tokens - 3
    assert _delta(before, after, "medserve_time_to_first_token_seconds_sum", **model) > 0

    assert _value(after, "medserve_case_index_size") == 2
    assert _delta(before, after, "medserve_case_search_duration_seconds_count") == 1
    assert _value(after, "medserve_worker_restarts_total", **model) == 0
    assert _value(after, "medserve_queue_depth", **model) == 0
    assert _value(after, "medserve_requests_in_flight", **model) == 0
    assert 0.0 <= _value(after, "medserve_kv_cache_usage_ratio", **model) <= 1.0
    assert ("medserve_kv_cache_usage_ratio", frozenset(model.items())) in after
    info = {**model, "engine": "openvino", "precision": "int8"}
    assert _value(after, "medserve_model_info", **info) == 1

    # Labels are templates and model names: no case id, path or text reaches the metrics.
    assert CANARY_ID not in text and "canarytext" not in text and "no-such-case" not in text


def test_json_view_moved_to_metrics_json(server: ServerProcess) -> None:
    stats = httpx.get(server.base_url + "/metrics.json", timeout=30).json()["models"]
    figures = stats[BUNDLED_MODEL]
    assert figures["in_flight"] == 0 and figures["restarts"] == 0
    assert 0.0 <= figures["kv_cache_usage"] <= 1.0
