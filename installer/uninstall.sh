#!/usr/bin/env bash
# Remove medserve's programs; the data (config, keys, cases, audit trail, models) stays unless
# --purge is given:
#
#   bash uninstall.sh [--prefix /opt/medserve] [--home /var/lib/medserve] [--purge --yes]
set -euo pipefail

PREFIX=/opt/medserve
HOME_DIR="${MEDSERVE_HOME:-/var/lib/medserve}"
SERVICE="${MEDSERVE_SERVICE_NAME:-medserve}"
UNIT="/etc/systemd/system/$SERVICE.service"
PURGE=0 YES=0
die() { printf 'medserve uninstall: %s\n' "$*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --home) HOME_DIR="$2"; shift 2 ;;
    --purge) PURGE=1; shift ;;
    --yes) YES=1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ -d "$PREFIX/releases" ]] || die "$PREFIX holds no medserve installation (no releases/)"
# Refuse before removing anything: a purge must be confirmed.
[[ $PURGE -eq 0 || $YES -eq 1 ]] || die "--purge deletes every case, key, audit record and model in $HOME_DIR; add --yes to confirm"

if [[ -f "$UNIT" ]]; then
  if [[ -d /run/systemd/system ]]; then
    systemctl disable --now "$SERVICE" || true
  fi
  rm -f "$UNIT"
  [[ -d /run/systemd/system ]] && systemctl daemon-reload || true
  echo "removed $UNIT"
fi
rm -rf "$PREFIX/releases" "$PREFIX/current" "$PREFIX/previous" "$PREFIX/.incoming"
rmdir "$PREFIX" 2>/dev/null || true
echo "removed the medserve programs in $PREFIX"

if [[ $PURGE -eq 1 ]]; then
  rm -rf "$HOME_DIR"
  echo "deleted the data in $HOME_DIR"
else
  echo "kept the data in $HOME_DIR (config, keys, cases, audit trail, models); --purge --yes deletes it"
fi
