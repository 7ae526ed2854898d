"""The checks of `medserve doctor`: each looks at one thing on this host and returns a Check.

Every check reads local state only (``/proc``, files, the environment, a bind on the configured
port, at most one GET /health to that port on loopback or the configured host), so it can run
on a locked-down ward server with no network, and each says in one line what it saw and, when
something is wrong, what to do about it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medserve.accel import cpu_features
from medserve.accel.registry import ENGINES, EngineNotInstalled, worker_python
from medserve.kv_cache.planner import RAM_FRACTION_LIMIT, memory_needs
from medserve.models.checksums import SUMS_NAME, verify_sha256sums
from medserve.models.manifest import ManifestError, read_manifest
from medserve.models.version_files import tree_size

OK, WARN, FAIL = "ok", "warn", "fail"
GiB = 1024**3
DISK_WARN_BYTES = 10 * GiB
DISK_FAIL_BYTES = 1 * GiB


@dataclass
class Check:
    name: str
    status: str
    """ok, warn or fail: a fail makes `medserve doctor` exit 1."""
    detail: str
    """One line: what was seen."""
    hint: str = ""
    """What to do about a warn or fail."""
    data: dict[str, Any] = field(default_factory=dict)
    """Figures for ``--json`` (sizes in bytes, names, paths)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.hint:
            out["hint"] = self.hint
        return out | self.data


def worst(statuses: list[str]) -> str:
    return FAIL if FAIL in statuses else WARN if WARN in statuses else OK


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def size(n: int) -> str:
    return gib(n) if n >= GiB else f"{n / 2**20:.0f} MiB"


# --- CPU and engines --------------------------------------------------------------------------


def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model_name(cpuinfo: str) -> str:
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():
            break  # the first core describes them all
    name = fields.get("model name") or os.uname().machine
    if "cpu family" in fields:  # "AMD EPYC" alone does not tell Zen 2 from Zen 4
        name += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return name


def check_cpu(cpuinfo: str) -> Check:
    ext = cpu_features.cpu_isa_extensions(cpuinfo)
    amx = sorted(e for e in ("amx_tile", "amx_bf16", "amx_int8") if e in ext)
    flags = {
        "AVX2": "avx2" in ext,
        "AVX-512F": "avx512f" in ext,
        "AVX512_VNNI": "avx512_vnni" in ext,
        "AVX512_BF16": "avx512_bf16" in ext,
        "AMX": bool(amx),
    }
    isa = ", ".join(f"{k.removeprefix('AVX512_')} {'yes' if v else 'no'}" for k, v in flags.items())
    if amx:
        isa += f" ({', '.join(amx)})"
    model = cpu_model_name(cpuinfo)
    data = {"cpu_model": model, "cores": os.cpu_count(), "isa": flags, "amx": amx}
    detail = f"{model}, {os.cpu_count()} cores; {isa}"
    if not flags["AVX2"]:
        return Check("cpu", WARN, detail, "no AVX2: every engine falls back to slow SSE kernels")
    return Check("cpu", OK, detail, data=data)


def fast_paths(ext: frozenset[str]) -> str:
    """Which engines and precisions this ISA makes fast (figures: benchmarks/RESULTS.md)."""
    if {"amx_tile", "amx_bf16"} <= ext or {"amx_tile", "amx_int8"} <= ext:
        return "AMX: OpenVINO bf16 and int8 run on AMX tiles, the fastest path here"
    if "avx512_vnni" in ext or "avx_vnni" in ext:
        bf16 = "; bf16 fast (AVX512_BF16)" if "avx512_bf16" in ext else ""
        return f"VNNI: int8 is fast (OpenVINO int8, llama.cpp Q8_0){bf16}"
    if "avx512f" in ext:
        return "AVX-512 without VNNI: OpenVINO int8/int4 and llama.cpp Q4_0 on AVX-512 kernels"
    if "avx2" in ext:
        # "Every engine side by side", measured on a 2-core Zen 3 (AVX2 only) host.
        return (
            "AVX2 only: OpenVINO int8/int4 on AVX2 kernels; fastest measured on such a host: "
            "llama.cpp Q4_0 at 1 stream (146 tok/s, OpenVINO int4 77), OpenVINO int8 at 8 (263)"
        )
    return "no AVX2: expect a few tokens per second from any engine"


def check_fast_paths(cpuinfo: str) -> Check:
    return Check("fast paths", OK, fast_paths(cpu_features.cpu_isa_extensions(cpuinfo)))


def engine_problem(name: str, venvs_root: Path | None = None) -> str | None:
    """Why engine ``name`` cannot run here (not installed, built for another CPU), or None."""
    if name not in ENGINES:
        return f"unknown engine {name!r}"
    try:
        python = worker_python(name, venvs_root)
    except EngineNotInstalled as exc:
        return str(exc)
    venv = ENGINES[name].venv
    if venv is None:
        # The server's own environment: importable without importing it (which takes seconds).
        if name == "openvino" and importlib.util.find_spec("openvino_genai") is None:
            return "openvino_genai is not installed in the server's environment"
        return None
    try:
        cpu_features.check_native_build(name, python.parent.parent)
    except cpu_features.NativeBuildMismatch as exc:
        return str(exc)
    return None


