"""`medserve bench structured`: how often structured output parses and validates, over HTTP.

Sends N chat completions with ``response_format: json_schema`` to a running server (complaints
in English and Chinese, three schemas, round robin, a few at a time) and counts the answers
that parse and validate against their schema with ``jsonschema``.  Every answer should: the
engine constrains decoding; a miss is a bug to report with the printed example.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema
from medserve.benchmarks.machine import cpu_info

COMPLAINTS = [
    "Cough and fever for 3 days, short of breath at night.",
    "Headache since yesterday, no fever, mild nausea.",
    "Chest pain for two hours with sweating, no fever.",
    "Swollen left ankle after a fall this morning, cannot walk.",
    "患者咳嗽发热三天，夜间气促。",
    "头痛一天，无发热，轻度恶心。",
    "胸痛两小时，伴出汗。",
    "腹泻两天，每天五次，无便血。",
]
SCHEMAS: dict[str, dict[str, Any]] = {
    "findings": {
        "type": "object",
        "properties": {
            "symptoms": {
                "type": "array",
                "items": {"type": "string", "maxLength": 40},
                "maxItems": 4,
            },
            "duration_days": {"type": "integer", "minimum": 0, "maximum": 365},
            "severity": {"enum": ["mild", "moderate", "severe"]},
        },
        "required": ["symptoms", "duration_days", "severity"],
        "additionalProperties": False,
    },
    "triage": {
        "type": "object",
        "properties": {
            "urgent": {"type": "boolean"},
            "department": {"enum": ["emergency", "cardiology", "respiratory", "general"]},
            "reason": {"type": "string", "maxLength": 80},
        },
        "required": ["urgent", "department", "reason"],
    },
    "negations": {
        "type": "object",
        "properties": {
            "absent": {
                "type": "array",
                "items": {"type": "string", "maxLength": 30},
                "maxItems": 3,
            },
            "present": {
                "type": "array",
                "items": {"type": "string", "maxLength": 30},
                "maxItems": 3,
            },
        },
        "required": ["absent", "present"],
    },
}


@dataclass
class Outcome:
    schema: str
    valid: bool
    finish_reason: str | None
    seconds: float
    problem: str = ""


def one_request(client: httpx.Client, args: argparse.Namespace, i: int) -> Outcome:
    name = list(SCHEMAS)[i % len(SCHEMAS)]
    complaint = COMPLAINTS[i % len(COMPLAINTS)]
    body = {
        "messages": [{"role": "user", "content": f"Extract as JSON ({name}): {complaint}"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": SCHEMAS[name]},
        },
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": i,
    }
    if args.model:
        body["model"] = args.model
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return Outcome(
            name, False, None, seconds, f"HTTP {response.status_code}: {response.text[:200]}"
        )
    choice = response.json()["choices"][0]
    try:
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS[name])
    except (ValueError, jsonschema.ValidationError) as exc:
        return Outcome(
            name, False, choice["finish_reason"], seconds, f"{type(exc).__name__}: {exc}"[:200]
        )
    return Outcome(name, True, choice["finish_reason"], seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medserve bench structured", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=800)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--json", dest="json_out", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with (
        httpx.Client(base_url=args.url, headers=headers, timeout=600) as client,
        ThreadPoolExecutor(args.concurrency) as pool,
    ):
        outcomes = list(pool.map(lambda i: one_request(client, args, i), range(args.requests)))
    valid = sum(o.valid for o in outcomes)
    latencies = sorted(o.seconds for o in outcomes)
    report = {
        "cpu": cpu_info()["cpu_model"],
        "requests": len(outcomes),
        "valid": valid,
        "validity_rate": valid / max(1, len(outcomes)),
        "by_schema": {name: sum(o.valid for o in outcomes if o.schema == name) for name in SCHEMAS},
        "finish_reasons": {
            r: sum(o.finish_reason == r for o in outcomes) for r in ("stop", "length", None)
        },
        "median_latency_s": latencies[len(latencies) // 2] if latencies else None,
        "temperature": args.temperature,
        "concurrency": args.concurrency,
        "first_problems": [o.problem for o in outcomes if not o.valid][:3],
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2, ensure_ascii=False)
    return 0 if valid == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
