"""The audit trail without a server: the real writer (thread, fsync, lock) and `medserve audit
verify` on what it wrote -- an edit, a deletion, a reordering and a torn line are each found;
cutting records off the end is found only against a head noted earlier; rotation, by size or by
command, keeps one chain; a failed write fails the caller."""

from __future__ import annotations

import asyncio
import itertools
import json
import stat
from pathlib import Path

import pytest
from medserve.server.audit.case_ids import CaseIdHasher, load_or_create_key
from medserve.server.audit.chain import GENESIS, verify
from medserve.server.audit.cli import main as audit_cli
from medserve.server.audit.writer import CURRENT, AuditLog, AuditWriteError, rotate, trail_files


def _record(i: int) -> dict[str, object]:
    return {"v": 1, "action": "case.read", "key_id": "k1", "cases": [f"h{i}"], "status": 200}


async def _write(directory: Path, count: int, **options: object) -> None:
    log = AuditLog(directory, **options)  # type: ignore[arg-type]
    await log.start()
    try:
        # concurrently, as requests arrive: the writer batches them into one fsync
        await asyncio.gather(*(log.append(_record(i)) for i in range(count)))
    finally:
        await log.stop()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _verify_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = audit_cli(list(args))
    return code, capsys.readouterr().out


def test_written_trail_verifies_and_is_private(tmp_path: Path, capsys) -> None:
    asyncio.run(_write(tmp_path, 25))
    path = tmp_path / CURRENT
    records = [json.loads(line) for line in _lines(path)]
    assert [r["seq"] for r in records] == list(range(1, 26))
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, out = _verify_cli(capsys, "--dir", str(tmp_path), "verify")
    assert code == 0 and "ok: 25 records" in out and records[-1]["hash"] in out


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "torn", "edit_last"])
def test_verify_detects_tampering(tmp_path: Path, capsys, tamper: str) -> None:
    asyncio.run(_write(tmp_path, 10))
    path = tmp_path / CURRENT
    lines = _lines(path)
    if tamper == "edit":
        lines[4] = lines[4].replace('"status":200', '"status":404')
    elif tamper == "edit_last":
        lines[-1] = lines[-1].replace('"key_id":"k1"', '"key_id":"k2"')
    elif tamper == "delete":
        del lines[4]
    elif tamper == "reorder":
        lines[3], lines[4] = lines[4], lines[3]
    else:
        lines[4] = lines[4][: len(lines[4]) // 2] + "\n"
    assert lines != _lines(path)
    path.write_text("".join(lines))
    code, out = _verify_cli(capsys, "verify", "--file", str(path))
    assert code == 1 and "BROKEN" in out and "FAIL" in out, out


def test_truncating_the_tail_is_found_only_against_a_noted_head(tmp_path: Path, capsys) -> None:
    asyncio.run(_write(tmp_path, 10))
    path = tmp_path / CURRENT
    noted_head = json.loads(_lines(path)[-1])["hash"]
    path.write_text("".join(_lines(path)[:7]))
    code, out = _verify_cli(capsys, "verify", "--file", str(path))
    assert code == 0  # the chain that remains is intact: truncation alone is invisible
    code, out = _verify_cli(capsys, "verify", "--file", str(path), "--expect-head", noted_head)
    assert code == 1 and "is not in the trail" in out


def test_rotation_by_command_and_by_size_keeps_one_chain(tmp_path: Path, capsys) -> None:
    asyncio.run(_write(tmp_path, 5))
    rotated = rotate(tmp_path)
    assert rotated is not None
    asyncio.run(_write(tmp_path, 40, max_file_bytes=4096))  # a few size rotations
    files = trail_files(tmp_path)
    assert len(files) >= 3 and files[-1].name == CURRENT
    result = verify(files)
    assert result.ok, result.problems
    assert result.starts_after == GENESIS
    first_of_new = json.loads((tmp_path / CURRENT).read_text().splitlines()[0])
    assert first_of_new["action"] == "audit.rotated"
    assert first_of_new["previous_file"] == files[-2].name
    assert first_of_new["prev"] == json.loads(_lines(files[-2])[-1])["hash"]
    # records total: 45 written + one marker per rotation
    assert result.records == 45 + len(files) - 1
    # deleting a whole middle file breaks the chain
    files[1].unlink()
    code, out = _verify_cli(capsys, "--dir", str(tmp_path), "verify")
    assert code == 1 and "chain broken" in out


def test_two_writers_on_one_trail_keep_one_chain(tmp_path: Path) -> None:
    async def both() -> None:
        await asyncio.gather(_write(tmp_path, 30), _write(tmp_path, 30))

    asyncio.run(both())
    result = verify(trail_files(tmp_path))
    assert result.ok and result.records == 60, result.problems


def test_a_failed_write_fails_the_caller(tmp_path: Path) -> None:
    (tmp_path / CURRENT).mkdir()  # open() of the trail now fails with EISDIR

    async def attempt() -> None:
        log = AuditLog(tmp_path)
        await log.start()
        try:
            with pytest.raises(AuditWriteError, match="IsADirectoryError"):
                await log.append(_record(0))
        finally:
            await log.stop()

    asyncio.run(attempt())


def test_case_ids_are_keyed_hmacs_with_a_private_key(tmp_path: Path) -> None:
    key_path = tmp_path / "audit" / "case-id.key"
    key = load_or_create_key(key_path)
    assert load_or_create_key(key_path) == key and len(key) == 32
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    hasher = CaseIdHasher(key)
    assert hasher("MRN-0001") == hasher("MRN-0001") != hasher("MRN-0002")
    assert "MRN" not in hasher("MRN-0001")
    assert CaseIdHasher(b"\x00" * 32)("MRN-0001") != hasher("MRN-0001")
