"""File work under a model version: copy with progress, seal read-only, unseal, delete.

Kept apart from ``versions.py`` so the store reads as decisions (which version, which link)
while this module does the byte and permission work those decisions need.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

CHUNK = 4 << 20
FILE_MODE = 0o444
DIR_MODE = 0o555


def tree_files(folder: Path) -> Iterator[Path]:
    """Regular files under ``folder`` (symlinks followed), sorted, as copy and size see them."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            yield path


def tree_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in tree_files(folder))


def copy_tree(source: Path, dest: Path, *, progress: bool = False) -> dict[str, str]:
    """Copy the files of ``source`` into the new folder ``dest``; ``{relative path: sha256}``.

    Symlinks are followed, so a version holds its own bytes rather than pointing outside
    itself. The digests are of the bytes read from the source, so the caller can check that
    the copy on disk (hashed again for SHA256SUMS) is what was read.
    """
    from tqdm import tqdm

    source, dest = Path(source), Path(dest)
    files = list(tree_files(source))
    dest.mkdir()
    digests: dict[str, str] = {}
    total = sum(path.stat().st_size for path in files)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="copy", disable=not progress, leave=False
    ) as bar:
        for path in files:
            relative = path.relative_to(source)
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with open(path, "rb") as src, open(target, "wb") as out:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            digests[relative.as_posix()] = digest.hexdigest()
    return digests


def seal(folder: Path) -> None:
    """Files 0o444, folders 0o555, deepest first so the walk never locks itself out."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(FILE_MODE)
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(DIR_MODE)
    folder.chmod(DIR_MODE)


def unseal(folder: Path) -> None:
    """Owner-writable again, top down (a folder must be writable before its entries change)."""
    folder = Path(folder)
    folder.chmod(folder.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(
                    path.stat().st_mode | stat.S_IWUSR | (stat.S_IXUSR if name in dirs else 0)
                )


def remove_tree(folder: Path) -> None:
    """Delete a (possibly sealed, possibly half-built) folder."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    unseal(folder)
    shutil.rmtree(folder)


def writable_entries(folder: Path) -> list[str]:
    """Relative paths under a sealed folder that someone made writable again."""
    folder = Path(folder)
    found = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        if not path.is_symlink() and path.stat().st_mode & 0o222:
            found.append(path.relative_to(folder).as_posix() if path != folder else ".")
    return found
