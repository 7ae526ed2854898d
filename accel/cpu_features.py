"""Which instruction-set extensions this CPU has, and whether a native build may run here.

The GGML engines (chatglm.cpp, llama.cpp) are compiled with ``-march=native``: the wheel uses
every extension of the machine that built it. Run on a CPU without one of them (a wheel copied
from an AVX-512 Xeon to an AVX2-only box, or carried in an offline wheelhouse), it dies with
SIGILL somewhere in a matrix kernel. So the installer stamps each engine's virtual environment
with the extensions its build was compiled for (``medserve-native-build.json``), and the worker
checks the stamp against this CPU before it imports the engine: a clear error instead of a
crash.

Standard library only: it runs in every engine environment and in ``installer/engine_venv.sh``.

    python -m medserve.accel.cpu_features fingerprint   # e.g. avx2-fma-f16c-...-3f2a9c1b
    python -m medserve.accel.cpu_features stamp VENV    # write VENV/medserve-native-build.json
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

STAMP_NAME = "medserve-native-build.json"

# Extensions a compiler may emit under -march=native on x86-64 (as /proc/cpuinfo names them).
# Others (sse2, cmov...) are in every x86-64 CPU and would only make fingerprints noisier.
ISA_EXTENSIONS = (
    "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2",
    "movbe", "adx", "sha_ni", "gfni", "vaes", "vpclmulqdq", "avx_vnni", "avx_vnni_int8",
    "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512ifma", "avx512vbmi",
    "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
)  # fmt: skip


class NativeBuildMismatch(RuntimeError):
    """The engine's native build needs instructions this CPU does not have."""


def cpu_isa_extensions(cpuinfo: str | None = None) -> frozenset[str]:
    """The ISA extensions of this CPU (of the first core: all cores of a box are alike)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return frozenset(name for name in ISA_EXTENSIONS if name in flags)
    return frozenset()


def fingerprint(extensions: frozenset[str] | None = None) -> str:
    """A short, stable name for a set of extensions: wheels built for it are cached under it."""
    ext = sorted(cpu_isa_extensions() if extensions is None else extensions)
    digest = hashlib.sha256(" ".join(ext).encode()).hexdigest()[:10]
    top = next((name for name in ("amx_int8", "avx512f", "avx2", "avx") if name in ext), "base")
    return f"{platform.machine()}-{top}-{digest}"


def write_stamp(venv: Path, engine: str, extensions: frozenset[str] | None = None) -> Path:
    ext = cpu_isa_extensions() if extensions is None else extensions
    stamp = venv / STAMP_NAME
    stamp.write_text(
        json.dumps(
            {"engine": engine, "fingerprint": fingerprint(ext), "isa_extensions": sorted(ext)},
            indent=2,
        )
        + "\n"
    )
    return stamp


def check_native_build(engine: str, venv: Path | None = None) -> None:
    """Raise NativeBuildMismatch if the engine in ``venv`` was built for a richer CPU.

    A missing stamp is allowed (a hand-made environment): the worker client still turns a
    SIGILL into the same explanation.
    """
    stamp = (Path(sys.prefix) if venv is None else venv) / STAMP_NAME
    try:
        built_for = frozenset(json.loads(stamp.read_text())["isa_extensions"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    missing = sorted(built_for - cpu_isa_extensions())
    if missing:
        raise NativeBuildMismatch(illegal_instruction_advice(engine, missing))


def illegal_instruction_advice(engine: str, missing: list[str] | None = None) -> str:
    lacking = (
        f"it was compiled for CPU instructions this machine lacks ({', '.join(missing)})"
        if missing
        else "it crashed with an illegal instruction: it was compiled for another CPU"
    )
    return (
        f"engine {engine!r} cannot run on this CPU: {lacking}. Build it on this machine with "
        f"`bash installer/setup.sh --with {engine} --rebuild`"
    )


def main(argv: list[str]) -> int:
    if argv[:1] == ["fingerprint"]:
        print(fingerprint())
        return 0
    if len(argv) == 3 and argv[0] == "stamp":
        print(write_stamp(Path(argv[1]), argv[2]))
        return 0
    print("usage: cpu_features fingerprint | stamp VENV ENGINE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
