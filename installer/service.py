"""The systemd unit of `medserve serve`, built as text from a few parameters.

Pure functions only (no file, user or systemctl is touched here: installer/service_cli.py does
that), so every line of the unit is unit-tested and checked by `systemd-analyze verify` and
`systemd-analyze security` without a running systemd.

The sandbox follows what the server actually does: it writes only below its data folder, talks
TCP to its clients and Unix sockets to its workers, runs engine workers that JIT code (so no
MemoryDenyWriteExecute), and drains on SIGTERM before it stops its workers itself.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

GIB = 1024**3
MIB = 1024**2

# MemoryMax headroom over the planner's figure (weights + KV pool per model,
# kv_cache/planner.py): engines allocate compiled-model buffers, activations and allocator
# slack beyond it; each worker is a Python interpreter with its engine runtime (measured: the
# bundled 135M int8 model's OpenVINO worker holds ~0.45 GiB besides its weights); the server
# process holds Litestar, the embedding model and the case index.
MODEL_OVERHEAD_FACTOR = 1.2
WORKER_HEADROOM_BYTES = 512 * MIB
SERVER_HEADROOM_BYTES = 1 * GIB
MEMORY_ROUNDING_BYTES = 256 * MIB

# After the drain, the server stops its workers (Shutdown, then up to 10 s + 5 s each, in
# parallel), saves the case index snapshot and closes the audit trail; this is their margin.
STOP_MARGIN_S = 45

# Directories ProtectHome= hides; anything the service must read or write below them is bound
# back into the sandbox explicitly.
HOME_ROOTS = (PurePosixPath("/home"), PurePosixPath("/root"), PurePosixPath("/run/user"))

# Proxies would only matter for outbound traffic, which medserve never makes; a manager-wide
# DefaultEnvironment= must not hand them to libraries that honour them anyway.
PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
)

# PrivateTmp=yes gives the service its own empty /tmp and /var/tmp: data kept there is invisible.
PRIVATE_TMP_ROOTS = (PurePosixPath("/tmp"), PurePosixPath("/var/tmp"))

_UNIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,200}$")
_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ServiceError(ValueError):
    """A parameter of the unit is unusable; the message names it and the fix."""


@dataclass(frozen=True)
class ServiceParams:
    name: str = "medserve"
    user: str = "medserve"
    group: str = "medserve"
    home: Path = Path("/var/lib/medserve")
    """MEDSERVE_HOME: the only folder the service may write (models, cases, audit, keys)."""
    exec_start: Path = Path("/opt/medserve/.venv/bin/medserve")
    config: Path | None = None
    allow: tuple[Network, ...] = ()
    """Client networks besides localhost; everything else is dropped by the kernel."""
    memory_max_bytes: int = 4 * GIB
    drain_timeout_s: float = 30.0
    port: int = 8000
    device: str = "CPU"
    read_only_paths: tuple[Path, ...] = ()
    """Paths the service reads (venvs, their base Python, the source tree, models, config)."""
    extra_write_paths: tuple[Path, ...] = ()
    """Writable folders the settings place outside ``home`` (cases.data_dir, audit.dir)."""
    generated_by: str = field(default="medserve install-service", compare=False)


def parse_allow(values: Iterable[str]) -> tuple[Network, ...]:
    """``--allow`` values as networks; a host address with bits set beyond the mask is refused
    (10.1.2.3/16 usually means a typo, and systemd would silently widen it)."""
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError as exc:
            raise ServiceError(
                f"--allow {value!r} is not a network in CIDR form ({exc}); "
                f"give e.g. 10.20.0.0/16 or 192.168.5.0/24"
            ) from None
    return tuple(networks)


def parse_memory(text: str) -> int:
    """``--memory-max`` as bytes: 8G, 8192M, 8GiB or a plain byte count (base 1024, as systemd)."""
    match = _MEMORY.match(text.strip())
    if not match:
        raise ServiceError(f"--memory-max {text!r}: give a size such as 8G, 12288M or 16GiB")
    scale = {"": 1, "K": 1024, "M": MIB, "G": GIB, "T": 1024 * GIB}[match.group(2).upper()]
    value = int(float(match.group(1)) * scale)
    if value < 256 * MIB:
        raise ServiceError(f"--memory-max {text!r} is below 256M; the server cannot start in it")
    return value


def memory_max_bytes(needs: Mapping[str, tuple[int, int]]) -> int:
    """MemoryMax from the planner's per-model (weight bytes, KV pool bytes):

    ceil_256MiB( 1.2 * sum(weights + kv_pool) + 512 MiB * models + 1 GiB )
    """
    models = sum(weights + kv for weights, kv in needs.values())
    total = MODEL_OVERHEAD_FACTOR * models + WORKER_HEADROOM_BYTES * len(needs)
    total += SERVER_HEADROOM_BYTES
    return math.ceil(total / MEMORY_ROUNDING_BYTES) * MEMORY_ROUNDING_BYTES


def stop_timeout_s(drain_timeout_s: float) -> int:
    return math.ceil(drain_timeout_s) + STOP_MARGIN_S


def under_home_roots(path: Path) -> bool:
    pure = PurePosixPath(path)
    return any(pure == root or root in pure.parents for root in HOME_ROOTS)


def minimal_paths(paths: Iterable[Path]) -> list[Path]:
    """Sorted, without duplicates and without paths inside another listed path."""
    unique = sorted({PurePosixPath(p) for p in paths})
    kept = [p for p in unique if not any(q != p and q in p.parents for q in unique)]
    return [Path(p) for p in kept]


def check_params(params: ServiceParams) -> None:
    if not _UNIT_NAME.match(params.name) or params.name.endswith(".service"):
        raise ServiceError(f"--name {params.name!r}: use letters, digits, '-', '_' or '.'")
    if not _USER_NAME.match(params.user):
        raise ServiceError(f"--user {params.user!r} is not a valid system user name")
    home = PurePosixPath(params.home)
    if not home.is_absolute() or len(home.parts) < 3:
        raise ServiceError(
            f"--home {params.home}: give an absolute folder of its own, e.g. /var/lib/medserve"
        )
    for path in (params.home, *params.extra_write_paths):
        if any(root in PurePosixPath(path).parents for root in PRIVATE_TMP_ROOTS):
            raise ServiceError(
                f"{path} is under /tmp or /var/tmp, which the service sees as its own empty "
                f"folder (PrivateTmp); keep its data in e.g. /var/lib/medserve"
            )
    paths = (params.home, params.exec_start, params.config, *params.read_only_paths)
    for path in (*paths, *params.extra_write_paths):
        if path is not None and any(c in str(path) for c in "\n\r\t\"'\\%$"):
            raise ServiceError(f"{path!r}: quotes, '%', '$', '\\' or control characters in a path")


def render_unit(params: ServiceParams) -> str:
    check_params(params)
    home = params.home
    writes = minimal_paths([home, *params.extra_write_paths])
    hidden_writes = [p for p in writes if under_home_roots(p)]
    hidden_reads = [
        p
        for p in params.read_only_paths
        if under_home_roots(p) and not any(w == p or w in p.parents for w in writes)
    ]
    # tmpfs keeps /home and /root empty, with only the bound paths inside (same protection as
    # "yes" for everything else there); "yes" when nothing is needed from them.
    protect_home = "tmpfs" if hidden_reads or hidden_writes else "yes"
    privileged_port = params.port < 1024
    environment = [
        f"MEDSERVE_HOME={home}",
        *([f"MEDSERVE_CONFIG={params.config}"] if params.config else []),
        # The service user has no home of its own; caches some libraries keep go here.
        f"HOME={home}",
        "HF_HUB_OFFLINE=1",
        "TRANSFORMERS_OFFLINE=1",
        "HF_HUB_DISABLE_TELEMETRY=1",
        "DO_NOT_TRACK=1",
        # The venvs are read-only in the sandbox; don't try to write __pycache__ into them.
        "PYTHONDONTWRITEBYTECODE=1",
    ]
    allow = " ".join(["localhost", *(str(n) for n in params.allow)])
    lines = [
        # split/join: a newline in a command-line argument must not end the comment.
        f"# Written by `{' '.join(params.generated_by.split())}`; run it again rather than "
        "editing this file.",
        "[Unit]",
        "Description=medserve on-premise LLM inference server",
        "Wants=network-online.target",
        "After=network-online.target",
        "StartLimitIntervalSec=600",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=exec",
        f"User={params.user}",
        f"Group={params.group}",
        f"ExecStart={params.exec_start} serve",
        "# SIGHUP: reload the model versions (models_dir symlinks); the server keeps serving.",
        "ExecReload=/bin/kill -HUP $MAINPID",
        f"WorkingDirectory={home}",
        *(f'Environment="{item}"' for item in environment),
        f"UnsetEnvironment={' '.join(PROXY_VARIABLES)}",
        "",
        "# Stop: SIGTERM to the server only; it drains for server.drain_timeout_s, then stops",
        "# its workers itself. Whatever is left when it exits is killed (KillMode=mixed).",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={stop_timeout_s(params.drain_timeout_s)}",
        "Restart=on-failure",
        "RestartSec=5",
        "# Exit code 2 is a configuration error: restarting would only repeat it.",
        "RestartPreventExitStatus=2",
        "# A worker killed for memory is restarted by the server (README, Operations); systemd",
        "# must not stop the whole service for it.",
        "OOMPolicy=continue",
        "",
        f"MemoryMax={math.ceil(params.memory_max_bytes / MIB)}M",
        "LimitNOFILE=65536",
        "",
        "# Network: the kernel drops every packet from or to anything but these networks.",
        "IPAddressDeny=any",
        f"IPAddressAllow={allow}",
        "# AF_UNIX: the worker socket pairs.",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "",
        "# Files: the OS and the venvs read-only; only the data folder writable.",
        "ProtectSystem=strict",
        f"ProtectHome={protect_home}",
        *(f"BindReadOnlyPaths={p}" for p in minimal_paths(hidden_reads)),
        *(f"BindPaths={p}" for p in minimal_paths(hidden_writes)),
        *(f"ReadWritePaths={p}" for p in writes),
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        "UMask=0077",
        "",
        "# Privileges and kernel surface.",
        "NoNewPrivileges=yes",
        *(
            [
                f"# Port {params.port} < 1024: binding it needs this one capability.",
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            ]
            if privileged_port
            else ["CapabilityBoundingSet=", "AmbientCapabilities="]
        ),
        # A user namespace would hold the capability outside the host's network namespace.
        *([] if privileged_port else ["PrivateUsers=yes"]),
        *(
            ["PrivateDevices=yes"]
            if params.device.upper() == "CPU"
            else [f"# engine.device={params.device}: the accelerator's /dev nodes stay visible."]
        ),
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "# Other users' processes are invisible; /proc/cpuinfo and meminfo stay (engines read",
        "# them to size thread pools), so no ProcSubset=pid.",
        "ProtectProc=invisible",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "# No MemoryDenyWriteExecute: OpenVINO's oneDNN and the GGML engines JIT their kernels.",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        # Not ~@resources: OpenVINO pins threads and binds memory to NUMA nodes with it.
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"
