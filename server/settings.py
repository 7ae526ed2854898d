"""One typed settings object for the whole server, read from TOML and then the environment.

Precedence (last wins): dataclass defaults < TOML file < ``MEDSERVE_<SECTION>_<KEY>`` env vars.
Every error names the offending key, where it came from and what would be accepted, because the
person reading it is hospital IT at a console, not the author of this file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medserve.models.manifest import default_home

ENV_PREFIX = "MEDSERVE_"


class SettingsError(ValueError):
    """A configuration value is missing, unknown or malformed."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    """Interface to bind.  Loopback by default: exposing it on the intranet is a deliberate act."""
    port: int = 8000
    max_body_bytes: int = 1_048_576
    """Largest accepted request body; larger bodies get 413 before they are parsed."""
    api_keys: tuple[str, ...] = ()
    """Deprecated: plain bearer tokens holding every scope (a warning at start-up says so).
    Use `medserve keys create` (scoped, hashed keys in ``auth.keys_file``) instead."""
    docs: bool = False
    """Serve the OpenAPI schema at /schema (JSON only: the HTML UIs load assets from a CDN)."""
    log_level: str = "info"
    request_timeout_s: float = 600.0
    """Longest a single generation may run before it is aborted and its KV blocks freed."""
    tls_cert: str = ""
    """PEM certificate chain served to clients; with ``tls_key`` it turns on HTTPS (and only
    HTTPS: plain HTTP on the port is then refused).  Empty: plain HTTP."""
    tls_key: str = ""
    """PEM private key of ``tls_cert`` (keep it readable by the service user only)."""
    tls_client_ca: str = ""
    """PEM CA bundle for mutual TLS: when set, every client must present a certificate signed
    by it, or the TLS handshake fails before any HTTP is read."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: new connections are refused at once, in-flight requests (streams included)
    get this long to finish, then they are cancelled and the server stops."""
    header_timeout_s: float = 20.0
    """A client must send its complete request headers within this many seconds of connecting
    (or of starting a new request on a kept-alive connection), or the connection is closed."""


@dataclass(frozen=True)
class EngineSettings:
    enabled: bool = True
    """False runs the server without an LLM (e.g. a box that only hosts the case index)."""
    model: str = "smollm2-135m-instruct"
    """Name of the default served model: a folder under ``models_dir`` holding medserve.json."""
    models_dir: Path = field(default_factory=lambda: default_home() / "models")
    served_models: tuple[str, ...] = ()
    """Extra model folders (names under models_dir) to serve beside ``model``."""
    device: str = "CPU"
    max_num_seqs: int = 8
    """Sequences batched together per engine step."""
    max_num_batched_tokens: int = 2048
    kv_cache_gb: int = 1
    """GiB reserved up front for the paged KV cache of each model (GenAI sizes it in whole GiB)."""
    enable_prefix_caching: bool = True
    max_queue: int = 64
    """Requests waiting for the engine beyond this are refused with 503 instead of piling up."""
    default_max_tokens: int = 256
    max_context_tokens: int = 4096
    num_threads: int = 0
    """CPU inference threads; 0 lets OpenVINO decide (one per physical core)."""
    performance_hint: str = ""
    """OpenVINO PERFORMANCE_HINT: LATENCY or THROUGHPUT; empty: the plugin's default."""
    kv_cache_precision: str = ""
    """KV-cache element type (u8, f16, bf16, f32); empty: the plugin's default (u8 on x86)."""
    inference_precision: str = ""
    """Activation precision (bf16, f16, f32); empty: the best the CPU supports."""
    dynamic_quantization_group_size: int = -1
    """Group size of int8 activations for int weights; 0 turns it off; -1: plugin default."""
    cpu_pinning: str = ""
    """Pin inference threads to cores: on, off; empty: the plugin's default."""
    startup_timeout_s: float = 600.0

    def engine_options(self) -> dict[str, Any]:
        """What the engines read from settings (each engine takes the options it knows)."""
        return {
            "device": self.device,
            "num_threads": self.num_threads,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "enable_prefix_caching": self.enable_prefix_caching,
            "performance_hint": self.performance_hint,
            "kv_cache_precision": self.kv_cache_precision,
            "inference_precision": self.inference_precision,
            "dynamic_quantization_group_size": self.dynamic_quantization_group_size,
            "cpu_pinning": self.cpu_pinning,
        }


