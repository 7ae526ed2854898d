"""Case ids in the audit trail as keyed HMACs: the same case always maps to the same value, so
an auditor can follow one patient's case through the trail (given its id and the key), but the
trail alone reveals no id.  A plain hash would not do: ids such as MRNs are guessable, and
hashing every candidate would reverse it."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path


def load_or_create_key(path: Path) -> bytes:
    """The 32-byte key in ``path`` (mode 0600), created on first use.

    Created under a temporary name and hard-linked into place, so two processes starting
    together agree on one key (the loser of the race reads the winner's).
    """
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    finally:
        os.unlink(temp)
    return bytes.fromhex(path.read_text().strip())


class CaseIdHasher:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, case_id: str) -> str:
        # 128 bits: no collisions among any realistic number of cases.
        return hmac.new(self._key, case_id.encode(), hashlib.sha256).hexdigest()[:32]
