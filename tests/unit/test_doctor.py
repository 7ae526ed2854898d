"""`medserve doctor` on a real temporary home: real files, sockets, certificates and the CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from medserve.installer import doctor
from medserve.installer.doctor_access import PROXY_VARIABLES
from medserve.models.checksums import write_sha256sums
from medserve.models.manifest import write_manifest

from tests.conftest import BUNDLED_MODEL, medserve_home
from tests.server_process import ServerProcess, free_port

MEDSERVE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "medserve"
MODEL = "tiny-model"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A clean home with one sealed model version behind a symlink, and no hazardous env."""
    home = tmp_path / "home"
    version = home / "models" / ".versions" / MODEL / "v1"
    version.mkdir(parents=True)
    (version / "config.json").write_text("{}")
    (version / "openvino_model.bin").write_bytes(b"\0" * 4096)
    write_manifest(version, {"name": MODEL, "precision": "int8"})
    (home / "models" / MODEL).symlink_to(Path(".versions") / MODEL / "v1")
    home.chmod(0o700)
    monkeypatch.setenv("MEDSERVE_HOME", str(home))
    for name in [*os.environ]:
        if name.startswith("MEDSERVE_") and name != "MEDSERVE_HOME":
            monkeypatch.delenv(name)
        if name.lower() in PROXY_VARIABLES or name in ("HF_ENDPOINT", "PIP_INDEX_URL"):
            monkeypatch.delenv(name)
    yield home


def write_config(home: Path, port: int, **server: str) -> Path:
    lines = ["[server]", f"port = {port}", *[f'{k} = "{v}"' for k, v in server.items()]]
    lines += ["[engine]", f'model = "{MODEL}"', f'models_dir = "{home / "models"}"']
    config = home / "medserve.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def run(config: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    code = doctor.main(["--config", str(config), "--json", *flags])
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == code
    return report


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


