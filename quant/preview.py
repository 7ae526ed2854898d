"""`medserve quantize --preview`: build every quantized candidate, measure each, judge, keep one.

    medserve quantize --preview --hf-dir DIR [--candidates all|ENGINE|NAME,...]
        [--max-ppl-increase F] [--min-tokens-per-s F] [--max-memory-gb F]
        [--reference OV_DIR] [--out DIR] [--work-dir DIR] [--quick]
        [--keep CANDIDATE [--name MODEL]] [--models-dir D]

The seed case study's "command to preview whether the quantized model's performance meets
expectations": one table of perplexity (and % vs the reference), TTFT on a ~1k-token prompt,
ITL and tokens/s at 1 and 4 streams, peak worker RSS and size on disk, with a verdict per
candidate against the user's thresholds; JSON, Markdown and a PNG chart in ``--out``.

Three steps, each done by the piece that already does it for a single build:
build (quant/preview_candidates.py: `medserve export` / `medserve quantize` into a work
folder), measure (quant/preview_measure.py: the benchmark's worker target and runner), judge
and report (quant/preview_verdict.py, quant/preview_report.py). ``--keep`` then installs the
chosen build as a served model the way every writer does: staged beside ``models_dir/NAME``,
manifest last, one rename (quant/preview_install.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from medserve.accel.base import BackendError
from medserve.benchmarks.machine import environment
from medserve.models.manifest import ManifestError, default_home, default_models_dir
from medserve.quant.accuracy import EVAL_TEXTS, AccuracyError, perplexity
from medserve.quant.convert import _NAME_PATTERN
from medserve.quant.export import ExportError, is_valid_model_dir
from medserve.quant.preview_candidates import (
    LOGIT_TWINS,
    QUICK_CANDIDATES,
    REFERENCE,
    Candidate,
    build,
    candidate_perplexity,
    folder_bytes,
    missing_engine,
    not_applicable,
    parse_candidates,
    prepare_work_dir,
)
from medserve.quant.preview_install import keep_candidate
from medserve.quant.preview_measure import FULL_PLAN, QUICK_PLAN, MeasurePlan, measure_folder
from medserve.quant.preview_report import (
    CandidateResult,
    Reference,
    json_document,
    markdown_report,
    text_report,
    write_chart,
)
from medserve.quant.preview_verdict import Thresholds, judge
from tqdm import tqdm

PROG = "medserve quantize --preview"
REPORT_STEM = "preview"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage block: the flag and the fix are in the message.
        self.exit(2, f"{PROG}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "Quantize a local HF model folder every way medserve serves it, measure each build "
            "through its engine's worker, and judge it against your thresholds."
        ),
    )
    parser.add_argument("--hf-dir", type=Path, required=True, help="local HF model folder")
    parser.add_argument(
        "--candidates",
        default=None,
        help="comma list: all, an engine (openvino, ipex-llm, ipex) or names such as "
        f"openvino-int4,ipex-llm-sym_int8 (default all; with --quick {','.join(QUICK_CANDIDATES)})",
    )
    parser.add_argument(
        "--max-ppl-increase",
        type=float,
        default=0.10,
        help="allowed perplexity increase over the reference (default 0.10 = 10%%)",
    )
    parser.add_argument(
        "--min-tokens-per-s", type=float, default=None, help="output tokens/s needed at 1 stream"
    )
    parser.add_argument(
        "--max-memory-gb", type=float, default=None, help="peak worker RSS allowed, GiB"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="exported OpenVINO fp16/fp32 folder to compare perplexity with (default: build "
        "openvino-fp16 from --hf-dir)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default $MEDSERVE_HOME/preview/…)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the builds here and reuse them on the next preview of the same source "
        "(default: a temporary folder in --models-dir, removed at the end)",
    )
    parser.add_argument("--keep", default=None, help="install this candidate if it passes")
    parser.add_argument(
        "--name", default=None, help="served model name for --keep (default <hf-dir>-<candidate>)"
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="where models are served from (default $MEDSERVE_HOME/models or ~/.medserve/models)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized: shorter prompt and answers, 2 candidates"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = _checked(args)
    except ValueError as exc:
        parser.error(str(exc))
    return run(argv=argv, **options)


def _checked(args: argparse.Namespace) -> dict[str, Any]:
    """Everything checkable before the minutes of building; ValueError names the bad input."""
    hf_dir = args.hf_dir.expanduser()
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"--hf-dir {hf_dir}: not a Hugging Face model folder (no config.json)")
    candidates = parse_candidates(
        args.candidates or (",".join(QUICK_CANDIDATES) if args.quick else "all")
    )
    thresholds = Thresholds(args.max_ppl_increase, args.min_tokens_per_s, args.max_memory_gb)
    name = None
    if args.keep is not None:
        if args.keep not in {c.name for c in candidates}:
            raise ValueError(f"--keep {args.keep}: not among the candidates previewed")
        name = args.name or f"{hf_dir.name}-{args.keep}"
        if not _NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"--name {name!r}: use letters, digits, '.', '_' or '-', starting with a "
                f"letter or digit"
            )
    elif args.name is not None:
        raise ValueError("--name names the model --keep installs: give --keep too")
    reference = args.reference.expanduser() if args.reference else None
    if reference is not None and not is_valid_model_dir(reference):
        raise ValueError(
            f"--reference {reference}: not an exported OpenVINO model folder (medserve.json "
            f"and the IRs); export the fp16 build first, or leave --reference out"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return {
        "hf_dir": hf_dir,
        "candidates": candidates,
        "thresholds": thresholds,
        "plan": QUICK_PLAN if args.quick else FULL_PLAN,
        "reference_dir": reference,
        "out_dir": (args.out or default_home() / "preview" / f"{hf_dir.name}-{stamp}"),
        "work_dir": args.work_dir.expanduser() if args.work_dir else None,
        "models_dir": (args.models_dir or default_models_dir()).expanduser(),
        "keep": args.keep,
        "keep_name": name,
        "progress": not args.no_progress,
    }


def run(
    *,
    argv: list[str],
    hf_dir: Path,
    candidates: list[Candidate],
    thresholds: Thresholds,
    plan: MeasurePlan,
    reference_dir: Path | None,
    out_dir: Path,
    work_dir: Path | None,
    models_dir: Path,
    keep: str | None,
    keep_name: str | None,
    progress: bool,
) -> int:
    env = environment(argv, prog=PROG)
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    scratch = work_dir is None
    if work_dir is None:
        # Beside the models: same disk (room for the builds), and hidden from the server.
        work_dir = Path(tempfile.mkdtemp(prefix=".medserve-preview-", dir=models_dir))
    try:
        finished = set(prepare_work_dir(work_dir, hf_dir))
        results, reference = _build_all(
            hf_dir, candidates, reference_dir, work_dir, finished, progress
        )
        if reference is None:
            return 1
        asyncio.run(_measure_all(results, plan, progress))
        for result in results:
            _judge(result, reference, thresholds)
        print(text_report(results, reference, thresholds, plan), end="")
        _write_reports(results, reference, thresholds, plan, env, hf_dir, out_dir)
        if keep is None:
            return 0
        return keep_candidate(
            results, keep, keep_name or keep, models_dir, reference, thresholds, env, PROG
        )
    finally:
        if scratch:
            shutil.rmtree(work_dir, ignore_errors=True)


def _say(text: str) -> None:
    print(f"[{PROG}] {text}", file=sys.stderr, flush=True)


def _build_all(
    hf_dir: Path,
    candidates: list[Candidate],
    reference_dir: Path | None,
    work_dir: Path,
    finished: set[str],
    progress: bool,
) -> tuple[list[CandidateResult], Reference | None]:
    """Build (or reuse) the reference and every candidate, and score their perplexity."""
    wanted = list(candidates)
    if reference_dir is None and REFERENCE not in wanted:
        wanted.insert(0, REFERENCE)
    built: dict[str, CandidateResult] = {}
    bar = tqdm(wanted, unit="build", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for candidate in bar:
        bar.set_description_str(f"building {candidate.name}")
        built[candidate.name] = _build_one(candidate, hf_dir, work_dir, finished)
    bar.close()
    _borrow_twin_perplexity(built)
    if reference_dir is None:
        base = built[REFERENCE.name]
        if base.status != "measured" or base.folder is None:
            _say(f"cannot build the reference {REFERENCE.name}: {base.message}")
            return [], None
        reference = Reference(
            "OpenVINO fp16 built from the source (openvino-fp16)", base.folder, base.perplexity
        )
    else:
        try:
            ppl = perplexity(reference_dir, EVAL_TEXTS)
        except (AccuracyError, ValueError, RuntimeError) as exc:
            _say(f"cannot score the reference {reference_dir}: {exc}")
            return [], None
        reference = Reference(f"{reference_dir} (given)", reference_dir, ppl)
    if not math.isfinite(reference.perplexity):
        _say(f"the reference {reference.folder} has perplexity {reference.perplexity}")
        return [], None
    return [built[c.name] for c in candidates], reference


def _borrow_twin_perplexity(built: dict[str, CandidateResult]) -> None:
    """chatglm.cpp rows take the perplexity of llama.cpp on the same ggml block format."""
    for name, twin_name in LOGIT_TWINS.items():
        result, twin = built.get(name), built.get(twin_name)
        if result is None or result.status != "measured":
            continue
        if twin is not None and twin.status == "measured" and math.isfinite(twin.perplexity):
            result.perplexity = twin.perplexity
            result.message = f"perplexity scored by llama.cpp on {twin_name} (same ggml blocks)"
        else:
            result.message = (
                f"perplexity needs {twin_name} in --candidates (chatglm.cpp has no logits)"
            )


def _build_one(
    candidate: Candidate, hf_dir: Path, work_dir: Path, finished: set[str]
) -> CandidateResult:
    result = CandidateResult(candidate.name, candidate.engine, candidate.precision, "measured")
    missing = missing_engine(candidate.engine) or not_applicable(candidate, hf_dir)
    if missing is not None:
        result.status, result.message = "skipped", missing
        return result
    started = time.monotonic()
    try:
        if candidate.name in finished:
            result.reused, result.folder = True, work_dir / candidate.name
        else:
            result.folder = build(candidate, hf_dir, work_dir)
        result.build_s = time.monotonic() - started
        result.size_bytes = folder_bytes(result.folder)
        result.perplexity = candidate_perplexity(candidate, result.folder)
    except (ExportError, ManifestError, AccuracyError, ValueError, KeyError) as exc:
        result.status, result.message = "error", f"build failed: {exc}"
    return result


async def _measure_all(results: list[CandidateResult], plan: MeasurePlan, progress: bool) -> None:
    """One candidate at a time, each in its own worker; a failing one becomes an error row."""
    todo = [r for r in results if r.status == "measured" and r.folder is not None]
    bar = tqdm(
        total=plan.total_requests() * len(todo),
        unit="req",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for result in todo:
            result.load_average = round(os.getloadavg()[0], 2)
            assert result.folder is not None
            try:
                result.measurement = await measure_folder(
                    result.name,
                    result.folder,
                    plan,
                    on_run_start=bar.set_description_str,
                    on_request_done=lambda: bar.update(1),
                )
            except BackendError as exc:
                result.status, result.message = "error", f"worker failed: {exc}"
    finally:
        bar.close()


def _judge(result: CandidateResult, reference: Reference, thresholds: Thresholds) -> None:
    if result.status != "measured" or result.measurement is None:
        return
    result.ppl_increase = result.perplexity / reference.perplexity - 1.0
    m = result.measurement
    result.verdict = judge(
        thresholds,
        ppl_increase=result.ppl_increase,
        tokens_per_s=m.tokens_per_s.get(1, math.nan),
        peak_rss_bytes=m.peak_rss_bytes,
        failed_requests=m.failed_requests,
    )


def _write_reports(
    results: list[CandidateResult],
    reference: Reference,
    thresholds: Thresholds,
    plan: MeasurePlan,
    env: dict[str, Any],
    hf_dir: Path,
    out_dir: Path,
) -> None:
    document = json_document(results, reference, thresholds, plan, env, hf_dir)
    (out_dir / f"{REPORT_STEM}.json").write_text(
        json.dumps(document, indent=2) + "\n", encoding="utf-8"
    )
    (out_dir / f"{REPORT_STEM}.md").write_text(
        markdown_report(results, reference, thresholds, plan, env), encoding="utf-8"
    )
    from medserve.benchmarks.chart import ChartUnavailable

    try:
        write_chart(
            results, out_dir / f"{REPORT_STEM}.png", f"{env['machine']['cpu_model']}, {env['date']}"
        )
    except ChartUnavailable as exc:
        _say(f"no chart: {exc}")
    print(f"{PROG}: reports in {out_dir} ({REPORT_STEM}.json, .md, .png)")
