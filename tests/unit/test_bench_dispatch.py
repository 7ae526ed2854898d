"""`medserve bench` sub-commands: lazy import, argv hand-over, clear message when missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from medserve.benchmarks import llm_bench


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_subcommand_gets_the_rest_of_argv(
    module_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (module_dir / "fake_bandwidth_bench.py").write_text(
        "seen = []\ndef main(argv):\n    seen.append(argv)\n    return 7\n"
    )
    monkeypatch.setitem(llm_bench.SUBCOMMANDS, "bandwidth", "fake_bandwidth_bench")
    assert llm_bench.main(["bandwidth", "--size", "1"]) == 7
    assert sys.modules["fake_bandwidth_bench"].seen == [["--size", "1"]]


def test_missing_subcommand_module_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(llm_bench.SUBCOMMANDS, "engine", "medserve.benchmarks.not_written_yet")
    assert llm_bench.main(["engine", "--model", "x"]) == 2
    err = capsys.readouterr().err
    assert "medserve bench engine: not available" in err
    assert "medserve.benchmarks.not_written_yet" in err


def test_a_broken_import_inside_a_subcommand_is_not_hidden(
    module_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (module_dir / "fake_engine_bench.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.setitem(llm_bench.SUBCOMMANDS, "engine", "fake_engine_bench")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        llm_bench.main(["engine"])


def test_run_is_the_default_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["run", "--help"]):
        with pytest.raises(SystemExit) as exited:
            llm_bench.main(argv)
        assert exited.value.code == 0
        assert "--compare" in capsys.readouterr().out


def test_per_url_options_take_one_value_or_one_per_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from medserve.benchmarks import run_cli

    parser = run_cli.build_parser()
    assert run_cli._per_url(parser, "model", ["m"], 3) == ["m", "m", "m"]
    assert run_cli._per_url(parser, "model", ["a", "b"], 2) == ["a", "b"]
    assert run_cli._per_url(parser, "model", None, 2) == [None, None]
    with pytest.raises(SystemExit):
        run_cli._per_url(parser, "model", ["a", "b"], 3)
    assert "--model takes one value or one per URL (3), got 2" in capsys.readouterr().err


def test_default_labels_tell_the_same_server_twice_apart() -> None:
    from medserve.benchmarks.run_cli import _default_labels

    urls = ["http://127.0.0.1:8000", "http://127.0.0.1:8000", "http://127.0.0.1:8080/"]
    assert _default_labels(urls) == ["127.0.0.1:8000", "127.0.0.1:8000#2", "127.0.0.1:8080"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compare", "http://a", "http://b", "--label", "x"], "--label takes one name per URL"),
        (["--compare", "http://a", "http://b", "--label", "x", "x"], "--label names must differ"),
        (["--concurrency", "1,0"], "concurrency must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--url", "http://a", "--compare", "http://b"], "not allowed with argument"),
    ],
)
def test_bad_options_are_refused_before_anything_is_sent(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        llm_bench.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
