"""KV-cache capacity planning: how many tokens fit, and whether the configuration fits in RAM.

The paged KV tensors themselves live inside the OpenVINO GenAI scheduler (one preallocated pool
of blocks per model, handed to each layer as views).  This module does the arithmetic around it,
without tensors, so a misconfiguration is caught at start-up with a message naming the setting,
not by the kernel's OOM killer in the middle of a night shift.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medserve.models.manifest import try_read_manifest

# OpenVINO's CPU plugin stores KV as u8 by default, with a float scale and zero point per
# token, head and group; bf16/f16/f32 are selectable through KV_CACHE_PRECISION.
BYTES_PER_ELEMENT = {"u8": 1, "f16": 2, "bf16": 2, "f32": 4}
U8_GROUP_OVERHEAD_BYTES = 8  # f32 scale + f32 zero point
U8_GROUP_SIZE = 64  # elements sharing one scale/zero point
DEFAULT_BLOCK_SIZE = 32  # tokens per KV block on CPU
RAM_FRACTION_LIMIT = 0.85  # leave room for the OS, the server and the case index


class KVPlanError(ValueError):
    """The configured KV cache cannot work on this machine."""


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> KVGeometry:
        try:
            layers = int(config["num_hidden_layers"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        except (KeyError, TypeError, ValueError) as exc:
            raise KVPlanError(f"config.json lacks the attention geometry ({exc})") from None
        return cls(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> KVGeometry:
        path = model_dir / "config.json"
        try:
            return cls.from_hf_config(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise KVPlanError(f"cannot read {path}: {exc}") from None

    def bytes_per_token(self, precision: str = "u8") -> int:
        """K and V for one token across all layers."""
        if precision not in BYTES_PER_ELEMENT:
            raise KVPlanError(
                f"unknown KV precision {precision!r}; use one of {', '.join(BYTES_PER_ELEMENT)}"
            )
        per_head = self.head_dim * BYTES_PER_ELEMENT[precision]
        if precision == "u8":
            per_head += math.ceil(self.head_dim / U8_GROUP_SIZE) * U8_GROUP_OVERHEAD_BYTES
        return 2 * self.num_layers * self.num_kv_heads * per_head


@dataclass(frozen=True)
class KVPlan:
    cache_bytes: int
    bytes_per_token: int
    block_size: int

    @property
    def num_blocks(self) -> int:
        return self.cache_bytes // (self.bytes_per_token * self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def full_context_sequences(self, context_tokens: int) -> int:
        """How many sequences of the full context length fit at once."""
        return self.capacity_tokens // max(1, context_tokens)


def plan_kv_cache(
    geometry: KVGeometry,
    cache_gb: float,
    precision: str = "u8",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> KVPlan:
    if cache_gb <= 0:
        raise KVPlanError(f"engine.kv_cache_gb must be > 0, got {cache_gb}")
    return KVPlan(
        cache_bytes=int(cache_gb * 1024**3),
        bytes_per_token=geometry.bytes_per_token(precision),
        block_size=block_size,
    )


# Which files of a model folder hold weights that stay in RAM while serving, by manifest
# format (models/manifest.py): tokenizer models and configs are negligible and left out.
WEIGHT_FILES_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "openvino-ir": ("openvino_model.bin",),
    "ipex-llm-low-bit": ("*.bin", "*.safetensors"),
    "hf": ("*.safetensors", "*.bin"),
    "gguf": ("*.gguf",),
    "chatglm-cpp": ("*.bin",),
}


def model_weight_bytes(model_dir: Path) -> int:
    """Bytes of the weights the engine keeps in memory for the folder's format."""
    manifest = try_read_manifest(model_dir)
    fmt = manifest.format if manifest is not None else "openvino-ir"
    patterns = WEIGHT_FILES_BY_FORMAT.get(fmt, ("*.bin", "*.safetensors", "*.gguf"))
    files = {path for pattern in patterns for path in Path(model_dir).glob(pattern)}
    return sum(path.stat().st_size for path in files if path.is_file())


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_needs(model_dirs: Mapping[str, Path], cache_gb: float) -> dict[str, tuple[int, int]]:
    """Per model: (weight bytes, KV pool bytes), the figures check_fits_in_memory adds up
    (`medserve doctor` reports them without raising)."""
    cache_bytes = int(cache_gb * 1024**3)
    return {name: (model_weight_bytes(d), cache_bytes) for name, d in model_dirs.items()}


def check_fits_in_memory(
    model_dirs: Mapping[str, Path], cache_gb: float, total_ram: int | None = None
) -> int:
    """Raise KVPlanError when weights plus KV pools exceed the RAM budget; return bytes needed."""
    total_ram = physical_memory_bytes() if total_ram is None else total_ram
    needed = sum(w + kv for w, kv in memory_needs(model_dirs, cache_gb).values())
    budget = int(total_ram * RAM_FRACTION_LIMIT)
    if needed > budget:
        raise KVPlanError(
            f"{len(model_dirs)} model(s) with engine.kv_cache_gb={cache_gb:g} need "
            f"{needed / 1024**3:.1f} GiB (weights + KV pools) but the budget is "
            f"{budget / 1024**3:.1f} GiB ({RAM_FRACTION_LIMIT:.0%} of "
            f"{total_ram / 1024**3:.1f} GiB RAM); lower engine.kv_cache_gb or serve fewer models"
        )
    return needed
