#!/usr/bin/env bash
# medserve set-up on a fresh machine: virtual environment, pinned CPU-only stack, bundled model.
#
#   bash installer/setup.sh                 # online (PyPI reachable)
#   MEDSERVE_WHEELHOUSE=/media/usb/wheels bash installer/setup.sh   # fully offline install
#
# Idempotent: re-running skips what is already in place.  After it finishes nothing in medserve
# touches the network.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEDSERVE_VENV:-$ROOT/.venv}"
CONSTRAINTS="$ROOT/installer/constraints.txt"
STEPS=5

step() { printf '\n\033[1m[%s/%s] %s\033[0m\n' "$1" "$STEPS" "$2"; }
die() { printf 'medserve setup: %s\n' "$*" >&2; exit 1; }

if [[ -n "${MEDSERVE_WHEELHOUSE:-}" ]]; then
  [[ -d "$MEDSERVE_WHEELHOUSE" ]] || die "MEDSERVE_WHEELHOUSE=$MEDSERVE_WHEELHOUSE is not a folder"
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$MEDSERVE_WHEELHOUSE"
fi
# No telemetry from any tool we run, and no model-hub look-ups.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

step 1 "Python 3.11 virtual environment ($VENV)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && \
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON="$candidate"; break
    fi
  done
fi
[[ -n "$PYTHON" ]] || die "Python 3.11 is required (set PYTHON=/path/to/python3.11)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)

step 2 "PyTorch 2.13.0, CPU build (used only to convert models, never to serve)"
if "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__ != "2.13.0+cpu")' 2>/dev/null; then
  echo "already installed"
else
  "${PIP[@]}" install --progress-bar on "torch==2.13.0"
fi

step 3 "medserve and its pinned dependencies"
"${PIP[@]}" install --progress-bar on -c "$CONSTRAINTS" -e "$ROOT[convert,test]"
# optimum-intel's metadata requires torchvision, whose PyPI wheel brings a CUDA torch and does
# not import beside the CPU one; we need neither, so it goes in without its dependencies.
"${PIP[@]}" install --progress-bar on -c "$CONSTRAINTS" --no-deps "optimum-intel==2.2.0"
"$VENV/bin/python" - <<'PY'
import importlib.util, sys, torch
problems = []
if not torch.__version__.endswith("+cpu"):
    problems.append(f"torch {torch.__version__} is not the CPU build")
if importlib.util.find_spec("torchvision") is not None:
    problems.append("torchvision is installed (it drags a CUDA torch); pip uninstall torchvision")
if problems:
    sys.exit("medserve setup: " + "; ".join(problems))
print("environment OK: torch", torch.__version__)
PY

step 4 "Telemetry off"
# nncf pulls in openvino-telemetry; record an explicit opt-out so nothing is ever sent.
if [[ -x "$VENV/bin/opt_in_out" ]]; then
  "$VENV/bin/opt_in_out" --opt_out >/dev/null 2>&1 || echo "warning: could not record the OpenVINO telemetry opt-out"
fi
echo "done"

step 5 "Bundled model (SmolLM2-135M-Instruct -> OpenVINO IR int8 and fp16)"
"$VENV/bin/medserve" setup

printf '\nmedserve is set up.  Start it with:  %s/bin/medserve serve\n' "$VENV"
