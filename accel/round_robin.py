"""Which request the PyTorch engines run next: a FIFO queue feeding round-robin slots.

ipex-llm and IPEX on CPU have no continuous batching (only ipex-llm's vLLM wrapper has it):
a forward pass runs one padded static batch, and sequences cannot join or leave it midway.
So these engines run batch-1 forwards, one per step, and this scheduler picks whose:

- requests wait in arrival order (FIFO) until one of ``max_running`` slots is free and their
  KV reservation (prompt + max new tokens) fits the KV budget;
- the running requests take turns, one forward each (a prefill, or one decode token), so four
  streams all make progress at a quarter of the single-stream speed each, instead of the
  fourth waiting for three whole answers; aggregate tokens/s stays that of one stream;
- a request alone is always admitted, even if its reservation exceeds the budget, so a large
  ``max_tokens`` can never wedge the queue.

Pure Python with no tensors, so it is unit-tested without a model (tests/unit).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    @property
    def request_id(self) -> str: ...

    @property
    def reserve_tokens(self) -> int:
        """KV tokens the request may need by its end: prompt plus max new tokens."""
        ...


T = TypeVar("T", bound=Schedulable)


class RoundRobinScheduler(Generic[T]):
    def __init__(self, max_running: int, capacity_tokens: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running={max_running}: at least one slot is needed")
        self.max_running = max_running
        self.capacity_tokens = capacity_tokens
        self._waiting: deque[T] = deque()
        self._running: list[T] = []
        self._turn = 0

    def add(self, item: T) -> None:
        self._waiting.append(item)

    def remove(self, request_id: str) -> T | None:
        """Take a request out, wherever it is (waiting or running); None if unknown."""
        for index, item in enumerate(self._running):
            if item.request_id == request_id:
                del self._running[index]
                if index < self._turn:
                    self._turn -= 1  # keep the turn on the request that was next
                return item
        for item in self._waiting:
            if item.request_id == request_id:
                self._waiting.remove(item)
                return item
        return None

    def next(self) -> T | None:
        """Admit what fits, then return the running request whose turn it is (None if idle)."""
        self._admit()
        if not self._running:
            return None
        self._turn %= len(self._running)  # the request at the turn may have just left
        item = self._running[self._turn]
        self._turn = (self._turn + 1) % len(self._running)
        return item

    def _admit(self) -> None:
        reserved = sum(item.reserve_tokens for item in self._running)
        while self._waiting and len(self._running) < self.max_running:
            head = self._waiting[0]
            if self._running and reserved + head.reserve_tokens > self.capacity_tokens:
                return  # FIFO: nobody overtakes the head of the queue
            self._running.append(self._waiting.popleft())
            reserved += head.reserve_tokens

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def __len__(self) -> int:
        return len(self._waiting) + len(self._running)

    def __iter__(self) -> Iterator[T]:
        yield from self._running
        yield from self._waiting
