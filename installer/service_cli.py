"""`medserve install-service`: write the hardened systemd unit (installer/service.py) and,
as root, the service user and data folder it needs. It never starts or enables anything.

    medserve install-service [--user medserve] [--home /var/lib/medserve] [--config PATH]
        [--venv PATH] [--allow CIDR ...] [--memory-max SIZE] [--unit-dir DIR] [--name NAME]
        [--print]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import grp
import os
import pwd
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from medserve.installer.service import (
    ServiceError,
    ServiceParams,
    memory_max_bytes,
    parse_allow,
    parse_memory,
    render_unit,
    under_home_roots,
)
from medserve.kv_cache.planner import memory_needs
from medserve.models.manifest import try_read_manifest
from medserve.server.settings import Settings, SettingsError, load_settings

SYSTEMD_RUNNING = Path("/run/systemd/system")
# The package root: inside site-packages, or the repository of an editable install.
SOURCE_TREE = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="medserve install-service",
        description="write a hardened systemd unit for `medserve serve` (starts nothing)",
    )
    parser.add_argument("--user", default="medserve", help="service user (default: medserve)")
    parser.add_argument(
        "--home",
        type=Path,
        default=Path("/var/lib/medserve"),
        help="data folder, MEDSERVE_HOME (default: /var/lib/medserve)",
    )
    parser.add_argument("--config", type=Path, help="TOML settings file the service reads")
    parser.add_argument(
        "--venv",
        type=Path,
        default=Path(sys.prefix),
        help="virtual environment holding bin/medserve (default: this one)",
    )
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="client network besides localhost (repeat for more)",
    )
    parser.add_argument("--memory-max", help="MemoryMax (e.g. 16G); default: from the models")
    parser.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    parser.add_argument("--name", default="medserve", help="unit name (default: medserve)")
    parser.add_argument("--print", action="store_true", help="print the unit, change nothing")
    args = parser.parse_args(argv)
    try:
        params = _params(args, argv)
        unit = render_unit(params)
    except (ServiceError, SettingsError) as exc:
        print(f"medserve install-service: {exc}", file=sys.stderr)
        return 2
    if args.print:
        sys.stdout.write(unit)
        return 0
    return _install(args, params, unit)


def _params(args: argparse.Namespace, argv: list[str]) -> ServiceParams:
    allow = parse_allow(args.allow)  # the cheap checks first
    home = args.home.expanduser().absolute()
    venv = args.venv.expanduser().absolute()
    exec_start = venv / "bin" / "medserve"
    if not os.access(exec_start, os.X_OK):
        raise ServiceError(f"--venv {venv}: {exec_start} is missing; give the venv medserve is in")
    config = args.config.expanduser().absolute() if args.config else None
    settings = _service_settings(home, config)
    if args.memory_max:
        memory = parse_memory(args.memory_max)
    else:
        memory = memory_max_bytes(_memory_needs(settings))
    return ServiceParams(
        name=args.name,
        user=args.user,
        group=_group_of(args.user),
        home=home,
        exec_start=exec_start,
        config=config,
        allow=allow,
        memory_max_bytes=memory,
        drain_timeout_s=settings.server.drain_timeout_s,
        port=settings.server.port,
        device=settings.engine.device,
        read_only_paths=tuple(_read_paths(venv, settings, config)),
        extra_write_paths=tuple(_write_paths(settings, home)),
        generated_by=" ".join(
            shlex.quote(a)
            for a in ["medserve", "install-service", *(a for a in argv if a != "--print")]
        ),
    )


def _service_settings(home: Path, config: Path | None) -> Settings:
    """The settings the service will see: its MEDSERVE_HOME and config file, none of this
    shell's MEDSERVE_* variables (the unit does not pass them on)."""
    with _environ("MEDSERVE_HOME", str(home)):
        return load_settings(config, env={"MEDSERVE_HOME": str(home)})


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    # Settings defaults (models_dir, cases.data_dir, ...) read MEDSERVE_HOME from os.environ.
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _memory_needs(settings: Settings) -> dict[str, tuple[int, int]]:
    engine = settings.engine
    if not engine.enabled:
        return {}
    names = dict.fromkeys([engine.model, *engine.served_models])
    dirs = {name: engine.models_dir / name for name in names}
    missing = [f"{name} ({d})" for name, d in dirs.items() if try_read_manifest(d) is None]
    if missing:
        raise ServiceError(
            f"cannot size MemoryMax: model(s) not prepared: {', '.join(missing)}. Prepare them "
            f"first (e.g. `MEDSERVE_HOME=... medserve setup`) or pass --memory-max, e.g. 16G"
        )
    return memory_needs(dirs, engine.kv_cache_gb)


