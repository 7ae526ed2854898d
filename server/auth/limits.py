"""Per-key ceilings: requests per minute, tokens per minute, concurrent generation requests.

So that one runaway EMR job cannot take every engine slot.  Windows slide over the last 60 s.
A request is admitted while its key is under each ceiling; its tokens (prompt plus completion,
from the usage the route records) are charged when the response ends, so one request may carry
a key past its token ceiling, and the next ones wait.  Refused requests are not counted, so a
client retrying in a loop does not extend its own lock-out.  "Streams" counts a key's POSTs to
chat-scoped routes (chat and text completions, streamed or not) that have not finished.

State lives only in this process's memory: a restart forgets it, and two servers on one box
limit separately (documented in the README).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medserve.server.auth.principal import Principal
from medserve.server.auth.reply import send_error
from medserve.server.auth.scopes import CHAT, required_scopes

WINDOW_S = 60.0


@dataclass
class _KeyUsage:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    tokens_in_window: int = 0
    streams: int = 0

    def prune(self, now: float) -> None:
        horizon = now - WINDOW_S
        while self.requests and self.requests[0] <= horizon:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= horizon:
            self.tokens_in_window -= self.tokens.popleft()[1]


@dataclass(frozen=True)
class Exceeded:
    limit: str
    message: str
    retry_after_s: int


class RateLimiter:
    """The bookkeeping alone (no ASGI), so it is unit-tested with a fake clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._usage: dict[str, _KeyUsage] = {}

    def admit(self, principal: Principal, *, stream: bool) -> Exceeded | None:
        """Counts the request and returns None, or says which ceiling it hits."""
        limits = principal.limits
        now = self._clock()
        usage = self._usage.setdefault(principal.key_id, _KeyUsage())
        usage.prune(now)
        if limits.rpm and len(usage.requests) >= limits.rpm:
            wait = usage.requests[0] + WINDOW_S - now
            return Exceeded("requests", f"{limits.rpm} requests per minute", _ceil(wait))
        if limits.tpm and usage.tokens_in_window >= limits.tpm:
            wait = self._wait_for_tokens(usage, limits.tpm, now)
            return Exceeded("tokens", f"{limits.tpm} tokens per minute", _ceil(wait))
        if stream and limits.max_streams and usage.streams >= limits.max_streams:
            return Exceeded("streams", f"{limits.max_streams} concurrent generations", 1)
        usage.requests.append(now)
        if stream:
            usage.streams += 1
        return None

    def finish(self, principal: Principal, *, stream: bool, tokens: int) -> None:
        usage = self._usage.setdefault(principal.key_id, _KeyUsage())
        if stream:
            usage.streams = max(0, usage.streams - 1)
        if tokens > 0:
            usage.tokens.append((self._clock(), tokens))
            usage.tokens_in_window += tokens

    @staticmethod
    def _wait_for_tokens(usage: _KeyUsage, tpm: int, now: float) -> float:
        """Seconds until enough charged tokens leave the window to go below ``tpm``."""
        remaining = usage.tokens_in_window
        for charged_at, tokens in usage.tokens:
            remaining -= tokens
            if remaining < tpm:
                return charged_at + WINDOW_S - now
        return WINDOW_S


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class RateLimitMiddleware:
    """Runs after AuthMiddleware, which leaves the Principal in ``scope["state"]``."""

    def __init__(self, app: Any, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        state = scope.get("state") or {}
        principal: Principal | None = state.get("principal")
        if scope["type"] != "http" or principal is None:
            await self.app(scope, receive, send)
            return
        stream = scope.get("method") == "POST" and CHAT in (
            required_scopes(scope.get("route_handler")) or ()
        )
        exceeded = self.limiter.admit(principal, stream=stream)
        if exceeded is not None:
            state.setdefault("usage", {})["error"] = f"rate_limited_{exceeded.limit}"
            await send_error(
                send,
                429,
                f"rate limit reached for API key {principal.key_id}: {exceeded.message}; "
                f"retry after {exceeded.retry_after_s} s",
                code="rate_limit_exceeded",
                headers=((b"retry-after", str(exceeded.retry_after_s).encode()),),
            )
            return
        try:
            await self.app(scope, receive, send)
        finally:
            usage = state.get("usage", {})
            tokens = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
            self.limiter.finish(principal, stream=stream, tokens=tokens)
