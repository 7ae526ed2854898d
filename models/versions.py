"""Immutable, versioned model folders and the link that says which one is served.

Layout under ``models_dir``::

    <name> -> .versions/<name>/<version>     relative symlink: the active version
    .versions/<name>/<version>/              sealed: medserve.json, weights, SHA256SUMS, read-only
    .versions/<name>/history.jsonl           one line per install and activation
    .versions/.<name>.lock                   serialises changes to one name

The server keeps reading ``models_dir/<name>/medserve.json``; it never needs to know about
versions. A version is built in a staging folder beside the others and renamed into place
only once it is complete, hashed and read-only, so a killed install leaves a staging folder
(cleaned by the next change) and never a half version. Switching versions replaces the
symlink with ``os.replace``: a reader sees the old folder or the new one, nothing between.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medserve.models.checksums import (
    SUMS_NAME,
    read_sha256sums,
    verify_sha256sums,
    write_sha256sums,
)
from medserve.models.manifest import MANIFEST_NAME, ManifestError, ModelManifest, read_manifest
from medserve.models.version_files import (
    copy_tree,
    remove_tree,
    seal,
    tree_size,
    unseal,
    writable_entries,
)
from medserve.server.durable import fsync_dir

VERSIONS_DIR = ".versions"
HISTORY_NAME = "history.jsonl"
UNVERSIONED = "unversioned"
STAGING_PREFIX = ".staging-"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DEFAULT_ID = re.compile(r"v([0-9]+)")
_ACTIVATIONS = ("activate", "rollback", "adopt")
LOCK_TIMEOUT_S = 10.0


class VersionError(ValueError):
    """A refused version operation; the message says what to do instead."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    path: Path
    """``models_dir/.versions/<name>/<version>`` (``models_dir/<name>`` when unversioned)."""
    active: bool
    installed: str
    """ISO time of the install (or adoption)."""
    manifest: ModelManifest


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ModelStore:
    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir).expanduser()
        self.root = self.models_dir / VERSIONS_DIR

    # ---- reading -------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Versioned names and plain model folders (anything with a medserve.json)."""
        found = set()
        if self.root.is_dir():
            for home in self.root.iterdir():
                # A name whose only entry is a killed install's staging folder is no model.
                if home.is_dir() and _NAME.fullmatch(home.name) and _has_versions(home):
                    found.add(home.name)
        if self.models_dir.is_dir():
            for entry in self.models_dir.iterdir():
                if not entry.name.startswith(".") and (entry / MANIFEST_NAME).is_file():
                    found.add(entry.name)
        return sorted(found)

    def versions(self, name: str) -> list[ModelVersion]:
        """Installed versions, oldest first; a plain folder is one ``unversioned`` entry."""
        home = self._home(name)
        current = self._active_id(name)
        listed = []
        if home.is_dir():
            installed = self._installed_times(name)
            # Install order is history order (times alone tie within a second).
            order = {version: i for i, version in enumerate(installed)}
            for path in home.iterdir():
                if path.is_dir() and _ID.fullmatch(path.name):
                    listed.append(self._version(name, path, installed, current))
            listed.sort(key=lambda v: (order.get(v.version, -1), v.installed, _natural(v.version)))
        link = self.models_dir / name
        if not link.is_symlink() and link.is_dir():
            listed.append(self._unversioned(name))
        return listed

    def active(self, name: str) -> ModelVersion | None:
        """The version ``models_dir/<name>`` serves, or None when nothing is there."""
        current = self._active_id(name)
        if current == UNVERSIONED:
            return self._unversioned(name)
        if current is None:
            return None
        path = self._home(name) / current
        return self._version(name, path, self._installed_times(name), current)

    def verify(self, name: str, version: str | None = None) -> list[str]:
        """Problems with a version's files (default: the active one); [] means intact."""
        if version is None:
            chosen = self.active(name)
            if chosen is None:
                raise VersionError(f"{name} has no active version; name one to verify")
            if chosen.version == UNVERSIONED:
                # A plain folder from setup/export has no SHA256SUMS unless someone wrote one.
                return verify_sha256sums(chosen.path)
            version = chosen.version
        path = self._existing(name, version)
        problems = verify_sha256sums(path)
        try:
            read_manifest(path)
        except ManifestError as exc:
            problems.append(str(exc))
        problems.extend(
            f"{entry}: writable (sealed versions are read-only)" for entry in writable_entries(path)
        )
        return problems

    # ---- changing ------------------------------------------------------------------------
    def install(
        self,
        source: Path,
        name: str | None = None,
        version: str | None = None,
        *,
        move: bool = False,
        activate: bool = False,
        progress: bool = False,
    ) -> ModelVersion:
        """Seal a copy (or, with ``move``, the folder itself) of ``source`` as a new version."""
        source = Path(source).expanduser()
        if not source.is_dir():
            raise VersionError(
                f"{source} is not a folder; give a model folder with {MANIFEST_NAME}"
            )
        try:
            manifest = read_manifest(source)
        except ManifestError as exc:
            raise VersionError(f"{exc}; only a finished model folder can be installed") from None
        name = name or manifest.name
        self._check_name(name)
        real = source.resolve()
        if move and (source.is_symlink() or real.is_relative_to(self.root.resolve())):
            raise VersionError(f"{source} is an installed version; install it without --move")
        with self._locked(name):
            self._clean_staging(name)
            plain = self.models_dir / name
            if not plain.is_symlink() and plain.is_dir():
                was = plain.resolve()
                adopted = self._adopt(name)
                if real == was:
                    # Installing the plain folder itself: adopting it was the whole job.
                    return adopted
            version = self._new_id(name, version)
            staged = self._stage(source, name, version, move=move, progress=progress)
            final = self._home(name) / version
            os.rename(staged, final)
            fsync_dir(final.parent)
            self._record(name, {"event": "install", "version": version, "time": _now()})
            if move and source.exists():
                remove_tree(source)  # moved across file systems: copied, now drop the original
            if activate:
                return self._switch(name, version, verify=False, event="activate")
            return self._version(name, final, self._installed_times(name), self._active_id(name))

    def activate(self, name: str, version: str, *, verify: bool = True) -> ModelVersion:
        """Point ``models_dir/<name>`` at ``version`` atomically (checksums checked first)."""
        self._check_name(name)
        with self._locked(name):
            return self._switch(name, version, verify=verify, event="activate")

    def rollback(self, name: str) -> ModelVersion:
        """Activate the version that was active before the current one."""
        self._check_name(name)
        with self._locked(name):
            current = self._active_id(name)
            stack = self._activation_stack(name)
            if current is not None and (not stack or stack[-1] != current):
                stack.append(current)
            present = {v.version for v in self.versions(name)}
            for candidate in reversed(stack[:-1]):
                if candidate != current and candidate in present:
                    return self._switch(name, candidate, verify=True, event="rollback")
            raise VersionError(
                f"{name} has no earlier active version to roll back to "
                f"(active: {current or 'none'}); use `medserve models activate {name} VERSION`"
            )

    def remove(self, name: str, version: str) -> None:
        """Delete an inactive version; the last one takes ``.versions/<name>`` with it."""
        self._check_name(name)
        with self._locked(name):
            path = self._existing(name, version)
            if self._active_id(name) == version:
                raise VersionError(
                    f"{name} {version} is active; activate another version (or "
                    f"`medserve models rollback {name}`) before removing it"
                )
            remove_tree(path)
            home = self._home(name)
            if _has_versions(home):
                self._record(name, {"event": "remove", "version": version, "time": _now()})
                fsync_dir(home)
            else:
                shutil.rmtree(home)
                fsync_dir(self.root)

    # ---- internals -----------------------------------------------------------------------
    def _home(self, name: str) -> Path:
        self._check_name(name)
        return self.root / name

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME.fullmatch(name or ""):
            raise VersionError(
                f"model name {name!r} is not allowed; use letters, digits, '.', '_' and '-' "
                f"(starting with a letter or digit, at most 128 characters)"
            )

    def _existing(self, name: str, version: str) -> Path:
        path = self._home(name) / version
        if not _ID.fullmatch(version or "") or not path.is_dir():
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise VersionError(f"{name} has no version {version!r} (installed: {known})")
        return path

    def _active_id(self, name: str) -> str | None:
        link = self.models_dir / name
        if not link.is_symlink():
            return UNVERSIONED if (link / MANIFEST_NAME).is_file() else None
        target = Path(os.readlink(link))
        if target.parent != Path(VERSIONS_DIR, name):
            raise VersionError(
                f"{link} links to {target}, not to a version under {VERSIONS_DIR}/{name}; "
                f"move that link away to manage {name} with `medserve models`"
            )
        return target.name if (link / MANIFEST_NAME).is_file() else None

    def _version(
        self, name: str, path: Path, installed: dict[str, str], current: str | None
    ) -> ModelVersion:
        try:
            manifest = read_manifest(path)
        except ManifestError:
            # Still listed, so it can be verified and removed; verify() says what is wrong.
            manifest = ModelManifest(name=name, precision="?", engine="?", format="?")
        when = installed.get(path.name) or _mtime(path)
        return ModelVersion(name, path.name, path, path.name == current, when, manifest)

    def _unversioned(self, name: str) -> ModelVersion:
        path = self.models_dir / name
        manifest = read_manifest(path)
        return ModelVersion(name, UNVERSIONED, path, True, _mtime(path / MANIFEST_NAME), manifest)

    def _new_id(self, name: str, version: str | None) -> str:
        home = self._home(name)
        if version is not None:
            if not _ID.fullmatch(version) or version == HISTORY_NAME:
                raise VersionError(
                    f"version {version!r} is not allowed; use 1-64 letters, digits, '.', '_' or "
                    f"'-', starting with a letter or digit (e.g. v3 or 2024-06-01)"
                )
            if (home / version).exists():
                raise VersionError(
                    f"{name} {version} already exists and versions never change; pick another "
                    f"--version (or leave it out for the next free vN)"
                )
            return version
        # Never reuse a removed id: history lines name it, and "v2" must always mean one thing.
        used = {p.name for p in home.iterdir()} if home.is_dir() else set()
        used |= {str(r.get("version")) for r in self._history(name)}
        numbers = [int(m.group(1)) for u in used if (m := _DEFAULT_ID.fullmatch(u))]
        return f"v{max(numbers, default=0) + 1}"

    def _stage(self, source: Path, name: str, version: str, *, move: bool, progress: bool) -> Path:
        home = self._home(name)
        home.mkdir(parents=True, exist_ok=True)
        staged = home / f"{STAGING_PREFIX}{version}-{os.getpid()}"
        had_sums = (source / SUMS_NAME).exists()
        read_digests: dict[str, str] | None = None
        moved = False
        if move:
            try:
                os.rename(source, staged)
                moved = True
            except OSError as exc:
                if exc.errno != errno.EXDEV:  # another file system: copy (and delete after)
                    raise VersionError(f"cannot move {source}: {exc}") from None
        try:
            if not moved:
                read_digests = copy_tree(source, staged, progress=progress)
            if had_sums:
                # The source shipped checksums (an offline bundle, another version): honour them.
                problems = verify_sha256sums(staged)
                if problems:
                    raise VersionError(
                        f"{source} does not match its own {SUMS_NAME}: {_summary(problems)}"
                    )
            read_manifest(staged)
            _hash(staged, progress=progress)
            if read_digests is not None:
                written = read_sha256sums(staged)
                changed = [p for p, d in read_digests.items() if written.get(p) != d]
                if changed:
                    raise VersionError(
                        f"copy of {source} differs from what was read ({', '.join(changed[:3])}); "
                        f"check the disk and install again"
                    )
            seal(staged)
            fsync_dir(home)
            return staged
        except BaseException as exc:
            if moved and not source.exists():
                unseal(staged)
                if not had_sums:
                    (staged / SUMS_NAME).unlink(missing_ok=True)
                os.rename(staged, source)  # give the folder back where it was
            else:
                remove_tree(staged)
            if isinstance(exc, (ManifestError, OSError)):
                raise VersionError(f"cannot install {source}: {exc}") from None
            raise

    def _adopt(self, name: str) -> ModelVersion:
        """Move the plain folder ``models_dir/<name>`` in as a sealed version and link it."""
        plain = self.models_dir / name
        version = self._new_id(name, None)
        home = self._home(name)
        home.mkdir(parents=True, exist_ok=True)
        staged = home / f"{STAGING_PREFIX}{version}-{os.getpid()}"
        os.rename(plain, staged)  # same file system by construction: a rename, no copy
        try:
            write_sha256sums(staged)
            seal(staged)
        except BaseException:
            os.rename(staged, plain)
            raise
        os.rename(staged, home / version)
        fsync_dir(home)
        self._record(name, {"event": "install", "version": version, "time": _now()})
        return self._switch(name, version, verify=False, event="adopt")

    def _switch(self, name: str, version: str, *, verify: bool, event: str) -> ModelVersion:
        link = self.models_dir / name
        if not link.is_symlink() and link.exists():
            if not link.is_dir():
                raise VersionError(f"{link} is a file, not a model folder; move it away")
            self._adopt(name)  # e.g. `medserve setup --force` wrote a plain folder again
        path = self._existing(name, version)
        previous = self._active_id(name)
        if previous == version:
            return self.active(name)  # type: ignore[return-value]
        if verify:
            problems = self.verify(name, version)
            if problems:
                raise VersionError(
                    f"{name} {version} is damaged, not activated: {_summary(problems)}; "
                    f"`medserve models remove {name} {version}` and install it again"
                )
        try:
            read_manifest(path)
        except ManifestError as exc:
            raise VersionError(f"{name} {version} cannot be served: {exc}") from None
        for leftover in self.models_dir.glob(f".{name}.link-*"):
            leftover.unlink(missing_ok=True)
        tmp = self.models_dir / f".{name}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(Path(VERSIONS_DIR, name, version), tmp)
        os.replace(tmp, link)
        fsync_dir(self.models_dir)
        record = {"event": event, "version": version, "previous": previous, "time": _now()}
        self._record(name, record)
        return self._version(name, path, self._installed_times(name), version)

    def _clean_staging(self, name: str) -> None:
        home = self._home(name)
        if home.is_dir():
            for leftover in home.glob(f"{STAGING_PREFIX}*"):
                remove_tree(leftover)

    def _history(self, name: str) -> list[dict[str, Any]]:
        path = self._home(name) / HISTORY_NAME
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a power cut; the ones around it still count
            if isinstance(record, dict):
                records.append(record)
        return records

    def _record(self, name: str, record: dict[str, Any]) -> None:
        path = self._home(name) / HISTORY_NAME
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _installed_times(self, name: str) -> dict[str, str]:
        times: dict[str, str] = {}
        for record in self._history(name):
            if record.get("event") == "install" and "version" in record:
                version = str(record["version"])
                times.pop(version, None)  # a reinstalled id counts from its latest install
                times[version] = str(record.get("time", ""))
        return times

    def _activation_stack(self, name: str) -> list[str]:
        """Versions as a stack of activations: activate pushes, rollback pops back to its target."""
        stack: list[str] = []
        for record in self._history(name):
            version = str(record.get("version"))
            if record.get("event") == "rollback":
                while stack and stack[-1] != version:
                    stack.pop()
                if not stack:
                    stack.append(version)
            elif record.get("event") in _ACTIVATIONS and (not stack or stack[-1] != version):
                stack.append(version)
        return stack

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{name}.lock", "a") as f:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise VersionError(
                            f"another `medserve models` command is changing {name}; "
                            f"wait for it to finish and try again"
                        ) from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _hash(folder: Path, *, progress: bool) -> None:
    from tqdm import tqdm

    total = tree_size(folder) if progress else 0
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="sha256", disable=not progress, leave=False
    ) as bar:
        write_sha256sums(folder, on_file=lambda _path, size: bar.update(size))


def _has_versions(home: Path) -> bool:
    return any(p.is_dir() and _ID.fullmatch(p.name) for p in home.iterdir())


def _natural(version: str) -> tuple[Any, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", version))


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")


def _summary(problems: list[str], shown: int = 3) -> str:
    more = f" (+{len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more