def check_engines(venvs_root: Path | None = None) -> Check:
    installed, missing, mismatch, native = [], [], [], []
    for name, entry in ENGINES.items():
        problem = engine_problem(name, venvs_root)
        if problem is None:
            installed.append(name)
            venv = worker_python(name, venvs_root).parent.parent if entry.venv else None
            if venv is not None and (venv / cpu_features.STAMP_NAME).is_file():
                native.append(name)
        elif "cannot run on this CPU" in problem:
            mismatch.append(name)
        else:
            missing.append(name)
    data = {"installed": installed, "missing": missing, "native_mismatch": mismatch}
    detail = f"installed: {', '.join(installed) or 'none'}; not installed: {', '.join(missing)}"
    if mismatch:
        return Check(
            "engines",
            WARN,
            detail + f"; built for another CPU: {', '.join(mismatch)}",
            "rebuild with `bash installer/setup.sh --with ENGINE --rebuild`",
            data,
        )
    if native:
        detail += f"; native builds match this CPU ({', '.join(native)})"
    return Check("engines", OK, detail, data=data)


# --- memory and disk --------------------------------------------------------------------------


def read_meminfo() -> tuple[int, int]:
    """(total, available) bytes from /proc/meminfo."""
    values: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = values.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, values.get("MemAvailable", total)


def check_memory(
    model_dirs: Mapping[str, Path], cache_gb: float, meminfo: tuple[int, int] | None = None
) -> Check:
    total, available = read_meminfo() if meminfo is None else meminfo
    if not model_dirs:
        return Check("memory", OK, f"{gib(total)} RAM, {gib(available)} available; engine off")
    needs = memory_needs(model_dirs, cache_gb)
    needed = sum(w + kv for w, kv in needs.values())
    budget = int(total * RAM_FRACTION_LIMIT)
    detail = (
        f"{len(needs)} model(s) need {gib(needed)} (weights + {cache_gb:g} GiB KV each) "
        f"of {gib(total)} RAM ({gib(available)} available, budget {gib(budget)})"
    )
    data = {
        "total_bytes": total,
        "available_bytes": available,
        "needed_bytes": needed,
        "per_model": {
            n: {"weights_bytes": w, "kv_cache_bytes": kv} for n, (w, kv) in needs.items()
        },
    }
    if needed > budget:
        hint = "the server will refuse to start: lower engine.kv_cache_gb or serve fewer models"
        return Check("memory", FAIL, detail, hint, data)
    if needed > available:
        return Check("memory", WARN, detail, "other programs hold the RAM the models need", data)
    return Check("memory", OK, detail, data=data)


def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(folders: Mapping[str, Path], largest_model_bytes: int) -> Check:
    """Free space on each file system holding a data folder (one line for all)."""
    seen: dict[int, tuple[str, Path, int]] = {}
    for label, folder in folders.items():
        where = existing_ancestor(folder)
        seen.setdefault(where.stat().st_dev, (label, folder, shutil.disk_usage(where).free))
    label, folder, free = min(seen.values(), key=lambda item: item[2])
    detail = f"{gib(free)} free for {label} ({folder})"
    data = {"free_bytes": free, "path": str(folder), "largest_model_bytes": largest_model_bytes}
    if free < DISK_FAIL_BYTES:
        return Check(
            "disk", FAIL, detail, "under 1 GiB free: audit and case writes will fail", data
        )
    if free < DISK_WARN_BYTES or free < largest_model_bytes:
        hint = f"under 10 GiB or the largest model ({gib(largest_model_bytes)}): free space"
        return Check("disk", WARN, detail, hint, data)
    return Check("disk", OK, detail, data=data)


# --- model folders ----------------------------------------------------------------------------

Progress = Callable[[Path, int], None]


def check_model(
    name: str,
    models_dir: Path,
    verify: bool = True,
    progress: Callable[[str, int], Progress | None] | None = None,
) -> Check:
    """The folder (or version symlink) exists, its manifest reads, its engine runs here, and
    its SHA256SUMS (if any) still matches.  ``progress(name, total_bytes)`` may give a
    per-file callback for the hashing."""
    folder = models_dir / name
    data: dict[str, Any] = {"model": name, "path": str(folder)}
    where = folder.resolve()
    if folder.is_symlink():
        data["resolved"] = str(where)
    try:
        manifest = read_manifest(where)
    except ManifestError as exc:
        hint = "run `medserve setup` (bundled model) or `medserve models install`"
        return Check("model", FAIL, f"{name}: {exc}", hint, data)
    total = tree_size(where)
    data |= {"engine": manifest.engine, "format": manifest.format, "size_bytes": total}
    detail = f"{name}: {manifest.format} {manifest.precision} on {manifest.engine}, {size(total)}"
    if folder.is_symlink():
        detail += f", -> {where.parent.name}/{where.name}"
    problem = engine_problem(manifest.engine)
    if problem is not None:
        return Check("model", FAIL, detail, problem, data)
    if not (where / SUMS_NAME).is_file():
        return Check("model", OK, detail + ", no SHA256SUMS", data=data)
    if not verify:
        return Check("model", OK, detail + ", checksums skipped", data=data)
    problems = verify_sha256sums(where, progress(name, total) if progress else None)
    data["checksum_problems"] = problems
    if problems:
        shown = "; ".join(problems[:2]) + (
            f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        )
        hint = "reinstall this version (`medserve models install`) or roll back"
        return Check("model", FAIL, f"{detail}, SHA256SUMS FAILS: {shown}", hint, data)
    return Check("model", OK, detail + ", SHA256SUMS ok", data=data)
