"""`medserve models list|install|activate|rollback|remove|verify`: versioned model folders.

Runs on the server's machine as the service user, like `medserve keys`: whoever may write
``models_dir`` administers the models. Changing the active version only moves a symlink; a
running server serves the new version after a reload.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medserve.models.version_files import tree_size
from medserve.models.versions import ModelStore, ModelVersion, VersionError

RELOAD_HINT = (
    "A running server picks it up on reload: `systemctl reload medserve` (SIGHUP) "
    "or `POST /admin/reload` with an admin key."
)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        store = ModelStore(args.models_dir or _models_dir_from_settings(args.config))
        return _COMMANDS[args.command](store, args)
    except (ValueError, OSError) as exc:
        # VersionError, ManifestError and SettingsError are ValueErrors: a refusal is one
        # line saying what to do, never a traceback.
        print(f"medserve models: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    # The common options work before or after the subcommand; SUPPRESS keeps a subcommand's
    # absent flag from overwriting one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models-dir", type=Path, default=argparse.SUPPRESS)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="medserve models", description="install, activate and roll back model versions"
    )
    parser.add_argument("--models-dir", type=Path, default=None, help="default: engine.models_dir")
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", parents=[common], help="models and their versions")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    install = commands.add_parser("install", parents=[common], help="seal a folder as a version")
    install.add_argument("source", type=Path, help="model folder with medserve.json")
    install.add_argument("--name", help="model name (default: the name in medserve.json)")
    install.add_argument("--version", help="version id (default: the next free vN)")
    install.add_argument("--move", action="store_true", help="move the folder instead of copying")
    install.add_argument("--activate", action="store_true", help="serve it once installed")

    activate = commands.add_parser("activate", parents=[common], help="serve a version")
    activate.add_argument("name")
    activate.add_argument("version")
    activate.add_argument("--no-verify", action="store_true", help="skip the sha256 check")

    rollback = commands.add_parser("rollback", parents=[common], help="serve the previous one")
    rollback.add_argument("name")

    remove = commands.add_parser("remove", parents=[common], help="delete an inactive version")
    remove.add_argument("name")
    remove.add_argument("version")

    verify = commands.add_parser("verify", parents=[common], help="check files against SHA256SUMS")
    verify.add_argument("name")
    verify.add_argument("version", nargs="?", help="default: the active version")
    return parser


def _models_dir_from_settings(config: Path | None) -> Path:
    from medserve.server.settings import load_tool_settings

    # The same file and MEDSERVE_* environment as the server, so both see the same folder.
    return load_tool_settings(config).engine.models_dir


def _list(store: ModelStore, args: argparse.Namespace) -> int:
    rows = [_row(v) for name in store.names() for v in store.versions(name)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {store.models_dir}")
        return 0
    header = ("NAME", "VERSION", "", "PRECISION", "ENGINE", "INSTALLED", "SIZE")
    table = [header] + [
        (
            r["name"],
            r["version"],
            "*" if r["active"] else "",
            r["precision"],
            r["engine"],
            r["installed"],
            _human(r["size_bytes"]),
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _row(version: ModelVersion) -> dict[str, object]:
    return {
        "name": version.name,
        "version": version.version,
        "active": version.active,
        "precision": version.manifest.precision,
        "engine": version.manifest.engine,
        "installed": version.installed,
        "size_bytes": tree_size(version.path),
        "path": str(version.path),
    }


def _install(store: ModelStore, args: argparse.Namespace) -> int:
    installed = store.install(
        args.source,
        args.name,
        args.version,
        move=args.move,
        activate=args.activate,
        progress=sys.stderr.isatty(),
    )
    print(f"installed {installed.name} {installed.version} at {installed.path}")
    if installed.active:
        print(f"{installed.name} now serves {installed.version}. {RELOAD_HINT}")
    else:
        print(f"serve it with: medserve models activate {installed.name} {installed.version}")
    return 0


def _activate(store: ModelStore, args: argparse.Namespace) -> int:
    before = store.active(args.name)
    after = store.activate(args.name, args.version, verify=not args.no_verify)
    return _switched(before, after)


def _rollback(store: ModelStore, args: argparse.Namespace) -> int:
    before = store.active(args.name)
    return _switched(before, store.rollback(args.name))


def _switched(before: ModelVersion | None, after: ModelVersion) -> int:
    was = f" (was {before.version})" if before is not None else ""
    print(f"{after.name} now serves {after.version}{was}. {RELOAD_HINT}")
    return 0


def _remove(store: ModelStore, args: argparse.Namespace) -> int:
    store.remove(args.name, args.version)
    print(f"removed {args.name} {args.version}")
    return 0


def _verify(store: ModelStore, args: argparse.Namespace) -> int:
    version = args.version or (store.active(args.name) or _none(args.name)).version
    problems = store.verify(args.name, args.version)
    if not problems:
        print(f"{args.name} {version}: intact")
        return 0
    for problem in problems:
        print(f"{args.name} {version}: {problem}")
    print(
        f"medserve models: {args.name} {version} has {len(problems)} problem(s); remove it and "
        f"install it again from a good copy",
        file=sys.stderr,
    )
    return 1


def _none(name: str) -> ModelVersion:
    raise VersionError(f"{name} has no active version; name one to verify")


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


_COMMANDS = {
    "list": _list,
    "install": _install,
    "activate": _activate,
    "rollback": _rollback,
    "remove": _remove,
    "verify": _verify,
}
