"""`medserve` command line: serve, setup, version."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from pathlib import Path

from medserve.server.settings import SettingsError, default_home, load_settings

DELEGATED = {
    # The benchmark only talks HTTP, so it needs none of the server.
    "bench": "medserve.benchmarks.llm_bench",
    # Conversion needs the [convert] extra (torch, optimum); serving never imports it.
    "export": "medserve.quant.convert",
    # Key management edits a local file; it needs no server, model or key.
    "keys": "medserve.server.auth.cli",
    "audit": "medserve.server.audit.cli",
    # Model versions are folders and a symlink under models_dir; no server is involved.
    "models": "medserve.models.versions_cli",
    # A read-only health report of this host; it starts no server and imports no engine.
    "doctor": "medserve.installer.doctor",
    # Writes a systemd unit (and, as root, its user and data folder); starts nothing.
    "install-service": "medserve.installer.service_cli",
    # The quantizer runs in the engine's own environment; this process only drives it.
    "quantize": "medserve.quant.quantize",
}
"""Subcommands with their own command line, each a module with ``main(argv) -> int``."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DELEGATED:
        # Imported only when asked for: each owns its flags and loads nothing of the server.
        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="medserve", description="On-premise LLM inference server")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--config", type=Path, help="TOML settings file (or env MEDSERVE_CONFIG)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="default served model (folder name under models_dir)")
    serve.add_argument("--models-dir", type=Path)

    commands.add_parser("bench", help="benchmark a running server (see `medserve bench -h`)")
    commands.add_parser(
        "export",
        help="HF folder -> OpenVINO IR, chatglm.cpp or GGUF; serve a GGUF (`medserve export -h`)",
    )
    commands.add_parser("keys", help="create, list, revoke, rotate API keys (`medserve keys -h`)")
    commands.add_parser("audit", help="verify or rotate the audit trail (`medserve audit -h`)")
    commands.add_parser(
        "models", help="install, activate, roll back model versions (`medserve models -h`)"
    )
    commands.add_parser("doctor", help="health report of this host (`medserve doctor -h`)")
    commands.add_parser(
        "install-service",
        help="write a hardened systemd unit for `medserve serve` (`medserve install-service -h`)",
    )
    commands.add_parser(
        "quantize", help="quantize a local HF model folder for ipex-llm (`medserve quantize -h`)"
    )

    setup = commands.add_parser(
        "setup", help="prepare the bundled model (download, verify, export)"
    )
    setup.add_argument("--home", type=Path, default=None, help="data folder (default ~/.medserve)")
    setup.add_argument("--force", action="store_true", help="rebuild even if already prepared")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "setup":
        from medserve.installer.bundled_model import BundledModelError, prepare_bundled_model

        try:
            prepare_bundled_model(args.home or default_home(), progress=True, force=args.force)
        except BundledModelError as exc:
            print(f"medserve setup: {exc}", file=sys.stderr)
            return 1
        return 0
    return 2


def _serve(args: argparse.Namespace) -> int:
    config = args.config or (
        Path(os.environ["MEDSERVE_CONFIG"]) if "MEDSERVE_CONFIG" in os.environ else None
    )
    try:
        settings = load_settings(
            config,
            overrides={
                "server": {"host": args.host, "port": args.port},
                "engine": {"model": args.model, "models_dir": args.models_dir},
            },
        )
    except SettingsError as exc:
        print(f"medserve: configuration error: {exc}", file=sys.stderr)
        return 2

    model_dir = settings.engine.models_dir / settings.engine.model
    if settings.engine.enabled and not (model_dir / "medserve.json").is_file():
        print(
            f"medserve: model {settings.engine.model!r} is not prepared in {model_dir}.\n"
            f"  Run `medserve setup` for the bundled model, or set engine.models_dir / "
            f"engine.model.",
            file=sys.stderr,
        )
        return 2

    from medserve.server import egress_guard
    from medserve.server.logging_setup import configure_logging
    from medserve.server.tls import uvicorn_ssl_options

    configure_logging(settings.server.log_level)
    # Before anything else is imported or started: no library gets a chance to call out.
    egress_guard.install(allowed_hosts=[settings.server.host])
    try:
        ssl_options = uvicorn_ssl_options(settings.server)
    except SettingsError as exc:
        print(f"medserve: configuration error: {exc}", file=sys.stderr)
        return 2

    import uvicorn
    from medserve.accel.base import BackendError
    from medserve.kv_cache.planner import KVPlanError
    from medserve.server.app import create_app
    from medserve.server.header_timeout import header_timeout_protocol

    try:
        app = create_app(settings)
    except (KVPlanError, BackendError) as exc:
        print(f"medserve: cannot start: {exc}", file=sys.stderr)
        return 2
    config_ = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        loop="medserve.server.egress_guard:guarded_event_loop",
        http=header_timeout_protocol(settings.server.header_timeout_s),
        # SIGTERM: listening sockets close at once (new connections are refused), idle
        # connections close, in-flight requests and streams get this long to finish; then
        # they are cancelled (which aborts their generations) and the components stop.
        timeout_graceful_shutdown=settings.server.drain_timeout_s,
        **ssl_options,
    )
    server = uvicorn.Server(config_)
    # SIGHUP reloads the models once the app has started (server/admin_api.py); until then,
    # and during shutdown, its default action (terminate) would kill a serving process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
