"""Turn a growing list of token ids into text deltas, honouring stop strings.

Pure Python so it is tested without a model.  Two subtleties drive the design:
- a multi-byte character (Chinese text, emoji) may be split across tokens; the decoder then
  yields U+FFFD, so text ending in it is held back until the next token completes it;
- a stop string may be split across deltas, so text that could still become a stop string is
  held back until it either matches (and is cut) or cannot match any more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class TextStream:
    decode: Callable[[Sequence[int]], str]
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    _emitted: int = 0
    """Characters of the decoded text already handed out."""
    stopped: bool = False

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text that is now safe to send (may be empty)."""
        if self.stopped:
            return ""
        self.token_ids.extend(new_ids)
        text = self.decode(self.token_ids)
        stable = text.rstrip(REPLACEMENT_CHAR)

        cut = self._find_stop(stable)
        if cut is not None:
            self.stopped = True
            return self._emit_until(stable, cut)
        return self._emit_until(stable, len(stable) - self._partial_stop_len(stable))

    def flush(self) -> str:
        """End of generation: release anything held back (a partial stop string is just text)."""
        if self.stopped:
            return ""
        text = self.decode(self.token_ids)
        return self._emit_until(text, len(text))

    def _emit_until(self, text: str, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = text[self._emitted : end]
        self._emitted = end
        return delta

    def _find_stop(self, text: str) -> int | None:
        # Only text not yet emitted can hold a new match; look back far enough to catch a stop
        # string that started in already-emitted-but-held text.
        positions = [
            pos
            for s in self.stop
            if (pos := text.find(s, max(0, self._emitted - len(s) + 1))) != -1
        ]
        return min(positions) if positions else None

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
