"""HTTPS and mutual TLS on a real server: certificates made here, at test time.

Two servers: HTTPS only, serving the bundled model (the official openai client chats over it,
plain HTTP on the same port gets no answer); and mutual TLS without a model (the handshake
fails without a client certificate or with one from another CA, and works with the right one).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import BUNDLED_MODEL
from tests.server_process import ServerProcess
from tests.soak.server import start_server


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    pem = Pem(folder / f"{stem}.crt", folder / f"{stem}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem


def make_ca(
    folder: Path, common_name: str
) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(folder, common_name, cert, key), cert, key


def make_leaf(
    folder: Path,
    stem: str,
    ca: tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> Pem:
    _, ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return _write(folder, stem, builder.sign(ca_key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    rogue_client: Pem
    """Signed by a CA the server does not trust."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "medserve-test-ca")
    rogue_ca = make_ca(folder, "rogue-ca")
    return Pki(
        ca=ca[0],
        server=make_leaf(folder, "server", ca, server=True),
        client=make_leaf(folder, "emr-client", ca, server=False),
        rogue_client=make_leaf(folder, "rogue-client", rogue_ca, server=False),
    )


@pytest.fixture(scope="module")
def https_server(
    pki: Pki, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "MEDSERVE_ENGINE_MODELS_DIR": str(models_dir),
        "MEDSERVE_ENGINE_MAX_NUM_SEQS": "2",
        "MEDSERVE_CASES_ENABLED": "false",
        "MEDSERVE_SERVER_TLS_CERT": str(pki.server.cert),
        "MEDSERVE_SERVER_TLS_KEY": str(pki.server.key),
    }
    with start_server(
        tmp_path_factory.mktemp("https"),
        env,
        scheme="https",
        client={"verify": _tls_client(pki, None)},
    ) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "MEDSERVE_ENGINE_ENABLED": "false",
        "MEDSERVE_CASES_ENABLED": "false",
        "MEDSERVE_SERVER_TLS_CERT": str(pki.server.cert),
        "MEDSERVE_SERVER_TLS_KEY": str(pki.server.key),
        "MEDSERVE_SERVER_TLS_CLIENT_CA": str(pki.ca.cert),
    }
    client = {"verify": _tls_client(pki, pki.client)}
    with start_server(
        tmp_path_factory.mktemp("mtls"), env, scheme="https", client=client
    ) as server:
        yield server


def _port(server: ServerProcess) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def test_openai_client_chats_over_https(https_server: ServerProcess, pki: Pki) -> None:
    with httpx.Client(verify=_tls_client(pki, None)) as http:
        client = openai.OpenAI(
            base_url=https_server.base_url + "/v1", api_key="unused", http_client=http
        )
        reply = client.chat.completions.create(
            model=BUNDLED_MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=8,
        )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_server_certificate_is_checked_by_the_client(https_server: ServerProcess) -> None:
    # The system trust store does not know the test CA: a client that verifies refuses.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(https_server.base_url + "/health", timeout=10)


def test_plain_http_is_refused_when_tls_is_on(https_server: ServerProcess) -> None:
    plain = https_server.base_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(plain + "/health", timeout=10)
    # At the byte level: an HTTP request gets no HTTP answer, only the connection closed
    # (or a TLS alert), so nothing is ever served in clear.
    with socket.create_connection(("127.0.0.1", _port(https_server)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = _read_until_closed(sock)
    assert not answer.startswith(b"HTTP/"), answer[:80]
    assert b'"status"' not in answer


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _tls_client(pki: Pki, cert: Pem | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return context


def _handshake_and_get(server: ServerProcess, context: ssl.SSLContext) -> bytes:
    """What one request over a fresh TLS connection gets back.  In TLS 1.3 the client's
    handshake completes before the server has checked its certificate, so a refusal shows on
    the first read: an alert (SSLError) or the connection closed with no byte (uvloop)."""
    with (
        socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        try:
            return _read_until_closed(tls)
        except ssl.SSLError as exc:
            return f"<{exc.reason}>".encode()


def test_mtls_refuses_a_client_without_a_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    answer = _handshake_and_get(mtls_server, _tls_client(pki, None))
    assert answer in (b"", b"<TLSV13_ALERT_CERTIFICATE_REQUIRED>"), answer[:80]
    with pytest.raises(httpx.HTTPError):
        httpx.get(mtls_server.base_url + "/health", verify=_tls_client(pki, None), timeout=10)


def test_mtls_refuses_a_certificate_from_another_ca(mtls_server: ServerProcess, pki: Pki) -> None:
    answer = _handshake_and_get(mtls_server, _tls_client(pki, pki.rogue_client))
    assert not answer.startswith(b"HTTP/"), answer[:80]
    assert answer in (b"", b"<TLSV1_ALERT_UNKNOWN_CA>"), answer[:80]


def test_mtls_serves_a_client_with_a_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    answer = _handshake_and_get(mtls_server, _tls_client(pki, pki.client))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    with httpx.Client(verify=_tls_client(pki, pki.client)) as http:
        client = openai.OpenAI(
            base_url=mtls_server.base_url + "/v1", api_key="unused", http_client=http
        )
        assert client.models.list().data == []  # no model on this server, but it answered


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MEDSERVE_SERVER_TLS_CERT": "{cert}"}, "tls_cert and server.tls_key go together"),
        (
            {"MEDSERVE_SERVER_TLS_CERT": "{cert}", "MEDSERVE_SERVER_TLS_KEY": "/nonexistent.key"},
            "server.tls_key: /nonexistent.key does not exist",
        ),
        (
            {"MEDSERVE_SERVER_TLS_CERT": "{cert}", "MEDSERVE_SERVER_TLS_KEY": "{other_key}"},
            "cannot load",
        ),
        ({"MEDSERVE_SERVER_TLS_CLIENT_CA": "{cert}"}, "tls_client_ca (mutual TLS) needs"),
    ],
)
def test_bad_tls_settings_exit_2_naming_the_setting(
    pki: Pki, env: dict[str, str], expected: str
) -> None:
    values = {"cert": str(pki.server.cert), "other_key": str(pki.client.key)}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEDSERVE_")}
    completed = subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", "serve"],
        env={
            **clean,
            "MEDSERVE_ENGINE_ENABLED": "false",
            "MEDSERVE_CASES_ENABLED": "false",
            **{k: v.format(**values) for k, v in env.items()},
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2, completed.stderr
    assert expected in completed.stderr
