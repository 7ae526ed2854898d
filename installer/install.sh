#!/usr/bin/env bash
# Install or upgrade medserve from an offline bundle (installer/build-bundle.sh), with no network:
#
#   bash medserve-install.sh medserve-bundle-VERSION.tar [--prefix /opt/medserve]
#        [--home /var/lib/medserve] [--with ENGINE]...
#
# Layout: PREFIX/releases/VERSION/ (the repository and its venvs), PREFIX/current -> the
# release in use, PREFIX/previous -> the one before.  Data (config, keys, cases, audit trail,
# models) lives in HOME and is never replaced: the bundled model is copied in only where it is
# missing.  An upgrade builds the new release beside the running one and starts it once on a
# spare loopback port (cases, knowledge base and audit off, so no data is touched); only when it answers
# /ready does `current` switch, atomically.  When a systemd unit named medserve is active it is
# restarted, and if the new release does not become ready the switch is undone and the old
# release restarted.  A failed install leaves the running release and all data as they were.
set -euo pipefail

PREFIX=/opt/medserve
HOME_DIR="${MEDSERVE_HOME:-/var/lib/medserve}"
SERVICE="${MEDSERVE_SERVICE_NAME:-medserve}"
READY_TIMEOUT_S="${MEDSERVE_READY_TIMEOUT_S:-300}"
BUNDLE=""
ENGINES=()
die() { printf 'medserve install: %s\n' "$*" >&2; exit 1; }
say() { printf '\033[1m[medserve install]\033[0m %s\n' "$*"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --home) HOME_DIR="$2"; shift 2 ;;
    --with) ENGINES+=(--with "$2"); shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) die "unknown option '$1'" ;;
    *) [[ -z "$BUNDLE" ]] || die "one bundle at a time"; BUNDLE="$1"; shift ;;
  esac
done
[[ -n "$BUNDLE" ]] || die "usage: install.sh BUNDLE.tar [--prefix DIR] [--home DIR] [--with ENGINE]..."
[[ -e "$BUNDLE" ]] || die "$BUNDLE does not exist"
mkdir -p "$PREFIX/releases" "$HOME_DIR"
PREFIX="$(cd "$PREFIX" && pwd)"
HOME_DIR="$(cd "$HOME_DIR" && pwd)"

# Only the bundle: no index, no machine-wide pip configuration, no telemetry.
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy PIP_INDEX_URL PIP_EXTRA_INDEX_URL

INCOMING="$PREFIX/.incoming"
rm -rf "$INCOMING"
mkdir -p "$INCOMING"
trap 'rm -rf "$INCOMING"' EXIT
if [[ -d "$BUNDLE" ]]; then
  SRC="$BUNDLE"
else
  if [[ -f "$BUNDLE.sha256" ]]; then
    say "checking $(basename "$BUNDLE") against $(basename "$BUNDLE").sha256"
    (cd "$(dirname "$BUNDLE")" && sha256sum --quiet -c "$(basename "$BUNDLE").sha256") ||
      die "$BUNDLE is damaged (sha256 differs); copy it again"
  fi
  say "unpacking $(basename "$BUNDLE")"
  tar -C "$INCOMING" -xf "$BUNDLE"
  SRC="$(compgen -G "$INCOMING/medserve-bundle-*" | head -n1)"
  [[ -n "$SRC" ]] || die "$BUNDLE is not a medserve bundle"
fi
say "verifying every file of the bundle (SHA256SUMS)"
(cd "$SRC" && sha256sum --quiet -c SHA256SUMS) || die "the bundle's files do not match its SHA256SUMS"
VERSION="$(cat "$SRC/VERSION")"
[[ "$VERSION" =~ ^[A-Za-z0-9][A-Za-z0-9.+_-]*$ ]] || die "bad VERSION '$VERSION'"
RELEASE="$PREFIX/releases/$VERSION"
CURRENT=""
[[ -L "$PREFIX/current" ]] && CURRENT="$(readlink -f "$PREFIX/current")"

if [[ -f "$RELEASE/.medserve-installed" ]]; then
  say "release $VERSION is already installed"
