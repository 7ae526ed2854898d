"""`medserve bench bandwidth`: memory read bandwidth, and the decode roofline it sets per model.

    python -m medserve.benchmarks.bandwidth [--threads N] [MODEL ...] \\
        [--measured NAME=TOKS | NAME=bench.json ...] [--json out.json]

Decoding one token of one stream reads every weight once, and on a CPU that read is the limit:
tokens/s can never exceed bandwidth / weight bytes read per token (the "roofline"). Stating a
measured tokens/s as a % of that bound tells how much an engine leaves on the table, on any CPU.

What is measured and how:

- Bandwidth: a buffer of several GiB (far beyond any cache), filled first so that every page is
  really backed (an untouched array reads the kernel's shared zero page and overstates it),
  is split into one contiguous slice per thread; each thread runs numpy's bitwise-or reduction
  over its slice (numpy releases the GIL inside ufunc loops, so threads do run in parallel;
  the output shows the 1-thread figure too, so the scaling can be checked). Median of passes.
- Bytes per token: every weight tensor counts whole, once, except tables that are only
  gathered (the input embedding of an untied model): those count one row. A tied
  embedding doubles as the lm_head, so it is read whole, once.
  - GGUF: the tensor list from the `gguf` package; `token_embd.weight` is gathered when an
    `output.weight` exists (untied), else it is the output matrix and counts whole.
  - OpenVINO IR: the Constants in openvino_model.xml (each distinct .bin range once, which
    is what the runtime keeps in memory). A Constant counts one row per token when every path
    out of its constant-only decompression subgraph (Convert/Subtract/Multiply/Reshape on
    constants) ends in a Gather's data input; if any path reaches a MatMul or another op
    it is read whole. This follows the graph, so it also holds for int4 models whose
    embedding the exporter kept in int8, and needs no config.json.
- KV-cache reads are not counted (small at short contexts: about 2 % of the weights for the
  bundled model at 200 tokens), nor activations, so the roofline is a slight overestimate.
- Measured figures: `NAME=TOKS`, or `NAME=FILE.json` from `medserve bench --json` (decode rate
  of one stream = 1000 / median inter-token ms, whatever the concurrency: a batched step
  that is still memory-bound keeps each stream at the single-stream roofline) or from
  `llama-bench -o json` (avg_ts of the generation test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GIB = 1 << 30
# GGUF tensors that are looked up by token id rather than multiplied (GPT-2-style models also
# have a position table); token_embd only while an output.weight exists.
GGUF_LOOKUP_TABLES = ("token_embd.weight", "position_embd.weight", "token_types.weight")
GGUF_OUTPUT = "output.weight"
OV_MODEL_XML = "openvino_model.xml"
CPU_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


@dataclass
class CpuInfo:
    model_name: str
    cores: int
    flags: dict[str, bool]

    def describe(self) -> str:
        present = [f for f, on in self.flags.items() if on]
        absent = [f for f, on in self.flags.items() if not on]
        return (
            f"{self.model_name}, {self.cores} cores usable; has {', '.join(present) or 'none'}; "
            f"lacks {', '.join(absent) or 'none'}"
        )


@dataclass
class Bandwidth:
    threads: int
    buffer_gib: float
    passes_gb_s: list[float]

    @property
    def median_gb_s(self) -> float:
        return statistics.median(self.passes_gb_s)


@dataclass
class WeightTraffic:
    """Weight bytes of one model file: stored, and read to decode one token."""

    name: str
    path: str
    format: str
    stored_bytes: int
    per_token_bytes: int
    gathered: list[str] = field(default_factory=list)
    """Tables counted as one row per token (lookups, not matmuls)."""


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """The CPU's name and the flags that decide which kernels an engine can use."""
    name, flags = "unknown CPU", set()
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return CpuInfo(name, usable_cores(), {f: f in flags for f in CPU_FLAGS})


def measure_bandwidth(threads: int, buffer_gib: float = 2.0, passes: int = 5) -> Bandwidth:
    """Read bandwidth of ``threads`` threads over a ``buffer_gib`` buffer, one figure per pass."""
    if threads < 1 or passes < 1 or buffer_gib <= 0:
        raise ValueError("threads and passes must be >= 1, buffer_gib > 0")
    words = int(buffer_gib * GIB) // 8 // threads * threads
    buffer = np.empty(words, dtype=np.uint64)
    buffer.fill(1)  # commit every page: see the module docstring
    slices = np.split(buffer, threads)
    results = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.bitwise_or.reduce, slices))  # warm-up: threads started, TLBs filled
        for _ in range(passes):
            started = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, slices))
            results.append(round(buffer.nbytes / (time.perf_counter() - started) / 1e9, 1))
    return Bandwidth(threads, round(buffer.nbytes / GIB, 2), results)


