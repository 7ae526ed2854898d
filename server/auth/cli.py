"""`medserve keys create|list|revoke|rotate`: manage the scoped API keys in ``auth.keys_file``.

Runs on the server's own machine, as the service user: whoever can write the key file is the
administrator, so the commands need no key themselves.  A running server picks up every change
on its next request.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
from pathlib import Path

from medserve.server.auth.keys import KeyRecord, new_key, rotated
from medserve.server.auth.scopes import SCOPES, parse_scopes
from medserve.server.auth.store import KeyFileError, editing, read_keys

_DURATION = re.compile(r"^(\d+)([dh])$")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medserve keys", description="manage API keys")
    parser.add_argument("--config", type=Path, help="TOML settings file (or env MEDSERVE_CONFIG)")
    parser.add_argument("--keys-file", type=Path, help="default: auth.keys_file from settings")
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", help="issue a key (the token is printed once)")
    create.add_argument("--name", required=True, help="the integration, e.g. emr-ward-7")
    create.add_argument(
        "--scopes", required=True, help=f"comma-separated, from: {', '.join(SCOPES)}"
    )
    create.add_argument(
        "--network",
        action="append",
        default=[],
        help="client network allowed to use the key (CIDR; repeat for more); default: any",
    )
    create.add_argument("--expires", help="ISO date/time (UTC) or a duration like 90d or 12h")
    create.add_argument("--rpm", type=int, help="requests per minute (0: unlimited)")
    create.add_argument("--tpm", type=int, help="prompt+completion tokens per minute")
    create.add_argument("--max-streams", type=int, help="concurrent chat/completion requests")

    listing = commands.add_parser("list", help="show keys (ids and prefixes, never secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    for name, text in (("revoke", "refuse a key from now on"), ("rotate", "new secret, same key")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("key_id")

    args = parser.parse_args(argv)
    try:
        path = args.keys_file or _keys_file_from_settings(args.config)
        if args.command == "create":
            return _create(path, args)
        if args.command == "list":
            return _list(path, include_revoked=args.all)
        return _revoke(path, args.key_id) if args.command == "revoke" else _rotate(path, args)
    except (KeyFileError, ValueError) as exc:
        print(f"medserve keys: {exc}", file=sys.stderr)
        return 2


def _keys_file_from_settings(config: Path | None) -> Path:
    from medserve.server.settings import load_tool_settings

    return load_tool_settings(config).auth.keys_file


def _create(path: Path, args: argparse.Namespace) -> int:
    for flag in ("rpm", "tpm", "max_streams"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0 (0: unlimited)")
    if not args.name.strip():
        raise ValueError("--name must not be empty")
    with editing(path) as records:
        issued = new_key(
            args.name.strip(),
            parse_scopes(args.scopes),
            networks=tuple(args.network),
            expires_at=_expiry(args.expires),
            rpm=args.rpm,
            tpm=args.tpm,
            max_streams=args.max_streams,
            existing_ids=set(records),
        )
        records[issued.record.id] = issued.record
    _print_issued(issued.record, issued.token, path)
    return 0


def _rotate(path: Path, args: argparse.Namespace) -> int:
    with editing(path) as records:
        record = _find(records, args.key_id)
        if record.revoked_at is not None:
            raise ValueError(f"key {record.id} is revoked; create a new one instead")
        issued = rotated(record)
        records[record.id] = issued.record
    _print_issued(issued.record, issued.token, path)
    print("The previous token of this key no longer works.")
    return 0


def _revoke(path: Path, key_id: str) -> int:
    with editing(path) as records:
        record = _find(records, key_id)
        if record.revoked_at is None:
            records[record.id] = _replace(record, revoked_at=time.time())
    print(f"revoked {record.id} ({record.name}); a running server refuses it from its next request")
    return 0


def _list(path: Path, *, include_revoked: bool) -> int:
    rows = [r for r in read_keys(path).values() if include_revoked or r.revoked_at is None]
    if not rows:
        print(f"no keys in {path}")
        return 0
    header = ("ID", "PREFIX", "NAME", "SCOPES", "NETWORKS", "EXPIRES", "LIMITS", "STATUS")
    table = [header] + [
        (
            r.id,
            r.prefix + "...",
            r.name,
            ",".join(r.scopes),
            ",".join(r.networks) or "any",
            _date(r.expires_at) if r.expires_at else "never",
            _limits(r),
            r.status,
        )
        for r in sorted(rows, key=lambda r: r.created_at)
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


def _find(records: dict[str, KeyRecord], key_id: str) -> KeyRecord:
    # Accept the prefix as shown by `list` too (msk_<id>_xxxx...).
    key_id = key_id.removeprefix("msk_").split("_", 1)[0]
    if key_id not in records:
        raise ValueError(f"no key with id {key_id!r} (see `medserve keys list --all`)")
    return records[key_id]


def _replace(record: KeyRecord, **changes: object) -> KeyRecord:
    import msgspec

    return msgspec.structs.replace(record, **changes)


def _expiry(text: str | None) -> float | None:
    if text is None:
        return None
    match = _DURATION.match(text.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        return time.time() + amount * (86400 if unit == "d" else 3600)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--expires {text!r}: use an ISO date/time (2027-06-30, 2027-06-30T18:00) or 90d/12h"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if when.timestamp() <= time.time():
        raise ValueError(f"--expires {text!r} is in the past")
    return when.timestamp()


def _print_issued(record: KeyRecord, token: str, path: Path) -> None:
    print(f"key id:   {record.id}")
    print(f"name:     {record.name}")
    print(f"scopes:   {','.join(record.scopes)}")
    print(f"networks: {','.join(record.networks) or 'any'}")
    print(f"expires:  {_date(record.expires_at) if record.expires_at else 'never'}")
    print(f"limits:   {_limits(record)}")
    print(f"stored:   {path} (salted hash only)")
    print()
    print(token)
    print()
    print("This token is shown once. Give it to the integration now; it cannot be recovered.")


def _limits(record: KeyRecord) -> str:
    parts = [
        f"{label}={'default' if value is None else value or 'unlimited'}"
        for label, value in (
            ("rpm", record.rpm),
            ("tpm", record.tpm),
            ("streams", record.max_streams),
        )
    ]
    return " ".join(parts)


def _date(timestamp: float | None) -> str:
    return dt.datetime.fromtimestamp(timestamp or 0, dt.UTC).strftime("%Y-%m-%dT%H:%MZ")
