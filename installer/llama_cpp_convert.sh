#!/usr/bin/env bash
# llama.cpp's HF -> GGUF converter, as `medserve export --engine llama-cpp` runs it:
#
#   bash installer/llama_cpp_convert.sh /path/to/.venv-llama-cpp [SDIST_DIR_OR_ARCHIVE]
#       -> /path/to/.venv-llama-cpp/share/medserve/llama.cpp-convert/
#            convert_hf_to_gguf.py  conversion/  gguf-py/  medserve-convert.json
#
# Why a copy: the llama-cpp-python wheel carries libllama and its binding but not the converter,
# and the converter must match the libllama that serves its output (same llama.cpp commit), so
# it is taken from the same sdist (llama-cpp-python 0.3.36 vendors llama.cpp). Only those three
# items are kept; the converter runs in the main venv (torch, transformers), with
# PYTHONPATH=<folder>/gguf-py (medserve/quant/gguf_export.py).
#
# Without a second argument the sdist is taken from $MEDSERVE_WHEELHOUSE / $PIP_FIND_LINKS when it
# is there, else fetched with `pip download` (which honours PIP_NO_INDEX / PIP_FIND_LINKS too).
# Idempotent: the folder is rebuilt beside the old one and swapped in.
set -euo pipefail

VERSION="0.3.36"
ENGINE_VENV="$1"
SOURCE="${2:-}"
DEST="$ENGINE_VENV/share/medserve/llama.cpp-convert"
PYTHON="$ENGINE_VENV/bin/python"

die() { printf 'medserve setup (llama-cpp converter): %s\n' "$*" >&2; exit 1; }
[[ -x "$PYTHON" ]] || die "$PYTHON is missing; create the llama-cpp environment first"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# An offline install has the sdist in its wheelhouse (it builds libllama from it): use that file
# directly. `pip download` of an sdist first installs its build backend (scikit-build-core) to
# read its metadata, which a wheelhouse without that backend cannot serve.
if [[ -z "$SOURCE" ]]; then
  read -ra LINKS <<<"${PIP_FIND_LINKS:-}"
  for dir in "${MEDSERVE_WHEELHOUSE:-}" "${LINKS[@]}"; do
    dir="${dir#file://}"
    if [[ -n "$dir" && -f "$dir/llama_cpp_python-$VERSION.tar.gz" ]]; then
      SOURCE="$dir/llama_cpp_python-$VERSION.tar.gz"
      echo "llama-cpp-python $VERSION sdist: $SOURCE"
      break
    fi
  done
fi
if [[ -z "$SOURCE" ]]; then
  echo "fetching the llama-cpp-python $VERSION sdist for its llama.cpp converter"
  "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d "$TMP/download"
  SOURCE="$(compgen -G "$TMP/download/llama_cpp_python-$VERSION.tar.gz" || true)"
  [[ -n "$SOURCE" ]] || die "pip gave no llama_cpp_python-$VERSION.tar.gz"
fi

if [[ -f "$SOURCE" ]]; then
  # Extract only the converter's members: the full tree is ~60 MB of C++ and tests.
  top="llama_cpp_python-$VERSION/vendor/llama.cpp"
  mkdir -p "$TMP/sdist"
  tar -xzf "$SOURCE" -C "$TMP/sdist" \
    "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
  TREE="$TMP/sdist/$top"
elif [[ -d "$SOURCE/vendor/llama.cpp" ]]; then
  TREE="$SOURCE/vendor/llama.cpp"
elif [[ -f "$SOURCE/convert_hf_to_gguf.py" ]]; then
  TREE="$SOURCE"
else
  die "$SOURCE is neither the llama-cpp-python sdist nor a llama.cpp tree"
fi
for item in convert_hf_to_gguf.py conversion gguf-py/gguf; do
  [[ -e "$TREE/$item" ]] || die "$TREE has no $item (not llama-cpp-python $VERSION?)"
done

NEW="$DEST.new"
rm -rf "$NEW"
mkdir -p "$NEW/gguf-py"
cp "$TREE/convert_hf_to_gguf.py" "$NEW/"
cp -r "$TREE/conversion" "$NEW/conversion"
# gguf-py's package and its licence; its tests and examples are not needed.
cp -r "$TREE/gguf-py/gguf" "$NEW/gguf-py/gguf"
[[ -f "$TREE/gguf-py/LICENSE" ]] && cp "$TREE/gguf-py/LICENSE" "$NEW/gguf-py/"
[[ -f "$TREE/LICENSE" ]] && cp "$TREE/LICENSE" "$NEW/LICENSE"
find "$NEW" -name __pycache__ -type d -prune -exec rm -rf {} +
printf '{"llama_cpp_python": "%s"}\n' "$VERSION" >"$NEW/medserve-convert.json"

rm -rf "$DEST"
mv "$NEW" "$DEST"
echo "llama.cpp converter (llama-cpp-python $VERSION) in $DEST"
