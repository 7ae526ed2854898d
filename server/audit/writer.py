"""The append-only audit file: ``<audit.dir>/audit.jsonl`` plus rotated ``audit-*.jsonl``.

Durability: a request waits until its record is written and (with ``audit.fsync``, the default)
fsynced, before its response is sent -- so an acknowledged access is never missing after a
power cut.  The writer thread takes every record queued while the previous fsync ran and writes
them with one fsync (group commit), which keeps the cost at one fsync per batch, not per record,
under load, and keeps the event loop free (it only awaits a future).

Several processes may share one trail (a second server on the same home, `medserve audit
rotate` while the server runs): every batch takes an exclusive lock on ``audit.lock`` and reads
the chain's head from the file's tail, so the chain stays one sequence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
from medserve.server.audit.chain import GENESIS, last_record, seal
from medserve.server.durable import fsync_dir

log = structlog.get_logger("medserve.audit")

CURRENT = "audit.jsonl"
_TAIL_BYTES = 65536
_MAX_BATCH = 512


class AuditWriteError(RuntimeError):
    """A record could not be made durable; the request it belongs to must fail."""


def trail_files(directory: Path) -> list[Path]:
    """Every file of the trail, oldest first (rotated names sort by time, then sequence)."""
    rotated = sorted(directory.glob("audit-*.jsonl"))
    current = directory / CURRENT
    return [*rotated, current] if current.exists() else rotated


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / "audit.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rotate(directory: Path, *, fsync: bool = True) -> tuple[str, str] | None:
    """Closes the current file under a new name and starts a new one whose first record
    links to it.  Returns (rotated file name, head hash), or None when there is nothing to
    rotate."""
    with locked(directory):
        return _rotate_locked(directory, fsync)


def _rotate_locked(directory: Path, fsync: bool) -> tuple[str, str] | None:
    current = directory / CURRENT
    if not current.exists() or current.stat().st_size == 0:
        return None
    head = _head_of(current) or (GENESIS, 0)
    name = f"audit-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{head[1]:012d}.jsonl"
    os.rename(current, directory / name)
    marker = {"v": 1, "time": utc_now(), "action": "audit.rotated", "previous_file": name}
    line, digest = seal(marker, head[1] + 1, head[0])
    fd = os.open(current, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)
    with contextlib.suppress(Exception):  # may run on the writer thread: never fail a batch
        log.info("audit.rotated", rotated_file=name, head=head[0], head_seq=head[1])
    return name, digest


def _head_of(path: Path) -> tuple[str, int] | None:
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - _TAIL_BYTES))
        return last_record(handle.read())


def utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


_Item = tuple[dict[str, Any], concurrent.futures.Future[None]]


class AuditLog:
    """Started and stopped with the app; ``append`` is what the middleware awaits."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        max_file_bytes: int = 0,
        write_timeout_s: float = 10.0,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.max_file_bytes = max_file_bytes
        self.write_timeout_s = write_timeout_s
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._thread = threading.Thread(target=self._run, name="medserve-audit", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        try:
            head = _head_of(self.directory / CURRENT)
        except OSError:
            head = None
        if head is not None:
            # An anchor outside the trail: truncating the trail later contradicts this line.
            log.info("audit.head", head=head[0], head_seq=head[1])

    async def append(self, record: dict[str, Any]) -> None:
        """Returns once the record is durable; raises AuditWriteError otherwise."""
        if self._thread is None:
            raise AuditWriteError("the audit writer is not running")
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((record, future))
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), self.write_timeout_s)
        except TimeoutError:
            raise AuditWriteError(
                f"audit write took longer than {self.write_timeout_s} s"
            ) from None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self._write([record for record, _ in batch])
            except Exception as exc:
                failure = AuditWriteError(f"{type(exc).__name__}: {exc}")
                for _, future in batch:
                    future.set_exception(failure)
                # After the futures: nothing here may leave a request waiting.
                with contextlib.suppress(Exception):
                    log.error("audit.write_failed", exc_type=type(exc).__name__, error=str(exc))
            else:
                for _, future in batch:
                    future.set_result(None)
            if stop:
                return

    def _write(self, records: list[dict[str, Any]]) -> None:
        with locked(self.directory):
            path = self.directory / CURRENT
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                size = os.fstat(fd).st_size
                tail = os.pread(fd, min(size, _TAIL_BYTES), max(0, size - _TAIL_BYTES))
                head = last_record(tail) if size else self._head_of_rotated()
                prev, seq = head or (GENESIS, 0)
                lines = []
                if tail and not tail.endswith(b"\n"):
                    lines.append(b"\n")  # keep a torn line (a crash mid-write) on its own
                for record in records:
                    seq += 1
                    line, prev = seal(record, seq, prev)
                    lines.append(line)
                data = b"".join(lines)
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                if self.fsync:
                    os.fsync(fd)
                size += len(data)
            finally:
                os.close(fd)
            if size == len(data):
                fsync_dir(self.directory)  # a new file: make its name durable too
            if self.max_file_bytes and size >= self.max_file_bytes:
                _rotate_locked(self.directory, self.fsync)

    def _head_of_rotated(self) -> tuple[str, int] | None:
        rotated = sorted(self.directory.glob("audit-*.jsonl"))
        return _head_of(rotated[-1]) if rotated else None
