"""Refuse every outbound socket connection that is not to loopback.

Imported by tests/conftest.py for the test process, and by sitecustomize.py (same folder, put on
PYTHONPATH) for every server subprocess the tests start, so a stray call to a model hub or a
telemetry endpoint fails loudly instead of leaking anything.
"""

from __future__ import annotations

import ipaddress
import socket

_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex


class NonLoopbackConnection(OSError):
    pass


def _check(sock: socket.socket, address: object) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # unix sockets and pipes between our own processes
    host = address[0] if isinstance(address, tuple) else address
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        ip = None
    if ip is None:
        if host in ("localhost",):
            return
    elif ip.is_loopback:
        return
    raise NonLoopbackConnection(f"tests may only connect to loopback, not {host!r}")


def _connect(self: socket.socket, address: object) -> None:
    _check(self, address)
    return _original_connect(self, address)


def _connect_ex(self: socket.socket, address: object) -> int:
    _check(self, address)
    return _original_connect_ex(self, address)


def install() -> None:
    socket.socket.connect = _connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
