#!/usr/bin/env bash
# medserve set-up on a fresh machine: virtual environment, pinned CPU-only stack, bundled model.
#
#   bash installer/setup.sh                 # online (PyPI reachable)
#   MEDSERVE_WHEELHOUSE=/media/usb/wheels bash installer/setup.sh   # fully offline install
#   bash installer/setup.sh --with ipex-llm  # also the ipex-llm engine, in .venv-ipex-llm
#   bash installer/setup.sh --with ipex-llm --with ipex  # and IPEX (.venv-ipex, ~6.4 GB of CUDA torch)
#   bash installer/setup.sh --with chatglm-cpp --with llama-cpp  # the GGML engines, built for this CPU
#   bash installer/setup.sh --with llama-cpp --rebuild   # rebuild native engines (e.g. a new CPU)
#
# Idempotent: re-running skips what is already in place.  After it finishes nothing in medserve
# touches the network.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEDSERVE_VENV:-$ROOT/.venv}"
CONSTRAINTS="$ROOT/installer/constraints.txt"
# Second venv for exports that need another transformers (see step 6); beside the main one.
CONVERT_VENV="${MEDSERVE_CONVERT_GLM_VENV:-$(dirname "$VENV")/.venv-convert-glm}"
STEPS=6

step() { printf '\n\033[1m[%s/%s] %s\033[0m\n' "$1" "$STEPS" "$2"; }
die() { printf 'medserve setup: %s\n' "$*" >&2; exit 1; }

# Optional engines, each in its own venv beside the main one: --with ipex-llm (repeatable).
OPTIONAL_ENGINES="ipex-llm ipex chatglm-cpp llama-cpp"
WITH_ENGINES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --with) [[ $# -ge 2 ]] || die "--with needs an engine name"; WITH_ENGINES+=("$2"); shift 2 ;;
    --with=*) WITH_ENGINES+=("${1#--with=}"); shift ;;
    --rebuild) export MEDSERVE_REBUILD_NATIVE=1; shift ;;
    *) die "unknown argument '$1' (usage: setup.sh [--with ENGINE]... [--rebuild], ENGINE: $OPTIONAL_ENGINES)" ;;
  esac
done
for engine in "${WITH_ENGINES[@]}"; do
  [[ " $OPTIONAL_ENGINES " == *" $engine "* ]] || die "--with $engine: known engines are $OPTIONAL_ENGINES"
done
STEPS=$((STEPS + ${#WITH_ENGINES[@]}))

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
"${PIP[@]}" install --progress-bar on -c "$CONSTRAINTS" -e "$ROOT[convert,test,bench]"
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

step 6 "Converter environment for GLM-4-9B-chat-hf and ChatGLM exports ($CONVERT_VENV)"
# optimum-intel exports model_type glm only with transformers <= 5.0.  The server's stack keeps
# 5.5.4, so that export runs in its own venv (same torch, OpenVINO, nncf and optimum pins);
# `medserve export` picks it by layout (medserve/models/layouts.py).
CONVERT_CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONVERT_CONSTRAINTS"' EXIT
grep -v '^transformers==' "$CONSTRAINTS" > "$CONVERT_CONSTRAINTS"
cat "$ROOT/installer/constraints-convert-glm.txt" >> "$CONVERT_CONSTRAINTS"
[[ -x "$CONVERT_VENV/bin/python" ]] || "$PYTHON" -m venv "$CONVERT_VENV"
CPIP=("$CONVERT_VENV/bin/python" -m pip)
if ! "$CONVERT_VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__ != "2.13.0+cpu")' 2>/dev/null; then
  "${CPIP[@]}" install --progress-bar on "torch==2.13.0"
fi
"${CPIP[@]}" install --progress-bar on -c "$CONVERT_CONSTRAINTS" transformers optimum nncf \
  openvino openvino-tokenizers safetensors setuptools "huggingface-hub>=0.23.2,<1.22" "requests>=2.33,<3"
"${CPIP[@]}" install --progress-bar on -c "$CONVERT_CONSTRAINTS" --no-deps "optimum-intel==2.2.0"
"$CONVERT_VENV/bin/python" - <<'PY'
import importlib.util, sys, torch, transformers
problems = []
if not torch.__version__.endswith("+cpu"):
    problems.append(f"torch {torch.__version__} is not the CPU build")
if importlib.util.find_spec("torchvision") is not None:
    problems.append("torchvision is installed in the converter venv")
if importlib.util.find_spec("optimum.intel") is None:
    problems.append("optimum-intel is missing")
if problems:
    sys.exit("medserve setup (converter venv): " + "; ".join(problems))
print("converter environment OK: transformers", transformers.__version__)
PY

STEP=$((STEPS - ${#WITH_ENGINES[@]}))
for engine in "${WITH_ENGINES[@]}"; do
  STEP=$((STEP + 1))
  step "$STEP" "Engine $engine in its own environment ($(dirname "$VENV")/.venv-$engine)"
  bash "$ROOT/installer/engine_venv.sh" "$engine" "$VENV" "$PYTHON"
done

printf '\nmedserve is set up.  Start it with:  %s/bin/medserve serve\n' "$VENV"
