"""`medserve bench engine`: the engine without HTTP, beside the servers, in one run.

    medserve bench engine --model smollm2-135m-instruct --concurrency 1,4,8 --repeats 3
    medserve bench engine --model M --variant default: \\
        --variant latency:performance_hint=LATENCY,num_threads=2 --json sweep.json
    medserve bench engine --model M --worker --url http://127.0.0.1:8000 \\
        --url-label medserve-http --markdown levels.md

Targets, interleaved within every repeat (the machine is shared and noisy):
- one engine core per ``--variant NAME:KEY=VALUE,...`` (default: one, with the server's
  defaults), loaded in this process and stepped by a thread: what the engine itself does;
  variants are how engine settings are chosen by measurement (keys: the engine options of
  ``medserve.server.settings.EngineSettings.engine_options``);
- ``--worker``: the model's real worker process driven through the server's client (adds the
  protocol and detokenization; any engine, in its own environment);
- ``--url``: OpenAI-compatible servers (medserve over HTTP, llama-server...), as in
  ``medserve bench --compare``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from medserve.benchmarks import session
from medserve.benchmarks.engine_target import EngineCoreTarget, WorkerTarget, engine_configure
from medserve.benchmarks.http_target import OpenAIChatTarget, discover_model
from medserve.benchmarks.target import Target
from medserve.models.manifest import ManifestError, default_models_dir
from medserve.server.settings import EngineSettings


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``"latency:performance_hint=LATENCY,num_threads=2"`` -> ("latency", {...})."""
    name, _, assignments = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {text!r} needs a name: NAME:KEY=VALUE,...")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in assignments.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"variant {text!r}: {item!r} is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return name, options


def variant_options(overrides: dict[str, str]) -> dict[str, Any]:
    """The server's engine options with ``overrides`` applied, typed like the settings."""
    defaults = EngineSettings().engine_options()
    options = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise ValueError(f"unknown engine option {key!r}; known: {', '.join(sorted(defaults))}")
        kind = type(defaults[key])
        if kind is bool:
            options[key] = value.lower() in {"1", "true", "yes", "on"}
        else:
            options[key] = kind(value)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medserve bench engine",
        description="Benchmark the engine in-process, its worker process, and HTTP servers.",
    )
    parser.add_argument("--model", required=True, help="model folder name under --models-dir")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        metavar="NAME:KEY=VALUE,...",
        help="an engine-core target with these engine options (repeatable)",
    )
    parser.add_argument("--no-core", action="store_true", help="no in-process engine target")
    parser.add_argument("--worker", action="store_true", help="add the worker-process target")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--url", action="append", default=[], help="an HTTP server to add")
    parser.add_argument("--url-label", action="append", default=[], help="label per --url")
    parser.add_argument(
        "--url-model", action="append", default=[], help="model per --url (default: discover)"
    )
    session.add_plan_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    session.check_plan_arguments(parser, args)
    model_dir = (args.models_dir or default_models_dir()) / args.model
    variants = args.variant or [("engine", {})]
    if len({name for name, _ in variants}) != len(variants):
        parser.error("--variant names must differ")
    for option in ("url_label", "url_model"):
        values = getattr(args, option)
        if values and len(values) != len(args.url):
            parser.error(f"--{option.replace('_', '-')} takes one value per --url, or none")
    try:
        configures = [
            (
                name,
                engine_configure(
                    model_dir,
                    max_num_seqs=args.max_num_seqs,
                    kv_cache_gb=args.kv_cache_gb,
                    options=variant_options(overrides),
                ),
            )
            for name, overrides in variants
        ]
    except (ManifestError, ValueError) as exc:
        parser.error(str(exc))
    http_targets: list[Target] = []
    for i, url in enumerate(args.url):
        label = args.url_label[i] if args.url_label else f"http-{i + 1}"
        try:
            model = args.url_model[i] if args.url_model else discover_model(url)
        except Exception as exc:  # any failure here means: no usable server at that URL
            print(f"medserve bench engine: cannot reach {url}: {exc}", file=sys.stderr)
            return 2
        http_targets.append(OpenAIChatTarget(label, url, model, timeout_s=args.timeout))
    return asyncio.run(_run(args, argv, configures, http_targets))


async def _run(
    args: argparse.Namespace,
    argv: list[str],
    configures: list[tuple[str, Any]],
    http_targets: list[Target],
) -> int:
    targets: list[Target] = []
    if not args.no_core:
        for name, configure in configures:
            print(f"medserve bench engine: loading {name} ...", file=sys.stderr, flush=True)
            targets.append(await asyncio.to_thread(EngineCoreTarget, name, configure))
    if args.worker:
        worker = WorkerTarget("worker", configures[0][1])
        await worker.start()
        targets.append(worker)
    targets.extend(http_targets)
    if not targets:
        print("medserve bench engine: no target (drop --no-core or add one)", file=sys.stderr)
        return 2
    return await session.measure_and_report(targets, args, argv, prog="medserve bench engine")


if __name__ == "__main__":
    sys.exit(main())
