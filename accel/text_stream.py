"""Token ids -> text deltas, incrementally, honouring stop strings.

Pure Python so it is tested without a model. The cost per step is bounded by a small window,
never by the length of the answer so far (decoding the whole list on every token made a
1,000-token answer cost ~500,000 token decodes). Two subtleties drive the design:

- Detokenization is not compositional: SentencePiece drops the leading space of the first
  token it decodes, and a multi-byte character (Chinese, emoji) may be split across byte-level
  tokens, decoding to U+FFFD until its last byte arrives. So, as vLLM's detokenizer does, each
  step decodes a short window twice, ``ids[prefix:read]`` (text already emitted) and
  ``ids[prefix:]``, and emits the difference; text ending in U+FFFD is held until it completes.
- A stop string may be split across deltas, so text that could still become a stop string is
  held back until it either matches (and is cut) or cannot match any more. Only the held-back
  text and the new delta are searched: emitted text can never start a match, because any
  suffix that could was held back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[Sequence[int]], str]


@dataclass
class IncrementalDetokenizer:
    decode: Decode
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    """Start of the decode window: the tokens of the previous emission, for context."""
    read_offset: int = 0
    """Tokens before this index are already emitted as text."""

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the new text that is complete (may be empty)."""
        self.token_ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """End of generation: whatever is held, even an incomplete character."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self.read_offset == len(self.token_ids):
            return ""
        emitted = self.decode(self.token_ids[self.prefix_offset : self.read_offset])
        window = self.decode(self.token_ids[self.prefix_offset :])
        if len(window) <= len(emitted) or (window.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return window[len(emitted) :]


@dataclass
class StopMatcher:
    stop: tuple[str, ...] = ()
    held: str = ""
    """Text not yet released: it ends in what could be the start of a stop string."""
    stopped: bool = False

    def feed(self, text: str) -> str:
        """Take new text; return what is safe to send. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        if not self.stop:
            return text
        buffer = self.held + text
        positions = [pos for s in self.stop if (pos := buffer.find(s)) != -1]
        if positions:
            self.stopped = True
            self.held = ""
            return buffer[: min(positions)]
        keep = _partial_stop_len(buffer, self.stop)
        self.held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """End of generation: a partial stop string that never completed is just text."""
        if self.stopped:
            return ""
        held, self.held = self.held, ""
        return held


def _partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Token ids in, text deltas out: incremental detokenization, then stop strings."""

    def __init__(self, decode: Decode, stop: tuple[str, ...] = ()) -> None:
        self._detokenizer = IncrementalDetokenizer(decode)
        self._stops = StopMatcher(stop)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def push(self, new_ids: Sequence[int]) -> str:
        if self._stops.stopped:
            return ""
        return self._stops.feed(self._detokenizer.push(new_ids))

    def flush(self) -> str:
        if self._stops.stopped:
            return ""
        return self._stops.feed(self._detokenizer.flush()) + self._stops.flush()
