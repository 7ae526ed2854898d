"""`medserve bench [run]`: benchmark one or several OpenAI-compatible servers over real HTTP.

    medserve bench --requests 32 --concurrency 4 --max-tokens 128 --json out.json
    medserve bench --compare http://127.0.0.1:8000 http://127.0.0.1:8080 \\
        --label medserve llama.cpp --workload short-chat long-prompt --concurrency 1,4 \\
        --repeats 3 --json out.json --markdown out.md --png out.png

Every request streams, so TTFT and inter-token latency are what a client sees.  With
``--compare`` the targets take turns within every repeat and the table gives ratios against
the first one.  Per-URL options (``--label``, ``--model``, ``--api-key``, ``--http-client``)
take one value for all targets or one per URL.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from medserve.benchmarks.http_target import HTTP_CLIENTS, OpenAIChatTarget, discover_model
from medserve.benchmarks.session import (
    add_plan_arguments,
    check_plan_arguments,
    concurrency_list,
    measure_and_report,
)
from medserve.benchmarks.target import Target

# Re-exported: engine_bench.py builds its command on these (see session.py).
__all__ = [
    "add_plan_arguments",
    "build_parser",
    "check_plan_arguments",
    "concurrency_list",
    "main",
    "measure_and_report",
]

DEFAULT_URL = "http://127.0.0.1:8000"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medserve bench",
        description="Benchmark OpenAI-compatible servers over HTTP (streamed chat completions).",
        epilog="Other benchmarks: `medserve bench bandwidth -h` (memory bandwidth), "
        "`medserve bench engine -h` (the engine without HTTP).",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help=f"one server (default {DEFAULT_URL})")
    where.add_argument(
        "--compare", nargs="+", metavar="URL", help="several servers, the first is the baseline"
    )
    parser.add_argument("--label", nargs="+", help="name per URL (default host:port)")
    parser.add_argument(
        "--model", nargs="+", help="model per URL, or one for all (default: first /v1/models)"
    )
    parser.add_argument("--api-key", nargs="+", help="bearer key per URL, or one for all")
    parser.add_argument(
        "--http-client",
        nargs="+",
        choices=HTTP_CLIENTS,
        help="client per URL, or one for all (default lean: the cheapest in client CPU)",
    )
    add_plan_arguments(parser)
    return parser


def _per_url(
    parser: argparse.ArgumentParser, name: str, values: list[str] | None, count: int
) -> list[str | None]:
    if values is None:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        parser.error(f"--{name} takes one value or one per URL ({count}), got {len(values)}")
    return list(values)


def _default_labels(urls: Sequence[str]) -> list[str]:
    labels: list[str] = []
    for url in urls:
        base = urlsplit(url).netloc or url
        label, n = base, 2
        while label in labels:
            label, n = f"{base}#{n}", n + 1
        labels.append(label)
    return labels


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    check_plan_arguments(parser, args)
    urls = args.compare or [args.url or DEFAULT_URL]
    labels = args.label or _default_labels(urls)
    if len(labels) != len(urls):
        parser.error(f"--label takes one name per URL ({len(urls)}), got {len(labels)}")
    if len(set(labels)) != len(labels):
        parser.error("--label names must differ")
    keys = _per_url(parser, "api-key", args.api_key, len(urls))
    clients = _per_url(parser, "http-client", args.http_client, len(urls))
    models = _per_url(parser, "model", args.model, len(urls))
    for i, (url, model) in enumerate(zip(urls, models, strict=True)):
        if model is None:
            try:
                models[i] = discover_model(url, keys[i])
            except Exception as exc:  # any failure here means: no usable server at that URL
                print(f"medserve bench: cannot reach {url}: {exc}", file=sys.stderr)
                return 2
    try:
        targets: list[Target] = [
            OpenAIChatTarget(
                label,
                url,
                str(model),
                api_key=key,
                http_client=client or "lean",  # type: ignore[arg-type]
                timeout_s=args.timeout,
            )
            for label, url, model, key, client in zip(
                labels, urls, models, keys, clients, strict=True
            )
        ]
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(measure_and_report(targets, args, argv, prog=parser.prog))
    except KeyboardInterrupt:
        print("medserve bench: interrupted; nothing written", file=sys.stderr)
        return 130
