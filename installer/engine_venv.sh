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


# A GGML engine compiled for this CPU (-march=native: AVX-512, VNNI, AMX where present).
# pip's own wheel cache ignores build flags, so a wheel built on another CPU could come back
# out of it; the wheels are cached instead under pip's cache folder by CPU fingerprint
# (medserve/accel/cpu_features.py), next to a stamp of the extensions they were built for.
# An offline wheelhouse (installer/build-bundle.sh) carries the same folders under native/.  The stamp is copied into the
# venv, and the worker refuses a build the CPU cannot run instead of dying of SIGILL.
native_sdist() {  # $1 dist name, $2 version: the sdist, fetched once into the cache; prints it
  local dist="$1" version="$2" dir file
  dir="$("${PIP[@]}" cache dir 2>/dev/null || echo "$HOME/.cache/pip")/medserve-native/sdists"
  file="$(compgen -G "$dir/${dist//-/_}-$version.tar.gz" | head -n1 || true)"
  # An offline wheelhouse carries the sdist at its top level (pip download would first need
  # the build backend to read the sdist's metadata).
  if [[ -z "$file" && -n "${MEDSERVE_WHEELHOUSE:-}" ]]; then
    file="$(compgen -G "$MEDSERVE_WHEELHOUSE/${dist//-/_}-$version.tar.gz" | head -n1 || true)"
  fi
  if [[ -z "$file" ]]; then
    mkdir -p "$dir"
    "${PIP[@]}" download --no-deps --no-binary "$dist" -d "$dir" "$dist==$version" >&2
    file="$(compgen -G "$dir/${dist//-/_}-$version.tar.gz" | head -n1 || true)"
    [[ -n "$file" ]] || die "pip gave no sdist of $dist $version"
  fi
  echo "$file"
}

install_native_wheel() {  # $1 dist name, $2 version, $3 CMAKE_ARGS, $4 build-time note
  local dist="$1" version="$2" cmake_args="$3" note="$4" fp cache wheel_dir src patches tag=""
  fp="$("$ENGINE_VENV/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1]); import cpu_features; print(cpu_features.fingerprint())' "$ROOT/accel")"
  cache="$("${PIP[@]}" cache dir 2>/dev/null || echo "$HOME/.cache/pip")/medserve-native"
  # medserve's patches to the sdist (installer/patches/DIST-VERSION-*.patch) name the build too.
  mapfile -t patches < <(compgen -G "$ROOT/installer/patches/$dist-$version-*.patch" | sort || true)
  if [[ ${#patches[@]} -gt 0 ]]; then
    tag="-p$(cat "${patches[@]}" | sha256sum | cut -c1-8)"
  fi
  # Extra compiler flags name it too: a wheel built with other flags is another build.
  if [[ -n "${NATIVE_CFLAGS:-}" ]]; then
    tag="$tag-f$(printf '%s' "$NATIVE_CFLAGS" | sha256sum | cut -c1-8)"
  fi
  wheel_dir="$cache/$dist-$version$tag-$fp"
  for src in "${MEDSERVE_WHEELHOUSE:+$MEDSERVE_WHEELHOUSE/native/$(basename "$wheel_dir")}" "$wheel_dir"; do
    if [[ -n "$src" && -z "${MEDSERVE_REBUILD_NATIVE:-}" && -f "$src/medserve-native-build.json" ]] && \
       compgen -G "$src/*.whl" >/dev/null; then
      echo "$dist $version for this CPU ($fp): cached wheel in $src"
      wheel_dir="$src"
      break
    fi
    src=""
  done
  if [[ -z "$src" ]]; then
    echo "building $dist $version for this CPU ($fp) from its sdist: $note"
    local tmp sdist patch; tmp="$(mktemp -d)"
    sdist="$(native_sdist "$dist" "$version")"
    if [[ ${#patches[@]} -gt 0 ]]; then
      command -v patch >/dev/null || die "the 'patch' tool is needed to build $dist"
      tar -xzf "$sdist" -C "$tmp"
      sdist="$(compgen -G "$tmp/${dist//-/_}-$version" | head -n1)"
      for patch in "${patches[@]}"; do
        echo "applying $(basename "$patch")"
        patch -d "$sdist" -p1 --forward --quiet < "$patch"
      done
    fi
    # --no-cache-dir: never reuse pip's flag-blind cache; our cache is the folder above.
    # NATIVE_CFLAGS: compiler flags CMake takes from CFLAGS/CXXFLAGS (they hold spaces, which
    # CMAKE_ARGS cannot carry).
    CFLAGS="${NATIVE_CFLAGS:-}" CXXFLAGS="${NATIVE_CFLAGS:-}" \
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "${PIP[@]}" wheel --no-deps --no-cache-dir -w "$tmp/wheel" "$sdist"
    mkdir -p "$wheel_dir"
    rm -f "$wheel_dir"/*.whl
    mv "$tmp"/wheel/*.whl "$wheel_dir/"
    rm -rf "$tmp"
    "$ENGINE_VENV/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1]); import cpu_features, pathlib; cpu_features.write_stamp(pathlib.Path(sys.argv[2]), sys.argv[3])' \
      "$ROOT/accel" "$wheel_dir" "$ENGINE"
  fi
  "${PIP[@]}" install --progress-bar on --no-deps --force-reinstall "$wheel_dir"/*.whl
  cp "$wheel_dir/medserve-native-build.json" "$ENGINE_VENV/medserve-native-build.json"
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
  chatglm-cpp)
    REQUIREMENTS="$ROOT/installer/requirements-chatglm-cpp.txt"
    "${PIP[@]}" install --progress-bar on -c "$REQUIREMENTS" -r "$REQUIREMENTS"
    # 0.4.2's vendored ggml asks for an old CMake policy level; its CMake files pick only
    # AVX2 by default, so -march=native gives it the CPU's AVX-512/VNNI where present.
    # installer/patches: CHATGLM_NUM_THREADS (its thread count is otherwise fixed; ggml's
    # waiting threads spin, so a worker must not take more cores than it is given).
    if ! cmp -s "$ROOT/installer/patches/chatglm-cpp-0.4.2-threads.patch" "$ENGINE_VENV/medserve-patches" || \
       ! "$ENGINE_VENV/bin/python" -c 'import chatglm_cpp' 2>/dev/null || [[ -n "${MEDSERVE_REBUILD_NATIVE:-}" ]]; then
      install_native_wheel chatglm-cpp 0.4.2 \
        "-DCMAKE_POLICY_VERSION_MINIMUM=3.5 -DCMAKE_C_FLAGS=-march=native -DCMAKE_CXX_FLAGS=-march=native" \
        "about 7 minutes on 2 cores, once per CPU type"
      cp "$ROOT/installer/patches/chatglm-cpp-0.4.2-threads.patch" "$ENGINE_VENV/medserve-patches"
    fi
    "${PIP[@]}" install --progress-bar on --no-deps -e "$ROOT"
    "$ENGINE_VENV/bin/python" - <<'PY'
from importlib.metadata import version
import chatglm_cpp  # noqa: F401  (loads its native module)
import medserve.accel.chatglm_cpp_engine  # noqa: F401
import medserve.accel.worker  # noqa: F401
print("chatglm-cpp environment OK: chatglm-cpp", version("chatglm-cpp"))
PY
    ;;
  llama-cpp)
    REQUIREMENTS="$ROOT/installer/requirements-llama-cpp.txt"
    "${PIP[@]}" install --progress-bar on -c "$REQUIREMENTS" -r "$REQUIREMENTS"
    # Only the shared library and its Python binding: no llava/mtmd, tools, server or curl.
    if ! "$ENGINE_VENV/bin/python" -c 'import llama_cpp' 2>/dev/null || [[ -n "${MEDSERVE_REBUILD_NATIVE:-}" ]]; then
      # No AMX: ggml's AMX matmul (batched q4/q8 prompt processing) faults at ldtilecfg on
      # the Xeon VMs here (general protection fault, every prompt longer than one token),
      # while AVX-512/VNNI from -march=native stay on (GCC keeps explicit -mno-* over -march).
      NATIVE_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" install_native_wheel llama-cpp-python 0.3.36 \
        "-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        "about 5 minutes on 2 cores, once per CPU type"
    fi
    "${PIP[@]}" install --progress-bar on --no-deps -e "$ROOT"
    # The HF -> GGUF converter of the same llama.cpp commit (`medserve export --engine llama-cpp`).
    bash "$ROOT/installer/llama_cpp_convert.sh" "$ENGINE_VENV" "$(native_sdist llama-cpp-python 0.3.36)"
    [[ -f "$ENGINE_VENV/share/medserve/llama.cpp-convert/convert_hf_to_gguf.py" ]] || die "llama.cpp converter missing"
    "$ENGINE_VENV/bin/python" - <<'PY'
from importlib.metadata import version
import llama_cpp  # noqa: F401  (loads libllama)
import medserve.accel.llama_cpp_engine  # noqa: F401
import medserve.quant.gguf_perplexity_job  # noqa: F401
import medserve.quant.gguf_quantize_job  # noqa: F401
import medserve.accel.worker  # noqa: F401
print("llama-cpp environment OK: llama-cpp-python", version("llama-cpp-python"))
PY
    ;;
  *)
    die "unknown engine '$ENGINE' (known: ipex-llm, ipex, chatglm-cpp, llama-cpp)"
    ;;
esac
