"""TextStream: incremental detokenization with held-back partial characters and stop strings."""

from __future__ import annotations

from medserve.accel.text_stream import TextStream


# A toy tokenizer: each id is one UTF-8 byte, so multi-byte characters span several tokens.
def _decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def _ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _run(text: str, stop: tuple[str, ...] = (), step: int = 1) -> tuple[str, list[str], bool]:
    stream = TextStream(decode=_decode, stop=stop)
    ids = _ids(text)
    deltas = [stream.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(stream.flush())
    return "".join(deltas), deltas, stream.stopped


def test_plain_text_round_trips_token_by_token() -> None:
    text, deltas, stopped = _run("Paris is the capital.")
    assert text == "Paris is the capital."
    assert not stopped
    assert len([d for d in deltas if d]) > 5  # streamed, not one lump at the end


def test_split_multibyte_characters_are_never_emitted_half_done() -> None:
    text, deltas, _ = _run("肺炎 pneumonia 患者")
    assert text == "肺炎 pneumonia 患者"
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cuts_output_and_is_not_included() -> None:
    text, _, stopped = _run("Answer: Paris.\nQuestion: next", stop=("\nQuestion",))
    assert text == "Answer: Paris."
    assert stopped


def test_stop_string_split_across_deltas_is_held_back() -> None:
    stream = TextStream(decode=_decode, stop=("END",))
    out = stream.push(_ids("abc E"))
    assert out == "abc "  # "E" could start "END": held back
    out += stream.push(_ids("N"))
    assert out == "abc "
    out += stream.push(_ids("D and more"))
    assert out == "abc "
    assert stream.stopped
    assert stream.flush() == ""


def test_held_back_prefix_is_released_when_it_stops_matching() -> None:
    stream = TextStream(decode=_decode, stop=("END",))
    assert stream.push(_ids("x EN")) == "x "
    assert stream.push(_ids("Z")) == "ENZ"


def test_flush_releases_a_partial_stop_at_end_of_generation() -> None:
    stream = TextStream(decode=_decode, stop=("END",))
    assert stream.push(_ids("tail E")) == "tail "
    assert stream.flush() == "E"


def test_earliest_of_several_stop_strings_wins() -> None:
    text, _, _ = _run("one two three", stop=("three", "two"), step=3)
    assert text == "one "