@dataclass(frozen=True)
class CasesSettings:
    enabled: bool = True
    data_dir: Path = field(default_factory=lambda: default_home() / "cases")
    """SQLite database (the source of truth) and the derived hnswlib index snapshot."""
    max_batch: int = 128
    """Cases per POST /v1/cases, and inputs per POST /v1/embeddings."""
    max_text_chars: int = 20_000
    """Longest case or query text; embedding cost grows with length (512-token windows)."""
    max_k: int = 100
    """Most results one search may ask for."""
    hnsw_m: int = 24
    """Graph degree: recall and memory grow with it (about 8*M bytes per case).  24 reaches
    recall@10 >= 0.98 at a million cases with half the search work of 16."""
    hnsw_ef_construction: int = 200
    """Build-time beam width: a better graph for a slower ingest."""
    hnsw_ef_search: int = 160
    """Search-time beam width (raised to k when k is larger): recall against latency.  160
    gives recall@10 0.99 at a million cases (benchmarks/RESULTS.md); smaller indexes need less."""
    hnsw_ef_filtered: int = 64
    """Beam width of filtered searches: a filtered walk already visits ~1/selectivity times more
    nodes (each through a Python predicate), so a narrower beam keeps recall at a lower cost."""
    exact_search_max: int = 20_000
    """Filtered searches matching at most this many cases are scored exactly, not via the graph
    (a selective filter makes the graph walk visit most of the index for few hits)."""
    initial_capacity: int = 10_000
    """Index slots allocated up front; the index doubles when full."""
    snapshot_interval_s: float = 300.0
    """How often a changed index is saved; after a crash, changes since the last snapshot are
    replayed from SQLite at start-up, so this bounds recovery work, not durability."""
    embed_threads: int = 1
    """OpenMP threads for the embedding model (1 leaves the other cores to the LLM)."""
    build_threads: int = 0
    """Threads for a full index rebuild at start-up; 0 uses every core."""
    language_centring: bool = True
    """Score searches by language-centred cosine once Chinese and English cases are both
    stored (server/cases/languages.py): without it a Chinese query ranks every Chinese case
    above the English case with its diagnosis."""
    language_min_texts: int = 8
    """Cases each language needs before centring starts (a mean of fewer is mostly topic)."""

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (
                1 <= self.max_batch <= 10_000,
                f"cases.max_batch must be 1-10000, got {self.max_batch}",
            ),
            (
                self.max_text_chars >= 100,
                f"cases.max_text_chars must be >= 100, got {self.max_text_chars}",
            ),
            (1 <= self.max_k <= 1000, f"cases.max_k must be 1-1000, got {self.max_k}"),
            (4 <= self.hnsw_m <= 96, f"cases.hnsw_m must be 4-96, got {self.hnsw_m}"),
            (
                self.hnsw_ef_construction >= self.hnsw_m,
                f"cases.hnsw_ef_construction must be >= hnsw_m ({self.hnsw_m}), "
                f"got {self.hnsw_ef_construction}",
            ),
            (
                self.hnsw_ef_search >= 1,
                f"cases.hnsw_ef_search must be >= 1, got {self.hnsw_ef_search}",
            ),
            (
                self.hnsw_ef_filtered >= 1,
                f"cases.hnsw_ef_filtered must be >= 1, got {self.hnsw_ef_filtered}",
            ),
            (
                self.exact_search_max >= 0,
                f"cases.exact_search_max must be >= 0, got {self.exact_search_max}",
            ),
            (
                self.initial_capacity >= 1,
                f"cases.initial_capacity must be >= 1, got {self.initial_capacity}",
            ),
            (
                self.snapshot_interval_s > 0,
                f"cases.snapshot_interval_s must be > 0, got {self.snapshot_interval_s}",
            ),
            (
                1 <= self.embed_threads <= 256,
                f"cases.embed_threads must be 1-256, got {self.embed_threads}",
            ),
            (
                self.build_threads >= 0,
                f"cases.build_threads must be >= 0, got {self.build_threads}",
            ),
            (
                self.language_min_texts >= 2,
                f"cases.language_min_texts must be >= 2, got {self.language_min_texts}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)


@dataclass(frozen=True)
class KnowledgeSettings:
    enabled: bool = True
    data_dir: Path = field(default_factory=lambda: default_home() / "knowledge")
    """SQLite database of documents and passages (the source of truth) and the hnswlib index."""
    chunk_chars: int = 700
    """Longest passage; e5 reads 512 tokens, about 1,500 English or 700 Chinese characters."""
    chunk_overlap_chars: int = 100
    """Characters shared by consecutive passages, so a fact cut in two is whole in one."""
    min_score: float = 0.85
    """Cosine similarity a passage needs to ground an answer while scores are plain cosines
    (one language stored); below it the server refuses.  Measured with multilingual-e5-small on
    guideline passages: related questions (English and Chinese) 0.886-0.913, unrelated ones
    0.735-0.818 (a Chinese cooking question the highest)."""
    min_score_centred: float = 0.17
    """The same once scores are language-centred (both languages stored, see
    ``language_min_texts``): centred cosines are on another scale.  Measured on
    benchmarks/data/retrieval_eval.json: the best passage of an answerable question scores
    >= 0.181 (cross-language; >= 0.281 same language), of an unrelated one <= 0.159; the
    default is the middle of that gap (RESULTS.md#refusal-threshold)."""
    context_min_score_centred: float = 0.09
    """Once an answer is allowed (its best passage reached ``min_score_centred``), the score
    any further passage needs to join it in the prompt, on the centred scale: the passage in
    the other language on the question's topic often ranks second at 0.10-0.15.  Measured on
    the evaluation set: supporting passage among those used for 31/32 questions at 0.09,
    27/32 at 0.17 (RESULTS.md#refusal-threshold).  Plain cosines use ``min_score`` for both."""
    language_centring: bool = True
    """Language-centred scoring once both languages are stored (see CasesSettings)."""
    language_min_texts: int = 8
    """Passages each language needs before centring starts."""
    max_text_chars: int = 500_000
    """Longest document text (after PDF extraction)."""
    max_question_chars: int = 4_000
    default_max_tokens: int = 256
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 64
    embed_threads: int = 1

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (
                100 <= self.chunk_chars <= 4000,
                f"knowledge.chunk_chars must be 100-4000, got {self.chunk_chars}",
            ),
            (
                0 <= self.chunk_overlap_chars < self.chunk_chars // 2,
                "knowledge.chunk_overlap_chars must be >= 0 and below half of chunk_chars",
            ),
            (
                -1.0 <= self.min_score <= 1.0,
                f"knowledge.min_score must be -1..1, got {self.min_score}",
            ),
            (
                -1.0 <= self.min_score_centred <= 1.0,
                f"knowledge.min_score_centred must be -1..1, got {self.min_score_centred}",
            ),
            (
                -1.0 <= self.context_min_score_centred <= 1.0,
                "knowledge.context_min_score_centred must be -1..1, "
                f"got {self.context_min_score_centred}",
            ),
            (
                self.language_min_texts >= 2,
                f"knowledge.language_min_texts must be >= 2, got {self.language_min_texts}",
            ),
            (4 <= self.hnsw_m <= 96, f"knowledge.hnsw_m must be 4-96, got {self.hnsw_m}"),
            (self.hnsw_ef_construction >= self.hnsw_m, "knowledge.hnsw_ef_construction < m"),
            (self.hnsw_ef_search >= 1, "knowledge.hnsw_ef_search must be >= 1"),
            (self.max_text_chars >= 1000, "knowledge.max_text_chars must be >= 1000"),
            (self.default_max_tokens >= 1, "knowledge.default_max_tokens must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)


@dataclass(frozen=True)
class AuthSettings:
    keys_file: Path = field(default_factory=lambda: default_home() / "keys.json")
    """Scoped API keys (salted hashes only), managed with `medserve keys`; re-read on change.
    While no key exists here and ``server.api_keys`` is empty, the server is open (a warning
    says so at start-up)."""
    default_rpm: int = 0
    """Requests per minute for a key that sets none (and for legacy and anonymous callers);
    0: unlimited."""
    default_tpm: int = 0
    """Prompt plus completion tokens per minute for a key that sets none; 0: unlimited."""
    default_max_streams: int = 0
    """Concurrent chat/completion requests for a key that sets none; 0: unlimited."""

    def __post_init__(self) -> None:
        for name in ("default_rpm", "default_tpm", "default_max_streams"):
            if getattr(self, name) < 0:
                raise SettingsError(
                    f"auth.{name} must be >= 0 (0: unlimited), got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class AuditSettings:
    enabled: bool = True
    """One hash-chained record per access to patient data; off only for test rigs."""
    dir: Path = field(default_factory=lambda: default_home() / "audit")
    """audit.jsonl, its rotated files, and the key that turns case ids into HMACs."""
    fsync: bool = True
    """fsync each batch of records before the responses they belong to are sent.  False:
    records reach the OS at once (they survive a crash of medserve) but a power cut may lose
    the last seconds."""
    max_file_bytes: int = 67_108_864
    """Rotate audit.jsonl when it reaches this size (the chain continues into the next file);
    0: rotate only with `medserve audit rotate`."""

    def __post_init__(self) -> None:
        if self.max_file_bytes != 0 and self.max_file_bytes < 4096:
            raise SettingsError(
                "audit.max_file_bytes must be 0 (no size rotation) or >= 4096, "
                f"got {self.max_file_bytes}"
            )


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    cases: CasesSettings = field(default_factory=CasesSettings)
    knowledge: KnowledgeSettings = field(default_factory=KnowledgeSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "engine": EngineSettings,
    "cases": CasesSettings,
    "knowledge": KnowledgeSettings,
    "auth": AuthSettings,
    "audit": AuditSettings,
}


def load_settings(
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build settings from an optional TOML file, the environment and explicit overrides.

    ``overrides`` come from the command line (e.g. ``--port``) and win over everything else.
    """
    env = os.environ if env is None else env
    raw: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in SECTIONS}

    if config_path is not None:
        for section, values in _read_toml(config_path).items():
            for key, value in values.items():
                raw[section][key] = (value, f"{config_path} [{section}]")

    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            env_name = f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}"
            if env_name in env:
                raw[section][f.name] = (env[env_name], f"env {env_name}")
    _reject_unknown_env(env)

    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                raw[section][key] = (value, f"--{key.replace('_', '-')}")

    built = {
        section: _build_section(section, cls, raw[section]) for section, cls in SECTIONS.items()
    }
    settings = Settings(**built)
    _validate(settings)
    return settings


def load_tool_settings(config_path: Path | None = None) -> Settings:
    """Settings for a local admin command (`medserve keys`, `medserve audit`): the same file
    (``--config`` or ``MEDSERVE_CONFIG``) and environment as the server, so both find the
    same key file and audit folder."""
    if config_path is None and "MEDSERVE_CONFIG" in os.environ:
        config_path = Path(os.environ["MEDSERVE_CONFIG"])
    return load_settings(config_path)


def _read_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    for section, values in data.items():
        if section not in SECTIONS:
            raise SettingsError(
                f"{path}: unknown section [{section}]; known sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise SettingsError(f"{path}: '{section}' must be a table ([{section}])")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key in values:
            if key not in known:
                raise SettingsError(
                    f"{path}: unknown key {section}.{key}; valid keys in [{section}]: "
                    f"{', '.join(sorted(known))}"
                )
    return data


def _reject_unknown_env(env: Mapping[str, str]) -> None:
    # MEDSERVE_HOME is read by default_home(); anything else under our prefix is a typo.
    known = {"MEDSERVE_HOME", "MEDSERVE_CONFIG"}
    for section, cls in SECTIONS.items():
        known |= {
            f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}" for f in dataclasses.fields(cls)
        }
    for name in env:
        if name.startswith(ENV_PREFIX) and name not in known:
            raise SettingsError(
                f"unknown environment variable {name}; medserve reads MEDSERVE_<SECTION>_<KEY>, "
                f"e.g. MEDSERVE_SERVER_PORT or MEDSERVE_ENGINE_MODEL"
            )


def _build_section(section: str, cls: type, values: dict[str, tuple[Any, str]]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, (value, origin) in values.items():
        try:
            kwargs[key] = _coerce(value, hints[key])
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{section}.{key} (from {origin}): {exc}") from None
    return cls(**kwargs)


def _coerce(value: Any, hint: Any) -> Any:
    """Turn a TOML value or an env string into the annotated type, or explain why not."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str | Path):
            raise ValueError(f"expected a path, got {value!r}")
        return Path(value).expanduser()
    if origin is tuple:
        if isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise ValueError(f"expected a list (or comma-separated string), got {value!r}")
        (item_type, _ellipsis) = typing.get_args(hint)
        return tuple(_coerce(item, item_type) for item in items)
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported settings type {hint}")
    raise TypeError(f"unsupported settings type {hint}")


def _validate(settings: Settings) -> None:
    s, e = settings.server, settings.engine
    checks: list[tuple[bool, str]] = [
        (1 <= s.port <= 65535, f"server.port must be 1-65535, got {s.port}"),
        (
            s.max_body_bytes >= 1024,
            f"server.max_body_bytes must be >= 1024, got {s.max_body_bytes}",
        ),
        (
            s.log_level in {"debug", "info", "warning", "error"},
            f"server.log_level must be debug, info, warning or error, got {s.log_level!r}",
        ),
        (s.request_timeout_s > 0, "server.request_timeout_s must be > 0"),
        (all(len(k) >= 16 for k in s.api_keys), "server.api_keys: each key needs >= 16 characters"),
        (s.drain_timeout_s >= 0, f"server.drain_timeout_s must be >= 0, got {s.drain_timeout_s}"),
        (
            s.header_timeout_s > 0,
            f"server.header_timeout_s must be > 0, got {s.header_timeout_s}",
        ),
        (e.max_num_seqs >= 1, f"engine.max_num_seqs must be >= 1, got {e.max_num_seqs}"),
        (e.kv_cache_gb > 0, f"engine.kv_cache_gb must be > 0, got {e.kv_cache_gb}"),
        (e.max_queue >= 1, f"engine.max_queue must be >= 1, got {e.max_queue}"),
        (e.default_max_tokens >= 1, "engine.default_max_tokens must be >= 1"),
        (e.max_context_tokens >= 16, "engine.max_context_tokens must be >= 16"),
        (e.num_threads >= 0, f"engine.num_threads must be >= 0, got {e.num_threads}"),
        (
            e.performance_hint in {"", "LATENCY", "THROUGHPUT"},
            f"engine.performance_hint must be LATENCY or THROUGHPUT, got {e.performance_hint!r}",
        ),
        (
            e.kv_cache_precision in {"", "u8", "f16", "bf16", "f32"},
            f"engine.kv_cache_precision must be u8, f16, bf16 or f32, got {e.kv_cache_precision!r}",
        ),
        (
            e.inference_precision in {"", "bf16", "f16", "f32"},
            f"engine.inference_precision must be bf16, f16 or f32, got {e.inference_precision!r}",
        ),
        (
            e.dynamic_quantization_group_size >= -1,
            "engine.dynamic_quantization_group_size must be -1 (default), 0 (off) or a size",
        ),
        (
            e.cpu_pinning in {"", "on", "off"},
            f"engine.cpu_pinning must be on or off, got {e.cpu_pinning!r}",
        ),
        (
            e.max_num_batched_tokens >= 64,
            f"engine.max_num_batched_tokens must be >= 64, got {e.max_num_batched_tokens}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SettingsError(message)
    _validate_tls(s)


def _validate_tls(s: ServerSettings) -> None:
    """Checked at start-up so that a wrong path is named here, not as an SSL traceback."""
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SettingsError(
            "server.tls_cert and server.tls_key go together: set both (HTTPS) or neither (HTTP)"
        )
    if s.tls_client_ca and not s.tls_cert:
        raise SettingsError(
            "server.tls_client_ca (mutual TLS) needs server.tls_cert and server.tls_key too"
        )
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        value = getattr(s, name)
        if not value:
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise SettingsError(f"server.{name}: {path} does not exist or is not a file")
        if not os.access(path, os.R_OK):
            raise SettingsError(f"server.{name}: {path} is not readable by this user")
