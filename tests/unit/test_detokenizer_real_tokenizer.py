"""Incremental detokenization with the bundled model's real tokenizer (OpenVINO IR).

Byte-level BPE splits Chinese characters and emoji across tokens; streaming token by token
must give exactly the text the whole answer decodes to, never a U+FFFD in a delta.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from medserve.accel.text_stream import TextStream

from tests.conftest import BUNDLED_MODEL

SAMPLES = (
    "患者男，65岁，胸痛3小时，心电图示V2-V4导联ST段抬高。",
    "Fever 🤒 and rash 🙂🙂 for 2 days — naïve café.",
    "  spaces,\ttabs\n\nand 12.5 mg/kg doses ",
)


@pytest.fixture(scope="module")
def tokenizer(models_dir: Path) -> object:
    import openvino_genai

    return openvino_genai.Tokenizer(str(models_dir / BUNDLED_MODEL))


def _ids(tokenizer: object, text: str) -> list[int]:
    encoded = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    return encoded.input_ids.data.tolist()[0]


def _decoder(tokenizer: object):
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # type: ignore[attr-defined]


@pytest.mark.parametrize("text", SAMPLES)
def test_token_by_token_equals_the_whole_decode(tokenizer: object, text: str) -> None:
    ids = _ids(tokenizer, text)
    assert len(ids) > 5
    stream = TextStream(decode=_decoder(tokenizer))
    deltas = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(deltas) == _decoder(tokenizer)(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_a_stop_string_spanning_tokens_is_cut_exactly(tokenizer: object) -> None:
    text = "诊断：急性心肌梗死。\n\n患者：还需要住院吗？"
    stop = "\n\n患者"
    ids = _ids(tokenizer, text)
    stream = TextStream(decode=_decoder(tokenizer), stop=(stop,))
    out = "".join(stream.push([i]) for i in ids) + stream.flush()
    assert stream.stopped
    assert out == "诊断：急性心肌梗死。"


def test_fast_decoder_is_used_only_when_it_matches_the_engine(
    tokenizer: object, models_dir: Path, tmp_path: Path
) -> None:
    from medserve.accel.fast_decode import verified_fast_decoder

    reference = _decoder(tokenizer)

    def encode(text: str) -> list[int]:
        return _ids(tokenizer, text)

    fast = verified_fast_decoder(models_dir / BUNDLED_MODEL, reference, encode, special_ids=[2])
    assert fast is not None
    ids = [*encode(SAMPLES[0]), 2]
    assert fast(ids) == reference(ids) == SAMPLES[0]
    # A reference that differs anywhere (here: upper-casing) must keep the reference decoder.
    assert (
        verified_fast_decoder(models_dir / BUNDLED_MODEL, lambda i: reference(i).upper(), encode)
        is None
    )
    assert verified_fast_decoder(tmp_path, reference, encode) is None  # no tokenizer.json