def _read_paths(venv: Path, settings: Settings, config: Path | None) -> list[Path]:
    """What the service reads: its venv and the engine venvs beside it (.venv-NAME), the
    Python each is built on (a venv only links to it), the source tree of an editable install,
    the models, the config and TLS files."""
    venvs = [venv, *sorted(p for p in venv.parent.glob(".venv-*") if (p / "pyvenv.cfg").is_file())]
    paths = [*venvs, SOURCE_TREE, settings.engine.models_dir]
    for v in venvs:
        python = (v / "bin" / "python").resolve()
        paths.append(python.parent.parent)
    if config is not None:
        paths.append(config)
    server = settings.server
    paths += [
        Path(p).expanduser() for p in (server.tls_cert, server.tls_key, server.tls_client_ca) if p
    ]
    return [p.absolute() for p in paths]


def _write_paths(settings: Settings, home: Path) -> list[Path]:
    dirs = []
    if settings.cases.enabled:
        dirs.append(settings.cases.data_dir)
    if settings.audit.enabled:
        dirs.append(settings.audit.dir)
    return [d.absolute() for d in dirs if home not in d.absolute().parents and d != home]


def _group_of(user: str) -> str:
    try:
        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:
        return user  # useradd --user-group creates it with the user's name


def _install(args: argparse.Namespace, params: ServiceParams, unit: str) -> int:
    root = os.geteuid() == 0
    if root:
        try:
            _ensure_user(params.user, params.home)
            # The group useradd just made, or a pre-existing user's own group.
            params = dataclasses.replace(params, group=_group_of(params.user))
            unit = render_unit(params)
            _ensure_home(params.home, params.user)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"medserve install-service: {exc}", file=sys.stderr)
            return 1
    else:
        print(
            f"not root: user {params.user!r} and {params.home} left as they are (create the "
            f"user and folder, owned by it, yourself)",
            file=sys.stderr,
        )
    path = args.unit_dir / f"{params.name}.service"
    try:
        args.unit_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(unit, encoding="utf-8")
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except OSError as exc:
        print(f"medserve install-service: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} (MemoryMax={params.memory_max_bytes // 1024**2}M)")
    for warning in _unreachable(params):
        print(f"warning: {warning}", file=sys.stderr)
    if root and SYSTEMD_RUNNING.is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        print("ran: systemctl daemon-reload")
    else:
        print("systemd is not running here (or not root): no daemon-reload")
    print("next:")
    print(f"  systemd-analyze security {params.name}")
    print(f"  systemctl enable --now {params.name}")
    print(f"  journalctl -u {params.name} -o cat -f | jq")
    return 0


def _ensure_user(user: str, home: Path) -> None:
    try:
        pwd.getpwnam(user)
        print(f"user {user!r} exists")
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                str(home),
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                user,
            ],
            check=True,
        )
        print(f"created system user {user!r}")


def _ensure_home(home: Path, user: str) -> None:
    """Create the data folder and hand it, with what is already in it, to the service user."""
    entry = pwd.getpwnam(user)
    home.mkdir(mode=0o750, parents=True, exist_ok=True)
    # HOME is the data folder in the unit. nncf pulls in openvino-telemetry, which reads its
    # consent from ~/intel/openvino_telemetry; without the file it makes a client id and tries
    # to resolve its collector (refused by the egress guard and IPAddressDeny, but logged).
    # The set-up records the same opt-out for the installing user.
    consent = home / "intel" / "openvino_telemetry"
    if not consent.exists():
        consent.parent.mkdir(mode=0o700, exist_ok=True)
        consent.write_text("0", encoding="utf-8")
    os.chown(home, entry.pw_uid, entry.pw_gid)
    for folder, dirnames, filenames in os.walk(home):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(folder, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    print(f"{home} owned by {user}")


def _unreachable(params: ServiceParams) -> list[str]:
    """Paths the service user cannot reach because a parent folder is closed to others
    (folders under /home and /root are bound into the sandbox, but permissions still apply)."""
    problems = []
    for path in params.read_only_paths:
        for parent in [*reversed(path.parents), path]:
            if under_home_roots(parent) and parent != path:
                continue
            try:
                mode = parent.stat().st_mode
            except OSError:
                break
            if parent.is_dir() and not mode & 0o001:
                problems.append(
                    f"{path}: {parent} is closed to other users (chmod o+x, or move it)"
                )
                break
    return problems
