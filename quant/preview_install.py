"""`--keep`: a previewed build installed as a served model, with what the preview measured.

Installed the way every model writer installs (quant/export.py ``staged_dir``): copied into a
staging folder beside ``models_dir/NAME``, ``medserve.json`` written last, one rename; so a
failed or interrupted install leaves ``models_dir/NAME`` as it was. Only a build that passed
its verdict is installed: the preview is the gate.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from medserve.models.manifest import read_manifest, write_manifest
from medserve.quant.accuracy import EVAL_TEXTS
from medserve.quant.export import staged_dir
from medserve.quant.preview_report import CandidateResult, Reference
from medserve.quant.preview_verdict import Thresholds


def keep_candidate(
    results: list[CandidateResult],
    keep: str,
    name: str,
    models_dir: Path,
    reference: Reference,
    thresholds: Thresholds,
    env: dict[str, Any],
    prog: str,
) -> int:
    """Install candidate ``keep`` as model ``name`` if it passed; the exit code (0 or 1)."""
    result = next(r for r in results if r.name == keep)
    if result.verdict is None or not result.verdict.passed or result.folder is None:
        why = result.verdict.describe() if result.verdict is not None else result.message
        print(f"{prog}: not keeping {keep}: {why or result.status}", file=sys.stderr)
        return 1
    folder = install(result, models_dir / name, reference, thresholds, env)
    print(f"{prog}: kept {keep} as model {name} in {folder}")
    return 0


def install(
    result: CandidateResult,
    final_dir: Path,
    reference: Reference,
    thresholds: Thresholds,
    env: dict[str, Any],
) -> Path:
    """Copy a measured build to ``final_dir`` as a served model, manifest (with what the
    preview measured) written last, the whole folder appearing in one rename."""
    assert result.folder is not None and result.measurement is not None
    manifest = read_manifest(result.folder)
    m = result.measurement
    accuracy = {
        **(manifest.accuracy or {}),
        "perplexity": result.perplexity,
        "reference_perplexity": reference.perplexity,
        "relative_increase": result.ppl_increase,
        "max_relative_increase": thresholds.max_ppl_increase,
        "reference": reference.label,
        "eval_texts": len(EVAL_TEXTS),
    }
    preview = {
        "date": env["date"],
        "cpu": env["machine"]["cpu_model"],
        "command": env["command"],
        "candidate": result.name,
        "ttft_ms": m.ttft_ms,
        "ttft_prompt_tokens": m.prompt_tokens,
        "itl_ms": {str(c): v for c, v in m.itl_ms.items()},
        "tokens_per_s": {str(c): v for c, v in m.tokens_per_s.items()},
        "peak_rss_bytes": m.peak_rss_bytes,
        "size_bytes": result.size_bytes,
    }
    with staged_dir(final_dir) as stage:
        shutil.copytree(
            result.folder, stage, dirs_exist_ok=True, ignore=shutil.ignore_patterns("medserve.json")
        )
        write_manifest(
            stage,
            replace(
                manifest,
                name=final_dir.name,
                accuracy=accuracy,
                created="",
                extras={**manifest.extras, "preview": preview},
            ),
        )
    return final_dir
