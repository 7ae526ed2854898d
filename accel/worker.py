"""Entry point of every engine worker process: ``python -m medserve.accel.worker --fd N``.

The server starts one per served model, with the interpreter of that model's engine
(accel/registry.py), and hands it one end of a Unix socket pair as file descriptor N. The
first message is Configure; the worker loads the engine, answers Ready (or Fatal with the
reason), then runs the shared loop until Shutdown or until the server's end closes.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

from medserve.accel.protocol import BlockingChannel, Configure, Fatal, Ready
from medserve.accel.registry import load_engine
from medserve.accel.worker_host import WorkerHost
from medserve.server import egress_guard

CONFIGURE_TIMEOUT_S = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medserve.accel.worker")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket descriptor")
    args = parser.parse_args(argv)
    # The server handles Ctrl-C and SIGTERM and then tells us to shut down. systemd (and
    # `timeout`, and a terminal's Ctrl-C) signal the whole process group at once; dying
    # mid-step on that signal would turn a clean stop into a crash and a restart.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # An engine library phoning home (model hub, telemetry) is refused here as in the server;
    # the worker talks to the server only over its inherited Unix socket.
    egress_guard.install()
    channel = BlockingChannel(socket.socket(fileno=args.fd))
    try:
        config = _wait_for_configure(channel)
    except (EOFError, OSError, TimeoutError):
        return 1
    try:
        engine = load_engine(config)
    except Exception as exc:  # report any load failure to the server instead of vanishing
        channel.send(Fatal(f"{type(exc).__name__}: {exc}"))
        return 1
    try:
        channel.send(Ready(engine.describe()))
        WorkerHost(engine, channel).run()
    finally:
        engine.close()
    return 0


def _wait_for_configure(channel: BlockingChannel) -> Configure:
    messages = channel.receive(CONFIGURE_TIMEOUT_S)
    if not messages:
        raise TimeoutError("no Configure message")
    first = messages[0]
    if not isinstance(first, Configure):
        raise EOFError(f"expected Configure, got {type(first).__name__}")
    return first


if __name__ == "__main__":
    sys.exit(main())
