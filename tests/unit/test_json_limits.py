"""Hostile and unsupported request bodies: each is a 400 naming the field, never a 500."""

from __future__ import annotations

import msgspec
import pytest
from medserve.server.api_docs import DocumentedOperation, documented
from medserve.server.cases.schemas import EmbeddingsRequest, SearchCases
from medserve.server.errors import APIError
from medserve.server.metrics import Metrics
from medserve.server.schemas import (
    MAX_MESSAGES,
    ChatCompletionRequest,
    CompletionRequest,
    decode_body,
)
from prometheus_client import generate_latest

HI = '"messages": [{"role": "user", "content": "hi"}]'


def _chat_error(body: bytes) -> APIError:
    with pytest.raises(APIError) as caught:
        decode_body(body, ChatCompletionRequest)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize("where", ["unknown", "tools", "response_format", "content"])
def test_100k_deep_json_is_400(where: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    bodies = {
        "unknown": b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + deep + b"}",
        "tools": b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"f": '
        + deep
        + b"}]}",
        "response_format": b'{"messages": [{"role": "user", "content": "hi"}], '
        b'"response_format": {"type": "json_schema", "json_schema": {"s": ' + deep + b"}}}",
        "content": b'{"messages": [{"role": "user", "content": ' + deep + b"}]}",
    }
    _chat_error(bodies[where])


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [{"role": "user", "content": "h\xff\xfei"}]}',
        b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]}',  # UTF-8 surrogate
        b'{"messages": [{"role": "user", "content": "\\ud800 lone"}]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "k\xc3": 1}',
    ],
)
def test_invalid_utf8_and_surrogates_are_400(body: bytes) -> None:
    _chat_error(body)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ('"logprobs": true', "logprobs"),
        ('"top_logprobs": 3', "top_logprobs"),
        ('"response_format": {"type": "xml"}', "response_format.type"),
        (
            '"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]',
            "tools[0].function.x",
        ),
        ('"functions": [{"name": "f"}]', "functions"),
        ('"n": 2', "n"),
        ('"presence_penalty": 0.5', "presence_penalty"),
        ('"frequency_penalty": -1', "frequency_penalty"),
        ('"logit_bias": {"50256": -100}', "logit_bias"),
        ('"store": true', "store"),
        ('"audio": {"voice": "alloy"}', "audio"),
        ('"modalities": ["text", "audio"]', "modalities"),
        ('"reasoning_effort": "low"', "reasoning_effort"),
        ('"web_search_options": {}', "web_search_options"),
        ('"repetition_penalty": 1.1', "repetition_penalty"),
        ('"stream_options": {"include_usage": true, "x": 1}', "stream_options.x"),
    ],
)
def test_unsupported_fields_are_400_naming_them(extra: str, param: str) -> None:
    error = _chat_error(f"{{{HI}, {extra}}}".encode())
    assert error.param == param
    assert param.split(".")[-1] in error.message


def test_unsupported_message_fields_are_400_naming_them() -> None:
    body = b'{"messages": [{"role": "user", "content": "hi", "weight": 1}]}'
    assert _chat_error(body).param == "messages[0].weight"
    parts = b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}'
    assert _chat_error(parts).param.startswith("messages[0].content[0]")


def test_defaults_sent_explicitly_are_accepted() -> None:
    body = (
        f'{{{HI}, "n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {{}},'
        ' "logprobs": false, "response_format": {"type": "text"}, "tools": [],'
        ' "tool_choice": "none", "store": false, "modalities": ["text"]}'
    )
    request = decode_body(body.encode(), ChatCompletionRequest)
    assert request.messages[0].text() == "hi"


def test_completion_unsupported_fields() -> None:
    for extra, param in [
        ('"echo": true', "echo"),
        ('"best_of": 3', "best_of"),
        ('"logprobs": 2', "logprobs"),
    ]:
        with pytest.raises(APIError) as caught:
            decode_body(f'{{"prompt": "x", {extra}}}'.encode(), CompletionRequest)
        assert caught.value.param == param


def test_message_count_and_text_length_are_bounded() -> None:
    many = ", ".join(['{"role": "user", "content": "x"}'] * (MAX_MESSAGES + 1))
    assert _chat_error(f'{{"messages": [{many}]}}'.encode()).param == "messages"
    long_text = "x" * 262_145
    body = f'{{"messages": [{{"role": "user", "content": "{long_text}"}}]}}'
    assert _chat_error(body.encode()).param == "messages[0].content"


def test_tiny_top_p_is_refused_before_the_engine() -> None:
    # 5e-324 rounds to 0 in the engine's float32 and made OpenVINO raise (found by schemathesis).
    assert _chat_error(f'{{{HI}, "top_p": 5e-324}}'.encode()).param == "top_p"


def test_case_and_embedding_bodies_reject_unknown_fields() -> None:
    from medserve.server.json_body import decode_json

    for body, request_type in [
        (b'{"text": "x", "filter": {}}', SearchCases),
        (b'{"input": "x", "truncate": true}', EmbeddingsRequest),
    ]:
        with pytest.raises(APIError) as caught:
            decode_json(body, request_type)
        assert caught.value.status == 400 and caught.value.param in {"filter", "truncate"}


def test_documented_operation_names_its_structs() -> None:
    operation = documented(ChatCompletionRequest, None, stream=None)
    assert issubclass(operation, DocumentedOperation)
    names = {t.__name__ for t in operation.structs()}  # type: ignore[attr-defined]
    assert names == {"ChatCompletionRequest", "ErrorResponse"}
    _, components = msgspec.json.schema_components([ChatCompletionRequest])
    assert components["ChatCompletionRequest"]["additionalProperties"] is False


def test_two_apps_in_one_process_have_separate_registries() -> None:
    first, second = Metrics(), Metrics()  # the global registry would refuse the second
    first.http_requests.labels("GET", "/x", "200").inc()
    assert b'route="/x"' in generate_latest(first.registry)
    assert b'route="/x"' not in generate_latest(second.registry)


def test_temperatures_float32_rounds_to_zero_decode_greedily() -> None:
    # 5e-324 passed ge=0, became 0.0 in the engine's float32, and OpenVINO refused "do_sample
    # with temperature 0" as a 503 (the same schemathesis case family as top_p).
    from medserve.server.openai_api import _temperature

    assert _temperature(5e-324) == 0.0
    assert _temperature(0.0) == 0.0
    assert _temperature(0.7) == 0.7
    assert _temperature(None) == 1.0
