"""The hash chain: each record carries ``prev`` (the previous record's hash) and ``hash``
(SHA-256 of its own canonical JSON without ``hash``).

What verification detects: an edited record (its hash no longer matches), a deleted or
inserted record and a reordering (``prev`` and ``seq`` stop following on), a torn line.  What it
cannot detect alone: records cut off the end of the newest file, a deleted newest file, or a
rewrite that recomputes every hash after the edit -- plain SHA-256 lets anyone (an auditor
without secrets) verify, but also lets someone who can write the file rebuild it.  Those need an
anchor kept elsewhere: note the head hash `medserve audit verify` prints (the server also logs
it at every rotation and at shutdown) and later pass it as ``--expect-head``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

GENESIS = "0" * 64
"""``prev`` of the very first record of a trail."""

_encoder = msgspec.json.Encoder(order="sorted")


def seal(record: dict[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
    """The record as one JSON line (with seq, prev and hash added), and its hash."""
    body = {**record, "seq": seq, "prev": prev}
    digest = hashlib.sha256(_encoder.encode(body)).hexdigest()
    return _encoder.encode({**body, "hash": digest}) + b"\n", digest


@dataclass
class Verification:
    records: int = 0
    head: str = GENESIS
    """Hash of the last record: the anchor to keep elsewhere."""
    head_seq: int = 0
    starts_after: str = GENESIS
    """``prev`` of the first record checked: not GENESIS when earlier files are absent."""
    problems: list[str] = field(default_factory=list)
    hashes: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(files: Iterable[Path], expect_head: str | None = None) -> Verification:
    """Checks the files as one chain, oldest first."""
    result = Verification()
    prev: str | None = None
    prev_seq: int | None = None
    for path in files:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                where = f"{path.name}:{number}"
                record = _parse(line)
                if record is None:
                    result.problems.append(f"{where}: not a complete audit record (torn or edited)")
                    continue
                stored = record.pop("hash")
                body_hash = hashlib.sha256(_encoder.encode(record)).hexdigest()
                if body_hash != stored:
                    result.problems.append(f"{where}: record was altered (hash mismatch)")
                if prev is None:
                    result.starts_after = record["prev"]
                elif record["prev"] != prev:
                    result.problems.append(
                        f"{where}: chain broken: prev does not match the record before it "
                        f"(a record was deleted, inserted or moved)"
                    )
                if prev_seq is not None and record["seq"] != prev_seq + 1:
                    result.problems.append(
                        f"{where}: seq {record['seq']} follows {prev_seq} (records missing or "
                        f"out of order)"
                    )
                prev, prev_seq = stored, record["seq"]
                result.records += 1
                result.hashes.add(stored)
    if prev is not None:
        result.head, result.head_seq = prev, prev_seq or 0
    if expect_head and expect_head not in result.hashes:
        result.problems.append(
            f"expected head {expect_head[:16]}... is not in the trail: records were cut off the "
            f"end or the trail was rewritten"
        )
    return result


def last_record(data: bytes) -> tuple[str, int] | None:
    """(hash, seq) of the last complete record in the tail ``data`` of a file."""
    for line in reversed(data.splitlines()):
        record = _parse(line)
        if record is not None:
            return record["hash"], record["seq"]
    return None


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    if not isinstance(record.get("hash"), str) or not isinstance(record.get("prev"), str):
        return None
    if not isinstance(record.get("seq"), int):
        return None
    return record
