"""A native engine build made for another CPU fails with advice, never with a bare SIGILL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from medserve.accel.base import BackendError
from medserve.accel.cpu_features import (
    ISA_EXTENSIONS,
    STAMP_NAME,
    NativeBuildMismatch,
    check_native_build,
    cpu_isa_extensions,
    fingerprint,
    write_stamp,
)
from medserve.accel.protocol import Configure
from medserve.accel.worker_client import WorkerClient, WorkerSpec

AVX2_BOX = "flags\t\t: fpu sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 popcnt\n"
SPR_BOX = AVX2_BOX.rstrip("\n") + " avx512f avx512bw avx512vl avx512_vnni amx_tile amx_int8\n"


def test_extensions_are_read_from_cpuinfo() -> None:
    assert "avx2" in cpu_isa_extensions(AVX2_BOX)
    assert "sse2" not in cpu_isa_extensions(AVX2_BOX)  # baseline x86-64, not fingerprinted
    assert {"avx512f", "amx_int8"} <= cpu_isa_extensions(SPR_BOX)
    assert cpu_isa_extensions() <= set(ISA_EXTENSIONS)


def test_fingerprint_names_the_top_extension_and_differs_per_cpu() -> None:
    avx2 = fingerprint(cpu_isa_extensions(AVX2_BOX))
    spr = fingerprint(cpu_isa_extensions(SPR_BOX))
    assert "-avx2-" in avx2 and "-amx_int8-" in spr
    assert avx2 != spr
    assert fingerprint(cpu_isa_extensions(AVX2_BOX)) == avx2  # stable: a cache key


def test_build_for_a_richer_cpu_is_refused_with_advice(tmp_path: Path) -> None:
    here = cpu_isa_extensions()
    richer = frozenset(here | {"amx_int8", "avx512_fp16", "avx512f"})
    if richer == here:
        pytest.skip("this CPU has every extension the test would add")
    write_stamp(tmp_path, "llama-cpp", richer)
    with pytest.raises(NativeBuildMismatch) as error:
        check_native_build("llama-cpp", tmp_path)
    message = str(error.value)
    assert "lacks" in message and "setup.sh --with llama-cpp --rebuild" in message
    for name in sorted(richer - here):
        assert name in message


def test_build_for_this_cpu_or_without_stamp_is_accepted(tmp_path: Path) -> None:
    check_native_build("llama-cpp", tmp_path)  # no stamp: a hand-made environment
    write_stamp(tmp_path, "llama-cpp")
    assert json.loads((tmp_path / STAMP_NAME).read_text())["fingerprint"] == fingerprint()
    check_native_build("llama-cpp", tmp_path)


def test_worker_killed_by_sigill_while_loading_gives_the_rebuild_advice(tmp_path: Path) -> None:
    """The server's side: an engine dying of an illegal instruction is explained."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nkill -ILL $$\n")
    python.chmod(0o755)
    configure = Configure(
        model_name="m",
        model_dir=str(tmp_path),
        engine="chatglm-cpp",
        max_num_seqs=1,
        max_context_tokens=512,
        kv_cache_gb=0.1,
    )
    client = WorkerClient(WorkerSpec(configure, python, max_in_flight=1, startup_timeout_s=30))
    with pytest.raises(BackendError) as error:
        asyncio.run(client.start())
    assert "cannot run on this CPU" in str(error.value)
    assert "setup.sh --with chatglm-cpp --rebuild" in str(error.value)
