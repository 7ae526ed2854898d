"""`medserve doctor`: a one-screen health report of this host for hospital IT.

    medserve doctor [--config PATH] [--json] [--no-checksums]

Runs every check (doctor_checks.py: CPU, engines, memory, disk, model folders;
doctor_access.py: port, permissions, TLS, environment), prints one line per check with a hint
under each warning or failure, and exits 1 if any check failed (warnings alone: 0), so a
monitoring job or an install script can run it as is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medserve.installer import doctor_access as access
from medserve.installer import doctor_checks as checks
from medserve.installer.doctor_checks import FAIL, OK, WARN, Check
from medserve.models.manifest import default_home
from medserve.server.settings import Settings, SettingsError, load_tool_settings


def served_models(settings: Settings) -> list[str]:
    """The names the server would serve, in its order (server/app.py build_backend)."""
    engine = settings.engine
    if not engine.enabled:
        return []
    return [engine.model, *[n for n in engine.served_models if n != engine.model]]


def run_checks(
    settings: Settings | None,
    config_check: Check,
    verify: bool = True,
    progress: Callable[[str, int], checks.Progress | None] | None = None,
) -> list[Check]:
    """All checks; without settings (a configuration error) only those that need none."""
    cpuinfo = checks.read_cpuinfo()
    results = [
        config_check,
        checks.check_cpu(cpuinfo),
        checks.check_fast_paths(cpuinfo),
        checks.check_engines(),
    ]
    if settings is None:
        return [*results, access.check_environment()]
    home, engine, server = default_home(), settings.engine, settings.server
    model_dirs = {name: engine.models_dir / name for name in served_models(settings)}
    model_checks = [checks.check_model(n, engine.models_dir, verify, progress) for n in model_dirs]
    largest = max((c.data.get("size_bytes", 0) for c in model_checks), default=0)
    folders = {"home": home, "models_dir": engine.models_dir}
    if settings.cases.enabled:
        folders["cases"] = settings.cases.data_dir
    return [
        *results,
        checks.check_memory(model_dirs, engine.kv_cache_gb),
        checks.check_disk(folders, largest),
        *model_checks,
        access.check_port(server.host, server.port, tls=bool(server.tls_cert)),
        access.check_permissions(settings, home),
        access.check_tls(settings),
        access.check_environment(),
    ]


def load(config: Path | None) -> tuple[Settings | None, Check]:
    try:
        settings = load_tool_settings(config)
    except SettingsError as exc:
        return None, Check("config", FAIL, str(exc), "fix the setting; the server will not start")
    source = str(config) if config else "defaults + MEDSERVE_* environment"
    return settings, Check("config", OK, f"{source}; home {default_home()}")


def summary(results: list[Check]) -> dict[str, Any]:
    counts = {s: sum(c.status == s for c in results) for s in (OK, WARN, FAIL)}
    cpu = next((c.data.get("cpu_model") for c in results if c.name == "cpu"), None)
    return counts | {"host": socket.gethostname(), "cpu_model": cpu, "home": str(default_home())}


def render(results: list[Check], exit_code: int) -> str:
    """One line per check; a hint line under each warning or failure."""
    lines = [f"medserve doctor  {socket.gethostname()}  {time.strftime('%Y-%m-%d %H:%M %Z')}"]
    width = max(len(c.name) for c in results)
    indent = " " * (width + 10)
    columns = max(80, shutil.get_terminal_size((100, 30)).columns)
    for c in results:
        mark = c.status if c.status == OK else c.status.upper()
        text = f"  {mark:<5} {c.name:<{width}}  {c.detail}"
        lines += textwrap.wrap(text, columns, subsequent_indent=indent)
        if c.hint and c.status != OK:
            hint = f"{indent}-> {c.hint}"
            lines += textwrap.wrap(hint, columns, subsequent_indent=indent + "   ")
    s = summary(results)
    lines.append(f"{s[OK]} ok, {s[WARN]} warning(s), {s[FAIL]} failure(s): exit {exit_code}")
    return "\n".join(lines)


def hashing_progress(name: str, total: int) -> checks.Progress:
    """A \\r-updated line on stderr while a model's SHA256SUMS is verified."""
    done = 0

    def on_file(path: Path, size: int) -> None:
        nonlocal done
        done += size
        print(f"\r  hashing {name}: {done >> 20}/{total >> 20} MiB", end="", file=sys.stderr)

    return on_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medserve doctor", description="health report of this host (exit 1 on a failure)"
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (or env MEDSERVE_CONFIG)")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument("--no-checksums", action="store_true", help="skip SHA256SUMS hashing")
    args = parser.parse_args(argv)

    settings, config_check = load(args.config)
    progress = hashing_progress if sys.stderr.isatty() else None
    results = run_checks(settings, config_check, not args.no_checksums, progress)
    if progress is not None:
        print("\r\033[K", end="", file=sys.stderr, flush=True)  # erase the last progress line
    exit_code = 1 if any(c.status == FAIL for c in results) else 0
    if args.json:
        report = {
            "checks": [c.to_json() for c in results],
            "summary": summary(results),
            "exit_code": exit_code,
        }
        print(json.dumps(report, indent=2))
    else:
        print(render(results, exit_code))
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
