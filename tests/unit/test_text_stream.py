"""TextStream: incremental detokenization with held-back partial characters and stop strings."""

from __future__ import annotations

import random

from medserve.accel.text_stream import StopMatcher, TextStream


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


def test_stop_matcher_holds_only_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(("\n\nUser:",))
    assert matcher.feed("Answer.\n") == "Answer."
    assert matcher.held == "\n"
    assert matcher.feed("\nUs") == ""
    assert matcher.feed("ual care") == "\n\nUsual care"
    assert not matcher.stopped and matcher.held == ""


def test_detokenizer_window_stays_small_however_long_the_answer() -> None:
    # Cost per token must not grow with the answer: record every window decoded.
    windows: list[int] = []

    def decode(ids: list[int]) -> str:
        windows.append(len(ids))
        return _decode(ids)

    text = "Plain ASCII answer. " * 200 + "混合中文和 emoji 🙂 " * 20
    stream = TextStream(decode=decode)
    out = "".join(stream.push([i]) for i in _ids(text)) + stream.flush()
    assert out == text
    assert max(windows) <= 8  # the longest character is 4 bytes: window = previous + current
    assert sum(windows) < 6 * len(_ids(text))


def test_random_splits_with_several_stops_match_a_reference_cut() -> None:
    rng = random.Random(7)
    pieces = ["肺", "炎", " pneumonia", "🙂", " END", "stop", "\n", "E", "N", "D", "x"]
    stops = ("END", "🙂x", "stop\n")
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        ids = _ids(text)
        positions = [p for s in stops if (p := text.find(s)) != -1]
        expected = text[: min(positions)] if positions else text
        stream = TextStream(decode=_decode, stop=stops)
        out, i = [], 0
        while i < len(ids):
            n = rng.randint(1, 4)
            out.append(stream.push(ids[i : i + n]))
            i += n
        out.append(stream.flush())
        assert "".join(out) == expected, text
        assert stream.stopped == bool(positions)
        assert all("\ufffd" not in piece for piece in out)