def gguf_weight_traffic(path: Path, name: str | None = None) -> WeightTraffic:
    """Bytes per token of a GGUF file, from its tensor list (no tensor data is read)."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    tied = all(t.name != GGUF_OUTPUT for t in tensors)
    stored = per_token = 0
    gathered = []
    for tensor in tensors:
        size = int(tensor.n_bytes)
        stored += size
        lookup = tensor.name in GGUF_LOOKUP_TABLES and not (tied and tensor.name.startswith("tok"))
        if lookup:
            # GGUF lists dimensions fastest-first: shape[0] is the row length.
            rows = int(tensor.n_elements) // int(tensor.shape[0])
            per_token += -(-size // rows)
            gathered.append(tensor.name)
        else:
            per_token += size
    return WeightTraffic(name or path.stem, str(path), "gguf", stored, per_token, gathered)


def openvino_weight_traffic(model_dir: Path, name: str | None = None) -> WeightTraffic:
    """Bytes per token of an OpenVINO IR folder, from the graph in openvino_model.xml."""
    root = ET.parse(model_dir / OV_MODEL_XML).getroot()
    layers = {layer.get("id", ""): layer for layer in root.iter("layer")}
    consumers: dict[str, list[tuple[str, str]]] = defaultdict(list)
    inputs: dict[str, set[str]] = defaultdict(set)
    for edge in root.iter("edge"):
        src, dst, port = edge.get("from-layer", ""), edge.get("to-layer", ""), edge.get("to-port")
        consumers[src].append((dst, port or ""))
        inputs[dst].add(port or "")
    constant = _constant_subgraph(layers, consumers, inputs)

    # Each distinct (offset, size) range of the .bin once; the weakest use decides: whole if
    # any Constant with that range is read whole.
    ranges: dict[tuple[int, int], int | None] = {}
    labels: dict[tuple[int, int], str] = {}
    for layer_id, layer in layers.items():
        data = layer.find("data")
        if layer.get("type") != "Const" or data is None or data.get("size") is None:
            continue
        key = (int(data.get("offset", "0")), int(data.get("size", "0")))
        row = _gathered_row_bytes(layer_id, data, layers, consumers, constant)
        if key in ranges and (ranges[key] is None or row is None):
            ranges[key] = None
        else:
            ranges[key] = row
        labels.setdefault(key, layer.get("name", layer_id))
    stored = sum(size for _, size in ranges)
    per_token = sum(size if row is None else row for (_, size), row in ranges.items())
    # Listed only above 1 KiB: zero points, scales and shape helpers are gathered too, but tiny.
    gathered = sorted(
        labels[key] for key, row in ranges.items() if row is not None and key[1] > 1024
    )
    return WeightTraffic(
        name or model_dir.name, str(model_dir), "openvino", stored, per_token, gathered
    )


def weight_traffic(path: Path, name: str | None = None) -> WeightTraffic:
    """Dispatch on the path: a .gguf file or an OpenVINO model folder."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_weight_traffic(path, name)
    if (path / OV_MODEL_XML).is_file():
        return openvino_weight_traffic(path, name)
    raise ValueError(f"{path}: neither a .gguf file nor a folder with {OV_MODEL_XML}")


def roofline_tokens_per_s(bandwidth_gb_s: float, per_token_bytes: int) -> float:
    return bandwidth_gb_s * 1e9 / per_token_bytes


def measured_tokens_per_s(value: str, name: str = "") -> tuple[float, str]:
    """A measured decode rate and where it came from: a number or a benchmark JSON file.

    A llama-bench file may hold several models: the entry whose GGUF is named ``name`` wins.
    """
    if not value.endswith(".json"):
        return float(value), "given"
    data: Any = json.loads(Path(value).expanduser().read_text(encoding="utf-8"))
    if isinstance(data, dict) and data.get("itl_median_ms"):
        c = data.get("concurrency", 1)
        return 1000.0 / float(data["itl_median_ms"]), f"1000/ITL, concurrency {c}"
    if isinstance(data, list):  # llama-bench -o json: one entry per test
        generation = [t for t in data if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0]
        same = [t for t in generation if Path(t.get("model_filename", "")).stem == name]
        generation = same or generation
        if generation:
            return float(generation[0]["avg_ts"]), f"llama-bench tg{generation[0]['n_gen']}"
    raise ValueError(f"{value}: not a medserve bench or llama-bench JSON result")


def _constant_subgraph(
    layers: dict[str, ET.Element],
    consumers: dict[str, list[tuple[str, str]]],
    inputs: dict[str, set[str]],
) -> set[str]:
    """Layers computed from Constants only: weight decompression, folded shapes."""
    constant = {i for i, layer in layers.items() if layer.get("type") == "Const"}
    ready: dict[str, set[str]] = defaultdict(set)
    queue = list(constant)
    while queue:
        src = queue.pop()
        for dst, port in consumers[src]:
            ready[dst].add(port)
            if dst not in constant and ready[dst] == inputs[dst]:
                constant.add(dst)
                queue.append(dst)
    return constant


