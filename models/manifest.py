"""`medserve.json`: the one owner of a model folder's manifest.

A folder under ``models_dir`` is a servable model iff its manifest exists and parses. Every
writer builds its folder in a staging directory and writes the manifest last, so a killed
export or install never leaves a folder that looks finished.

The manifest says which engine serves the folder (the server starts that engine's worker, in
that engine's virtual environment), in which format the weights are, and what was measured
about them. Folders written before ``engine``/``format`` existed are OpenVINO IR folders.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST_NAME = "medserve.json"


def default_home() -> Path:
    """``$MEDSERVE_HOME`` or ``~/.medserve``: models, cases, downloads and engine caches."""
    return Path(os.environ.get("MEDSERVE_HOME", Path.home() / ".medserve")).expanduser()


def default_models_dir() -> Path:
    return default_home() / "models"


class ManifestError(ValueError):
    """A model folder has no usable manifest."""


@dataclass(frozen=True)
class ModelManifest:
    name: str
    precision: str
    """Weight precision as served: fp32, fp16, bf16, int8, int4, sym_int4, q8_0, ..."""
    architecture: str = "unknown"
    """The Hugging Face model_type of the source (llama, glm, glm4, chatglm, ...)."""
    context_length: int = 0
    """Trained context length in tokens; 0 when unknown (the server's limit applies)."""
    engine: str = "openvino"
    """Which engine serves this folder (a key of ``medserve.accel.registry.ENGINES``)."""
    format: str = "openvino-ir"
    """How the weights are stored: openvino-ir, ipex-llm-low-bit, gguf, chatglm-cpp, hf."""
    source: Mapping[str, Any] = field(default_factory=dict)
    accuracy: Mapping[str, Any] | None = None
    created: str = ""
    extras: Mapping[str, Any] = field(default_factory=dict)
    """Other top-level keys (e.g. the bundled model's sanity answer), kept as written."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["extras"]
        data["source"] = dict(self.source)
        if self.accuracy is None:
            del data["accuracy"]
        else:
            data["accuracy"] = dict(self.accuracy)
        return {**self.extras, **data}

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], where: Path | str = "medserve.json"
    ) -> ModelManifest:
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: expected a JSON object")
        try:
            return cls(
                name=str(data["name"]),
                precision=str(data.get("precision", "unknown")),
                architecture=str(data.get("architecture", "unknown")),
                context_length=int(data.get("context_length") or 0),
                engine=str(data.get("engine", "openvino")),
                format=str(data.get("format", "openvino-ir")),
                source=dict(data.get("source") or {}),
                accuracy=dict(data["accuracy"]) if data.get("accuracy") else None,
                created=str(data.get("created", "")),
                extras={k: v for k, v in data.items() if k not in _FIELDS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: malformed manifest ({exc})") from None


_FIELDS = {f for f in ModelManifest.__dataclass_fields__ if f != "extras"}


def read_manifest(model_dir: Path) -> ModelManifest:
    """The manifest of a finished model folder; ManifestError says why there is none."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(
            f"{model_dir} is not a prepared model folder (no {MANIFEST_NAME}); run "
            f"`medserve setup` or `medserve export`, or check engine.models_dir"
        ) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} cannot be read: {exc}") from None
    return ModelManifest.from_json(data, path)


def try_read_manifest(model_dir: Path) -> ModelManifest | None:
    try:
        return read_manifest(model_dir)
    except ManifestError:
        return None


def write_manifest(model_dir: Path, manifest: ModelManifest | Mapping[str, Any]) -> Path:
    """Write ``medserve.json`` atomically (temp file + fsync + rename); stamps ``created``."""
    if not isinstance(manifest, ModelManifest):
        manifest = ModelManifest.from_json(manifest)
    if not manifest.created:
        manifest = replace(manifest, created=datetime.now(UTC).isoformat(timespec="seconds"))
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, streamed: how manifests name the exact source weights."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
