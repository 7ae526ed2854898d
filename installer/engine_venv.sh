#!/usr/bin/env bash
# One optional engine's own virtual environment, beside the main one:
#
#   bash installer/engine_venv.sh ipex-llm /path/to/.venv python3.11   # -> /path/to/.venv-ipex-llm
#
# Called by `installer/setup.sh --with NAME` (which exports the offline / no-telemetry settings).
# Engines whose pins cannot live beside OpenVINO's get their own environment; the server starts
# their worker with that environment's interpreter (medserve/accel/registry.py looks for
# .venv-NAME next to the server's venv) and never imports them itself.  Idempotent: pip skips
# what is installed; torch is checked first so it is never reinstalled or swapped for CUDA.
set -euo pipefail

ENGINE="$1"
MAIN_VENV="$2"
PYTHON="$3"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENGINE_VENV="$(dirname "$MAIN_VENV")/.venv-$ENGINE"

die() { printf 'medserve setup (%s): %s\n' "$ENGINE" "$*" >&2; exit 1; }

[[ -x "$ENGINE_VENV/bin/python" ]] || "$PYTHON" -m venv "$ENGINE_VENV"
PIP=("$ENGINE_VENV/bin/python" -m pip)

install_torch() {  # $1: the exact torch version wanted, CPU build
  if "$ENGINE_VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '$1+cpu')" 2>/dev/null; then
    echo "torch $1+cpu already installed"
  else
    # As in the main venv: the +cpu wheel (on this machine's disk, or in the wheelhouse)
    # outranks PyPI's CUDA build of the same version.
    "${PIP[@]}" install --progress-bar on "torch==$1"
  fi
}

check_cpu_torch() {
  "$ENGINE_VENV/bin/python" - <<'PY'
import importlib.util, sys, torch
problems = []
if not torch.__version__.endswith("+cpu"):
    problems.append(f"torch {torch.__version__} is not the CPU build")
if importlib.util.find_spec("torchvision") is not None:
    problems.append("torchvision is installed (it drags a CUDA torch)")
if problems:
    sys.exit("medserve setup: " + "; ".join(problems))
PY
}

case "$ENGINE" in
  ipex-llm)
    REQUIREMENTS="$ROOT/installer/requirements-ipex-llm.txt"
    install_torch 2.13.0
    "${PIP[@]}" install --progress-bar on -c "$REQUIREMENTS" -r "$REQUIREMENTS"
    # ipex-llm imports one sampling helper from trl.core when it loads any model; trl's own
    # requirements (datasets, tyro...) serve training only, so it goes in without them.
    "${PIP[@]}" install --progress-bar on --no-deps "trl==0.11.4"
    "${PIP[@]}" install --progress-bar on --no-deps -e "$ROOT"
    check_cpu_torch
    "$ENGINE_VENV/bin/python" - <<'PY'
from importlib.metadata import version
from ipex_llm.transformers import AutoModelForCausalLM  # noqa: F401  (imports its kernels)
import medserve.accel.ipex_llm_engine  # noqa: F401
import medserve.accel.worker  # noqa: F401
import medserve.quant.ipex_llm_job  # noqa: F401
print("ipex-llm environment OK:", ", ".join(
    f"{name} {version(name)}" for name in ("ipex-llm", "torch", "transformers")))
PY
    ;;
  ipex)
    REQUIREMENTS="$ROOT/installer/requirements-ipex.txt"
    if ! "$ENGINE_VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__ != "2.8.0+cu128")' 2>/dev/null; then
      echo "intel-extension-for-pytorch 2.8 needs torch 2.8, whose only PyPI Linux build is the"
      echo "CUDA one: about 6.4 GB of downloads (torch + nvidia-* wheels), used here on the CPU."
    fi
    "${PIP[@]}" install --progress-bar on -c "$REQUIREMENTS" -r "$REQUIREMENTS"
    "${PIP[@]}" install --progress-bar on --no-deps -e "$ROOT"
    "$ENGINE_VENV/bin/python" - <<'PY'
from importlib.metadata import version
import intel_extension_for_pytorch  # noqa: F401  (refuses a torch it was not built for)
import medserve.accel.worker  # noqa: F401
print("ipex environment OK:", ", ".join(
    f"{name} {version(name)}" for name in ("intel-extension-for-pytorch", "torch", "transformers")))
PY
    ;;
  *)
    die "unknown engine '$ENGINE' (known: ipex-llm, ipex)"
    ;;
esac
