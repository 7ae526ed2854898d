"""Upgrades from an offline bundle: a broken release never takes over, a good one keeps the data.

These run where CI runs the suite: inside the release that `.ci/offline-install-and-test`
installed from a freshly built bundle, in a namespace with only loopback.  CI names the bundle
and the installation in ``CI_MEDSERVE_BUNDLE`` and ``CI_MEDSERVE_PREFIX``; elsewhere the upgrade
tests skip (the uninstall test runs everywhere).  Each upgrade is a real offline set-up of a
release (main and converter venvs, no optional engines: ~3 min on 2 cores).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "installer" / "install.sh"
UNINSTALL = ROOT / "installer" / "uninstall.sh"
BUNDLE = os.environ.get("CI_MEDSERVE_BUNDLE")
PREFIX = os.environ.get("CI_MEDSERVE_PREFIX")

SERVE = "def _serve(args: argparse.Namespace) -> int:\n"
needs_bundle = pytest.mark.skipif(
    not (BUNDLE and PREFIX),
    reason="CI_MEDSERVE_BUNDLE / CI_MEDSERVE_PREFIX unset (set by .ci/offline-install-and-test)",
)


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSERVE_")}
    return {**env, "MEDSERVE_HOME": str(home)}


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every data file; the bundled model's own folders may be added, never changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _unchanged(before: dict[str, str], home: Path) -> bool:
    after = _digests(home)
    return {name: after.get(name) for name in before} == before


def _variant(source: Path, dest: Path, version: str, edit: dict[str, str]) -> Path:
    """A copy of the unpacked bundle (hard links: instant) with another VERSION and files."""
    subprocess.run(["cp", "-al", str(source), str(dest)], check=True)
    changed = {"VERSION": version + "\n", **{f"repo/{k}": v for k, v in edit.items()}}
    for name, text in changed.items():
        path = dest / name
        path.unlink()  # break the hard link before writing
        path.write_text(text, encoding="utf-8")
    sums = dest / "SHA256SUMS"
    lines = []
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, name = line.split("  ", 1)
        if name in changed:
            digest = hashlib.sha256((dest / name).read_bytes()).hexdigest()
        lines.append(f"{digest}  {name}")
    sums.unlink()
    sums.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("bundle")
    with tarfile.open(BUNDLE) as tar:
        tar.extractall(where, filter="tar")
    return next(where.glob("medserve-bundle-*"))


@pytest.fixture(scope="module")
def data_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hospital's data: config, an API key, cases and audit files, the bundled model."""
    home = tmp_path_factory.mktemp("hospital-home")
    live = Path(os.environ["MEDSERVE_HOME"])
    (home / "models").mkdir()
    for name in ("smollm2-135m-instruct",):
        subprocess.run(["cp", "-al", str(live / "models" / name), str(home / "models")], check=True)
    (home / "medserve.toml").write_text("[server]\nport = 8123\n", encoding="utf-8")
    (home / "cases").mkdir()
    (home / "cases" / "cases.sqlite3").write_bytes(b"stand-in for the case store")
    (home / "audit").mkdir()
    (home / "audit" / "audit.jsonl").write_text('{"seq": 1}\n', encoding="utf-8")
    medserve = Path(PREFIX or ROOT) / "current" / ".venv" / "bin" / "medserve"
    subprocess.run(
        [str(medserve), "keys", "create", "--name", "emr-ward-7", "--scopes", "chat"],
        env=_clean_env(home),
        check=True,
        capture_output=True,
    )
    return home


def _install(bundle: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), str(bundle), "--prefix", str(PREFIX), "--home", str(home)],
        env=_clean_env(home),
        capture_output=True,
        text=True,
        timeout=1800,
    )


@needs_bundle
def test_a_release_that_cannot_serve_never_takes_over(
    unpacked: Path, data_home: Path, tmp_path: Path
) -> None:
    before_current = os.path.realpath(Path(PREFIX) / "current")
    before = _digests(data_home)
    cli = (unpacked / "repo" / "server" / "cli.py").read_text(encoding="utf-8")
    assert SERVE in cli
    broken = _variant(
        unpacked,
        tmp_path / "broken",
        "9.9.9-broken",
        # Sets up fine (its `medserve setup` works); only `medserve serve` cannot start.
        {
            "server/cli.py": cli.replace(
                SERVE, SERVE + '    raise SystemExit("broken on purpose")\n'
            )
        },
    )
    result = _install(broken, data_home)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "did not become ready; nothing was switched" in result.stderr
    assert os.path.realpath(Path(PREFIX) / "current") == before_current
    assert not (Path(PREFIX) / "releases" / "9.9.9-broken").exists()
    assert _unchanged(before, data_home)


@needs_bundle
def test_an_upgrade_switches_release_and_keeps_config_keys_cases_and_models(
    unpacked: Path, data_home: Path, tmp_path: Path
) -> None:
    before_current = os.path.realpath(Path(PREFIX) / "current")
    before = _digests(data_home)
    model_manifest = (data_home / "models" / "smollm2-135m-instruct" / "medserve.json").read_bytes()
    readme = (unpacked / "repo" / "README.md").read_text(encoding="utf-8")
    newer = _variant(unpacked, tmp_path / "newer", "9.9.9-upgrade", {"README.md": readme})
    result = _install(newer, data_home)
    assert result.returncode == 0, result.stderr[-3000:]
    current = Path(os.path.realpath(Path(PREFIX) / "current"))
    assert current.name == "9.9.9-upgrade"
    assert os.path.realpath(Path(PREFIX) / "previous") == before_current
    assert Path(before_current).is_dir(), "the release before stays for a manual rollback"
    assert _unchanged(before, data_home)
    assert (data_home / "models" / "smollm2-135m-instruct" / "medserve.json").read_bytes() == (
        model_manifest
    )
    keys = subprocess.run(
        [str(current / ".venv" / "bin" / "medserve"), "keys", "list"],
        env=_clean_env(data_home),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "emr-ward-7" in keys.stdout
    # Put the installation back the way CI made it, for whatever runs after this module.
    subprocess.run(
        ["ln", "-sfn", f"releases/{Path(before_current).name}", f"{PREFIX}/current"], check=True
    )


def test_uninstall_keeps_the_data_unless_purged(tmp_path: Path) -> None:
    prefix, home = tmp_path / "opt", tmp_path / "data"
    (prefix / "releases" / "1.0").mkdir(parents=True)
    (prefix / "current").symlink_to("releases/1.0")
    (home / "cases").mkdir(parents=True)
    (home / "cases" / "cases.sqlite3").write_bytes(b"cases")
    env = _clean_env(home)
    run = [
        "bash",
        str(UNINSTALL),
        "--prefix",
        str(prefix),
        "--home",
        str(home),
    ]
    kept = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    assert not prefix.exists()
    assert (home / "cases" / "cases.sqlite3").read_bytes() == b"cases"
    assert "kept the data" in kept.stdout
    (prefix / "releases").mkdir(parents=True)
    # An unconfirmed purge removes nothing at all.
    refused = subprocess.run([*run, "--purge"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert home.exists() and (prefix / "releases").exists()
    subprocess.run([*run, "--purge", "--yes"], env=env, capture_output=True, check=True)
    assert not home.exists()