else
  [[ "$RELEASE" != "$CURRENT" ]] || die "release $VERSION is in use but incomplete; reinstall with another VERSION"
  rm -rf "$RELEASE"
  cp -a "$SRC/repo" "$RELEASE"
  fail() { rm -rf "$RELEASE"; die "$1; nothing was switched${CURRENT:+, $CURRENT stays in use}"; }
  say "bundled model into $HOME_DIR (only what is missing; nothing is overwritten)"
  cp -an "$SRC/home/." "$HOME_DIR/" || fail "copying the bundled model failed"
  say "environments of release $VERSION, offline from the bundle's wheels"
  MEDSERVE_WHEELHOUSE="$SRC/wheels" MEDSERVE_VENV="$RELEASE/.venv" MEDSERVE_HOME="$HOME_DIR" \
    bash "$RELEASE/installer/setup.sh" "${ENGINES[@]}" || fail "set-up of release $VERSION failed"
fi

# The new release must start and load its models before it takes over.
probe() {
  local port log pid ok=1
  port="$("$RELEASE/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  log="$(mktemp)"
  # The server refuses MEDSERVE_* variables it does not know (typos): pass it only its own.
  local drop=() name
  for name in "${!MEDSERVE_@}"; do [[ "$name" == MEDSERVE_CONFIG ]] || drop+=(-u "$name"); done
  env "${drop[@]}" MEDSERVE_HOME="$HOME_DIR" \
    MEDSERVE_SERVER_HOST=127.0.0.1 MEDSERVE_SERVER_PORT="$port" \
    MEDSERVE_CASES_ENABLED=false MEDSERVE_AUDIT_ENABLED=false MEDSERVE_KNOWLEDGE_ENABLED=false \
    "$RELEASE/.venv/bin/medserve" serve >"$log" 2>&1 &
  pid=$!
  for _ in $(seq "$READY_TIMEOUT_S"); do
    if "$RELEASE/.venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2)' "$port" 2>/dev/null; then
      ok=0; break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  [[ $ok -eq 0 ]] || { echo "--- last lines of the probe server's log:" >&2; tail -n 20 "$log" >&2; }
  rm -f "$log"
  return $ok
}
say "starting release $VERSION once on loopback to check it serves"
if ! probe; then
  [[ "$RELEASE" == "$CURRENT" ]] || rm -rf "$RELEASE"
  die "release $VERSION did not become ready; nothing was switched${CURRENT:+, $CURRENT stays in use}"
fi
touch "$RELEASE/.medserve-installed"

switch_to() {  # atomic: a new symlink renamed over the old one
  ln -sfn "releases/$(basename "$1")" "$PREFIX/.current.new"
  mv -Tf "$PREFIX/.current.new" "$PREFIX/current"
}
if [[ -n "$CURRENT" && "$CURRENT" != "$RELEASE" ]]; then
  ln -sfn "releases/$(basename "$CURRENT")" "$PREFIX/.previous.new"
  mv -Tf "$PREFIX/.previous.new" "$PREFIX/previous"
fi
switch_to "$RELEASE"
say "current -> releases/$VERSION"

if [[ -d /run/systemd/system ]] && systemctl is-active --quiet "$SERVICE" 2>/dev/null; then
  say "restarting $SERVICE"
  systemctl restart "$SERVICE" || true
  ready=1
  for _ in $(seq "$READY_TIMEOUT_S"); do
    if systemctl is-active --quiet "$SERVICE" && "$RELEASE/.venv/bin/medserve" doctor --json >/dev/null 2>&1; then
      ready=0; break
    fi
    sleep 1
  done
  if [[ $ready -ne 0 && -n "$CURRENT" && "$CURRENT" != "$RELEASE" ]]; then
    switch_to "$CURRENT"
    systemctl restart "$SERVICE" || true
    die "$SERVICE did not come back on $VERSION; rolled back to $(basename "$CURRENT")"
  fi
fi

# Keep the release in use and the one before (for `--rollback`-style recovery by hand).
keep_prev=""
[[ -L "$PREFIX/previous" ]] && keep_prev="$(readlink -f "$PREFIX/previous")"
for old in "$PREFIX"/releases/*; do
  [[ "$old" == "$RELEASE" || "$old" == "$keep_prev" ]] || rm -rf "$old"
done
say "medserve $VERSION installed in $PREFIX (data in $HOME_DIR)"
say "start it: MEDSERVE_HOME=$HOME_DIR $PREFIX/current/.venv/bin/medserve serve, or as a service: $PREFIX/current/.venv/bin/medserve install-service --home $HOME_DIR"
