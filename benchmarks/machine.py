"""Where and how a benchmark ran: CPU, cores, load, date, git commit, command line.

Every figure must name the machine it was measured on (machines here may be Intel or AMD, and
are shared), so the JSON and Markdown reports carry this alongside the numbers.  Everything is
read locally: /proc, os, and ``git`` on this checkout.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
from pathlib import Path
from typing import Any

# Instruction-set features that decide which kernels an engine can use.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")
REPO = Path(__file__).resolve().parent.parent


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model name, physical cores and ISA features from /proc/cpuinfo (Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    cores: set[tuple[str, str]] = set()
    physical = core = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        fields.setdefault(key, value)
        if key == "physical id":
            physical = value
        elif key == "core id":
            core = value
            cores.add((physical, core))
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name") or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count() or 0,
        "physical_cores": len(cores) or None,
        "cpu_features": [name for name in CPU_FEATURES if name in flags],
    }


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def git_commit(repo: Path = REPO) -> str | None:
    """HEAD of the checkout the bench runs from, with ``-dirty`` when files are modified."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def environment(argv: list[str], prog: str = "medserve bench") -> dict[str, Any]:
    """The facts every report opens with; ``argv`` is what followed ``prog`` on the command."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([*shlex.split(prog), *argv]),
        "git_commit": git_commit(),
        "machine": {
            **cpu_info(),
            "memory_gib": _memory_gib(),
            "load_average": list(os.getloadavg()),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
