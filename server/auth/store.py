"""The key file (``auth.keys_file``, default ~/.medserve/keys.json) and its live view.

Writes are atomic (temp file, fsync, rename, fsync of the folder) with mode 0600, under an
exclusive lock so two `medserve keys` commands cannot lose each other's change.  The server
never writes it; it re-reads it when its (inode, size, mtime) changes, checked with one
``stat`` per request, so `medserve keys revoke` takes effect on the next request without a
restart or a signal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import structlog
from medserve.server.auth.keys import KeyRecord
from medserve.server.durable import write_atomically

log = structlog.get_logger("medserve.auth")


class KeyFileError(RuntimeError):
    """The key file exists but cannot be read or parsed."""


class _KeyFile(msgspec.Struct):
    version: int = 1
    keys: list[KeyRecord] = []


def read_keys(path: Path) -> dict[str, KeyRecord]:
    """Records by key id; an absent file is an empty store."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        parsed = msgspec.json.decode(data, type=_KeyFile)
    except msgspec.DecodeError as exc:
        raise KeyFileError(f"key file {path} is damaged: {exc}") from None
    return {record.id: record for record in parsed.keys}


def write_keys(path: Path, records: dict[str, KeyRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = msgspec.json.format(
        msgspec.json.encode(_KeyFile(keys=sorted(records.values(), key=lambda r: r.created_at)))
    )
    write_atomically(path, data + b"\n")


@contextlib.contextmanager
def editing(path: Path) -> Iterator[dict[str, KeyRecord]]:
    """Read-modify-write under an exclusive lock; the dict is written back on success."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        os.chmod(lock_path, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = read_keys(path)
        yield records
        write_keys(path, records)


class LiveKeys:
    """The server's view of the key file, reloaded whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._records: dict[str, KeyRecord] = {}
        self._damaged = False
        self.refresh()

    def refresh(self) -> dict[str, KeyRecord]:
        """The current records.  A damaged file yields no valid key (fail closed) until fixed."""
        try:
            st = os.stat(self.path)
            signature: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        if signature == self._signature and not self._damaged:
            return self._records
        self._signature = signature
        try:
            self._records = read_keys(self.path) if signature is not None else {}
            self._damaged = False
            log.info("auth.keys_loaded", keys_file=str(self.path), keys=len(self._records))
        except KeyFileError as exc:
            if not self._damaged:
                log.error("auth.keys_unreadable", error=str(exc))
            self._records = {}
            self._damaged = True
        return self._records

    @property
    def damaged(self) -> bool:
        return self._damaged
