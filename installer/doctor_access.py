"""`medserve doctor` checks of who can reach and read the server: its port, the permissions of
its data and secrets, TLS, and environment variables that would send traffic off the machine.

The hardware and model checks are in ``doctor_checks.py``; both return ``Check`` objects.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import json
import os
import socket
import ssl
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from medserve.installer.doctor_checks import FAIL, OK, WARN, Check, existing_ancestor
from medserve.server.settings import Settings

PROBE_TIMEOUT_S = 2.0
TLS_WARN_DAYS = 30


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


# --- port -------------------------------------------------------------------------------------


def check_port(host: str, port: int, tls: bool = False) -> Check:
    """Free, held by a medserve answering /health, or held by something else."""
    where = f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: SO_REUSEADDR, so closing connections in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return _probe_holder(host, port, tls)
            if exc.errno == errno.EACCES:
                hint = "ports below 1024 need root or CAP_NET_BIND_SERVICE; use e.g. 8000"
                return Check("port", FAIL, f"{where}: permission denied", hint)
            if exc.errno == errno.EADDRNOTAVAIL:
                hint = "server.host must be an address of this machine (or 0.0.0.0)"
                return Check("port", FAIL, f"{where}: no such local address", hint)
            return Check("port", FAIL, f"{where}: cannot bind ({exc.strerror})")
    return Check("port", OK, f"{where} is free")


def _probe_holder(host: str, port: int, tls: bool) -> Check:
    """GET /health on the port: on loopback for a wildcard bind, else the configured host."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    where = f"{host}:{port}"
    if tls:
        # Only "is this medserve?": the certificate is checked by the TLS check, not here.
        context = ssl._create_unverified_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            target, port, timeout=PROBE_TIMEOUT_S, context=context
        )
    else:
        conn = http.client.HTTPConnection(target, port, timeout=PROBE_TIMEOUT_S)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = json.loads(response.read(4096) or b"null")
    except ssl.SSLError:
        hint = "with server.tls_client_ca set the probe has no client certificate"
        return Check("port", WARN, f"{where} is in use; TLS handshake refused", hint)
    except (OSError, http.client.HTTPException, ValueError):
        body, response = None, None
    finally:
        conn.close()
    if response is not None and response.status == 200 and body == {"status": "ok"}:
        return Check(
            "port", OK, f"{where}: medserve is running (GET /health ok)", data={"running": True}
        )
    hint = "another program holds the port: stop it or set server.port (ss -ltnp shows it)"
    return Check("port", FAIL, f"{where} is held by something that is not medserve", hint)


# --- permissions ------------------------------------------------------------------------------


