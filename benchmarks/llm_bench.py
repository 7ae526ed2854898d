"""Benchmark a running medserve (or any OpenAI-compatible) server over real HTTP.

    medserve bench --url http://127.0.0.1:8000 --model smollm2-135m-instruct \\
        --requests 32 --concurrency 4 --max-tokens 128 --json results.json

Each request streams, so time to first token (TTFT) and inter-token latency (ITL) are measured
as a client sees them.  Prompts are synthetic clinical-style questions (no patient data);
greedy decoding keeps the work per request the same from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

PROMPTS = [
    "Explain the difference between type 1 and type 2 diabetes.",
    "List common symptoms of community-acquired pneumonia.",
    "What are the first-line treatments for hypertension?",
    "Describe how to interpret a complete blood count.",
    "Summarise the warning signs of a stroke.",
    "What is the role of the kidneys in regulating blood pressure?",
    "Explain what an ECG measures and why it is used.",
    "Describe the stages of wound healing.",
]


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    token_gaps_s: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Summary:
    model: str
    requests: int
    concurrency: int
    max_tokens: int
    failed: int
    wall_s: float
    ttft_median_ms: float
    ttft_p99_ms: float
    itl_median_ms: float
    itl_p99_ms: float
    latency_median_s: float
    output_tokens_per_s: float
    requests_per_s: float
    completion_tokens_median: float


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


async def _one(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
) -> RequestResult:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    last = started
    gaps: list[float] = []
    usage: dict[str, Any] = {}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(ok=False, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        return RequestResult(ok=False, error=type(exc).__name__)
    end = time.perf_counter()
    return RequestResult(
        ok=first is not None,
        ttft_s=(first or end) - started,
        latency_s=end - started,
        completion_tokens=int(usage.get("completion_tokens", 0)),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        token_gaps_s=gaps,
        error="" if first is not None else "no tokens",
    )


async def run_benchmark(
    url: str,
    model: str,
    *,
    num_requests: int,
    concurrency: int,
    max_tokens: int,
    api_key: str | None = None,
    progress: bool = True,
) -> tuple[Summary, list[RequestResult]]:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=num_requests, desc="requests", disable=not progress, file=sys.stderr)

    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        # One warm-up request: the first inference compiles kernels and is not representative.
        await _one(client, url, model, PROMPTS[0], 8)

        async def limited(i: int) -> RequestResult:
            async with semaphore:
                result = await _one(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens)
                bar.update(1)
                return result

        started = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(num_requests)))
        wall = time.perf_counter() - started
    bar.close()
    return summarise(results, model, concurrency, max_tokens, wall), results


def summarise(
    results: list[RequestResult], model: str, concurrency: int, max_tokens: int, wall_s: float
) -> Summary:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s * 1000 for r in ok]
    gaps = [g * 1000 for r in ok for g in r.token_gaps_s]
    tokens = sum(r.completion_tokens for r in ok)
    return Summary(
        model=model,
        requests=len(results),
        concurrency=concurrency,
        max_tokens=max_tokens,
        failed=len(results) - len(ok),
        wall_s=round(wall_s, 3),
        ttft_median_ms=round(statistics.median(ttfts), 1) if ttfts else 0.0,
        ttft_p99_ms=round(percentile(ttfts, 99), 1),
        itl_median_ms=round(statistics.median(gaps), 2) if gaps else 0.0,
        itl_p99_ms=round(percentile(gaps, 99), 2),
        latency_median_s=round(statistics.median([r.latency_s for r in ok]), 3) if ok else 0.0,
        output_tokens_per_s=round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        requests_per_s=round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        completion_tokens_median=(
            statistics.median([r.completion_tokens for r in ok]) if ok else 0.0
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medserve bench", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        parser.error("--requests, --concurrency and --max-tokens must be >= 1")

    model = args.model
    if model is None:
        headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        try:
            listing = httpx.get(args.url + "/v1/models", headers=headers, timeout=10)
            listing.raise_for_status()
        except httpx.HTTPError as exc:
            print(f"medserve bench: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 2
        model = listing.json()["data"][0]["id"]

    summary, _ = asyncio.run(
        run_benchmark(
            args.url,
            model,
            num_requests=args.requests,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            api_key=args.api_key,
            progress=not args.no_progress,
        )
    )
    text = json.dumps(asdict(summary), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
