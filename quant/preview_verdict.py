"""The user's expectations of a quantized build, and the verdict of one candidate against them.

Pure arithmetic over the measured figures, so the rule is stated once and reads in one place:
a candidate passes iff every request succeeded, every figure is a real number, and each
threshold that was given holds. A missing or NaN figure fails: "not measured" is never "good".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class Thresholds:
    max_ppl_increase: float = 0.10
    """Allowed perplexity increase over the reference, relative: 0.10 = 10 % worse."""
    min_tokens_per_s: float | None = None
    """Output tokens/s one stream must reach (what one user waiting on an answer sees)."""
    max_memory_gib: float | None = None
    """Peak resident memory of the worker process, GiB (weights, runtime and KV cache)."""

    def __post_init__(self) -> None:
        # The same messages serve the CLI (exit 2) and callers of the API (ValueError).
        if not math.isfinite(self.max_ppl_increase) or self.max_ppl_increase <= -1.0:
            raise ValueError(
                f"--max-ppl-increase {self.max_ppl_increase}: use a finite fraction above -1 "
                f"(0.10 allows 10 % worse perplexity than the reference)"
            )
        for flag, value in (
            ("--min-tokens-per-s", self.min_tokens_per_s),
            ("--max-memory-gb", self.max_memory_gib),
        ):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} {value}: use a positive finite number")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]
    """Each check as it came out, failures first: why, in the user's units."""

    def describe(self) -> str:
        return ("pass" if self.passed else "fail") + ": " + "; ".join(self.reasons)


def judge(
    thresholds: Thresholds,
    *,
    ppl_increase: float,
    tokens_per_s: float,
    peak_rss_bytes: int | None,
    failed_requests: int,
) -> Verdict:
    """``tokens_per_s`` is the one-stream figure; ``ppl_increase`` is relative (0.05 = 5 %)."""
    failures: list[str] = []
    passes: list[str] = []

    def check(ok: bool, good: str, bad: str) -> None:
        (passes if ok else failures).append(good if ok else bad)

    if failed_requests:
        failures.append(f"{failed_requests} request(s) failed")
    allowed = thresholds.max_ppl_increase
    check(
        math.isfinite(ppl_increase) and ppl_increase <= allowed,
        f"perplexity {ppl_increase:+.1%} <= {allowed:+.1%}",
        f"perplexity {ppl_increase:+.1%} > {allowed:+.1%}"
        if math.isfinite(ppl_increase)
        else "perplexity not measured",
    )
    if thresholds.min_tokens_per_s is not None:
        wanted = thresholds.min_tokens_per_s
        check(
            math.isfinite(tokens_per_s) and tokens_per_s >= wanted,
            f"{tokens_per_s:.1f} tok/s >= {wanted:g}",
            f"{tokens_per_s:.1f} tok/s < {wanted:g}",
        )
    if thresholds.max_memory_gib is not None:
        limit = thresholds.max_memory_gib
        gib = peak_rss_bytes / GIB if peak_rss_bytes is not None else math.nan
        check(
            math.isfinite(gib) and gib <= limit,
            f"peak RSS {gib:.2f} GiB <= {limit:g}",
            f"peak RSS {gib:.2f} GiB > {limit:g}" if math.isfinite(gib) else "RSS not measured",
        )
    return Verdict(not failures, tuple(failures + passes))