def test_clean_home_exits_0(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = run(write_config(home, free_port()), capsys)
    assert report["exit_code"] == 0, report
    assert report["summary"]["fail"] == 0
    names = [c["name"] for c in report["checks"]]
    for expected in ("config", "cpu", "engines", "memory", "disk", "model", "port", "tls"):
        assert expected in names
    model = check(report, "model")
    assert model["status"] == "ok" and "SHA256SUMS" in model["detail"]
    assert model["resolved"].endswith(".versions/tiny-model/v1")
    assert check(report, "memory")["per_model"][MODEL]["weights_bytes"] == 4096
    assert check(report, "port")["status"] == "ok"


def test_text_report_fits_one_screen(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.main(["--config", str(write_config(home, free_port()))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 30
    assert lines[-1].endswith("exit 0")


def test_world_readable_keys_file_fails(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = home / "keys.json"
    keys.write_text('{"keys": []}')
    keys.chmod(0o644)
    report = run(write_config(home, free_port()), capsys)
    assert report["exit_code"] == 1
    permissions = check(report, "permissions")
    assert permissions["status"] == "fail" and "world-readable" in permissions["detail"]
    keys.chmod(0o600)
    assert run(write_config(home, free_port()), capsys)["exit_code"] == 0


def test_damaged_file_under_sha256sums_fails(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = home / "models" / ".versions" / MODEL / "v1"
    write_sha256sums(version)
    config = write_config(home, free_port())
    assert check(run(config, capsys), "model")["detail"].endswith("SHA256SUMS ok")

    with open(version / "openvino_model.bin", "r+b") as f:
        f.write(b"\1")  # one flipped byte, same size
    report = run(config, capsys)
    model = check(report, "model")
    assert report["exit_code"] == 1 and model["status"] == "fail"
    assert model["checksum_problems"] == ["openvino_model.bin: sha256 differs (changed or damaged)"]
    # --no-checksums trades the hashing for speed: the damage goes unseen.
    assert "skipped" in check(run(config, capsys, "--no-checksums"), "model")["detail"]


def test_missing_model_folder_fails(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "models" / MODEL).unlink()
    report = run(write_config(home, free_port()), capsys)
    assert check(report, "model")["status"] == "fail" and report["exit_code"] == 1


def test_proxy_variables(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(home, free_port())
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.hospital.example:3128")
    report = run(config, capsys)
    env = check(report, "environment")
    assert env["status"] == "warn" and "HTTPS_PROXY" in env["hint"] and report["exit_code"] == 0
    # A proxy on loopback passes the egress guard and forwards everything out.
    monkeypatch.setenv("all_proxy", "socks5://127.0.0.1:1080")
    report = run(config, capsys)
    assert check(report, "environment")["status"] == "fail" and report["exit_code"] == 1


def test_port_held_by_plain_socket_fails(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        report = run(write_config(home, holder.getsockname()[1]), capsys)
    port = check(report, "port")
    assert port["status"] == "fail" and "not medserve" in port["detail"]
    assert report["exit_code"] == 1


def test_port_held_by_running_medserve_is_ok(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "MEDSERVE_HOME": str(home),
        "MEDSERVE_ENGINE_ENABLED": "false",
        "MEDSERVE_CASES_ENABLED": "false",
    }
    with ServerProcess.start(tmp_path, env, ready_timeout_s=60) as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        report = run(write_config(home, port), capsys)
    assert check(report, "port") == check(report, "port") | {"status": "ok", "running": True}


def make_cert(folder: Path, not_after: dt.datetime) -> tuple[Path, Path]:
    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medserve.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=400))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.mark.parametrize(("days", "status"), [(365, "ok"), (10, "warn"), (-1, "fail")])
def test_tls_certificate_expiry(
    home: Path, capsys: pytest.CaptureFixture[str], days: int, status: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    cert, key = make_cert(home, now + dt.timedelta(days=days))
    config = write_config(home, free_port(), tls_cert=str(cert), tls_key=str(key))
    tls = check(run(config, capsys), "tls")
    assert tls["status"] == status, tls
    assert tls["not_after"] == (now + dt.timedelta(days=days)).strftime("%Y-%m-%d")


def test_plain_http_on_the_lan_warns(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tls = check(run(write_config(home, free_port(), host="0.0.0.0"), capsys), "tls")
    assert tls["status"] == "warn" and "tls_cert" in tls["hint"]


def test_config_error_is_a_failure_not_a_traceback(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run(home / "missing.toml", capsys)
    assert check(report, "config")["status"] == "fail" and report["exit_code"] == 1
    assert check(report, "cpu")["cpu_model"]  # the host checks still ran


def test_real_cli_on_the_default_home() -> None:
    """`medserve doctor --json` as hospital IT runs it, on this machine's prepared home."""
    models = medserve_home() / "models"
    if not (models / BUNDLED_MODEL / "medserve.json").is_file():
        pytest.skip(f"bundled model not prepared in {models} (run `medserve setup`)")
    result = subprocess.run(
        [str(MEDSERVE), "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        # As the server sees it: only medserve's own MEDSERVE_* settings (CI exports others).
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("MEDSERVE_")},
            "MEDSERVE_HOME": str(medserve_home()),
        },
    )
    report = json.loads(result.stdout)
    assert result.returncode == report["exit_code"] in (0, 1)
    assert set(report) == {"checks", "summary", "exit_code"}
    for entry in report["checks"]:
        assert {"name", "status", "detail"} <= set(entry) and entry["status"] in (
            "ok",
            "warn",
            "fail",
        )
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model_name = next(ln for ln in cpuinfo.splitlines() if ln.startswith("model name"))
    assert model_name.partition(":")[2].strip() in report["summary"]["cpu_model"]
    model = next(c for c in report["checks"] if c.get("model") == BUNDLED_MODEL)
    assert model["status"] == "ok", model


def cpuinfo(flags: str) -> str:
    return f"model name\t: Test CPU\ncpu family\t: 6\nmodel\t\t: 143\nflags\t\t: {flags}\n\n"


@pytest.mark.parametrize(
    ("flags", "prefix", "expected"),
    [
        (
            "sse4_2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8",
            "AMX",
            "bf16 and int8",
        ),
        ("sse4_2 avx avx2 fma avx512f avx512_vnni", "VNNI", "int8 is fast"),
        ("sse4_2 avx avx2 fma", "AVX2 only", "llama.cpp Q4_0"),
    ],
)
def test_fast_paths_follow_the_isa(flags: str, prefix: str, expected: str) -> None:
    from medserve.installer.doctor_checks import check_cpu, check_fast_paths

    detail = check_fast_paths(cpuinfo(flags)).detail
    assert detail.startswith(prefix) and expected in detail
    cpu = check_cpu(cpuinfo(flags))
    assert cpu.data["cpu_model"] == "Test CPU (family 6 model 143)"
    assert cpu.data["isa"]["AMX"] == ("amx_tile" in flags)
    assert check_cpu(cpuinfo("sse4_2")).status == "warn"  # no AVX2