def _gathered_row_bytes(
    layer_id: str,
    data: ET.Element,
    layers: dict[str, ET.Element],
    consumers: dict[str, list[tuple[str, str]]],
    constant: set[str],
) -> int | None:
    """Bytes of one row if this Constant only feeds Gathers' data inputs, else None (whole)."""
    shape = [int(d) for d in (data.get("shape") or "").replace(" ", "").split(",") if d]
    if not shape or shape[0] <= 1:
        return None
    exits, seen, stack = [], {layer_id}, [layer_id]
    while stack:
        for dst, port in consumers[stack.pop()]:
            if dst in constant:
                if dst not in seen:
                    seen.add(dst)
                    stack.append(dst)
            else:
                exits.append((layers[dst].get("type"), port))
    if exits and all(kind == "Gather" and port == "0" for kind, port in exits):
        return -(-int(data.get("size", "0")) // shape[0])
    return None


def _parse_model(arg: str) -> tuple[str | None, Path]:
    name, sep, path = arg.partition("=")
    return (name, Path(path)) if sep and not Path(arg).exists() else (None, Path(arg))


def _row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([_row(header, widths), rule, *(_row(r, widths) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medserve bench bandwidth", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "models", nargs="*", help="[NAME=]PATH: a .gguf file or an OpenVINO IR folder"
    )
    parser.add_argument("--threads", type=int, default=usable_cores(), help="default: all cores")
    parser.add_argument("--buffer-gib", type=float, default=2.0)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--bandwidth", type=float, default=None, help="skip measuring: GB/s")
    parser.add_argument(
        "--measured",
        action="append",
        default=[],
        metavar="NAME=TOKS|NAME=FILE.json",
        help="a measured decode rate for model NAME (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = parser.parse_args(argv)

    try:
        models = [weight_traffic(path, name) for name, path in map(_parse_model, args.models)]
        by_name = {m.name: m for m in models}
        measured = []
        for item in args.measured:
            name, sep, value = item.partition("=")
            if not sep or name not in by_name:
                raise ValueError(f"--measured {item!r}: use NAME=VALUE with NAME one of the models")
            measured.append((name, *measured_tokens_per_s(value, name)))
    except (OSError, ValueError) as exc:
        print(f"medserve bench bandwidth: {exc}", file=sys.stderr)
        return 2

    cpu = cpu_info()
    load = os.getloadavg()  # the box is shared: a busy neighbour lowers every figure
    print(f"CPU: {cpu.describe()}")
    print(f"load average before measuring: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    single: Bandwidth | None = None
    if args.bandwidth is not None:
        bandwidth = Bandwidth(args.threads, 0.0, [args.bandwidth])
        print(f"memory read bandwidth: {args.bandwidth:.1f} GB/s (given)")
    else:
        bandwidth = measure_bandwidth(args.threads, args.buffer_gib, args.passes)
        if args.threads > 1:
            single = measure_bandwidth(1, args.buffer_gib, args.passes)
        print(
            f"memory read bandwidth, {bandwidth.threads} threads over {bandwidth.buffer_gib} GiB: "
            f"{bandwidth.median_gb_s:.1f} GB/s (median of {len(bandwidth.passes_gb_s)} passes "
            f"{bandwidth.passes_gb_s})"
        )
        if single is not None:
            print(f"  1 thread: {single.median_gb_s:.1f} GB/s {single.passes_gb_s}")
    gb_s = bandwidth.median_gb_s

    report: dict[str, Any] = {
        "cpu": asdict(cpu),
        "load_average": list(load),
        "bandwidth": {**asdict(bandwidth), "median_gb_s": gb_s},
        "single_thread_bandwidth": single and {**asdict(single), "median_gb_s": single.median_gb_s},
        "models": [],
        "measured": [],
    }
    if models:
        rows = []
        for m in models:
            roof = roofline_tokens_per_s(gb_s, m.per_token_bytes)
            stored_mb, read_mb = m.stored_bytes / 1e6, m.per_token_bytes / 1e6
            rows.append([m.name, m.format, f"{stored_mb:.1f}", f"{read_mb:.1f}", f"{roof:.1f}"])
            report["models"].append({**asdict(m), "roofline_tokens_per_s": round(roof, 2)})
        header = ["model", "format", "stored MB", "read/token MB", "roofline tok/s"]
        print("\n" + _table(header, rows))
    if measured:
        rows = []
        for name, toks, source in measured:
            roof = roofline_tokens_per_s(gb_s, by_name[name].per_token_bytes)
            rows.append([name, f"{toks:.1f}", source, f"{roof:.1f}", f"{100 * toks / roof:.0f} %"])
            report["measured"].append(
                {"model": name, "tokens_per_s": round(toks, 2), "source": source}
                | {"roofline_tokens_per_s": round(roof, 2), "fraction": round(toks / roof, 6)}
            )
        header = ["model", "measured tok/s", "from", "roofline tok/s", "of roofline"]
        print("\n" + _table(header, rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
