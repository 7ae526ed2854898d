"""`medserve audit verify|rotate`: check the hash chain of the audit trail, or start a new file.

verify exits 0 when the chain is intact, 1 when it is not (each problem on its own line), 2 on
usage errors -- so a nightly cron job can alert on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medserve.server.audit.chain import GENESIS, verify
from medserve.server.audit.writer import rotate, trail_files


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medserve audit", description="audit trail tools")
    parser.add_argument("--config", type=Path, help="TOML settings file (or env MEDSERVE_CONFIG)")
    parser.add_argument("--dir", type=Path, help="audit folder; default: audit.dir from settings")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check the hash chain (every file, oldest first)")
    check.add_argument(
        "--file", type=Path, action="append", help="verify only these files, in this order"
    )
    check.add_argument(
        "--expect-head",
        help="a head hash noted earlier: fails if it is no longer in the trail (truncation)",
    )
    commands.add_parser("rotate", help="close audit.jsonl and continue the chain in a new file")
    args = parser.parse_args(argv)
    # Keep stdout for the verdict: the writer's own log lines (rotation) go to stderr as JSON.
    from medserve.server.logging_setup import configure_logging

    configure_logging("warning")

    if args.command == "verify" and args.file:
        files = list(args.file)
    else:
        try:
            directory = args.dir or _audit_dir_from_settings(args.config)
        except ValueError as exc:  # SettingsError names the bad key
            print(f"medserve audit: configuration error: {exc}", file=sys.stderr)
            return 2
        if args.command == "rotate":
            rotated = rotate(directory)
            print(f"rotated to {rotated[0]}; head {rotated[1]}" if rotated else "nothing to rotate")
            return 0
        files = trail_files(directory)
        if not files:
            print(f"medserve audit: no audit files in {directory}", file=sys.stderr)
            return 2
    missing = [f for f in files if not f.is_file()]
    if missing:
        print(f"medserve audit: no such file: {missing[0]}", file=sys.stderr)
        return 2
    result = verify(files, expect_head=args.expect_head)
    for problem in result.problems:
        print(f"FAIL {problem}")
    if result.starts_after != GENESIS:
        print(
            f"note: the first record continues an earlier file (prev {result.starts_after[:16]}"
            "...); files before it were not checked"
        )
    state = "ok" if result.ok else "BROKEN"
    print(
        f"{state}: {result.records} records in {len(files)} file(s); "
        f"head seq {result.head_seq} hash {result.head}"
    )
    return 0 if result.ok else 1


def _audit_dir_from_settings(config: Path | None) -> Path:
    from medserve.server.settings import load_tool_settings

    return load_tool_settings(config).audit.dir