def _folder_problem(path: Path) -> tuple[str, str] | None:
    """(status, text) when the folder cannot serve as a data folder, else None."""
    if path.exists():
        if not path.is_dir():
            return FAIL, f"{path} is not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return FAIL, f"{path} is not writable by this user"
        mode = path.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            return FAIL, f"{path} is world-writable (chmod o-w)"
        return None
    parent = existing_ancestor(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        return FAIL, f"{path} is missing and {parent} is not writable to create it"
    return None


def _secret_problem(path: Path) -> tuple[str, str] | None:
    if not path.is_file():
        return None  # created with mode 0600 on first use
    mode = path.stat().st_mode
    if mode & stat.S_IROTH:
        return FAIL, f"{path} is world-readable (chmod 600)"
    if mode & stat.S_IRGRP:
        return WARN, f"{path} is group-readable (chmod 600 unless a group needs it)"
    return None


def check_permissions(settings: Settings, home: Path) -> Check:
    folders = {"home": home, "models": settings.engine.models_dir}
    if settings.cases.enabled:
        folders["cases"] = settings.cases.data_dir
    if settings.audit.enabled:
        folders["audit"] = settings.audit.dir
    folders["keys"] = settings.auth.keys_file.parent
    secrets = [settings.auth.keys_file, settings.audit.dir / "case-id.key"]
    if settings.server.tls_key:
        secrets.append(Path(settings.server.tls_key).expanduser())
    problems = [p for p in map(_folder_problem, dict.fromkeys(folders.values())) if p]
    problems += [p for p in map(_secret_problem, secrets) if p]
    data = {
        "folders": {k: str(v) for k, v in folders.items()},
        "secrets": [str(s) for s in secrets],
    }
    if not problems:
        detail = f"{len(set(folders.values()))} data folders writable, secrets private"
        return Check("permissions", OK, detail, data=data)
    status = FAIL if any(s == FAIL for s, _ in problems) else WARN
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    data["problems"] = [text for _, text in problems]
    return Check("permissions", status, problems[0][1] + more, "; ".join(data["problems"]), data)


# --- TLS --------------------------------------------------------------------------------------


def cert_not_after(cert: Path) -> float:
    """Expiry (epoch seconds) of the first certificate in a PEM file, standard library only.

    ``ssl._ssl._test_decode_cert`` is private but has been in CPython, unchanged, since 3.2
    (the test suite uses it); ``cryptography`` is an optional dependency here.
    """
    decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
    return ssl.cert_time_to_seconds(decoded["notAfter"])


def check_tls(settings: Settings, now: float | None = None) -> Check:
    server = settings.server
    if not server.tls_cert:
        if is_loopback(server.host):
            return Check("tls", OK, f"off (plain HTTP, loopback {server.host} only)")
        hint = "set server.tls_cert and server.tls_key: API keys and patient text cross the LAN"
        return Check("tls", WARN, f"off, yet server.host is {server.host}", hint)
    cert, key = Path(server.tls_cert).expanduser(), Path(server.tls_key).expanduser()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
        if server.tls_client_ca:
            context.load_verify_locations(cafile=Path(server.tls_client_ca).expanduser())
        not_after = cert_not_after(cert)
    except (OSError, ssl.SSLError, ValueError, KeyError) as exc:
        hint = "both PEM, the key unencrypted and matching the certificate"
        return Check("tls", FAIL, f"cannot load {cert} with {key}: {exc}", hint)
    days = (not_after - (time.time() if now is None else now)) / 86400
    expires = time.strftime("%Y-%m-%d", time.gmtime(not_after))
    mtls = ", mutual TLS" if server.tls_client_ca else ""
    data = {"cert": str(cert), "not_after": expires, "days_left": round(days, 1)}
    if days < 0:
        return Check("tls", FAIL, f"{cert} expired on {expires}", "install a new certificate", data)
    detail = f"{cert.name} + {key.name} load{mtls}; expires {expires} ({days:.0f} days)"
    if days < TLS_WARN_DAYS:
        return Check("tls", WARN, detail, "renew the certificate within the month", data)
    return Check("tls", OK, detail, data=data)


# --- outbound-call hazards --------------------------------------------------------------------

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy")
# Where `medserve setup` / `setup.sh --with` would fetch from; the server itself never does.
INSTALL_VARIABLES = ("HF_ENDPOINT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "UV_INDEX_URL")


def _proxy_host(value: str) -> str:
    rest = value.split("://", 1)[-1].rsplit("@", 1)[-1]
    return rest.split("/", 1)[0].rsplit(":", 1)[0].strip("[]")


def check_environment(env: Mapping[str, str] | None = None) -> Check:
    """Variables that would route medserve's traffic elsewhere.

    The server's egress guard (server/egress_guard.py) refuses every non-loopback connection
    from Python, so a proxy on the LAN is blocked anyway; a proxy on *loopback* is allowed by
    that guard and would forward everything out, hence a fail.  HF_HUB_OFFLINE needs no
    setting: the worker client sets it (and TRANSFORMERS_OFFLINE) to 1 for every engine.
    """
    env = os.environ if env is None else env
    proxies = {k: v for k, v in env.items() if k.lower() in PROXY_VARIABLES and v}
    installs = {k: env[k] for k in INSTALL_VARIABLES if env.get(k)}
    data = {"proxy": sorted(proxies), "install": sorted(installs)}
    local = sorted(k for k, v in proxies.items() if is_loopback(_proxy_host(v)))
    if local:
        hint = f"unset {' '.join(sorted(proxies))}: a loopback proxy passes the egress guard"
        return Check("environment", FAIL, f"loopback proxy set: {', '.join(local)}", hint, data)
    if proxies or installs:
        names = ", ".join([*sorted(proxies), *installs])
        hint = f"unset {names} in the service's environment (the egress guard blocks them anyway)"
        return Check("environment", WARN, f"set: {names}", hint, data)
    return Check("environment", OK, "no proxy, hub or package-index variables set", data=data)
