"""``SHA256SUMS``: the checksum manifest of a folder, in ``sha256sum`` format.

One line per regular file, ``<hex digest>  <relative path>`` (POSIX separators, sorted), so
hospital IT can check a model version or an offline bundle with plain ``sha256sum -c
SHA256SUMS`` as well as with ``medserve doctor``.  The manifest does not list itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from medserve.models.manifest import sha256_of

SUMS_NAME = "SHA256SUMS"


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.relative_to(folder) != Path(SUMS_NAME):
            yield path


def write_sha256sums(folder: Path, on_file: Callable[[Path, int], None] | None = None) -> Path:
    """Hash every file under ``folder`` into ``folder/SHA256SUMS`` (written atomically).

    ``on_file(path, size)`` is called after each file, for a progress bar over large weights.
    """
    folder = Path(folder)
    lines = []
    for path in _files(folder):
        lines.append(f"{sha256_of(path)}  {path.relative_to(folder).as_posix()}\n")
        if on_file is not None:
            on_file(path, path.stat().st_size)
    target = folder / SUMS_NAME
    tmp = target.with_name(SUMS_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def read_sha256sums(folder: Path) -> dict[str, str]:
    """``{relative path: digest}`` from ``folder/SHA256SUMS``; ValueError on a malformed line."""
    sums: dict[str, str] = {}
    text = (Path(folder) / SUMS_NAME).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise ValueError(f"{SUMS_NAME} line {number} is not '<sha256>  <path>'")
        sums[name] = digest.lower()
    return sums


def verify_sha256sums(
    folder: Path, on_file: Callable[[Path, int], None] | None = None
) -> list[str]:
    """Problems found checking ``folder`` against its ``SHA256SUMS``; empty when it matches.

    Missing, changed and unlisted files are all problems: a version folder is immutable, so
    anything added after it was sealed is as suspect as anything changed.
    """
    folder = Path(folder)
    try:
        expected = read_sha256sums(folder)
    except FileNotFoundError:
        return [f"{folder}: no {SUMS_NAME}"]
    except (OSError, ValueError) as exc:
        return [f"{folder}/{SUMS_NAME}: {exc}"]
    problems = []
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    for name, digest in expected.items():
        path = present.get(name)
        if path is None:
            problems.append(f"{name}: missing")
            continue
        if sha256_of(path) != digest:
            problems.append(f"{name}: sha256 differs (changed or damaged)")
        if on_file is not None:
            on_file(path, path.stat().st_size)
    problems.extend(f"{name}: not in {SUMS_NAME}" for name in present.keys() - expected.keys())
    return problems
