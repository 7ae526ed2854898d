"""HTTPS and mutual TLS from ``server.tls_*``: uvicorn's ssl options, checked before start-up.

uvicorn builds the SSL context itself while starting and reports a bad key as a bare
``ssl.SSLError`` traceback; loading the files here first turns that into one sentence naming
the setting to fix.  With ``tls_client_ca`` set, ``CERT_REQUIRED`` makes the handshake fail
for a client without a certificate signed by that CA, before any HTTP byte is read, so an
unauthorised machine on the hospital LAN never reaches the API-key check.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from medserve.server.settings import ServerSettings, SettingsError


def uvicorn_ssl_options(server: ServerSettings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``; empty when TLS is off."""
    if not server.tls_cert:
        return {}
    cert, key = Path(server.tls_cert).expanduser(), Path(server.tls_key).expanduser()
    ca = Path(server.tls_client_ca).expanduser() if server.tls_client_ca else None
    _check_loadable(cert, key, ca)
    options: dict[str, Any] = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    if ca is not None:
        options |= {"ssl_ca_certs": str(ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def _check_loadable(cert: Path, key: Path, ca: Path | None) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise SettingsError(
            f"server.tls_cert / server.tls_key: cannot load {cert} with {key} ({exc.reason}); "
            f"both must be PEM, the key unencrypted and matching the certificate"
        ) from None
    if ca is None:
        return
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise SettingsError(
            f"server.tls_client_ca: {ca} is not a PEM CA bundle ({exc.reason})"
        ) from None
