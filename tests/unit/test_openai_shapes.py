"""The pre-encoded SSE text event is byte for byte the event built from the full dict."""

from __future__ import annotations

import json

import msgspec
import pytest
from medserve.accel.base import GenerationRequest, Sampling
from medserve.server.openai_shapes import ResponseBuilder

TEXTS = ["Paris", "", ' "quoted" \\ back\\slash', "患者\n\t🙂", "\x00\x1f control", "</script>"]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_text_event_equals_the_encoded_delta_event(chat: bool, text: str) -> None:
    generation = GenerationRequest(
        request_id='id-"1"', model="model-ü", params=Sampling(max_tokens=4)
    )
    builder = ResponseBuilder(generation, chat=chat, created=1_700_000_000)
    expected = b"data: " + msgspec.json.encode(builder.delta_event(text=text)) + b"\n\n"
    if chat and not text:
        # an empty delta is an empty object, not {"content": ""}: the server never sends one
        assert json.loads(builder.text_event(text)[6:])["choices"][0]["delta"] == {"content": ""}
        return
    assert builder.text_event(text) == expected
    assert json.loads(builder.text_event(text)[6:])["model"] == "model-ü"
