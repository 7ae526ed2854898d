"""Refuse, inside the server process, every network connection that would leave the machine.

medserve never needs to call out: it serves requests and talks to its workers over Unix
sockets.  Anything that tries to connect elsewhere is a library phoning home (telemetry, a model
hub, an update check) or worse, so `medserve serve` installs this guard before it imports the
app.  It is a Python audit hook (PEP 578): it sees every ``socket.connect``, ``sendto`` and name
lookup made through Python's socket module, whichever library makes it, and it cannot be
removed once added.  An attempt raises `EgressBlocked` (an ``OSError``, so callers that
tolerate a network failure carry on) and logs one ``egress_blocked`` event with the operation
and destination, never any request content.  uvloop connects without the socket module, so
the event loop it builds is guarded too (`guarded_event_loop`).

Allowed: Unix sockets, loopback addresses, ``localhost`` and the names in ``allowed_hosts``
(`medserve serve` passes its own ``server.host``).  Native code that opens sockets itself is not
seen here; the operating system (a network namespace, systemd ``IPAddressDeny=``) is the
second wall, and the test suite runs in a loopback-only namespace to prove nothing needs more.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
import threading
from collections.abc import Iterable
from typing import Any

import structlog

log = structlog.get_logger("medserve.egress")

_allowed_names: frozenset[str] = frozenset()
_installed = False
_in_hook = threading.local()


class EgressBlocked(PermissionError):
    """An outbound connection or name lookup that the server does not allow."""


def install(allowed_hosts: Iterable[str] = ()) -> None:
    """Adds the audit hook (once per process; later calls only widen ``allowed_hosts``)."""
    global _allowed_names, _installed
    _allowed_names = _allowed_names | {h.lower() for h in allowed_hosts if h}
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True


def installed() -> bool:
    return _installed


def destination_allowed(host: object) -> bool:
    """True for loopback addresses, ``localhost`` and the allowed names; False otherwise."""
    if host is None:
        return True  # a passive lookup (binding), not a destination
    text = (host.decode() if isinstance(host, bytes) else str(host)).lower()
    if text in ("localhost", *_allowed_names) or text.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    if ip.is_unspecified:
        return True  # connecting to 0.0.0.0 / :: reaches this machine only
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def lookup_allowed(host: object) -> bool:
    """A lookup of a numeric address sends nothing; a name may go to a DNS server."""
    if destination_allowed(host):
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    try:
        ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    return True  # numeric: the connect that may follow is checked on its own


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not event.startswith("socket.") or getattr(_in_hook, "active", False):
        return
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock, address = args[0], args[1]
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            _refuse_unless(destination_allowed(address[0]), event[7:], address[0], address[1])
    elif event == "socket.getaddrinfo":
        _refuse_unless(lookup_allowed(args[0]), "getaddrinfo", args[0], args[1])
    elif event in ("socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        _refuse_unless(lookup_allowed(args[0]), event[7:], args[0], None)


def _refuse_unless(allowed: bool, operation: str, host: object, port: object) -> None:
    if allowed:
        return
    _in_hook.active = True
    try:
        log.warning(
            "egress_blocked",
            operation=operation,
            host=str(host)[:253],
            port=port if isinstance(port, int) else None,
        )
    finally:
        _in_hook.active = False
    raise EgressBlocked(f"medserve allows no outbound network: {operation} to {host!r} refused")


def guarded_event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn ``loop=`` factory: a uvloop loop (or asyncio's) with outbound connections checked.

    uvloop's create_connection and getaddrinfo go through libuv, past the audit hook.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()

    class GuardedLoop(uvloop.Loop):  # type: ignore[misc, name-defined]
        async def create_connection(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            host = kwargs.get("host", args[1] if len(args) > 1 else None)
            port = kwargs.get("port", args[2] if len(args) > 2 else None)
            _refuse_unless(destination_allowed(host), "connect", host, port)
            return await super().create_connection(*args, **kwargs)

        async def create_datagram_endpoint(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            remote = kwargs.get("remote_addr")
            if isinstance(remote, tuple):
                _refuse_unless(destination_allowed(remote[0]), "sendto", remote[0], remote[1])
            return await super().create_datagram_endpoint(*args, **kwargs)

        async def getaddrinfo(self, host: Any, port: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            _refuse_unless(lookup_allowed(host), "getaddrinfo", host, port)
            return await super().getaddrinfo(host, port, **kwargs)

        async def sock_connect(self, sock: socket.socket, address: Any) -> Any:  # type: ignore[override]
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                _refuse_unless(destination_allowed(address[0]), "connect", address[0], address[1])
            return await super().sock_connect(sock, address)

    return GuardedLoop()
