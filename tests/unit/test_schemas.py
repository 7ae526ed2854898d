"""Request decoding: every malformed body becomes a 400 naming the field."""

from __future__ import annotations

import pytest
from medserve.server.errors import APIError
from medserve.server.schemas import ChatCompletionRequest, CompletionRequest, decode_body


def _chat(body: str) -> ChatCompletionRequest:
    return decode_body(body.encode(), ChatCompletionRequest)


def test_valid_chat_request_with_text_parts_and_default_openai_fields() -> None:
    request = _chat(
        '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},'
        ' {"type": "text", "text": " there"}]}], "temperature": 0, "stop": "x",'
        ' "presence_penalty": 0, "logit_bias": {}}'
    )
    assert request.messages[0].text() == "hi there"
    assert request.stop_strings() == ("x",)
    assert request.temperature == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}], "temperature": 3}', "temperature"),
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role"),
        ('{"messages": []}', "messages"),
        ('{"model": "m"}', None),
        ('{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
        (
            '{"messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}',
            "stop",
        ),
    ],
)
def test_invalid_chat_requests_are_400_with_param(body: str, param: str | None) -> None:
    with pytest.raises(APIError) as error:
        _chat(body)
    assert error.value.status == 400
    if param is not None:
        assert error.value.param == param


@pytest.mark.parametrize("body", ["", "   ", "{not json", "[1, 2]", '"text"'])
def test_malformed_json_is_400(body: str) -> None:
    with pytest.raises(APIError) as error:
        _chat(body)
    assert error.value.status == 400


def test_completion_prompt_list_must_hold_one_prompt() -> None:
    assert decode_body(b'{"prompt": ["a"]}', CompletionRequest).prompt == ["a"]
    with pytest.raises(APIError) as error:
        decode_body(b'{"prompt": ["a", "b"]}', CompletionRequest)
    assert error.value.param == "prompt"
